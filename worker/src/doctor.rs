//! `moxin-train doctor`: what this machine can run — libtorch, CUDA devices and their
//! memory, NCCL (where it was found and its version), and the device and collective
//! backend a worker started here would use.

use serde::Serialize;

use crate::cuda::{self, libraries, GpuInfo};

/// Where NCCL was found and which version it is.
#[derive(Debug, Clone, Serialize)]
pub struct NcclReport {
    /// The library file, or "loader search path".
    pub library: String,
    /// How it was found.
    pub source: String,
    /// Its version, if it loaded.
    pub version: Option<String>,
}

/// The CPU, as far as it decides CPU training speed.
#[derive(Debug, Clone, Serialize)]
pub struct CpuReport {
    /// `model name` from /proc/cpuinfo ("unknown" elsewhere).
    pub model: String,
    /// `vendor_id` (`AuthenticAMD`, `GenuineIntel`, ...).
    pub vendor: String,
    /// `cpu family` (AMD: 23 Zen 1/2, 25 Zen 3/4, 26 Zen 5).
    pub family: Option<u32>,
    /// Cores this process may use.
    pub cores: usize,
    /// Instruction sets the GEMM libraries pick kernels by.
    pub avx512: bool,
    /// bf16 dot products (fast bf16 training on the CPU).
    pub avx512_bf16: bool,
    /// Intel AMX tiles.
    pub amx: bool,
    /// What fp32 projections run on (see `model::linear`).
    pub fp32_linear: String,
}

/// What `doctor` found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// libtorch version (`2.11.0+cu130`).
    pub torch_version: Option<String>,
    /// Directory of the libtorch in use.
    pub torch_lib_dir: Option<String>,
    /// Whether libtorch can use CUDA here.
    pub cuda_available: bool,
    /// The GPUs, with memory.
    pub devices: Vec<GpuInfo>,
    /// NCCL, if found.
    pub nccl: Option<NcclReport>,
    /// The device a worker started here would train on (with `runtime.device = "auto"`).
    pub worker_device: String,
    /// The collective backend `cluster.collective = "auto"` gives a group of such workers.
    pub backend: String,
    /// The CPU.
    pub cpu: CpuReport,
    /// Problems and hints.
    pub notes: Vec<String>,
}

/// Looks at this machine. Never fails: what cannot be found is reported as missing.
pub fn report() -> Report {
    let torch_lib = libraries::torch_lib_dir();
    let mut notes = Vec::new();
    let cuda_available = tch::Cuda::is_available();
    let mut devices = Vec::new();
    let mut nccl = None;
    let mut worker_device = "cpu".to_string();
    if cuda_available {
        for i in 0..tch::Cuda::device_count().max(0) as usize {
            match cuda::gpu_info(i) {
                Ok(g) => devices.push(g),
                Err(e) => notes.push(format!("device {i}: {e}")),
            }
        }
        let visible = devices.len().max(1);
        match crate::device::gpu_ordinal(None, &|k| std::env::var(k).ok(), visible) {
            Ok(i) => worker_device = format!("cuda:{i}"),
            Err(e) => notes.push(e),
        }
        let override_path = std::env::var(libraries::NCCL_OVERRIDE_ENV).ok();
        let loaded = libraries::loaded_nccl().into_iter().next();
        let found = libraries::find_nccl(
            override_path.as_deref(),
            loaded.as_deref(),
            false,
            torch_lib.as_deref(),
            &libraries::system_dirs(),
        );
        let version = crate::collective::nccl::version();
        nccl = match (found, &version) {
            (Ok(Some(f)), _) => Some(NcclReport {
                library: f.path.display().to_string(),
                source: f.source.to_string(),
                version: version.as_ref().ok().cloned(),
            }),
            (Ok(None), Ok(v)) => Some(NcclReport {
                library: "loader search path".into(),
                source: "LD_LIBRARY_PATH / system".into(),
                version: Some(v.clone()),
            }),
            (Ok(None), Err(_)) => {
                notes.push(format!(
                    "NCCL not found: install the nvidia-nccl pip package beside torch, or set {}",
                    libraries::NCCL_OVERRIDE_ENV
                ));
                None
            }
            (Err(e), _) => {
                notes.push(e);
                None
            }
        };
        if let (Some(n), Err(e)) = (&nccl, &version) {
            notes.push(format!("NCCL at {} does not load: {e}", n.library));
        }
        let mapped = libraries::loaded_nccl();
        if mapped.len() > 1 {
            notes.push(format!("two NCCL libraries are loaded ({mapped:?}); NCCL collectives will fail"));
        }
        let cublaslt = libraries::mapped_libraries("libcublasLt.so");
        if cublaslt.len() > 1 {
            notes.push(format!(
                "two cuBLASLt libraries are loaded ({cublaslt:?}); runtime.gemm = \"tuned\" refuses to run"
            ));
        }
    } else {
        notes.push("CUDA is not available: no GPU or no CUDA driver; workers train on the CPU".into());
    }
    let nccl_works = nccl.as_ref().is_some_and(|n| n.version.is_some());
    let backend = if cuda_available && nccl_works {
        "nccl (one GPU per worker; workers sharing a GPU use the ring)".to_string()
    } else {
        "ring (CPU; CUDA tensors staged through host memory)".to_string()
    };
    let cpu = cpu_report(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default());
    Report {
        cpu,
        torch_version: torch_lib.as_deref().and_then(libraries::torch_version),
        torch_lib_dir: torch_lib.map(|d| d.display().to_string()),
        cuda_available,
        devices,
        nccl,
        worker_device,
        backend,
        notes,
    }
}

/// The CPU from the text of /proc/cpuinfo (its first processor).
fn cpu_report(cpuinfo: &str) -> CpuReport {
    let field = |key: &str| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
    };
    let flags = field("flags").unwrap_or_default();
    let has = |flag: &str| flags.split_whitespace().any(|f| f == flag);
    CpuReport {
        model: field("model name").unwrap_or_else(|| "unknown".into()),
        vendor: field("vendor_id").unwrap_or_else(|| "unknown".into()),
        family: field("cpu family").and_then(|f| f.parse().ok()),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        avx512: has("avx512f"),
        avx512_bf16: has("avx512_bf16"),
        amx: has("amx_tile"),
        fp32_linear: crate::model::cpu_linear_route(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_report_reads_the_first_processor() {
        let text = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel name\t: AMD EPYC\n\
                    flags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\nvendor_id\t: Other\n";
        let r = cpu_report(text);
        assert_eq!((r.vendor.as_str(), r.family, r.model.as_str()), ("AuthenticAMD", Some(26), "AMD EPYC"));
        assert!(r.avx512 && r.avx512_bf16 && !r.amx);
        let none = cpu_report("");
        assert_eq!((none.model.as_str(), none.family, none.avx512), ("unknown", None, false));
    }
}
