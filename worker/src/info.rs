//! Parameter counts and memory of a model shape, computed without allocating tensors.

use serde::Serialize;

use crate::model::ModelConfig;

/// Parameters of one class (embedding, attention, MLP, norms, LM head).
#[derive(Debug, Clone, Serialize)]
pub struct ParamClass {
    /// Class name.
    pub class: &'static str,
    /// Parameters.
    pub params: u64,
    /// Bytes in bf16.
    pub bytes_bf16: u64,
    /// Bytes in fp32.
    pub bytes_fp32: u64,
}

/// Parameter and memory summary of a model shape.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// Per class.
    pub classes: Vec<ParamClass>,
    /// All parameters.
    pub total_params: u64,
    /// Training memory per rank without activations for bf16 parameters and gradients with
    /// fp32 master weights and Adam moments fully replicated (16 bytes per parameter).
    pub train_bytes_unsharded: u64,
    /// The same with ZeRO-1 over 8 ranks: 4 + 12/8 bytes per parameter.
    pub train_bytes_zero1_8: u64,
}

/// Counts the parameters of `config` by class.
pub fn model_info(config: &ModelConfig) -> ModelInfo {
    let order = ["embedding", "attention", "mlp", "norm", "lm_head"];
    let mut counts = [0u64; 5];
    for d in config.param_decls() {
        let class = if d.name.contains("embed_tokens") {
            0
        } else if d.name.contains("self_attn") {
            1
        } else if d.name.contains(".mlp.") {
            2
        } else if d.name.contains("norm") {
            3
        } else {
            4
        };
        counts[class] += d.numel() as u64;
    }
    let classes = order
        .iter()
        .zip(counts)
        .map(|(class, params)| ParamClass { class, params, bytes_bf16: params * 2, bytes_fp32: params * 4 })
        .collect();
    let total: u64 = counts.iter().sum();
    ModelInfo {
        classes,
        total_params: total,
        train_bytes_unsharded: total * 16,
        train_bytes_zero1_8: total * 4 + total * 12 / 8,
    }
}
