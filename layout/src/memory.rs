//! The per-GPU memory plan of a training job (`moxin-train plan`): what moxin-train keeps
//! on each GPU for a model shape, world size, sequence length and micro-batch.
//!
//! * parameters: bf16 (2 B each), the whole model on every rank;
//! * gradients: the flat fp32 accumulation buffer (4 B; 2 B with `grad_reduce = "bf16"`);
//! * optimizer: fp32 master weights and the two Adam moments of this rank's ZeRO-1
//!   partition (12 B × parameters / GPUs);
//! * activations: what backward needs, per token per layer, counted from what the
//!   hand-written block (the GPU default, `trainer::block`) keeps in bf16: the block input,
//!   the q/k/v projection with q and k rotated in place, the attention output, the
//!   residual, the gate/up projection, and (unless `recompute = "elementwise"`, the
//!   default) both norm outputs and the SwiGLU output: `6·dim + 2·kv_dim + 3·ffn`
//!   elements, `4·dim + 2·kv_dim + 2·ffn` when those are recomputed. With
//!   `recompute = "blocks"` only each block's input (`dim`) is kept, and one block's full
//!   set exists at a time while it is recomputed;
//! * working memory: one block's activation gradients during backward (its weight
//!   gradients go straight into the gradient buffer), one
//!   chunk of logits in the head (256 MiB), the head's input gradient, the norm and
//!   SwiGLU outputs recomputed in backward, and the CUDA context and cuBLAS workspace
//!   (0.75 GiB).
//!
//! Calibrated against device memory in use measured on an H200 (BENCHMARKS.md): the plan is
//! within 4% of the gpu-1b and moxin-7b-shaped runs there (those runs predate the weight
//! gradients written in place; see the test).

use serde::Serialize;

use crate::flat::zero1_partition_len;
use crate::shape::ModelShape;

const GIB: f64 = (1u64 << 30) as f64;
/// CUDA context, cuBLAS workspace and allocator slack, measured.
const CONTEXT_BYTES: u64 = 768 << 20;
/// Bytes of one chunk of logits in the head: the worker's LM head projects this much of
/// the batch at a time (fp32 logits through ATen, bf16 with the fused kernels).
pub const HEAD_CHUNK_BYTES: u64 = 256 << 20;

/// What a job is, for planning.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanInput {
    /// GPUs (ranks) the job trains on.
    pub gpus: u32,
    /// Tokens per sample.
    pub seq_len: u32,
    /// Samples per forward/backward on one GPU.
    pub micro_batch: u32,
    /// What backward recomputes instead of keeping.
    pub recompute: Recompute,
    /// Gradients accumulate and reduce in bf16 instead of fp32.
    pub bf16_grads: bool,
}

/// What backward recomputes instead of keeping (`runtime.recompute`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Nothing: every activation backward needs is kept.
    None,
    /// The norm and SwiGLU outputs (one cheap pass each); GEMM outputs are kept.
    Elementwise,
    /// Whole blocks: only each block's input is kept.
    Blocks,
}

/// Bytes per GPU, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryPlan {
    /// Parameters (bf16, whole model).
    pub params: u64,
    /// Gradient accumulation buffer (whole model).
    pub grads: u64,
    /// fp32 master weights and Adam moments of this GPU's ZeRO-1 partition.
    pub optimizer: u64,
    /// Activations kept for backward.
    pub activations: u64,
    /// Transient working memory at the peak, including the CUDA context.
    pub working: u64,
    /// The sum: peak device memory in use.
    pub total: u64,
}

impl MemoryPlan {
    /// Whether it fits a GPU with `gib` GiB of memory.
    pub fn fits(&self, gib: f64) -> bool {
        (self.total as f64) <= gib * GIB
    }
}

/// The memory plan of training `shape` as `input` says, per GPU.
pub fn plan(shape: &ModelShape, input: &PlanInput) -> MemoryPlan {
    let p = shape.param_count();
    let partition = zero1_partition_len(p, input.gpus);
    let padded = partition * input.gpus.max(1) as u64;
    let (d, kv, f, layers) =
        (shape.dim as u64, (shape.n_kv_heads * shape.head_dim()) as u64, shape.ffn_dim as u64, shape.n_layers as u64);
    let tokens = input.micro_batch as u64 * input.seq_len as u64;
    let full = 6 * d + 2 * kv + 3 * f;
    let (activations, recomputed) = match input.recompute {
        Recompute::None => (2 * tokens * layers * full, 0),
        Recompute::Elementwise => (2 * tokens * layers * (4 * d + 2 * kv + 2 * f), 2 * tokens * (f + d)),
        Recompute::Blocks => (2 * tokens * (layers * d + full), 0),
    };
    let working = 2 * tokens * (2 * f + 2 * d)        // one block's activation gradients
        + HEAD_CHUNK_BYTES                            // a chunk of logits
        + 2 * tokens * d                              // the head's input gradient
        + recomputed                                  // norm / SwiGLU outputs recomputed
        + CONTEXT_BYTES;
    let params = 2 * padded;
    let grads = if input.bf16_grads { 2 } else { 4 } * padded;
    let optimizer = crate::checkpoint::OPTIMIZER_BYTES_PER_ELEMENT * partition;
    MemoryPlan {
        params,
        grads,
        optimizer,
        activations,
        working,
        total: params + grads + optimizer + activations + working,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::tests::moxin_7b;

    #[test]
    fn moxin_7b_on_8_gpus_by_hand() {
        let s = moxin_7b();
        let input =
            PlanInput { gpus: 8, seq_len: 4096, micro_batch: 1, recompute: Recompute::Blocks, bf16_grads: false };
        let m = plan(&s, &input);
        // 8,114,180,096 parameters split 8 ways: 1,014,272,512 each (already a multiple of 64).
        assert_eq!(m.params, 2 * 8_114_180_096);
        assert_eq!(m.grads, 4 * 8_114_180_096);
        assert_eq!(m.optimizer, 12 * 1_014_272_512);
        // Recompute: 36 block inputs of 4096 tokens × 4096 dims in bf16, plus one block's
        // full set: 6·4096 + 2·1024 + 3·14336 = 69,632 elements per token.
        assert_eq!(m.activations, 2 * 4096 * (36 * 4096 + 69_632));
        // Weight gradients go straight into the gradient buffer: no per-block copy.
        let working = 2 * 4096 * (2 * 14336 + 2 * 4096) + (256 << 20) + 2 * 4096 * 4096 + (768 << 20);
        assert_eq!(m.working, working);
        assert_eq!(m.total, m.params + m.grads + m.optimizer + m.activations + m.working);
        // Fits an 80 GB GPU, and so does recomputing only the elementwise outputs:
        // 4·4096 + 2·1024 + 2·14336 = 47,104 elements per token and layer (71.3 GiB).
        assert!(m.fits(79.6), "{:.1} GiB", m.total as f64 / GIB);
        let elementwise = plan(&s, &PlanInput { recompute: Recompute::Elementwise, ..input });
        assert_eq!(elementwise.activations, 2 * 4096 * 36 * 47_104);
        assert_eq!(elementwise.working, working + 2 * 4096 * (14336 + 4096));
        assert!(elementwise.fits(79.6), "{:.1} GiB", elementwise.total as f64 / GIB);
        let full = plan(&s, &PlanInput { recompute: Recompute::None, ..input });
        assert_eq!(full.activations, 2 * 4096 * 36 * 69_632);
        // Two samples per GPU need whole blocks recomputed.
        let two = PlanInput { micro_batch: 2, ..input };
        assert!(!plan(&s, &PlanInput { recompute: Recompute::Elementwise, ..two }).fits(79.6));
        assert!(plan(&s, &two).fits(79.6));
        // bf16 gradients halve the gradient buffer.
        assert_eq!(plan(&s, &PlanInput { bf16_grads: true, ..input }).grads, 2 * 8_114_180_096);
    }

    #[test]
    fn matches_the_measured_h200_runs() {
        // Device memory in use measured by scripts/gpu-check.sh on one H200 (BENCHMARKS.md).
        let gpu_1b = ModelShape {
            vocab_size: 32000,
            dim: 2048,
            n_layers: 16,
            n_heads: 16,
            n_kv_heads: 8,
            ffn_dim: 5632,
            ..moxin_7b()
        };
        // Hand-written blocks, 2026-11-27: keeping everything, and recomputing elementwise.
        // Measured before weight gradients went straight into the gradient buffer and the
        // bf16 head chunk doubled (one block's bf16 weight gradients less, 0.08 / 0.41 GiB;
        // 0.125 GiB more), not re-measured since: the plan is 0.5–3.3% below these.
        let four_layers = ModelShape { n_layers: 4, ..moxin_7b() };
        for (recompute, gpu_1b_gib, moxin_gib, tolerance) in
            [(Recompute::None, 31.8, 25.7, 0.04), (Recompute::Elementwise, 28.0, 24.2, 0.04)]
        {
            let input = PlanInput { gpus: 1, seq_len: 2048, micro_batch: 8, recompute, bf16_grads: false };
            let got = plan(&gpu_1b, &input).total as f64 / GIB;
            assert!((got / gpu_1b_gib - 1.0).abs() < tolerance, "gpu-1b {recompute:?}: {got:.2} GiB vs {gpu_1b_gib}");
            let input = PlanInput { seq_len: 4096, micro_batch: 2, ..input };
            let got = plan(&four_layers, &input).total as f64 / GIB;
            assert!(
                (got / moxin_gib - 1.0).abs() < tolerance,
                "moxin-7b-4l {recompute:?}: {got:.2} GiB vs {moxin_gib}"
            );
        }
    }
}
