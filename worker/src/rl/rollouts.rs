//! GRPO's batch source: each step this rank takes its prompts of the global batch,
//! samples `group_size` completions of each with the current policy (batched, KV-cached),
//! scores them, turns the rewards into group-relative advantages, and serves micro-batches
//! of prompt + completion sequences whose completion tokens carry the aggregation's loss
//! weight, the advantage and (β > 0) the reference model's log-probs.

use std::ops::Range;
use std::path::PathBuf;
use std::time::Instant;

use moxin_data::sft::ChatTemplate;
use moxin_data::{SampleOrder, TextTokenizer};
use moxin_proto::v1::{GrpoSpec, JobSpec};
use tch::{Device, Kind, Tensor};

use super::grpo::{advantages, token_weight, Aggregation, RlTerms};
use super::reward::{Format, MathAnswer, Reward, Weighted};
use crate::checkpoint::CarriedFile;
use crate::collective::{all_sum, Collective};
use crate::generate::{generate_with_entropy, SamplingOptions};
use crate::model::Transformer;
use crate::trainer::batch::{template_file, Batch, BatchSource};
use crate::trainer::objective::target_log_probs;
use crate::WorkerError;

/// What a rollout batch looked like, over all ranks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RolloutStats {
    /// Mean reward.
    pub reward_mean: f64,
    /// Standard deviation of the rewards.
    pub reward_std: f64,
    /// Prompts whose completions all scored the same (no signal).
    pub zero_std_fraction: f64,
    /// Mean completion length (tokens, EOS included).
    pub len_mean: f64,
    /// Longest completion.
    pub len_max: u32,
    /// Completions cut at `max_new_tokens`.
    pub truncation_ratio: f64,
    /// Mean entropy of the sampling distribution per completion token (nats).
    pub entropy: f64,
    /// Seconds spent generating and scoring.
    pub seconds: f64,
}

struct Prompt {
    tokens: Vec<i64>,
    answer: String,
}

/// Rollouts of the prompts in a [`GrpoSpec`].
pub struct Rollouts {
    spec: GrpoSpec,
    prompts: Vec<Prompt>,
    order: SampleOrder,
    /// Where dynamic sampling draws replacement prompts from (its own seeded order).
    refill: SampleOrder,
    slice: Range<u32>,
    micro: usize,
    global_batch: u32,
    tokenizer: TextTokenizer,
    tokenizer_path: PathBuf,
    /// The chat template the prompts are rendered with (checkpoints carry it).
    template: ChatTemplate,
    reward: Weighted,
    aggregation: Aggregation,
    reference: Option<Transformer>,
    seed: u64,
    rank: u64,
    /// The rollout batch's micro-batches, served to each of its updates.
    ready: Vec<Batch>,
    /// Tokens (prompt + completion) of the step over all ranks.
    step_tokens: u64,
    /// The cursor the rollouts in `ready` were made at, the updates made on them, and
    /// their statistics.
    made_at: Option<u64>,
    updates_done: u32,
    stats: RolloutStats,
}

impl Rollouts {
    /// The prompts of `spec.grpo`, encoded with its tokenizer; this rank takes `slice` of
    /// each global batch of `global_batch` prompts, `micro` prompts per micro-batch. The
    /// reference model (β > 0) is the job's starting checkpoint, as `kind` on `device`.
    pub fn new(
        spec: &JobSpec,
        slice: Range<u32>,
        micro: u32,
        global_batch: u32,
        rank: usize,
        (kind, device): (Kind, Device),
    ) -> Result<Self, WorkerError> {
        let grpo = spec.grpo.clone().ok_or_else(|| WorkerError::Spec("missing grpo".into()))?;
        let model = spec.model.as_ref().ok_or_else(|| WorkerError::Spec("missing model".into()))?;
        crate::trainer::batch::check_slice(&slice, micro, global_batch)?;
        let tokenizer_path = PathBuf::from(&grpo.tokenizer);
        let tokenizer = moxin_data::load_tokenizer(&tokenizer_path)?;
        let template: ChatTemplate =
            serde_json::from_str(&grpo.template_json).map_err(|e| WorkerError::Spec(format!("grpo template: {e}")))?;
        let path = PathBuf::from(&grpo.prompts);
        if moxin_data::sha256_hex(&path).map_err(|e| WorkerError::io(&path, e))? != grpo.prompts_sha256 {
            return Err(WorkerError::Spec(format!("{}: changed since the coordinator validated it", path.display())));
        }
        let limits = (model.max_seq_len as usize, grpo.max_new_tokens as usize);
        let prompts: Vec<Prompt> = moxin_data::sft::encode_prompts(&path, &template, &tokenizer, limits)?
            .into_iter()
            .map(|(tokens, answer)| Prompt { tokens, answer })
            .collect();
        let mut rewards: Vec<(f64, Box<dyn Reward>)> = Vec::new();
        if grpo.math_weight > 0.0 {
            rewards.push((grpo.math_weight, Box::new(MathAnswer)));
        }
        if grpo.format_weight > 0.0 {
            rewards.push((grpo.format_weight, Box::new(Format)));
        }
        let aggregation = match grpo.loss_aggregation.as_str() {
            "token-mean" => Aggregation::TokenMean,
            "dr-grpo" => Aggregation::DrGrpo,
            _ => Aggregation::SeqMeanTokenMean,
        };
        let reference = if grpo.beta > 0.0 {
            let dir = std::path::Path::new(&model.init_from);
            let ckpt = crate::checkpoint::Checkpoint::open(dir)?;
            Some(crate::checkpoint::load_model(&ckpt, kind, device)?)
        } else {
            None
        };
        Ok(Rollouts {
            order: SampleOrder::new(prompts.len().max(1) as u64, spec.seed),
            refill: SampleOrder::new(prompts.len().max(1) as u64, spec.seed ^ 0x5eed_f00d),
            prompts,
            slice,
            micro: micro as usize,
            global_batch,
            tokenizer,
            tokenizer_path,
            template,
            reward: Weighted(rewards),
            aggregation,
            reference,
            seed: spec.seed,
            rank: rank as u64,
            ready: Vec::new(),
            step_tokens: 0,
            made_at: None,
            updates_done: 0,
            stats: RolloutStats::default(),
            spec: grpo,
        })
    }

    /// The largest of every rank's `value`.
    fn all_max(collective: &mut dyn Collective, value: f64, device: Device) -> Result<f64, WorkerError> {
        let (rank, world) = (collective.rank(), collective.world_size());
        let mut v = vec![0f32; world];
        v[rank] = value as f32;
        let t = Tensor::from_slice(&v).to_device(device);
        let ranges: Vec<Range<usize>> = (0..world).map(|r| r..r + 1).collect();
        collective
            .all_gather(&t, &ranges)
            .and_then(|w| w.wait())
            .map_err(|e| WorkerError::Collective(e.to_string()))?;
        let all = Vec::<f32>::try_from(t.to_device(Device::Cpu)).map_err(WorkerError::Torch)?;
        Ok(all.into_iter().fold(0f32, f32::max) as f64)
    }
}

/// Completions, their rewards, and each one's summed sampling entropy.
type Sampled = (Vec<Vec<i64>>, Vec<f64>, Vec<f64>);

impl Rollouts {
    /// `group_size` completions of each of `prompts` (indices), sampled one micro-batch of
    /// prompts at a time (a batch's KV cache grows with its rows), with their rewards and
    /// each completion's summed sampling entropy.
    fn sample_groups(&self, model: &Transformer, prompts: &[usize], seed: u64) -> Result<Sampled, WorkerError> {
        let group = self.spec.group_size as usize;
        let eos = self.tokenizer.eos_id as i64;
        let rows: Vec<Vec<i64>> =
            prompts.iter().flat_map(|&p| std::iter::repeat_n(self.prompts[p].tokens.clone(), group)).collect();
        let (mut completions, mut entropies) = (Vec::with_capacity(rows.len()), Vec::with_capacity(rows.len()));
        for (i, chunk) in rows.chunks(self.micro * group).enumerate() {
            let opts = SamplingOptions {
                temperature: self.spec.temperature,
                top_p: self.spec.top_p,
                max_new_tokens: self.spec.max_new_tokens as usize,
                stop_token: Some(eos),
                seed: seed.wrapping_add(i as u64).rotate_left(7),
            };
            let (made, e) = generate_with_entropy(model, chunk, &opts).map_err(WorkerError::Spec)?;
            completions.extend(made);
            entropies.extend(e);
        }
        let mut rewards = Vec::with_capacity(completions.len());
        for (i, c) in completions.iter().enumerate() {
            let kept: Vec<u32> = c.iter().filter(|&&t| t != eos).map(|&t| t as u32).collect();
            let text = self.tokenizer.decode(&kept)?;
            rewards.push(self.reward.score(&text, &self.prompts[prompts[i / group]].answer));
        }
        Ok((completions, rewards, entropies))
    }
}

impl BatchSource for Rollouts {
    fn micro_batches(&self) -> usize {
        self.slice.len() / self.micro
    }

    fn micro_batch(&mut self, _cursor: u64, index: usize, _device: Device) -> Result<Batch, WorkerError> {
        let b = self
            .ready
            .get(index)
            .ok_or_else(|| WorkerError::Spec(format!("rollout micro-batch {index} requested before the rollouts")))?;
        let rl = b.rl.as_ref().map(|rl| RlTerms {
            advantages: rl.advantages.shallow_clone(),
            // The first update is made by the policy that generated: ratio 1 exactly.
            old_logp: rl.old_logp.as_ref().filter(|_| self.updates_done > 1).map(Tensor::shallow_clone),
            ref_logp: rl.ref_logp.as_ref().map(Tensor::shallow_clone),
        });
        Ok(Batch {
            inputs: b.inputs.shallow_clone(),
            targets: b.targets.shallow_clone(),
            weights: b.weights.as_ref().map(Tensor::shallow_clone),
            packing: None,
            rl,
        })
    }

    fn samples_per_step(&self) -> u64 {
        // The prompts advance once their rollouts had all their updates.
        if self.updates_done >= self.spec.updates_per_batch.max(1) {
            self.global_batch as u64
        } else {
            0
        }
    }

    fn tokens_per_step(&self) -> u64 {
        self.step_tokens
    }

    fn loss_tokens(&self, _cursor: u64) -> f64 {
        // The token weights carry the aggregation's normalisation.
        1.0
    }

    fn samples_per_epoch(&self) -> u64 {
        self.prompts.len() as u64
    }

    fn checkpoint_files(&self) -> Vec<(String, CarriedFile)> {
        vec![
            (crate::checkpoint::TOKENIZER_FILE.into(), CarriedFile::Copy(self.tokenizer_path.clone())),
            (crate::checkpoint::CHAT_TEMPLATE_FILE.into(), CarriedFile::Contents(template_file(&self.template))),
        ]
    }

    fn begin_step(
        &mut self,
        cursor: u64,
        model: &Transformer,
        collective: &mut dyn Collective,
    ) -> Result<Option<RolloutStats>, WorkerError> {
        let updates = self.spec.updates_per_batch.max(1);
        if self.made_at == Some(cursor) && self.updates_done < updates {
            // Another update on the same rollouts: no generation.
            self.updates_done += 1;
            return Ok(Some(RolloutStats { seconds: 0.0, ..self.stats }));
        }
        let started = Instant::now();
        let device = model.device();
        let group = self.spec.group_size as usize;
        let eos = self.tokenizer.eos_id as i64;
        let mut mine: Vec<usize> =
            self.slice.clone().map(|j| self.order.sample_at(cursor + j as u64) as usize).collect();
        // Each (step, rank) samples from its own stream, so resumed runs draw the same.
        let seed =
            moxin_data::SplitMix64::new(self.seed ^ cursor.rotate_left(17) ^ self.rank.rotate_left(40)).next_u64();
        let (mut completions, mut rewards, mut entropies) = self.sample_groups(model, &mine, seed)?;
        // Dynamic sampling (DAPO): a prompt whose completions all scored the same teaches
        // nothing; draw another in its place, for up to `dynamic_sampling_rounds` rounds.
        let rounds = self.spec.dynamic_sampling_rounds as u64;
        for round in 1..=rounds {
            let flat: Vec<usize> = (0..mine.len())
                .filter(|&j| rewards[j * group..(j + 1) * group].iter().all(|r| *r == rewards[j * group]))
                .collect();
            if flat.is_empty() {
                break;
            }
            let refill: Vec<usize> = flat
                .iter()
                .map(|&j| {
                    let position = (cursor + self.slice.start as u64 + j as u64) * (rounds + 1) + round;
                    self.refill.sample_at(position) as usize
                })
                .collect();
            let (c, r, e) = self.sample_groups(model, &refill, seed ^ round.rotate_left(50))?;
            for (k, &j) in flat.iter().enumerate() {
                mine[j] = refill[k];
                for g in 0..group {
                    completions[j * group + g] = c[k * group + g].clone();
                    rewards[j * group + g] = r[k * group + g];
                    entropies[j * group + g] = e[k * group + g];
                }
            }
        }
        let entropy_sum: f64 = entropies.iter().sum();
        let rows: Vec<Vec<i64>> =
            mine.iter().flat_map(|&p| std::iter::repeat_n(self.prompts[p].tokens.clone(), group)).collect();
        let adv = advantages(&rewards, group, self.spec.std_normalization);
        let truncated: Vec<bool> = completions.iter().map(|c| c.last() != Some(&eos)).collect();
        let masked = |i: usize| self.spec.mask_truncated && truncated[i];
        let zero_std = rewards.chunks(group).filter(|g| g.iter().all(|r| *r == g[0])).count();
        let lens: Vec<usize> = completions.iter().map(Vec::len).collect();
        let loss_tokens: usize = (0..lens.len()).filter(|&i| !masked(i)).map(|i| lens[i]).sum();
        let prompt_tokens: usize = rows.iter().map(Vec::len).sum();
        let local = [
            rewards.len() as f64,
            rewards.iter().sum(),
            rewards.iter().map(|r| r * r).sum(),
            zero_std as f64,
            mine.len() as f64,
            lens.iter().sum::<usize>() as f64,
            truncated.iter().filter(|&&t| t).count() as f64,
            loss_tokens as f64,
            prompt_tokens as f64,
            entropy_sum,
        ];
        let g = all_sum(collective, &local, device).map_err(|e| WorkerError::Collective(e.to_string()))?;
        let len_max = Self::all_max(collective, lens.iter().copied().max().unwrap_or(0) as f64, device)?;
        let (n, total_loss_tokens) = (g[0].max(1.0), g[7] as usize);
        let weights: Vec<f64> = (0..lens.len())
            .map(|i| {
                if masked(i) {
                    0.0
                } else {
                    let max_len = self.spec.max_new_tokens as usize;
                    token_weight(self.aggregation, lens[i], n as usize, total_loss_tokens, max_len)
                }
            })
            .collect();

        // Micro-batches: `micro` prompts × `group` completions, right-padded.
        self.ready.clear();
        for m in 0..self.micro_batches() {
            let range = m * self.micro * group..(m + 1) * self.micro * group;
            let width = range.clone().map(|i| rows[i].len() + lens[i]).max().unwrap_or(2) - 1;
            let (mut inputs, mut targets, mut w, mut a) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for i in range.clone() {
                let seq: Vec<i64> = rows[i].iter().chain(&completions[i]).copied().collect();
                let prompt_len = rows[i].len();
                for p in 0..width {
                    inputs.push(seq.get(p).copied().unwrap_or(eos));
                    targets.push(seq.get(p + 1).copied().unwrap_or(eos));
                    // Position p predicts token p + 1: a completion token when it lies in
                    // [prompt_len, prompt_len + len).
                    let in_completion = p + 1 >= prompt_len && p + 1 < prompt_len + lens[i];
                    w.push(if in_completion { weights[i] as f32 } else { 0.0 });
                    a.push(if in_completion { adv[i] as f32 } else { 0.0 });
                }
            }
            let shape = [range.len() as i64, width as i64];
            let inputs = Tensor::from_slice(&inputs).view(shape).to_device(device);
            let targets = Tensor::from_slice(&targets).view(shape).to_device(device);
            // With several updates per batch, later ones compare with the policy that
            // generated the rollouts; the reference too is taken at the sampling
            // temperature, as the loss takes the policy's log-probs.
            let scale = if self.spec.temperature > 0.0 { 1.0 / self.spec.temperature } else { 1.0 };
            let log_probs = |m: &Transformer| {
                tch::no_grad(|| {
                    let hidden = m.hidden(&inputs, None) * scale;
                    let d = hidden.size()[2];
                    target_log_probs(&hidden.reshape([-1, d]), m.lm_head(), &targets.reshape([-1])).view(shape)
                })
            };
            let old_logp = (updates > 1).then(|| log_probs(model));
            let ref_logp = self.reference.as_ref().map(log_probs);
            self.ready.push(Batch {
                inputs,
                targets,
                weights: Some(Tensor::from_slice(&w).view(shape).to_device(device)),
                packing: None,
                rl: Some(RlTerms {
                    advantages: Tensor::from_slice(&a).view(shape).to_device(device),
                    old_logp,
                    ref_logp,
                }),
            });
        }
        self.step_tokens = (g[5] + g[8]) as u64;
        let mean = g[1] / n;
        self.made_at = Some(cursor);
        self.updates_done = 1;
        self.stats = RolloutStats {
            reward_mean: mean,
            reward_std: (g[2] / n - mean * mean).max(0.0).sqrt(),
            zero_std_fraction: g[3] / g[4].max(1.0),
            len_mean: g[5] / n,
            len_max: len_max as u32,
            truncation_ratio: g[6] / n,
            entropy: g[9] / g[5].max(1.0),
            seconds: started.elapsed().as_secs_f64(),
        };
        Ok(Some(self.stats))
    }
}
