//! Choosing the device, precision and CPU threads a worker uses.
//!
//! A worker's GPU, in order: an explicit `--device cuda:N`; else `LOCAL_RANK` (torchrun,
//! `launch`) or `SLURM_LOCALID` (srun), where a process that sees one GPU only (e.g.
//! `CUDA_VISIBLE_DEVICES` set per task) uses it whatever its local rank; else GPU 0.

use moxin_proto::v1::{runtime_spec, RuntimeSpec};
use tch::{Device, Kind};

use crate::WorkerError;

/// Where and in what precision this worker computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Device of parameters and activations.
    pub device: Device,
    /// Parameter / activation dtype (the optimizer always keeps fp32 state).
    pub kind: Kind,
}

impl Placement {
    /// The CUDA ordinal, if on a GPU.
    pub fn cuda_ordinal(&self) -> Option<usize> {
        match self.device {
            Device::Cuda(i) => Some(i),
            _ => None,
        }
    }
}

/// Whether libtorch can use CUDA on this machine.
pub fn cuda_available() -> bool {
    tch::Cuda::is_available()
}

/// CUDA devices this process sees.
pub fn cuda_device_count() -> usize {
    tch::Cuda::device_count().max(0) as usize
}

/// Parses `cpu`, `cuda` or `cuda:N` (the `--device` flag).
pub fn parse_device(text: &str) -> Result<Device, String> {
    match text {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => text
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("--device {text}: expected cpu, cuda or cuda:N")),
    }
}

/// The GPU ordinal this process uses among `visible` devices (see the module docs);
/// `env` reads environment variables.
pub fn gpu_ordinal(
    explicit: Option<usize>,
    env: &dyn Fn(&str) -> Option<String>,
    visible: usize,
) -> Result<usize, String> {
    if let Some(n) = explicit {
        return if n < visible {
            Ok(n)
        } else {
            Err(format!("--device cuda:{n}: this machine shows {visible} CUDA device(s)"))
        };
    }
    for var in ["LOCAL_RANK", "SLURM_LOCALID"] {
        if let Some(value) = env(var) {
            let local: usize =
                value.trim().parse().map_err(|_| format!("{var}={value}: expected a non-negative integer"))?;
            if visible == 1 {
                return Ok(0);
            }
            return if local < visible {
                Ok(local)
            } else {
                Err(format!(
                    "{var}={local} but this process sees {visible} CUDA device(s); start at most {visible} workers per \
                     machine, set CUDA_VISIBLE_DEVICES per worker, or pass --device cuda:N"
                ))
            };
        }
    }
    Ok(0)
}

/// Resolves `auto` choices against this machine, picks the GPU (`explicit` from
/// `--device`, else the environment) and applies the thread count.
pub fn place(runtime: &RuntimeSpec, explicit: Option<Device>) -> Result<Placement, WorkerError> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = match runtime.threads {
        0 => cores,
        n => n as usize,
    };
    static OVERSUBSCRIBED: std::sync::Once = std::sync::Once::new();
    if threads > cores {
        // Once per process: `place` runs again for every group the worker joins.
        OVERSUBSCRIBED.call_once(|| {
            tracing::warn!(
                threads,
                cores,
                "runtime.threads is more than this machine's available cores: the threads share them and \
             every step is slower; runtime.threads = 0 uses one per core"
            )
        });
    }
    let threads = i32::try_from(threads).map_err(|_| {
        WorkerError::Device(format!("runtime.threads = {threads} is too many; 0 = one per available core"))
    })?;
    tch::set_num_threads(threads);
    let want_cuda = match (explicit, runtime.device()) {
        (Some(Device::Cpu), _) => false,
        (Some(_), _) | (None, runtime_spec::Device::Cuda) => {
            if !tch::Cuda::is_available() {
                let fix = match explicit {
                    Some(_) => "pass --device cpu",
                    None => "set runtime.device = \"auto\" or \"cpu\"",
                };
                return Err(WorkerError::Device(format!(
                    "CUDA was asked for but libtorch sees no CUDA device on this machine; {fix} (`moxin-train \
                     doctor` says what it sees)"
                )));
            }
            true
        }
        (None, runtime_spec::Device::Cpu) => false,
        (None, runtime_spec::Device::Auto) => tch::Cuda::is_available(),
    };
    let device = if want_cuda {
        let explicit = match explicit {
            Some(Device::Cuda(n)) => Some(n),
            _ => None,
        };
        let visible = tch::Cuda::device_count().max(0) as usize;
        Device::Cuda(gpu_ordinal(explicit, &|k| std::env::var(k).ok(), visible).map_err(WorkerError::Device)?)
    } else {
        Device::Cpu
    };
    let kind = match (runtime.precision(), device) {
        (runtime_spec::Precision::Fp32, _) | (runtime_spec::Precision::Auto, Device::Cpu) => Kind::Float,
        _ => Kind::BFloat16,
    };
    Ok(Placement { device, kind })
}

/// Peak memory of this process on `device`: device memory in use on a GPU (total − free,
/// as nvidia-smi counts it, sampled now), peak resident set on the CPU.
pub fn memory_in_use(device: Device, ctx: Option<&crate::cuda::CudaContext>) -> u64 {
    match (device, ctx) {
        (Device::Cuda(_), Some(ctx)) => crate::cuda::memory_in_use(ctx).unwrap_or(0),
        _ => peak_rss_bytes().unwrap_or(0),
    }
}

/// `VmHWM` of this process in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Makes glibc keep large freed host blocks for reuse instead of unmapping them; returns
/// whether it took effect. Each training step frees and re-makes the same large host
/// buffers (activations, logits chunks, gradients on the CPU), and libtorch's CPU allocator
/// caches nothing: with glibc's defaults every block above its adaptive mmap threshold
/// (128 KiB to 32 MiB) is a fresh `mmap`, so every step pays page faults and page zeroing
/// for memory it has just given back (bench-small on the CPU: +13% tokens/s in bf16 with
/// this, see BENCHMARKS.md). The cost: freed memory stays with the process, whose resident
/// size stays at its peak until it exits. `MOXIN_MALLOC_TUNING=0` keeps glibc's defaults.
#[allow(unsafe_code)]
pub fn keep_freed_host_memory() -> bool {
    if std::env::var("MOXIN_MALLOC_TUNING").is_ok_and(|v| v == "0") {
        return false;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets glibc's allocation thresholds; it touches no memory of ours.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_from_flag_then_local_rank_then_slurm() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let none = env(&[]);
        assert_eq!(gpu_ordinal(None, &none, 8), Ok(0));
        assert_eq!(gpu_ordinal(Some(3), &env(&[("LOCAL_RANK", "5")]), 8), Ok(3));
        assert!(gpu_ordinal(Some(8), &none, 8).unwrap_err().contains("cuda:8"));
        assert_eq!(gpu_ordinal(None, &env(&[("LOCAL_RANK", "5"), ("SLURM_LOCALID", "2")]), 8), Ok(5));
        assert_eq!(gpu_ordinal(None, &env(&[("SLURM_LOCALID", "2")]), 8), Ok(2));
        // One visible GPU (CUDA_VISIBLE_DEVICES per task): it is ours whatever the local rank.
        assert_eq!(gpu_ordinal(None, &env(&[("SLURM_LOCALID", "6")]), 1), Ok(0));
        let e = gpu_ordinal(None, &env(&[("LOCAL_RANK", "4")]), 2).unwrap_err();
        assert!(e.contains("LOCAL_RANK=4") && e.contains("2 CUDA device"), "{e}");
        assert!(gpu_ordinal(None, &env(&[("LOCAL_RANK", "x")]), 2).unwrap_err().contains("LOCAL_RANK=x"));
        assert_eq!(parse_device("cuda:3"), Ok(Device::Cuda(3)));
        assert_eq!(parse_device("cpu"), Ok(Device::Cpu));
        assert!(parse_device("gpu").is_err());
    }
}
