//! CUDA through `cudarc`, loaded at run time: the driver (device facts, memory, events and
//! streams for NCCL), NCCL, NVRTC and cuBLASLt. Nothing here runs unless a CUDA device is in use, so
//! one binary serves CPU-only and GPU machines.
//!
//! libtorch and cudarc share the device's *primary* context, and torch launches its kernels
//! on the legacy default stream, so work cudarc orders against that stream (events, waits)
//! is ordered against torch's kernels.

pub mod gemm;
pub mod kernels;
pub mod libraries;
pub mod trace;

use std::sync::Arc;

pub use cudarc::driver::{CudaContext, CudaEvent, CudaStream};

use crate::WorkerError;

/// Whether the CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by its usual names.
    #[allow(unsafe_code)]
    unsafe {
        cudarc::driver::sys::is_culib_present()
    }
}

/// The primary context of device `ordinal` (the one libtorch uses).
pub fn context(ordinal: usize) -> Result<Arc<CudaContext>, WorkerError> {
    if !driver_present() {
        return Err(WorkerError::Device("the CUDA driver (libcuda) is not installed on this machine".into()));
    }
    CudaContext::new(ordinal).map_err(|e| WorkerError::Device(format!("CUDA device {ordinal}: {e:?}")))
}

/// What a GPU is.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GpuInfo {
    /// CUDA ordinal (within `CUDA_VISIBLE_DEVICES`).
    pub ordinal: usize,
    /// Marketing name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Total memory in bytes.
    pub memory_bytes: u64,
    /// Free memory in bytes when asked.
    pub free_bytes: u64,
    /// Compute capability `(major, minor)`.
    pub compute_capability: (i32, i32),
    /// Device UUID (hex): two workers with the same UUID share one GPU.
    pub uuid: String,
}

/// Facts about device `ordinal`.
pub fn gpu_info(ordinal: usize) -> Result<GpuInfo, WorkerError> {
    let ctx = context(ordinal)?;
    let err =
        |what: &str, e: cudarc::driver::DriverError| WorkerError::Device(format!("device {ordinal} {what}: {e:?}"));
    let (free, total) = ctx.mem_get_info().map_err(|e| err("memory", e))?;
    let uuid = ctx.uuid().map_err(|e| err("uuid", e))?;
    Ok(GpuInfo {
        ordinal,
        name: ctx.name().map_err(|e| err("name", e))?,
        memory_bytes: total as u64,
        free_bytes: free as u64,
        compute_capability: ctx.compute_capability().map_err(|e| err("compute capability", e))?,
        uuid: uuid.bytes.iter().map(|b| format!("{:02x}", *b as u8)).collect(),
    })
}

/// Device memory in use on the context's GPU (total − free), as `nvidia-smi` counts it:
/// everything the caching allocator holds plus the CUDA context itself.
pub fn memory_in_use(ctx: &CudaContext) -> Option<u64> {
    ctx.mem_get_info().ok().map(|(free, total)| (total - free) as u64)
}

/// Dense bf16 tensor-core peak of a GPU in FLOP/s, for MFU, by its name; `None` for an
/// unknown model (set `runtime.peak_tflops` then).
pub fn peak_bf16_flops(name: &str) -> Option<f64> {
    let name = name.to_ascii_uppercase();
    let tflops = [
        ("H200", 989.0),
        ("H100", 989.0),
        ("H800", 989.0),
        ("GH200", 989.0),
        ("B200", 2250.0),
        ("A100", 312.0),
        ("A800", 312.0),
        ("L40S", 362.0),
        ("A10G", 70.0),
        ("L4", 121.0),
    ]
    .into_iter()
    .find(|(model, _)| name.contains(model))?
    .1;
    Some(tflops * 1e12)
}

#[cfg(test)]
mod tests {
    #[test]
    fn peak_flops_by_name() {
        assert_eq!(super::peak_bf16_flops("NVIDIA H100 80GB HBM3"), Some(989e12));
        assert_eq!(super::peak_bf16_flops("NVIDIA H200"), Some(989e12));
        assert_eq!(super::peak_bf16_flops("NVIDIA A100-SXM4-80GB"), Some(312e12));
        assert_eq!(super::peak_bf16_flops("Some Future GPU"), None);
    }
}
