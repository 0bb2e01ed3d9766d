//! Loss of a checkpoint on prepared data.

use std::path::Path;

use moxin_data::TokenDataset;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::TOKENIZER_FILE;
use crate::trainer::objective::{head_loss, CrossEntropy};
use crate::trainer::Batch;
use crate::WorkerError;

/// Result of [`evaluate`].
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// The checkpoint evaluated.
    pub checkpoint: String,
    /// Its training step.
    pub step: u64,
    /// Mean next-token cross-entropy (nats per token).
    pub loss: f64,
    /// exp(loss).
    pub perplexity: f64,
    /// Tokens scored.
    pub tokens: u64,
    /// Batches run.
    pub batches: u64,
}

/// Scores up to `batches` batches of `batch_size` samples, taken in order from the start of
/// `data_dir`, at the checkpoint's sequence length (`checkpoint_dir`: a checkpoint, or a run
/// directory's newest).
pub fn evaluate(
    checkpoint_dir: &Path,
    data_dir: &Path,
    batches: u64,
    batch_size: u32,
) -> Result<EvalReport, WorkerError> {
    if batches == 0 || batch_size == 0 {
        return Err(WorkerError::Usage(format!(
            "--batches {batches} --batch-size {batch_size}: both must be at least 1 (a loss over no tokens means nothing)"
        )));
    }
    let ckpt = crate::hf::open_checkpoint(checkpoint_dir)?;
    let shape = ckpt.manifest.model.clone();
    // Token ids only mean the same thing under the same tokenizer.
    if moxin_data::sft::SftManifest::load(data_dir).is_ok_and(|m| m.is_some()) {
        return Err(WorkerError::Usage(format!(
            "--data {}: holds SFT conversations (`data prepare-sft`); `eval --data` scores pre-training token data \
             (`data prepare`). Score a fine-tuned model on prompts with answers with `eval --prompts FILE.jsonl`",
            data_dir.display()
        )));
    }
    let data_manifest = moxin_data::Manifest::load(data_dir)?;
    if let Some(trained) = ckpt.manifest.files.get(TOKENIZER_FILE) {
        if *trained != data_manifest.tokenizer.sha256 {
            return Err(WorkerError::Checkpoint {
                path: ckpt.dir.join(TOKENIZER_FILE),
                reason: format!(
                    "the checkpoint was trained with another tokenizer than {} was prepared with (sha256 {} vs {}); \
                     prepare the data with the checkpoint's tokenizer: `moxin-train data prepare --tokenizer {}`",
                    data_dir.display(),
                    trained,
                    data_manifest.tokenizer.sha256,
                    ckpt.dir.join(TOKENIZER_FILE).display()
                ),
            });
        }
    }
    let device = Device::cuda_if_available();
    let model = crate::checkpoint::load_model(&ckpt, Kind::Float, device)?;
    let seq_len = ckpt.manifest.seq_len;
    let data = TokenDataset::open(data_dir, seq_len, shape.vocab_size, true)?;
    let batch_size = batch_size as u64;
    let available = data.num_samples();
    let (mut loss_sum, mut tokens, mut run) = (0.0, 0u64, 0u64);
    let mut buf = vec![0i64; (seq_len + 1) as usize];
    let mut rows = Vec::new();
    tch::no_grad(|| {
        while run < batches && run * batch_size < available {
            let first = run * batch_size;
            let n = batch_size.min(available - first);
            rows.clear();
            for i in first..first + n {
                data.read_sample(i, &mut buf);
                rows.extend_from_slice(&buf);
            }
            let rows = Tensor::from_slice(&rows).view([n as i64, seq_len as i64 + 1]).to_device(device);
            let len = seq_len as i64;
            let batch = Batch {
                inputs: rows.narrow(1, 0, len),
                targets: rows.narrow(1, 1, len),
                weights: None,
                packing: None,
                rl: None,
            };
            let batch_tokens = n * seq_len as u64;
            let hidden = model.hidden(&batch.inputs, None);
            // Sum of token losses (scale 1); divided by all tokens at the end.
            let objective = CrossEntropy { scale: 1.0 };
            loss_sum += head_loss(&hidden, model.lm_head(), &batch, &objective).double_value(&[]);
            tokens += batch_tokens;
            run += 1;
        }
    });
    let loss = loss_sum / tokens.max(1) as f64;
    Ok(EvalReport {
        checkpoint: ckpt.dir.display().to_string(),
        step: ckpt.manifest.step,
        loss,
        perplexity: loss.exp(),
        tokens,
        batches: run,
    })
}

/// Logits (fp32, `[rows, len, vocab]`) of the model at `checkpoint` (a checkpoint or a run
/// directory's newest) for each row of `tokens`, computed in fp32 on the CPU: a fixed
/// reference to compare other implementations against (`moxin-train logits`).
pub fn logits(checkpoint: &Path, tokens: &[Vec<i64>]) -> Result<Tensor, WorkerError> {
    let ckpt = crate::hf::open_checkpoint(checkpoint)?;
    let shape = &ckpt.manifest.model;
    let len = tokens.first().map_or(0, Vec::len);
    let bad = |reason: String| WorkerError::Input { path: checkpoint.to_path_buf(), reason };
    if len == 0 || tokens.iter().any(|r| r.len() != len) {
        return Err(bad("the token rows must be non-empty and of one length".into()));
    }
    if len > shape.max_seq_len as usize {
        return Err(bad(format!("rows of {len} tokens exceed the model's max_seq_len {}", shape.max_seq_len)));
    }
    if let Some(t) = tokens.iter().flatten().find(|&&t| t < 0 || t >= shape.vocab_size as i64) {
        return Err(bad(format!("token id {t} is outside the vocabulary (0..{})", shape.vocab_size)));
    }
    let model = crate::checkpoint::load_model(&ckpt, Kind::Float, Device::Cpu)?;
    let flat: Vec<i64> = tokens.iter().flatten().copied().collect();
    let input = Tensor::from_slice(&flat).view([tokens.len() as i64, len as i64]);
    Ok(tch::no_grad(|| model.forward(&input, None)))
}

/// How [`accuracy`] continues each prompt.
#[derive(Debug, Clone)]
pub struct AccuracyOptions {
    /// Tokens generated at most per completion.
    pub max_new_tokens: usize,
    /// Completions per prompt (1 with temperature 0: the greedy answer).
    pub samples: usize,
    /// Sampling temperature; 0 = greedy.
    pub temperature: f64,
    /// Nucleus threshold when sampling.
    pub top_p: f64,
    /// Seed of the sampler.
    pub seed: u64,
    /// How many (prompt, completion) pairs to keep in the report, first prompts first.
    pub examples: usize,
}

impl AccuracyOptions {
    /// One greedy completion per prompt: the pipeline's held-out score.
    pub fn greedy(max_new_tokens: usize) -> Self {
        AccuracyOptions { max_new_tokens, samples: 1, temperature: 0.0, top_p: 1.0, seed: 0, examples: 0 }
    }
}

/// One scored completion kept in an [`AccuracyReport`].
#[derive(Debug, Clone, Serialize)]
pub struct ScoredCompletion {
    /// The prompt as written in the file.
    pub prompt: String,
    /// Its reference answer.
    pub answer: String,
    /// The model's completion (decoded, without the end-of-sequence token).
    pub completion: String,
    /// Whether the verifier accepted it.
    pub correct: bool,
}

/// Result of [`accuracy`].
#[derive(Debug, Clone, Serialize)]
pub struct AccuracyReport {
    /// The checkpoint scored.
    pub checkpoint: String,
    /// Its training step.
    pub step: u64,
    /// Prompts scored.
    pub prompts: u64,
    /// Completions per prompt.
    pub samples: u64,
    /// Fraction of all completions the verifier accepts (= greedy accuracy when samples is 1
    /// and temperature 0).
    pub accuracy: f64,
    /// Fraction of prompts with at least one accepted completion.
    pub pass_at_samples: f64,
    /// The first completions, for reading.
    pub examples: Vec<ScoredCompletion>,
}

/// Accuracy of the model at `checkpoint` (or a run directory's newest) on `prompts`
/// (`{"prompt": ..., "answer": ...}` lines): each prompt rendered as a user turn of the Moxin
/// chat template, continued (in batches; greedily or sampled, see [`AccuracyOptions`]) and
/// scored by the math-answer verifier. The pipeline's held-out score is
/// `AccuracyOptions::greedy`.
pub fn accuracy(checkpoint: &Path, prompts: &Path, opts: &AccuracyOptions) -> Result<AccuracyReport, WorkerError> {
    use crate::rl::reward::{MathAnswer, Reward};
    if opts.max_new_tokens == 0 {
        return Err(WorkerError::Usage(
            "--max-new-tokens 0: an answer needs at least one new token to be scored".into(),
        ));
    }
    if opts.samples == 0 || (opts.samples > 1 && opts.temperature <= 0.0) {
        return Err(WorkerError::Usage(format!(
            "--samples {} --temperature {}: take at least one sample, and more than one only when sampling \
             (temperature > 0; greedy completions are all the same)",
            opts.samples, opts.temperature
        )));
    }
    let ckpt = crate::hf::open_checkpoint(checkpoint)?;
    let tokenizer = moxin_data::load_tokenizer(&ckpt.dir.join(TOKENIZER_FILE))?;
    let model = crate::checkpoint::load_model(&ckpt, Kind::Float, Device::cuda_if_available())?;
    let template = moxin_data::sft::ChatTemplate::moxin();
    let limits = (ckpt.manifest.model.max_seq_len as usize, opts.max_new_tokens);
    let items = moxin_data::sft::encode_prompts(prompts, &template, &tokenizer, limits)?;
    let texts: Vec<String> = moxin_data::sft::read_prompts(prompts)?.into_iter().map(|(p, _)| p).collect();
    let mut sampling = crate::generate::SamplingOptions {
        temperature: opts.temperature,
        top_p: opts.top_p,
        max_new_tokens: opts.max_new_tokens,
        stop_token: Some(tokenizer.eos_id as i64),
        seed: opts.seed,
    };
    // Row i of the flattened work is sample i % samples of prompt i / samples.
    let rows: Vec<usize> = (0..items.len() * opts.samples).collect();
    let (mut correct, mut solved) = (0usize, vec![false; items.len()]);
    let mut examples = Vec::new();
    for (batch, chunk) in rows.chunks(64).enumerate() {
        let ids: Vec<Vec<i64>> = chunk.iter().map(|&r| items[r / opts.samples].0.clone()).collect();
        sampling.seed = opts.seed.wrapping_add(batch as u64);
        let out = crate::generate::generate(&model, &ids, &sampling).map_err(WorkerError::Usage)?;
        for (&r, completion) in chunk.iter().zip(out) {
            let prompt = r / opts.samples;
            let kept: Vec<u32> =
                completion.iter().filter(|&&t| t != tokenizer.eos_id as i64).map(|&t| t as u32).collect();
            let text = tokenizer.decode(&kept)?;
            let answer = &items[prompt].1;
            let ok = MathAnswer.score(&text, answer) > 0.0;
            correct += ok as usize;
            solved[prompt] |= ok;
            if examples.len() < opts.examples {
                let prompt = texts.get(prompt).cloned().unwrap_or_default();
                examples.push(ScoredCompletion { prompt, answer: answer.clone(), completion: text, correct: ok });
            }
        }
    }
    let n = items.len().max(1) as f64;
    Ok(AccuracyReport {
        checkpoint: ckpt.dir.display().to_string(),
        step: ckpt.manifest.step,
        prompts: items.len() as u64,
        samples: opts.samples as u64,
        accuracy: correct as f64 / (n * opts.samples as f64),
        pass_at_samples: solved.iter().filter(|&&s| s).count() as f64 / n,
        examples,
    })
}
