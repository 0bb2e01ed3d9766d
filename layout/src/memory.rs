//! The per-GPU memory plan of a training job (`moxin-train plan`): what moxin-train keeps
//! on each GPU for a model shape, world size, sequence length and micro-batch.
//!
//! * parameters: bf16 (2 B each), the whole model on every rank;
//! * gradients: the flat fp32 accumulation buffer (4 B; 2 B with `grad_reduce = "bf16"`);
//! * optimizer: fp32 master weights and the two Adam moments of this rank's ZeRO-1
//!   partition (12 B × parameters / GPUs);
//! * activations: what backward needs, per token per layer, counted from what the block's
//!   autograd graph saves in bf16: the block input, both norm outputs, the q/k/v projection
//!   (kept whole because attention keeps v, a view of it), rotated q and k, the attention
//!   output before and after the head merge, the residual, the gate/up projection, the SiLU
//!   output and its product with up: `8·dim + 3·kv_dim + 4·ffn` elements. With
//!   `recompute = "blocks"` only each block's input (`dim`) is kept, and one block's full
//!   set exists at a time while it is recomputed;
//! * working memory: one block's weight and activation gradients during backward, one
//!   chunk of logits in the head (2^26 elements), the head's input gradient, and the CUDA
//!   context and cuBLAS workspace (0.75 GiB).
//!
//! Calibrated against device memory in use measured on an H200 (BENCHMARKS.md): the plan is
//! within 2% of the gpu-1b and moxin-7b-shaped runs there.

use serde::Serialize;

use crate::flat::zero1_partitions;
use crate::shape::ModelShape;

const GIB: f64 = (1u64 << 30) as f64;
/// CUDA context, cuBLAS workspace and allocator slack, measured.
const CONTEXT_BYTES: u64 = 768 << 20;
/// Elements of one logits chunk in the head (see the worker's objective module).
const HEAD_CHUNK_ELEMENTS: u64 = 1 << 26;

/// What a job is, for planning.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanInput {
    /// GPUs (ranks) the job trains on.
    pub gpus: u32,
    /// Tokens per sample.
    pub seq_len: u32,
    /// Samples per forward/backward on one GPU.
    pub micro_batch: u32,
    /// Keep only block inputs and recompute blocks in backward.
    pub recompute: bool,
    /// Gradients accumulate and reduce in bf16 instead of fp32.
    pub bf16_grads: bool,
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
    let padded = zero1_partitions(p, input.gpus).last().map_or(p, |r| r.end);
    let partition = padded / input.gpus.max(1) as u64;
    let (d, kv, f, layers) =
        (shape.dim as u64, (shape.n_kv_heads * shape.head_dim()) as u64, shape.ffn_dim as u64, shape.n_layers as u64);
    let tokens = input.micro_batch as u64 * input.seq_len as u64;
    let per_token_layer = 8 * d + 3 * kv + 4 * f;
    let activations = if input.recompute {
        2 * tokens * (layers * d + per_token_layer)
    } else {
        2 * tokens * layers * per_token_layer
    };
    let layer_params = (p - 2 * shape.vocab_size as u64 * d - d).checked_div(layers).unwrap_or(0);
    let working = 2 * layer_params                    // one block's weight gradients (bf16)
        + 2 * tokens * (2 * f + 2 * d)                // its activation gradients
        + 2 * HEAD_CHUNK_ELEMENTS                     // a chunk of bf16 logits
        + 2 * tokens * d                              // the head's input gradient
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
        let input = PlanInput { gpus: 8, seq_len: 4096, micro_batch: 1, recompute: true, bf16_grads: false };
        let m = plan(&s, &input);
        // 8,114,180,096 parameters split 8 ways: 1,014,272,512 each (already a multiple of 64).
        assert_eq!(m.params, 2 * 8_114_180_096);
        assert_eq!(m.grads, 4 * 8_114_180_096);
        assert_eq!(m.optimizer, 12 * 1_014_272_512);
        // Recompute: 36 block inputs of 4096 tokens × 4096 dims in bf16, plus one block's
        // full set: 8·4096 + 3·1024 + 4·14336 = 93,184 elements per token.
        assert_eq!(m.activations, 2 * 4096 * (36 * 4096 + 93_184));
        // Per layer 218,112,000 parameters: (8,114,180,096 − 2·32000·4096 − 4096) / 36.
        let working =
            2 * 218_112_000 + 2 * 4096 * (2 * 14336 + 2 * 4096) + 2 * (1 << 26) + 2 * 4096 * 4096 + (768 << 20);
        assert_eq!(m.working, working);
        assert_eq!(m.total, m.params + m.grads + m.optimizer + m.activations + m.working);
        // About 64.2 GiB: fits an 80 GB GPU; without recomputation it does not.
        assert!(m.fits(79.6), "{:.1} GiB", m.total as f64 / GIB);
        let full = plan(&s, &PlanInput { recompute: false, ..input });
        assert_eq!(full.activations, 2 * 4096 * 36 * 93_184);
        assert!(!full.fits(79.6), "{:.1} GiB", full.total as f64 / GIB);
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
        let m =
            plan(&gpu_1b, &PlanInput { gpus: 1, seq_len: 2048, micro_batch: 8, recompute: false, bf16_grads: false });
        let measured = 36.2 * GIB;
        assert!((m.total as f64 / measured - 1.0).abs() < 0.03, "{:.2} GiB vs 36.2", m.total as f64 / GIB);
        let four_layers = ModelShape { n_layers: 4, ..moxin_7b() };
        let m = plan(
            &four_layers,
            &PlanInput { gpus: 1, seq_len: 4096, micro_batch: 2, recompute: false, bf16_grads: false },
        );
        let measured = 26.5 * GIB;
        assert!((m.total as f64 / measured - 1.0).abs() < 0.03, "{:.2} GiB vs 26.5", m.total as f64 / GIB);
    }
}
