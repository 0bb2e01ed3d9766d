// Shared by the build scripts of every crate whose binaries or tests link libtorch
// (included with `include!`, so there is one copy of this logic).
//
// Why: torch-sys links libtorch dynamically but its rpath does not reach our binaries,
// and the linker's `--as-needed` drops `libtorch_cuda.so` because no symbol of it is
// referenced directly, which makes CUDA silently unavailable at run time. We therefore
//  1. embed a RUNPATH to the libtorch the crate was built against, so binaries run with
//     no LD_LIBRARY_PATH (a RUNPATH, so LD_LIBRARY_PATH can still point elsewhere, e.g.
//     at a GPU machine's own libtorch), and
//  2. force `libtorch_cuda.so` into DT_NEEDED when the libtorch build has one.
fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-L{lib}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
