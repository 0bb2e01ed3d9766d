//! The training loop: gradient accumulation to a fixed global batch, global-norm clipping,
//! AdamW on a flat partition, scheduled checkpoints, and exact resume.
//!
//! One optimizer step consumes samples `[cursor, cursor + global_batch)` of the seeded
//! [`SampleOrder`]. The loop's whole state is (parameters, optimizer state, step, cursor),
//! all of which a checkpoint holds bit for bit, so a resumed run continues exactly as if it
//! had never stopped.

use std::path::PathBuf;
use std::time::Instant;

use moxin_data::{Manifest, SampleOrder, TokenDataset};
use moxin_proto::v1::{JobSpec, StepMetrics};
use tch::{Kind, Tensor};

use crate::checkpoint::{self, CheckpointManifest, RngState, SaveRequest};
use crate::collective::{Collective, CollectiveError, ReduceOp};
use crate::device::{place, Placement};
use crate::model::{ModelConfig, Transformer};
use crate::optim::{clip_factor, learning_rate, AdamW, AdamWConfig};
use crate::WorkerError;

/// Name of the data-order algorithm recorded in checkpoints.
const DATA_ORDER: &str = "feistel6-splitmix64-v1";

/// This process's place in a data-parallel group with ZeRO-1 optimizer sharding.
pub struct Group {
    /// Collectives with the other ranks.
    pub collective: Box<dyn Collective>,
    /// Optimizer partition of every rank: contiguous ranges tiling the (padded) flat
    /// parameter buffer, in rank order.
    pub partitions: Vec<std::ops::Range<usize>>,
    /// This rank's samples within every global batch (the coordinator's data assignment):
    /// global step s trains on cursors `s * B + samples`.
    pub samples: std::ops::Range<u32>,
}

/// A job's training state on this process.
pub struct Trainer {
    group: Option<Group>,
    /// Set (from any thread) to stop at the next step boundary; in a group the ranks agree
    /// on it through the per-step all-reduce, so all stop at the same step.
    pub stop_requested: std::sync::Arc<std::sync::atomic::AtomicBool>,
    group_stop: bool,
    spec: JobSpec,
    /// The model.
    pub model: Transformer,
    opt: AdamW,
    data: TokenDataset,
    order: SampleOrder,
    flat_grad: Tensor,
    placement: Placement,
    run_dir: PathBuf,
    step: u64,
    cursor: u64,
    tokens: u64,
    elapsed_s: f64,
    resumed_from: Option<u64>,
    batch_buf: Vec<i64>,
}

/// Why [`Trainer::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// `train.steps` were completed.
    Finished,
    /// Stopped early at the requested step (a checkpoint was written; resumable).
    Stopped,
}

macro_rules! section {
    ($spec:expr, $field:ident) => {
        $spec.$field.as_ref().ok_or_else(|| WorkerError::Spec(concat!("missing ", stringify!($field)).into()))?
    };
}

impl Trainer {
    /// Builds the model and data for `spec` in a single process, resuming from the newest
    /// valid checkpoint in the run directory if there is one.
    pub fn new(spec: &JobSpec) -> Result<Self, WorkerError> {
        Self::with_group(spec, None)
    }

    /// As [`Trainer::new`], as one rank of `group`: this rank trains on its slice of every
    /// global batch and keeps optimizer state for its partition only.
    pub fn with_group(spec: &JobSpec, group: Option<Group>) -> Result<Self, WorkerError> {
        let model_spec = section!(spec, model);
        let data_spec = section!(spec, data);
        let train = section!(spec, train);
        let opt_spec = section!(spec, optimizer);
        let placement = place(section!(spec, runtime))?;
        let run_dir = PathBuf::from(&spec.run_dir);
        let world = group.as_ref().map_or(1, |g| g.collective.world_size()) as u32;
        let samples = group.as_ref().map_or(0..train.global_batch_size, |g| g.samples.clone());
        if train.micro_batch_size == 0
            || samples.is_empty()
            || samples.end > train.global_batch_size
            || samples.len() as u32 % train.micro_batch_size != 0
        {
            return Err(WorkerError::Spec(format!(
                "samples {samples:?} of a global batch of {} are not whole micro-batches of {}",
                train.global_batch_size, train.micro_batch_size
            )));
        }

        let config = ModelConfig::from(model_spec);
        let total = config.param_count();
        let padded = group.as_ref().map_or(total, |g| g.partitions.last().map_or(0, |r| r.end) as i64);
        let mut model = Transformer::with_flat_len(config.clone(), placement.kind, placement.device, padded);
        model.params.initialise(spec.seed);

        let data_dir = PathBuf::from(&data_spec.prepared_dir);
        let data = TokenDataset::open(&data_dir, train.seq_len, config.vocab_size as u32, data_spec.verify_checksums)?;
        let sha = Manifest::file_sha256(&data_dir)?;
        if !data_spec.manifest_sha256.is_empty() && sha != data_spec.manifest_sha256 {
            return Err(WorkerError::Spec(format!(
                "{}: data manifest changed since the coordinator validated it",
                data_dir.display()
            )));
        }
        let order = SampleOrder::new(data.num_samples(), spec.seed);
        let (start, end) = match &group {
            None => (0, total),
            Some(g) => {
                let mine = &g.partitions[g.collective.rank()];
                if padded < total || g.partitions.len() != world as usize {
                    return Err(WorkerError::Spec(format!(
                        "partitions {:?} do not cover {total} parameters over {world} ranks",
                        g.partitions
                    )));
                }
                if placement.kind != Kind::Float || placement.device != tch::Device::Cpu {
                    return Err(WorkerError::Spec(
                        "the CPU collective backend trains fp32 on CPU; set runtime.device = \"cpu\" and precision = \"fp32\"".into(),
                    ));
                }
                ((mine.start as i64).min(total), (mine.end as i64).min(total))
            }
        };
        let opt = AdamW::new(AdamWConfig::from(opt_spec), model.params.flat(), start, end, model.params.decay_numel());
        let flat_grad = Tensor::zeros([padded], (Kind::Float, placement.device));

        let mut trainer = Trainer {
            group,
            stop_requested: Default::default(),
            group_stop: false,
            spec: spec.clone(),
            model,
            opt,
            data,
            order,
            flat_grad,
            placement,
            run_dir,
            step: 0,
            cursor: 0,
            tokens: 0,
            elapsed_s: 0.0,
            resumed_from: None,
            batch_buf: Vec::new(),
        };
        if trainer.rank_and_world().0 == 0 {
            checkpoint::sweep_temporaries(&trainer.run_dir);
        }
        if let Some(ckpt) = checkpoint::latest_valid(&trainer.run_dir)? {
            trainer.restore(&ckpt)?;
        }
        if let Some(group) = trainer.group.as_mut() {
            // Every rank starts from rank 0's parameters, whatever happened before.
            let mut flat = trainer.model.params.flat().shallow_clone();
            let bytes = cpu_f32_mut(&mut flat);
            let len = std::mem::size_of_val(bytes);
            // SAFETY: viewing initialised f32s as bytes for the duration of the broadcast.
            #[allow(unsafe_code)]
            let bytes = unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<u8>(), len) };
            group.collective.broadcast(bytes, 0).map_err(comm_error)?;
        }
        Ok(trainer)
    }

    fn restore(&mut self, ckpt: &checkpoint::Checkpoint) -> Result<(), WorkerError> {
        let m = &ckpt.manifest;
        let refuse = |reason: String| WorkerError::Resume { run_dir: self.run_dir.clone(), reason };
        if m.model != self.model.config {
            let (saved, now) = (
                serde_json::to_value(&m.model).unwrap_or_default(),
                serde_json::to_value(&self.model.config).unwrap_or_default(),
            );
            let diffs: Vec<String> = saved
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| now.get(k.as_str()) != Some(v))
                .map(|(k, v)| format!("model.{k} = {v} in the checkpoint, {} in this job", now[k.as_str()]))
                .collect();
            return Err(refuse(format!(
                "{} has a different model ({}); pass a new --out to start a fresh run",
                ckpt.dir.display(),
                diffs.join(", ")
            )));
        }
        let data = section!(self.spec, data);
        if m.data_manifest_sha256 != data.manifest_sha256 {
            return Err(refuse(format!(
                "{} was trained on other data (manifest sha256 {}, now {}); the data cursor would be meaningless. \
                 Pass a new --out to start a fresh run",
                ckpt.dir.display(),
                m.data_manifest_sha256,
                data.manifest_sha256
            )));
        }
        let seq_len = section!(self.spec, train).seq_len;
        if m.seq_len != seq_len || m.rng.seed != self.spec.seed {
            return Err(refuse(format!(
                "{} used seq_len {} and seed {}, this job has seq_len {seq_len} and seed {}; pass a new --out",
                ckpt.dir.display(),
                m.seq_len,
                m.rng.seed,
                self.spec.seed
            )));
        }
        let tensors = ckpt.model_tensors()?;
        self.model
            .params
            .load_named(&tensors)
            .map_err(|reason| WorkerError::Checkpoint { path: ckpt.dir.join(checkpoint::MODEL_FILE), reason })?;
        let mut restored = 0;
        for i in 0..m.optimizer.len() {
            let (part, tensors) = ckpt.optimizer_part(i)?;
            restored += self
                .opt
                .load_overlap(part.start, part.end, &tensors)
                .map_err(|reason| WorkerError::Checkpoint { path: ckpt.dir.join(&part.file), reason })?;
        }
        if restored != self.opt.len() {
            return Err(WorkerError::Checkpoint {
                path: ckpt.dir.clone(),
                reason: format!("optimizer partitions cover {restored} of {} elements", self.opt.len()),
            });
        }
        self.opt.write_params(self.model.params.flat());
        self.step = m.step;
        self.cursor = m.data_cursor;
        self.tokens = m.tokens;
        self.elapsed_s = m.elapsed_s;
        self.resumed_from = Some(m.step);
        tracing::info!(step = m.step, dir = %ckpt.dir.display(), "resumed from checkpoint");
        Ok(())
    }

    /// Optimizer steps completed.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Samples consumed.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// The step of the checkpoint this run resumed from, if any.
    pub fn resumed_from(&self) -> Option<u64> {
        self.resumed_from
    }

    /// Device and dtype in use.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// Samples per epoch of the training data.
    pub fn samples_per_epoch(&self) -> u64 {
        self.data.num_samples()
    }

    /// Runs optimizer steps until `train.steps` (or `stop_after`, if smaller), calling
    /// `observer` after every `log_every_steps`-th step and checkpointing on schedule and
    /// at the end.
    pub fn run(
        &mut self,
        stop_after: Option<u64>,
        observer: &mut dyn FnMut(&StepMetrics) -> Result<(), String>,
    ) -> Result<RunEnd, WorkerError> {
        let train = *section!(self.spec, train);
        let every = section!(self.spec, checkpoint).every_steps;
        let target = stop_after.map_or(train.steps, |s| s.min(train.steps));
        let mut saved_at = self.resumed_from;
        while self.step < target {
            let metrics = self.train_step()?;
            if self.step % train.log_every_steps as u64 == 0 || self.step == target {
                observer(&metrics).map_err(WorkerError::Observer)?;
            }
            if every > 0 && self.step % every == 0 {
                self.save_checkpoint()?;
                saved_at = Some(self.step);
            }
            if self.group_stop {
                tracing::info!(step = self.step, "stop requested; saving a checkpoint and stopping");
                break;
            }
        }
        if saved_at != Some(self.step) {
            self.save_checkpoint()?;
        }
        Ok(if self.step >= train.steps { RunEnd::Finished } else { RunEnd::Stopped })
    }

    /// This rank and the group size.
    pub fn rank_and_world(&self) -> (usize, usize) {
        self.group.as_ref().map_or((0, 1), |g| (g.collective.rank(), g.collective.world_size()))
    }

    /// One optimizer step over the next global batch. In a group, this rank computes
    /// gradients on its slice of the batch; gradients are averaged by reduce-scatter so the
    /// rank holds its partition's; the global norm comes from per-partition norms; AdamW
    /// updates the partition; all-gather gives every rank the new parameters.
    pub fn train_step(&mut self) -> Result<StepMetrics, WorkerError> {
        let started = Instant::now();
        let train = *section!(self.spec, train);
        let opt_spec = *section!(self.spec, optimizer);
        let schedule = *section!(self.spec, schedule);
        let lr = learning_rate(&schedule, opt_spec.lr, self.step, train.steps);
        let world = self.rank_and_world().1;
        let samples = self.group.as_ref().map_or(0..train.global_batch_size, |g| g.samples.clone());
        let micro = train.micro_batch_size as usize;
        let accum = samples.len() / micro;
        let row = train.seq_len as i64 + 1;
        let first = self.cursor + samples.start as u64;

        let mut loss_sum = 0.0;
        for m in 0..accum {
            self.batch_buf.clear();
            self.data.read_batch(&self.order, first + (m * micro) as u64, micro, &mut self.batch_buf);
            let batch = Tensor::from_slice(&self.batch_buf).view([micro as i64, row]).to_device(self.placement.device);
            let loss = self.model.loss(&batch);
            self.model.params.backward_into(&(&loss / accum as f64), &mut self.flat_grad, m > 0);
            loss_sum += loss.double_value(&[]);
        }
        let compute_s = started.elapsed().as_secs_f64();
        let mut loss = loss_sum / accum as f64;

        let (start, len) = (self.opt.start, self.opt.len());
        let grad_norm;
        let mut comm_s = 0.0;
        if let Some(group) = self.group.as_mut() {
            let t = Instant::now();
            let ranges = group.partitions.clone();
            group
                .collective
                .reduce_scatter_f32(cpu_f32_mut(&mut self.flat_grad), &ranges, ReduceOp::Avg)
                .map_err(comm_error)?;
            let own = self.flat_grad.narrow(0, start, len);
            let stop = f32::from(u8::from(self.stop_requested.load(std::sync::atomic::Ordering::Relaxed)));
            let mut stats = [own.square().sum(Kind::Double).double_value(&[]) as f32, loss as f32, stop];
            group.collective.all_reduce_f32(&mut stats, ReduceOp::Sum).map_err(comm_error)?;
            grad_norm = (stats[0] as f64).sqrt();
            loss = stats[1] as f64 / world as f64;
            self.group_stop = stats[2] > 0.0;
            comm_s += t.elapsed().as_secs_f64();
        } else {
            grad_norm = self.flat_grad.norm().double_value(&[]);
            self.group_stop = self.stop_requested.load(std::sync::atomic::Ordering::Relaxed);
        }
        if !loss.is_finite() {
            return Err(WorkerError::Spec(format!(
                "loss became {loss} at step {}; lower optimizer.lr or check the data",
                self.step + 1
            )));
        }
        let mut own_grad = self.flat_grad.narrow(0, start, len);
        let clip = clip_factor(grad_norm, opt_spec.grad_clip);
        if clip != 1.0 {
            let _ = own_grad.g_mul_scalar_(clip);
        }
        self.opt.step(&own_grad, lr);
        self.opt.write_params(self.model.params.flat());
        if let Some(group) = self.group.as_mut() {
            let t = Instant::now();
            let ranges = group.partitions.clone();
            let mut flat = self.model.params.flat().shallow_clone();
            group.collective.all_gather_f32(cpu_f32_mut(&mut flat), &ranges).map_err(comm_error)?;
            comm_s += t.elapsed().as_secs_f64();
        }
        let optimizer_s = started.elapsed().as_secs_f64() - compute_s - comm_s;

        self.step += 1;
        self.cursor += train.global_batch_size as u64;
        let step_tokens = train.global_batch_size as u64 * train.seq_len as u64;
        self.tokens += step_tokens;
        let step_time_s = started.elapsed().as_secs_f64();
        self.elapsed_s += step_time_s;
        Ok(StepMetrics {
            step: self.step,
            loss,
            lr,
            grad_norm,
            tokens: self.tokens,
            tokens_per_s: step_tokens as f64 / step_time_s.max(1e-9),
            elapsed_s: self.elapsed_s,
            step_time_s,
            world_size: world as u32,
            data_cursor: self.cursor,
            compute_s,
            optimizer_s,
            comm_s,
        })
    }

    /// Writes a checkpoint of the current state. In a group every rank writes its optimizer
    /// partition into the shared staging directory and rank 0 publishes, between barriers.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf, WorkerError> {
        let started = Instant::now();
        let (rank, world) = self.rank_and_world();
        let barrier = |group: &mut Option<Group>| -> Result<(), WorkerError> {
            match group.as_mut() {
                Some(g) => g.collective.barrier().map_err(comm_error),
                None => Ok(()),
            }
        };
        if rank == 0 {
            checkpoint::stage(&self.run_dir, self.step)?;
        }
        barrier(&mut self.group)?;
        checkpoint::write_partition(&self.run_dir, self.step, rank, &self.opt.state_tensors())?;
        barrier(&mut self.group)?;
        let dir = checkpoint::checkpoints_dir(&self.run_dir).join(format!("step-{:08}", self.step));
        if rank == 0 {
            let total = self.model.params.numel();
            let partitions = match &self.group {
                None => vec![(0, total)],
                Some(g) => {
                    g.partitions.iter().map(|r| ((r.start as i64).min(total), (r.end as i64).min(total))).collect()
                }
            };
            let manifest = CheckpointManifest {
                format: String::new(),
                step: self.step,
                data_cursor: self.cursor,
                tokens: self.tokens,
                elapsed_s: self.elapsed_s,
                rng: RngState { seed: self.spec.seed, data_order: DATA_ORDER.into() },
                world_size: world as u32,
                seq_len: section!(self.spec, train).seq_len,
                model: self.model.config.clone(),
                data_manifest_sha256: section!(self.spec, data).manifest_sha256.clone(),
                resolved_config_toml: self.spec.resolved_config_toml.clone(),
                optimizer: Vec::new(),
                files: Default::default(),
            };
            checkpoint::publish(SaveRequest {
                run_dir: &self.run_dir,
                manifest,
                model: self.model.params.named_tensors(),
                partitions,
                extra_files: vec![(
                    checkpoint::TOKENIZER_FILE.into(),
                    self.data.dir().join(&self.data.manifest().tokenizer.file),
                )],
                keep_last: section!(self.spec, checkpoint).keep_last as usize,
            })?;
            tracing::info!(step = self.step, dir = %dir.display(), secs = started.elapsed().as_secs_f64(), "checkpoint saved");
        }
        barrier(&mut self.group)?;
        Ok(dir)
    }
}

fn comm_error(e: CollectiveError) -> WorkerError {
    WorkerError::Collective(e.to_string())
}

/// The elements of a contiguous CPU fp32 tensor as a mutable slice.
fn cpu_f32_mut(t: &mut Tensor) -> &mut [f32] {
    assert!(
        t.device() == tch::Device::Cpu && t.kind() == Kind::Float && t.is_contiguous(),
        "CPU fp32 contiguous tensor expected"
    );
    let len = t.numel();
    // SAFETY: the tensor is a contiguous CPU fp32 buffer of `len` elements that `t` keeps
    // alive for the borrow; no other Rust reference to it exists while the slice lives
    // (autograd is not running: collectives happen between backward and the next forward).
    #[allow(unsafe_code)]
    unsafe {
        std::slice::from_raw_parts_mut(t.data_ptr().cast::<f32>(), len)
    }
}
