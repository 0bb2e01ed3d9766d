//! `[runtime]`: where and how the worker computes (device, precision, kernels, the block
//! engine, recomputation). Part of [`super`], split out for size.

use serde::{Deserialize, Serialize};

/// Where computation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum Device {
    /// CUDA if the worker has a GPU, else CPU.
    Auto,
    Cpu,
    Cuda,
}

/// Number format of parameters and compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum Precision {
    /// bf16 on CUDA, fp32 on CPU.
    Auto,
    Fp32,
    /// bf16 parameters and compute with fp32 master weights and optimizer state.
    Bf16,
}

/// Activation recomputation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// `elementwise` where the blocks are hand-written (CUDA with the fused kernels), `none`
    /// elsewhere.
    Auto,
    /// Keep every activation backward needs.
    None,
    /// Keep each decoder block's input only and recompute the block in backward.
    Blocks,
    /// Hand-written blocks: recompute the RMSNorm and SwiGLU outputs in backward instead of
    /// keeping them (GEMM outputs are kept).
    Elementwise,
}

/// Number format gradients accumulate and reduce in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum GradReduce {
    Fp32,
    Bf16,
}

/// `[runtime]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSection {
    /// Device.
    pub device: Device,
    /// Precision.
    pub precision: Precision,
    /// libtorch intra-op threads; 0 = one per available core.
    pub threads: u32,
    /// Activation recomputation (`auto`, `none`, `elementwise` or `blocks`).
    pub recompute: Recompute,
    /// Gradient accumulation and reduction format (`fp32` or `bf16`).
    pub grad_reduce: GradReduce,
    /// Synchronise the device between phases so the step breakdown is exact.
    pub profile: bool,
    /// Dense bf16 peak of one device in TFLOP/s for MFU; 0 = from the GPU's name.
    pub peak_tflops: f64,
    /// `auto` (the fused kernels on CUDA, ATen elsewhere), `aten` (libtorch operations
    /// only) or `fused` (moxin-train's own CUDA kernels where they apply; CUDA only).
    pub kernels: KernelChoice,
    /// How decoder blocks are differentiated: `auto` (explicit where the fused kernels
    /// run), `autograd` or `explicit` (hand-written).
    pub block_backward: BlockBackward,
    /// One GPU with the fused AdamW: the update runs stage by stage on a CUDA stream of its
    /// own, beside the next forward (off: an H200 measured it 0.92–0.99× the default).
    pub optimizer_stream: bool,
    /// Hand-written blocks: q, k, v and gate, up as one GEMM each (inside the fused layouts)
    /// instead of one GEMM per fused projection, as models with separate projections run
    /// them (off: not yet measured on a GPU; `moxin-train bench kernels` times both ways).
    pub split_projections: bool,
    /// `aten` (libtorch's GEMMs) or `tuned` (CUDA: the step's GEMMs through cuBLASLt with
    /// each problem's algorithm chosen by timing; off until a GPU check shows it faster).
    pub gemm: GemmChoice,
}

/// `runtime.gemm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GemmChoice {
    /// libtorch's GEMMs: cuBLAS with the algorithm its heuristics pick.
    Aten,
    /// CUDA only: cuBLASLt, each distinct GEMM problem's algorithm chosen by timing its
    /// top candidates once (a resumed run may choose differently: equal within rounding).
    Tuned,
}

/// `runtime.block_backward`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockBackward {
    /// Explicit where the fused kernels are in use (CUDA), autograd elsewhere: with ATen's
    /// elementwise ops the hand-written block is slower than autograd's.
    Auto,
    /// Autograd records each block's forward and replays it backward.
    Autograd,
    /// Each block's forward and backward written out, with fused elementwise kernels where
    /// the fused kernels are in use (`trainer::block`).
    Explicit,
}

/// `runtime.kernels`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelChoice {
    /// Fused on CUDA, ATen elsewhere.
    Auto,
    /// libtorch operations only.
    Aten,
    /// Fused CUDA kernels compiled at run time (AdamW, cross-entropy).
    Fused,
}

impl Default for RuntimeSection {
    fn default() -> Self {
        RuntimeSection {
            device: Device::Auto,
            precision: Precision::Auto,
            threads: 0,
            recompute: Recompute::Auto,
            grad_reduce: GradReduce::Fp32,
            profile: false,
            peak_tflops: 0.0,
            kernels: KernelChoice::Auto,
            block_backward: BlockBackward::Auto,
            optimizer_stream: false,
            split_projections: false,
            gemm: GemmChoice::Aten,
        }
    }
}
