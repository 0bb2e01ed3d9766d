// Compiles proto/ with protox (pure Rust), so building needs no protoc installed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = ["proto/moxin/v1/job.proto", "proto/moxin/v1/coordinator.proto"];
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
