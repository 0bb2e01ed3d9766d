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

/// Continues each prompt and returns the new tokens of each, ending with the stop token
/// where one was produced. Prompts of different lengths are decoded together in one batch
/// (left-padded; each row has its own positions and never attends to padding). Prompt plus
/// continuation must fit in the model's `max_seq_len`.
pub fn generate(model: &Transformer, prompts: &[Vec<i64>], opts: &SamplingOptions) -> Result<Vec<Vec<i64>>, String> {
    Ok(sample_rows(model, prompts, opts, false)?.0)
}

/// As [`generate`], and for each row the sum over its new tokens of the sampling
/// distribution's entropy (nats; at the sampling temperature, at 1 when greedy).
pub fn generate_with_entropy(
    model: &Transformer,
    prompts: &[Vec<i64>],
    opts: &SamplingOptions,
) -> Result<(Vec<Vec<i64>>, Vec<f64>), String> {
    sample_rows(model, prompts, opts, true)
}

/// Entropy of each row of `softmax(logits / temperature)` `[batch]`, nats.
fn entropy(logits: &Tensor, temperature: f64) -> Vec<f64> {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let logp = (logits / t).log_softmax(-1, Kind::Float);
    let h = -(logp.exp() * &logp).sum_dim_intlist(-1, false, Kind::Double);
    Vec::<f64>::try_from(h.to_device(tch::Device::Cpu)).unwrap_or_default()
}

fn sample_rows(
    model: &Transformer,
    prompts: &[Vec<i64>],
    opts: &SamplingOptions,
    with_entropy: bool,
) -> Result<(Vec<Vec<i64>>, Vec<f64>), String> {
    let Some(len) = prompts.iter().map(Vec::len).max() else { return Ok((Vec::new(), Vec::new())) };
    if prompts.iter().any(Vec::is_empty) {
        return Err("prompts must be non-empty".into());
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
    if prompts.iter().any(|p| p.len() != len) {
        return Ok(generate_ragged(model, prompts, opts, with_entropy));
    }
    let device = model.device();
    let batch = prompts.len();
    let flat: Vec<i64> = prompts.iter().flatten().copied().collect();
    let mut input = Tensor::from_slice(&flat).view([batch as i64, len as i64]).to_device(device);
    let mut cache = KvCache::new();
    let mut rng = SplitMix64::new(opts.seed);
    let mut out = vec![Vec::new(); batch];
    let mut done = vec![false; batch];
    let mut entropies = vec![0.0; batch];
    tch::no_grad(|| {
        for _ in 0..opts.max_new_tokens {
            let logits = model.forward_last(&input, Some(&mut cache)).to_kind(Kind::Float);
            if with_entropy {
                add_entropy(&logits, opts.temperature, &done, &mut entropies);
            }
            let next = sample(&logits, opts, &mut rng);
            if record(&next, &mut out, &mut done, opts.stop_token) {
                break;
            }
            input = next.view([batch as i64, 1]);
        }
    });
    Ok((out, entropies))
}

/// Adds each unfinished row's entropy at this step.
fn add_entropy(logits: &Tensor, temperature: f64, done: &[bool], sums: &mut [f64]) {
    for ((sum, h), &d) in sums.iter_mut().zip(entropy(logits, temperature)).zip(done) {
        if !d {
            *sum += h;
        }
    }
}

/// Batched decoding of prompts of different lengths: left-padded to the longest, each row
/// at its own positions; a key is visible when it is real (not padding), not after the
/// query, and inside the sliding window. Every key is kept (the lengths fit max_seq_len).
fn generate_ragged(
    model: &Transformer,
    prompts: &[Vec<i64>],
    opts: &SamplingOptions,
    with_entropy: bool,
) -> (Vec<Vec<i64>>, Vec<f64>) {
    let device = model.device();
    let (batch, width) = (prompts.len() as i64, prompts.iter().map(Vec::len).max().unwrap_or(0) as i64);
    let window = model.shape.sliding_window as i64;
    let (mut tokens, mut positions, mut valid) = (Vec::new(), Vec::new(), Vec::new());
    for p in prompts {
        let pad = width as usize - p.len();
        tokens.extend(std::iter::repeat_n(0, pad).chain(p.iter().copied()));
        positions.extend(std::iter::repeat_n(0, pad).chain(0..p.len() as i64));
        valid.extend(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, p.len())));
    }
    let shape = [batch, width];
    let mut key_pos = Tensor::from_slice(&positions).view(shape).to_device(device);
    let mut key_valid = Tensor::from_slice(&valid).view(shape).to_device(device);
    let mut next_pos =
        Tensor::from_slice(&prompts.iter().map(|p| p.len() as i64).collect::<Vec<_>>()).to_device(device);
    // Keys a query at `q_pos` may see: real, not later, inside the window; and itself (so
    // a padding query has one key and stays finite).
    let visible = |q_pos: &Tensor, key_pos: &Tensor, key_valid: &Tensor, own: &Tensor| {
        let behind = q_pos.unsqueeze(2) - key_pos.unsqueeze(1);
        key_valid.unsqueeze(1).logical_and(&behind.ge(0)).logical_and(&behind.lt(window)).logical_or(own).unsqueeze(1)
    };
    let idx = Tensor::arange(width, (Kind::Int64, device));
    let causal = idx.unsqueeze(1).ge_tensor(&idx.unsqueeze(0));
    let own = idx.unsqueeze(1).eq_tensor(&idx.unsqueeze(0)).unsqueeze(0);
    let mut cache = KvCache::with_capacity(width + opts.max_new_tokens as i64);
    let mut rng = SplitMix64::new(opts.seed);
    let mut out = vec![Vec::new(); batch as usize];
    let mut done = vec![false; batch as usize];
    let mut entropies = vec![0.0; batch as usize];
    tch::no_grad(|| {
        let input = Tensor::from_slice(&tokens).view(shape).to_device(device);
        let mask = visible(&key_pos, &key_pos, &key_valid, &own).logical_and(&causal.unsqueeze(0).unsqueeze(0));
        let mut hidden = model.hidden_masked(&input, &key_pos, &mask, &mut cache);
        for _ in 0..opts.max_new_tokens {
            let last = hidden.select(1, hidden.size()[1] - 1);
            let logits = last.linear(model.lm_head(), None::<Tensor>).to_kind(Kind::Float);
            if with_entropy {
                add_entropy(&logits, opts.temperature, &done, &mut entropies);
            }
            let next = sample(&logits, opts, &mut rng);
            if record(&next, &mut out, &mut done, opts.stop_token) {
                break;
            }
            let q_pos = next_pos.view([batch, 1]);
            key_pos = Tensor::cat(&[&key_pos, &q_pos], 1);
            key_valid = Tensor::cat(&[key_valid, Tensor::ones([batch, 1], (Kind::Bool, device))], 1);
            let keys = key_pos.size()[1];
            let own = Tensor::arange(keys, (Kind::Int64, device)).eq(keys - 1).view([1, 1, keys]);
            let mask = visible(&q_pos, &key_pos, &key_valid, &own);
            hidden = model.hidden_masked(&next.view([batch, 1]), &q_pos, &mask, &mut cache);
            next_pos += 1;
        }
    });
    (out, entropies)
}

/// Appends each unfinished row's new token; true once every row has stopped.
fn record(next: &Tensor, out: &mut [Vec<i64>], done: &mut [bool], stop: Option<i64>) -> bool {
    let ids: Vec<i64> = Vec::<i64>::try_from(&next.to_device(tch::Device::Cpu)).expect("i64 ids");
    for (b, &id) in ids.iter().enumerate() {
        if !done[b] {
            out[b].push(id);
            done[b] = stop == Some(id);
        }
    }
    done.iter().all(|&d| d)
}

/// Draws one token per row of `logits` `[batch, vocab]`. The uniform draws come from our
/// own RNG, so sampling is reproducible from `opts.seed` on any device.
fn sample(logits: &Tensor, opts: &SamplingOptions, rng: &mut SplitMix64) -> Tensor {
    if opts.temperature == 0.0 {
        return logits.argmax(-1, false);
    }
    let probs = (logits / opts.temperature).softmax(-1, Kind::Float);
    let rows = logits.size()[0];
    let draws: Vec<f32> = (0..rows).map(|_| rng.next_f64() as f32).collect();
    let u = Tensor::from_slice(&draws).to_device(logits.device()).view([rows, 1]);
    if opts.top_p >= 1.0 {
        // Plain sampling needs no sort: invert the cumulative distribution in vocabulary order.
        let cumulative = probs.cumsum(-1, Kind::Float);
        let total = cumulative.select(-1, cumulative.size()[1] - 1).unsqueeze(-1);
        let position = (u * total).searchsorted(&cumulative, false, true, "right", None::<Tensor>);
        return position.clamp_max(cumulative.size()[1] - 1).squeeze_dim(-1);
    }
    let (sorted, indices) = probs.sort(-1, true);
    let cumulative = sorted.cumsum(-1, Kind::Float);
    // Keep a token if the mass before it is below top_p (so the top token always stays).
    let keep = (&cumulative - &sorted).lt(opts.top_p);
    let kept = sorted * keep.to_kind(Kind::Float);
    let cumulative = kept.cumsum(-1, Kind::Float);
    let total = cumulative.select(-1, cumulative.size()[1] - 1).unsqueeze(-1);
    let position = (u * total).searchsorted(&cumulative, false, true, "right", None::<Tensor>);
    let position = position.clamp_max(cumulative.size()[1] - 1);
    indices.gather(-1, &position, false).squeeze_dim(-1)
}

/// Loads a checkpoint (or a run directory's newest) and its tokenizer, and continues every
/// prompt (in one batch);
/// returns the new text of each.
pub fn generate_texts(
    checkpoint_dir: &std::path::Path,
    prompts: &[String],
    mut opts: SamplingOptions,
) -> Result<Vec<String>, crate::WorkerError> {
    let ckpt = crate::hf::open_checkpoint(checkpoint_dir)?;
    let tokenizer = moxin_data::load_tokenizer(&ckpt.dir.join(crate::checkpoint::TOKENIZER_FILE))?;
    let device = tch::Device::cuda_if_available();
    let model = crate::checkpoint::load_model(&ckpt, Kind::Float, device)?;
    let mut rows = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let mut ids: Vec<i64> = tokenizer.encode(prompt)?.into_iter().map(i64::from).collect();
        if let Some(bos) = tokenizer.bos_id.filter(|_| ids.is_empty()) {
            ids.push(bos as i64);
        }
        rows.push(ids);
    }
    opts.stop_token = opts.stop_token.or(Some(tokenizer.eos_id as i64));
    let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
    let context = model.shape.max_seq_len as usize;
    if longest >= context {
        return Err(crate::WorkerError::Usage(format!(
            "the prompt is {longest} tokens; this model's context is {context} tokens (max_seq_len), which leaves \
             no room for new ones: shorten the prompt"
        )));
    }
    if opts.max_new_tokens > context - longest {
        tracing::warn!(
            "--max-new-tokens {} capped to {}: the prompt's {longest} tokens leave that much of the model's \
             {context}-token context",
            opts.max_new_tokens,
            context - longest
        );
        opts.max_new_tokens = context - longest;
    }
    let out = generate(&model, &rows, &opts).map_err(crate::WorkerError::Usage)?;
    out.iter()
        .map(|new| {
            let kept: Vec<u32> = new.iter().filter(|&&t| t != tokenizer.eos_id as i64).map(|&t| t as u32).collect();
            Ok(tokenizer.decode(&kept)?)
        })
        .collect()
}
