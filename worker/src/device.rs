//! Choosing the device, precision and CPU threads a JobSpec asks for.

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

/// Resolves `auto` choices against this machine and applies the thread count.
pub fn place(runtime: &RuntimeSpec) -> Result<Placement, WorkerError> {
    let threads = match runtime.threads {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as i32,
        n => n as i32,
    };
    tch::set_num_threads(threads);
    let device = match runtime.device() {
        runtime_spec::Device::Cpu => Device::Cpu,
        runtime_spec::Device::Cuda => {
            if !tch::Cuda::is_available() {
                return Err(WorkerError::Device(
                    "runtime.device = cuda but libtorch sees no CUDA device on this machine; use device = \"auto\" or \"cpu\"".into(),
                ));
            }
            Device::Cuda(0)
        }
        runtime_spec::Device::Auto => Device::cuda_if_available(),
    };
    let kind = match (runtime.precision(), device) {
        (runtime_spec::Precision::Fp32, _) | (runtime_spec::Precision::Auto, Device::Cpu) => Kind::Float,
        _ => Kind::BFloat16,
    };
    Ok(Placement { device, kind })
}
