include!("../build/link_libtorch.rs");

fn main() {
    link_libtorch();
    pin_build();
}

/// The git commit this build comes from and whether the tree had uncommitted changes, for
/// checkpoint manifests (`MOXIN_GIT_COMMIT`, `MOXIN_GIT_DIRTY`; "unknown" outside git).
fn pin_build() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
        .map_or("unknown".into(), |s| (!s.is_empty()).to_string());
    println!("cargo:rustc-env=MOXIN_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=MOXIN_GIT_DIRTY={dirty}");
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        println!("cargo:rerun-if-changed={dir}/index");
    }
}
