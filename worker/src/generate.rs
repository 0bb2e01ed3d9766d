//! Sampling from the model with the KV cache: what GRPO rollouts and chat use.

use moxin_data::SplitMix64;
use tch::{Kind, Tensor};

use crate::model::{KvCache, Transformer};

/// How to sample.
#[derive(Debug, Clone)]
pub struct SamplingOptions {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f64,
    /// Tokens to generate at most, per sequence.
    pub max_new_tokens: usize,
    /// A sequence ends after producing this token.
    pub stop_token: Option<i64>,
    /// Seed of the sampling RNG.
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions { temperature: 1.0, top_p: 1.0, max_new_tokens: 64, stop_token: None, seed: 0 }
    }
}

/// Continues each prompt (all of the same length) and returns the new tokens of each,
/// ending with the stop token where one was produced. Prompt plus continuation must fit in
/// the model's `max_seq_len`.
pub fn generate(model: &Transformer, prompts: &[Vec<i64>], opts: &SamplingOptions) -> Result<Vec<Vec<i64>>, String> {
    let Some(len) = prompts.first().map(Vec::len) else { return Ok(Vec::new()) };
    if len == 0 || prompts.iter().any(|p| p.len() != len) {
        return Err("prompts must be non-empty and of equal length".into());
    }
    let max_total = model.shape.max_seq_len as usize;
    if len + opts.max_new_tokens > max_total {
        return Err(format!(
            "prompt of {len} tokens + {} new tokens exceeds max_seq_len {max_total}",
            opts.max_new_tokens
        ));
    }
    if !(opts.top_p > 0.0 && opts.top_p <= 1.0) {
        return Err(format!("--top-p {}: must be in (0, 1]", opts.top_p));
    }
    if !(opts.temperature.is_finite() && opts.temperature >= 0.0) {
        return Err(format!("--temperature {}: must be a finite number >= 0 (0 = greedy)", opts.temperature));
    }
    let device = model.device();
    let batch = prompts.len();
    let flat: Vec<i64> = prompts.iter().flatten().copied().collect();
    let mut input = Tensor::from_slice(&flat).view([batch as i64, len as i64]).to_device(device);
    let mut cache = KvCache::new();
    let mut rng = SplitMix64::new(opts.seed);
    let mut out = vec![Vec::new(); batch];
    let mut done = vec![false; batch];
    tch::no_grad(|| {
        for _ in 0..opts.max_new_tokens {
            let logits = model.forward_last(&input, Some(&mut cache)).to_kind(Kind::Float);
            let next = sample(&logits, opts, &mut rng);
            let ids: Vec<i64> = Vec::<i64>::try_from(&next.to_device(tch::Device::Cpu)).expect("i64 ids");
            for (b, &id) in ids.iter().enumerate() {
                if !done[b] {
                    out[b].push(id);
                    done[b] = opts.stop_token == Some(id);
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            input = next.view([batch as i64, 1]);
        }
    });
    Ok(out)
}

/// Draws one token per row of `logits` `[batch, vocab]`. The uniform draws come from our
/// own RNG, so sampling is reproducible from `opts.seed` on any device.
fn sample(logits: &Tensor, opts: &SamplingOptions, rng: &mut SplitMix64) -> Tensor {
    if opts.temperature == 0.0 {
        return logits.argmax(-1, false);
    }
    let probs = (logits / opts.temperature).softmax(-1, Kind::Float);
    let (sorted, indices) = probs.sort(-1, true);
    let cumulative = sorted.cumsum(-1, Kind::Float);
    // Keep a token if the mass before it is below top_p (so the top token always stays).
    let keep = (&cumulative - &sorted).lt(opts.top_p);
    let kept = sorted * keep.to_kind(Kind::Float);
    let cumulative = kept.cumsum(-1, Kind::Float);
    let total = cumulative.select(-1, cumulative.size()[1] - 1).unsqueeze(-1);
    let rows = logits.size()[0];
    let draws: Vec<f32> = (0..rows).map(|_| rng.next_f64() as f32).collect();
    let u = Tensor::from_slice(&draws).to_device(logits.device()).view([rows, 1]) * total;
    let position = u.searchsorted(&cumulative, false, true, "right", None::<Tensor>);
    let position = position.clamp_max(cumulative.size()[1] - 1);
    indices.gather(-1, &position, false).squeeze_dim(-1)
}

/// Loads a checkpoint and its tokenizer, and continues `prompt`; returns the new text.
pub fn generate_text(
    checkpoint_dir: &std::path::Path,
    prompt: &str,
    mut opts: SamplingOptions,
) -> Result<String, crate::WorkerError> {
    use crate::checkpoint::{Checkpoint, TOKENIZER_FILE};
    let ckpt = Checkpoint::open(checkpoint_dir)?;
    let tokenizer = moxin_data::load_tokenizer(&checkpoint_dir.join(TOKENIZER_FILE))?;
    let device = tch::Device::cuda_if_available();
    let model = crate::checkpoint::load_model(&ckpt, Kind::Float, device)?;
    let mut ids: Vec<i64> = tokenizer.encode(prompt)?.into_iter().map(i64::from).collect();
    if let Some(bos) = tokenizer.bos_id.filter(|_| ids.is_empty()) {
        ids.push(bos as i64);
    }
    opts.stop_token = opts.stop_token.or(Some(tokenizer.eos_id as i64));
    let room = (model.shape.max_seq_len as usize).saturating_sub(ids.len());
    opts.max_new_tokens = opts.max_new_tokens.min(room);
    let out = generate(&model, &[ids], &opts).map_err(crate::WorkerError::Spec)?;
    let new: Vec<u32> = out[0].iter().filter(|&&t| t != tokenizer.eos_id as i64).map(|&t| t as u32).collect();
    Ok(tokenizer.decode(&new)?)
}
