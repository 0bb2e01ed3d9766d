//! `[grpo]`: reinforcement learning with group-relative policy optimisation. The section
//! is the user's; [`resolve`] checks it against the job (a starting checkpoint with a
//! tokenizer, prompts that exist) and makes the [`GrpoSpec`] workers receive.

use std::path::{Path, PathBuf};

use moxin_proto::v1::GrpoSpec;
use serde::{Deserialize, Serialize};

use crate::ConfigError;

/// `[grpo]` (defaults: DeepSeekMath's GRPO with DeepScaleR's sampling).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoSection {
    /// JSONL of prompts with reference answers: `{"prompt": "...", "answer": "..."}`.
    pub prompts: String,
    /// Chat template the prompt is rendered with as one user turn: `moxin` or a JSON file.
    pub template: String,
    /// Completions per prompt (G).
    pub group_size: u32,
    /// Longest completion.
    pub max_new_tokens: u32,
    /// Sampling temperature.
    pub temperature: f64,
    /// Nucleus sampling threshold.
    pub top_p: f64,
    /// Clip range ε.
    pub epsilon: f64,
    /// Upper clip range (DAPO's clip-higher); defaults to `epsilon`.
    pub epsilon_high: Option<f64>,
    /// KL coefficient β to the starting checkpoint (0: no reference model is loaded).
    pub beta: f64,
    /// `seq-mean-token-mean` (GRPO), `token-mean` (DAPO) or `dr-grpo`.
    pub loss_aggregation: String,
    /// Divide advantages by the group's standard deviation (false: Dr. GRPO).
    pub std_normalization: bool,
    /// Truncated completions get no loss (DAPO's overlong filtering).
    pub mask_truncated: bool,
    /// Weight of the math-answer reward (1 when the final answer matches).
    pub math_weight: f64,
    /// Weight of the format reward (1 when a final answer is stated).
    pub format_weight: f64,
    /// Optimizer steps on each rollout batch (the prompts advance once they are done).
    pub updates_per_batch: u32,
    /// Dynamic sampling (DAPO): rounds of replacing prompts whose completions all scored
    /// the same with fresh ones (0 = off).
    pub dynamic_sampling_rounds: u32,
}

impl Default for GrpoSection {
    fn default() -> Self {
        GrpoSection {
            prompts: String::new(),
            template: "moxin".into(),
            group_size: 8,
            max_new_tokens: 256,
            temperature: 0.6,
            top_p: 1.0,
            epsilon: 0.2,
            epsilon_high: None,
            beta: 0.001,
            loss_aggregation: "seq-mean-token-mean".into(),
            std_normalization: true,
            mask_truncated: false,
            math_weight: 1.0,
            format_weight: 0.0,
            updates_per_batch: 1,
            dynamic_sampling_rounds: 0,
        }
    }
}

const AGGREGATIONS: [&str; 3] = ["seq-mean-token-mean", "token-mean", "dr-grpo"];

impl GrpoSection {
    /// Checks every value on its own (the prompts and checkpoint are checked in [`resolve`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, value: &dyn std::fmt::Display, message: &str| ConfigError::Invalid {
            field: format!("grpo.{field}"),
            value: value.to_string(),
            message: message.into(),
        };
        if self.prompts.is_empty() {
            return Err(bad("prompts", &"\"\"", "missing; a JSONL file of {\"prompt\", \"answer\"} lines"));
        }
        if self.group_size < 2 {
            return Err(bad("group_size", &self.group_size, "must be at least 2 (advantages compare a group)"));
        }
        if self.updates_per_batch == 0 {
            return Err(bad("updates_per_batch", &0, "must be at least 1"));
        }
        if self.max_new_tokens == 0 {
            return Err(bad("max_new_tokens", &0, "must be at least 1"));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(bad(
                "temperature",
                &self.temperature,
                "must be a positive number: a group's completions are sampled and compared (greedy ones are all \
                 the same, so every advantage would be 0)",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(bad("top_p", &self.top_p, "must be in (0, 1]"));
        }
        if !(self.epsilon > 0.0 && self.epsilon < 1.0) {
            return Err(bad("epsilon", &self.epsilon, "must be in (0, 1)"));
        }
        if let Some(high) = self.epsilon_high.filter(|h| !(*h > 0.0 && h.is_finite())) {
            return Err(bad("epsilon_high", &high, "must be positive"));
        }
        if !(self.beta >= 0.0 && self.beta.is_finite()) {
            return Err(bad("beta", &self.beta, "must be >= 0 (0 = no KL penalty, no reference model)"));
        }
        if !AGGREGATIONS.contains(&self.loss_aggregation.as_str()) {
            return Err(bad(
                "loss_aggregation",
                &self.loss_aggregation,
                "use seq-mean-token-mean, token-mean or dr-grpo",
            ));
        }
        if !(self.math_weight >= 0.0 && self.format_weight >= 0.0) || self.math_weight + self.format_weight == 0.0 {
            return Err(bad(
                "math_weight",
                &self.math_weight,
                "the reward weights must be >= 0 and not all 0 (math_weight, format_weight)",
            ));
        }
        Ok(())
    }
}

/// The spec of `section` for a job starting from the checkpoint `init_dir`; the prompts'
/// path made absolute.
pub fn resolve(section: &GrpoSection, init_dir: Option<&Path>) -> Result<(GrpoSpec, u64), ConfigError> {
    section.validate()?;
    let init_dir = init_dir.ok_or_else(|| ConfigError::Invalid {
        field: "model.init_from".into(),
        value: String::new(),
        message: "GRPO starts from a trained policy: set model.init_from to a checkpoint (an SFT run, say)".into(),
    })?;
    let tokenizer = init_dir.join(moxin_layout::checkpoint::TOKENIZER_FILE);
    if !tokenizer.exists() {
        return Err(ConfigError::Invalid {
            field: "model.init_from".into(),
            value: init_dir.display().to_string(),
            message: "has no tokenizer.json to encode the prompts with".into(),
        });
    }
    let prompts: PathBuf = std::fs::canonicalize(&section.prompts).map_err(|e| ConfigError::Invalid {
        field: "grpo.prompts".into(),
        value: section.prompts.clone(),
        message: e.to_string(),
    })?;
    let count = moxin_data::sft::read_prompts(&prompts)
        .map_err(|e| ConfigError::Invalid {
            field: "grpo.prompts".into(),
            value: section.prompts.clone(),
            message: e.to_string(),
        })?
        .len() as u64;
    let template = moxin_data::sft::ChatTemplate::load(&section.template)?;
    let spec = GrpoSpec {
        prompts: prompts.display().to_string(),
        prompts_sha256: moxin_data::sha256_hex(&prompts).map_err(|e| ConfigError::Invalid {
            field: "grpo.prompts".into(),
            value: prompts.display().to_string(),
            message: e.to_string(),
        })?,
        template_json: serde_json::to_string(&template).unwrap_or_default(),
        group_size: section.group_size,
        max_new_tokens: section.max_new_tokens,
        temperature: section.temperature,
        top_p: section.top_p,
        epsilon: section.epsilon,
        epsilon_high: section.epsilon_high.unwrap_or(section.epsilon),
        beta: section.beta,
        loss_aggregation: section.loss_aggregation.clone(),
        std_normalization: section.std_normalization,
        mask_truncated: section.mask_truncated,
        math_weight: section.math_weight,
        format_weight: section.format_weight,
        tokenizer: tokenizer.display().to_string(),
        updates_per_batch: section.updates_per_batch,
        dynamic_sampling_rounds: section.dynamic_sampling_rounds,
    };
    Ok((spec, count))
}
