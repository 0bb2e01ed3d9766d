//! Finding NCCL (and NVRTC, and the cuBLASLt libtorch loaded) without the user setting
//! anything.
//!
//! cudarc opens NCCL by the names `libnccl.so`, `libnccl.so.1`, … through the dynamic
//! loader's search path, but pip's NCCL (the one beside the torch that libtorch came from)
//! is `site-packages/nvidia/nccl/lib/libnccl.so.2`, in no search path, and NVRTC is in
//! `site-packages/nvidia/cu13/lib`. The loader reads `LD_LIBRARY_PATH` only when a process
//! starts, so [`plan`] works out a search path (a private directory holding a `libnccl.so`
//! link to the library found, plus those directories) and the binary restarts itself once
//! with it, before doing anything else. Where NCCL is found in order:
//!
//! 1. `MOXIN_NCCL_LIBRARY=/path/to/libnccl.so.2` (an error if that file does not exist);
//! 2. the NCCL this process already loaded (libtorch links it): one process must never
//!    hold two NCCL libraries, whose symbols would mix (seen on a GPU machine with a
//!    system NCCL 2.28.3 beside pip's 2.28.9: every communicator looked corrupted);
//! 3. beside the loaded libtorch: `<torch>/lib/../../nvidia/nccl/lib/libnccl.so.2`;
//! 4. the loader's own search path, if it already finds `libnccl.so` (nothing to do);
//! 5. system locations: `/usr/lib/x86_64-linux-gnu`, `/usr/lib64`, `/usr/local/cuda/lib64`.

use std::path::{Path, PathBuf};

/// Set in the restarted process so it never restarts again.
pub const RESTARTED_ENV: &str = "MOXIN_LIBRARY_PATH_SET";
/// Path of the NCCL library to use, overriding the search.
pub const NCCL_OVERRIDE_ENV: &str = "MOXIN_NCCL_LIBRARY";

/// Where a NCCL library was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The library file.
    pub path: PathBuf,
    /// How it was found: `MOXIN_NCCL_LIBRARY`, `torch` or `system`.
    pub source: &'static str,
}

/// The directory of the libtorch this process loaded (`…/torch/lib`), from `/proc/self/maps`.
pub fn torch_lib_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .and_then(|p| Path::new(p).parent().map(Path::to_path_buf))
}

/// The libtorch version of `torch_lib_dir` (from the package's `version.py`), e.g.
/// `2.11.0+cu130`.
pub fn torch_version(torch_lib_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(torch_lib_dir.parent()?.join("version.py")).ok()?;
    let line = text.lines().find(|l| l.starts_with("__version__"))?;
    Some(line.split(['\'', '"']).nth(1)?.to_string())
}

/// pip's NVIDIA library directories beside a torch `lib` directory.
fn pip_nvidia_dir(torch_lib_dir: &Path, sub: &str) -> PathBuf {
    torch_lib_dir.join("../../nvidia").join(sub).join("lib")
}

/// Finds a NCCL library in the order of the module docs. `loaded` is the NCCL this process
/// has already mapped, if any; `in_search_path` says whether the loader finds `libnccl.so`
/// by itself (then, with nothing loaded and nothing beside torch, `Ok(None)`).
pub fn find_nccl(
    override_path: Option<&str>,
    loaded: Option<&Path>,
    in_search_path: bool,
    torch_lib_dir: Option<&Path>,
    system_dirs: &[PathBuf],
) -> Result<Option<Found>, String> {
    if let Some(p) = override_path.filter(|p| !p.is_empty()) {
        let path = PathBuf::from(p);
        if !path.is_file() {
            return Err(format!("{NCCL_OVERRIDE_ENV}={p}: no such file; point it at a libnccl.so.2 or unset it"));
        }
        return Ok(Some(Found { path, source: NCCL_OVERRIDE_ENV }));
    }
    if let Some(path) = loaded {
        return Ok(Some(Found { path: path.to_path_buf(), source: "already loaded by libtorch" }));
    }
    let beside_torch = torch_lib_dir.map(|d| pip_nvidia_dir(d, "nccl").join("libnccl.so.2"));
    if let Some(path) = beside_torch.filter(|p| p.is_file()) {
        return Ok(Some(Found { path, source: "torch" }));
    }
    if in_search_path {
        return Ok(None);
    }
    Ok(system_dirs
        .iter()
        .map(|d| d.join("libnccl.so.2"))
        .find(|p| p.is_file())
        .map(|path| Found { path, source: "system" }))
}

/// The NCCL library files mapped into this process (normally none or one).
pub fn loaded_nccl() -> Vec<PathBuf> {
    mapped_libraries("libnccl.so")
}

/// The distinct library files whose name starts with `prefix` (e.g. `libcublasLt.so`)
/// mapped into this process, resolved through links.
pub fn mapped_libraries(prefix: &str) -> Vec<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut found: Vec<PathBuf> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| Path::new(p).file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix)))
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| PathBuf::from(p)))
        .collect();
    found.sort();
    found.dedup();
    found
}

/// System directories searched for `libnccl.so.2`.
pub fn system_dirs() -> Vec<PathBuf> {
    ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/local/cuda/lib64", "/usr/local/lib"]
        .into_iter()
        .map(PathBuf::from)
        .collect()
}

/// Makes a private directory under `root` holding the link `name` (e.g. `libnccl.so`) →
/// `target`; returns it.
pub fn link_dir(target: &Path, name: &str, root: &Path) -> std::io::Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    target.hash(&mut h);
    let dir = root.join(format!("{name}-{:016x}", h.finish()));
    std::fs::create_dir_all(&dir)?;
    let link = dir.join(name);
    if std::fs::read_link(&link).ok().as_deref() != Some(target) {
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp)?;
        std::fs::rename(&tmp, &link)?;
    }
    Ok(dir)
}

/// The `LD_LIBRARY_PATH` this process should restart with so that cudarc finds NCCL, NVRTC
/// and libtorch's cuBLASLt, or `None` when nothing needs to change (no CUDA driver, already restarted, or the
/// libraries are already found). An error names a bad override.
pub fn plan() -> Result<Option<String>, String> {
    if std::env::var_os(RESTARTED_ENV).is_some() || !super::driver_present() {
        return Ok(None);
    }
    let override_path = std::env::var(NCCL_OVERRIDE_ENV).ok();
    let torch = torch_lib_dir();
    let loaded = loaded_nccl().into_iter().next();
    let beside_torch = torch.as_deref().is_some_and(|d| pip_nvidia_dir(d, "nccl").join("libnccl.so.2").is_file());
    // Probe the loader only when nothing better is known: a probe loads whatever NCCL the
    // loader finds into this process.
    // SAFETY: only tries to dlopen NCCL by its usual names.
    #[allow(unsafe_code)]
    let in_search_path = override_path.is_none()
        && loaded.is_none()
        && !beside_torch
        && unsafe { cudarc::nccl::sys::is_culib_present() };
    let mut dirs: Vec<PathBuf> = Vec::new();
    let root = std::env::temp_dir().join(format!("moxin-train-libs-{}", user_id()));
    // cudarc opens cuBLASLt (`runtime.gemm = "tuned"`) as `libcublasLt.so` first: a link by
    // that name to the copy libtorch mapped makes the loader return that copy instead of a
    // CUDA toolkit's.
    if let Some(cublaslt) = mapped_libraries("libcublasLt.so").into_iter().next() {
        let linked = link_dir(&cublaslt, "libcublasLt.so", &root).map_err(|e| format!("{}: {e}", root.display()))?;
        dirs.push(linked);
    }
    if let Some(found) =
        find_nccl(override_path.as_deref(), loaded.as_deref(), in_search_path, torch.as_deref(), &system_dirs())?
    {
        let linked = link_dir(&found.path, "libnccl.so", &root).map_err(|e| format!("{}: {e}", root.display()))?;
        dirs.push(linked);
        dirs.extend(found.path.parent().map(Path::to_path_buf));
    }
    if let Some(nvrtc) = torch.as_deref().map(|d| pip_nvidia_dir(d, "cu13")).filter(|d| d.is_dir()) {
        dirs.push(nvrtc);
    }
    if dirs.is_empty() {
        return Ok(None);
    }
    let mut path: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    if let Ok(existing) = std::env::var("LD_LIBRARY_PATH") {
        path.extend(existing.split(':').filter(|s| !s.is_empty()).map(str::to_string));
    }
    Ok(Some(path.join(":")))
}

fn user_id() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_is_found_by_override_then_torch_then_system() {
        let tmp = tempfile::tempdir().unwrap();
        let torch_lib = tmp.path().join("site-packages/torch/lib");
        let pip_nccl = tmp.path().join("site-packages/nvidia/nccl/lib");
        let system = tmp.path().join("usr/lib");
        for d in [&torch_lib, &pip_nccl, &system] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(system.join("libnccl.so.2"), b"").unwrap();
        let sys_dirs = vec![system.clone()];

        // Nothing beside torch: the system copy.
        let f = find_nccl(None, None, false, Some(&torch_lib), &sys_dirs).unwrap().unwrap();
        assert_eq!((f.source, f.path.clone()), ("system", system.join("libnccl.so.2")));
        // The loader finds one by itself and nothing is beside torch: nothing to do.
        assert_eq!(find_nccl(None, None, true, Some(&torch_lib), &sys_dirs).unwrap(), None);
        // pip's copy beside torch wins over the system's and over the search path (which
        // could hold a different NCCL than the one libtorch loads).
        std::fs::write(pip_nccl.join("libnccl.so.2"), b"").unwrap();
        for in_search_path in [false, true] {
            let f = find_nccl(None, None, in_search_path, Some(&torch_lib), &sys_dirs).unwrap().unwrap();
            assert_eq!(f.source, "torch");
            assert_eq!(f.path.canonicalize().unwrap(), pip_nccl.join("libnccl.so.2").canonicalize().unwrap());
        }
        // The NCCL already in the process wins over every file on disk.
        let loaded = tmp.path().join("loaded/libnccl.so.2");
        let f = find_nccl(None, Some(&loaded), true, Some(&torch_lib), &sys_dirs).unwrap().unwrap();
        assert_eq!((f.source, f.path), ("already loaded by libtorch", loaded.clone()));
        // The override wins over everything; a bad one is an error naming the variable.
        let custom = tmp.path().join("custom.so");
        std::fs::write(&custom, b"").unwrap();
        let f = find_nccl(custom.to_str(), Some(&loaded), true, Some(&torch_lib), &sys_dirs).unwrap().unwrap();
        assert_eq!((f.source, f.path), (NCCL_OVERRIDE_ENV, custom));
        let e = find_nccl(Some("/nope/libnccl.so.2"), None, false, None, &sys_dirs).unwrap_err();
        assert!(e.contains(NCCL_OVERRIDE_ENV) && e.contains("/nope/libnccl.so.2"), "{e}");
        // Nowhere at all.
        assert_eq!(find_nccl(None, None, false, None, &[]).unwrap(), None);

        // The private directory links libnccl.so to the library, idempotently.
        let root = tmp.path().join("links");
        let dir = link_dir(&system.join("libnccl.so.2"), "libnccl.so", &root).unwrap();
        assert_eq!(std::fs::read_link(dir.join("libnccl.so")).unwrap(), system.join("libnccl.so.2"));
        assert_eq!(link_dir(&system.join("libnccl.so.2"), "libnccl.so", &root).unwrap(), dir);
    }

    #[test]
    fn torch_of_this_process_is_found() {
        // Tests link libtorch, so the running process has it mapped.
        let _ = tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu));
        let dir = torch_lib_dir().expect("libtorch is mapped");
        assert!(dir.join("libtorch_cpu.so").is_file());
        assert!(torch_version(&dir).unwrap().starts_with("2.11.0"), "{:?}", torch_version(&dir));
        // libtorch links pip's NCCL, so exactly that one is mapped.
        let loaded = loaded_nccl();
        assert!(loaded.len() <= 1, "{loaded:?}");
        // And one cuBLASLt at most (pip's CUDA build maps libcublasLt.so.13).
        let cublaslt = mapped_libraries("libcublasLt.so");
        assert!(cublaslt.len() <= 1, "{cublaslt:?}");
    }
}
