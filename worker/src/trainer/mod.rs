//! The training loop, composed from swappable parts (as torchtitan composes its step):
//!
//! * a [`BatchSource`] (pre-training windows today) says what this rank trains on;
//! * an [`Objective`] (next-token cross-entropy today) turns target log-probs into a loss;
//! * the step ([`step::forward_backward`]) runs the model block by block, optionally
//!   recomputing blocks, handing gradients to
//! * the gradient-sync / optimizer-sharding strategy ([`Zero1`] over a [`Collective`]: a
//!   world of one is [`crate::collective::Solo`], so there is one code path), and
//! * the [`Checkpointer`] saves and resumes the group's state, and a [`Handover`] carries
//!   it in memory to the group's next generation when nobody died.
//!
//! One optimizer step consumes samples `[cursor, cursor + global_batch)` of the seeded
//! order. The loop's whole state is (parameters, optimizer state, step, cursor), which a
//! checkpoint holds bit for bit, so a resumed run continues exactly as if never stopped.

pub mod batch;
pub mod block;
pub mod checkpointing;
pub mod grads;
mod group_checks;
pub mod handover;
pub mod objective;
pub mod profile;
pub mod step;
pub mod zero;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use moxin_data::{Manifest, TokenDataset};
use moxin_layout::ModelShape;
use moxin_proto::v1::{runtime_spec, Assignment, JobSpec, StepMetrics};
use tch::{Kind, Tensor};

pub use self::batch::{Batch, BatchSource, PretrainWindows, SftPacks};
pub use self::checkpointing::{Checkpointer, Progress};
pub use self::handover::Handover;
pub use self::objective::{CrossEntropy, Objective};
use self::profile::PhaseClock;
pub use self::zero::{Votes, Zero1};
use crate::checkpoint::Committer;
use crate::collective::Collective;
use crate::device::Placement;
use crate::model::Transformer;
use crate::optim::{learning_rate, AdamWConfig};
use crate::rl::grpo::{GrpoConfig, GrpoObjective};
use crate::rl::rollouts::Rollouts;
use crate::WorkerError;

/// Why [`Trainer::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// `train.steps` were completed.
    Finished,
    /// Stopped early (at `stop_after`, or on request); a checkpoint was written, or the
    /// state was handed over to the group's next generation ([`Trainer::take_handover`]).
    Stopped,
}

/// Where a trainer's state came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Initialised from the seed: nothing to resume.
    Fresh,
    /// The checkpoint of this step.
    Checkpoint(u64),
    /// The previous generation of the group, in memory, at this step.
    Handover(u64),
}

macro_rules! section {
    ($spec:expr, $field:ident) => {
        $spec.$field.as_ref().ok_or_else(|| WorkerError::Spec(concat!("missing ", stringify!($field)).into()))?
    };
}

/// A job's training state on this process (one rank of a group, possibly of one).
pub struct Trainer {
    spec: JobSpec,
    /// The model.
    pub model: Transformer,
    stages: step::Stages,
    batches: Box<dyn BatchSource>,
    objective: Box<dyn Objective>,
    sync: Zero1,
    checkpoints: Checkpointer,
    placement: Placement,
    progress: Progress,
    start: Start,
    /// Set (from any thread) to stop at the next step boundary; the ranks agree on it
    /// through the per-step all-reduce, so all stop at the same step (and checkpoint).
    pub stop_requested: Arc<AtomicBool>,
    /// Set (from any thread) to stop at the next step boundary for the group's next
    /// generation: no checkpoint, the state is handed over in memory. Agreed like a stop,
    /// which takes precedence.
    pub handover_requested: Arc<AtomicBool>,
    /// This rank will not be in the next generation: at a handover it gives its state to
    /// a rank that stays.
    pub leaving: Arc<AtomicBool>,
    /// The collective addresses of the next generation's members, once this rank has its
    /// next assignment: ranks missing from it leave at a handover (whatever they heard).
    pub next_peers: Arc<std::sync::Mutex<Option<Vec<String>>>>,
    /// Every rank's collective address in this generation.
    peers: Vec<String>,
    group_handover: bool,
    /// What this rank carries to the next generation after a handover stop.
    handover: Option<Handover>,
    /// Set (from any thread) to checkpoint at the next step boundary (the coordinator
    /// asked); agreed on like a stop.
    pub checkpoint_requested: Arc<AtomicBool>,
    group_stop: bool,
    engine: step::EngineOptions,
    /// Phase timers (`runtime.profile`).
    clock: PhaseClock,
    flops_per_token: f64,
    peak_flops: Option<f64>,
    cuda: Option<Arc<crate::cuda::CudaContext>>,
    peak_memory: u64,
    /// Seconds checkpointing held training up since the last step's metrics.
    checkpoint_blocking_s: f64,
    /// The membership generation of this rank's group.
    generation: u64,
    /// When this rank last checkpointed (or started), for `checkpoint.every_seconds`.
    last_checkpoint: Instant,
    /// The group agreed, at the last step, that a checkpoint is due.
    group_checkpoint: bool,
}

impl Trainer {
    /// Builds the model, data and optimizer partition for `spec` as the rank `assignment`
    /// places this process at, talking to the others through `collective`, on `placement`;
    /// continues from the state the group's previous generation handed over in memory
    /// (`carried` on the ranks that hold some) when it can, else resumes from the newest
    /// valid checkpoint in the run directory if there is one. Checkpoints are committed by
    /// `committer`.
    pub fn new(
        spec: &JobSpec,
        assignment: &Assignment,
        collective: Box<dyn Collective>,
        placement: Placement,
        committer: Arc<dyn Committer>,
        carried: Option<Handover>,
    ) -> Result<Self, WorkerError> {
        let model_spec = section!(spec, model);
        let data_spec = section!(spec, data);
        let train = section!(spec, train);
        let runtime = section!(spec, runtime);
        let data_plan = section!(assignment, data);
        let (rank, world) = (collective.rank(), collective.world_size());
        if (assignment.rank as usize, assignment.world_size as usize) != (rank, world) {
            return Err(WorkerError::Spec(format!(
                "assignment for rank {} of {} given a collective of rank {rank} of {world}",
                assignment.rank, assignment.world_size
            )));
        }
        if data_plan.global_batch_size != train.global_batch_size
            || data_plan.accumulation_steps * data_plan.micro_batch_size != data_plan.rank_samples
        {
            return Err(WorkerError::Spec(format!(
                "data assignment {data_plan:?} does not fit the job's global batch of {}",
                train.global_batch_size
            )));
        }

        let shape = ModelShape::from(model_spec);
        let partitions: Vec<std::ops::Range<usize>> =
            assignment.partitions.iter().map(|p| p.start as usize..p.end as usize).collect();
        let padded = partitions.last().map_or(0, |r| r.end) as i64;
        let mut model = Transformer::with_flat_len(shape.clone(), placement.kind, placement.device, padded);
        model.params.initialise(spec.seed);

        let data_dir = PathBuf::from(&data_spec.prepared_dir);
        if spec.grpo.is_none() {
            let sha = Manifest::file_sha256(&data_dir)?;
            if !data_spec.manifest_sha256.is_empty() && sha != data_spec.manifest_sha256 {
                return Err(WorkerError::Spec(format!(
                    "{}: data manifest changed since the coordinator validated it",
                    data_dir.display()
                )));
            }
        }
        let slice = data_plan.rank_first_sample..data_plan.rank_first_sample + data_plan.rank_samples;
        let (micro, global) = (data_plan.micro_batch_size, data_plan.global_batch_size);
        let batches: Box<dyn BatchSource> = if spec.grpo.is_some() {
            // Prompts, not prepared data: the rollouts are made at each step.
            Box::new(Rollouts::new(spec, slice, micro, global, rank, (placement.kind, placement.device))?)
        } else if moxin_data::sft::SftManifest::load(&data_dir)?.is_some() {
            let data = moxin_data::sft::SftData::open(
                &data_dir,
                train.seq_len,
                shape.vocab_size,
                spec.seed,
                data_spec.verify_checksums,
            )?;
            Box::new(SftPacks::new(data, spec.seed, slice, micro, global, (shape.vocab_size, shape.sliding_window))?)
        } else {
            let data = TokenDataset::open(&data_dir, train.seq_len, shape.vocab_size, data_spec.verify_checksums)?;
            Box::new(PretrainWindows::new(data, spec.seed, slice, micro, global, shape.vocab_size)?)
        };
        if data_plan.samples_per_epoch != batches.samples_per_epoch() {
            return Err(WorkerError::Spec(format!(
                "{}: {} samples per epoch here, {} when the coordinator planned the job; the data changed",
                data_dir.display(),
                batches.samples_per_epoch(),
                data_plan.samples_per_epoch
            )));
        }
        let objective: Box<dyn Objective> = match &spec.grpo {
            Some(g) => Box::new(GrpoObjective::new(GrpoConfig {
                epsilon: g.epsilon,
                epsilon_high: g.epsilon_high,
                beta: g.beta,
                temperature: g.temperature,
            })),
            None => Box::new(CrossEntropy::mean_over(batches.loss_tokens(0))),
        };

        let grad_kind = match runtime.grad_reduce() {
            runtime_spec::GradReduce::Bf16 => Kind::BFloat16,
            runtime_spec::GradReduce::Fp32 => Kind::Float,
        };
        let opt_config = AdamWConfig::from(section!(spec, optimizer));
        let mut sync =
            Zero1::new(collective, partitions, model.params.layout(), model.params.flat(), grad_kind, opt_config)?;
        // `auto` uses the fused kernels on CUDA: scripts/gpu-check.sh showed them equal to the
        // ATen path within bf16 rounding and 10-15% faster end to end (BENCHMARKS.md).
        let kernels = match (runtime.kernels(), placement.cuda_ordinal()) {
            (runtime_spec::Kernels::Aten, _) | (runtime_spec::Kernels::Auto, None) => None,
            (runtime_spec::Kernels::Fused | runtime_spec::Kernels::Auto, Some(ordinal)) => {
                Some(crate::cuda::kernels::Kernels::for_device(ordinal)?)
            }
            (runtime_spec::Kernels::Fused, None) => {
                return Err(WorkerError::Device(
                    "runtime.kernels = \"fused\" needs a CUDA device (the fused kernels are CUDA code); use \"aten\" on the CPU"
                        .into(),
                ))
            }
        };
        if let Some(k) = &kernels {
            sync.opt.use_fused_kernel(k.clone());
        }
        if runtime.optimizer_stream {
            let on = match &kernels {
                Some(k) => sync.use_optimizer_stream(k.clone())?,
                None => false,
            };
            if !on {
                tracing::warn!(
                    "runtime.optimizer_stream applies to one GPU with the fused kernels (a group of one, \
                     runtime.kernels = auto or fused on CUDA); the update runs on torch's stream"
                );
            }
        }
        // `auto`: hand-written blocks where their fused pieces run (scripts/gpu-check.sh
        // showed them equal to autograd within bf16 rounding and faster, BENCHMARKS.md);
        // with ATen's elementwise ops the hand-written block is slower than autograd's.
        let explicit_blocks = match runtime.block_backward() {
            runtime_spec::BlockBackward::Explicit => true,
            runtime_spec::BlockBackward::Autograd => false,
            runtime_spec::BlockBackward::Auto => kernels.is_some(),
        };
        // `auto`: hand-written blocks recompute their norm and SwiGLU outputs (about 1% of the
        // throughput for 1.5-3.8 GiB on the GPU check's shapes, BENCHMARKS.md).
        let recompute_elementwise = match runtime.recompute() {
            runtime_spec::Recompute::Elementwise => true,
            runtime_spec::Recompute::Auto => explicit_blocks,
            runtime_spec::Recompute::None | runtime_spec::Recompute::Blocks => false,
        };
        if runtime.split_projections && !explicit_blocks {
            tracing::warn!(
                "runtime.split_projections applies to hand-written blocks (runtime.block_backward = \"explicit\", \
                 or \"auto\" with the fused kernels); these blocks use autograd and fused projections"
            );
        }
        if runtime.gemm() == runtime_spec::Gemm::Tuned {
            let Some(ordinal) = placement.cuda_ordinal() else {
                return Err(WorkerError::Device(
                    "runtime.gemm = \"tuned\" needs a CUDA device (it runs GEMMs through cuBLASLt); use \"aten\" on \
                     the CPU"
                        .into(),
                ));
            };
            crate::cuda::gemm::install(ordinal, crate::cuda::gemm::CANDIDATES)?;
            if !explicit_blocks {
                tracing::warn!(
                    "runtime.gemm = \"tuned\" applies to hand-written blocks and the fused head \
                     (runtime.block_backward = \"explicit\", or \"auto\" with the fused kernels); these blocks use \
                     libtorch's GEMMs"
                );
            }
        }
        if recompute_elementwise && !explicit_blocks {
            tracing::warn!(
                "runtime.recompute = \"elementwise\" applies to hand-written blocks (runtime.block_backward = \
                 \"explicit\", or \"auto\" with the fused kernels); these blocks use autograd and keep everything"
            );
        }
        let checkpoints = Checkpointer::new(spec, assignment.generation, committer);
        group_checks::check_shared_run_dir(
            sync.collective(),
            checkpoints.run_dir(),
            assignment.generation,
            placement.device,
        )?;
        let numel = model.params.numel();
        let clamped = clamp(sync.partitions(), numel);
        // (Not fatal on rank 0 alone: the others are already waiting in `adopt`.)
        let newest_checkpoint = if rank == 0 {
            match moxin_layout::checkpoint::list(checkpoints.run_dir()) {
                Ok(list) => list.first().map(|(step, _)| *step),
                Err(e) => {
                    tracing::warn!("listing checkpoints: {e}");
                    None
                }
            }
        } else {
            None
        };
        let (collective, opt) = sync.collective_and_optimizer();
        let adopted = handover::adopt(collective, carried, opt, &clamped, numel, newest_checkpoint)?;
        let params = model.params.flat().shallow_clone();
        let (start, progress) = if let Some(progress) = adopted {
            // The parameters are the master weights, gathered.
            sync.opt.write_params(&params);
            let partitions = sync.partitions().to_vec();
            sync.collective()
                .all_gather(&params, &partitions)
                .and_then(|w| w.wait())
                .map_err(|e| WorkerError::Collective(e.to_string()))?;
            (Start::Handover(progress.step), progress)
        } else {
            let restored = checkpoints.restore_latest(&mut model, &mut sync.opt)?;
            if restored.is_none() && rank == 0 && !model_spec.init_from.is_empty() {
                // A fresh run from given weights (rank 0 reads them; the broadcast below
                // gives them to the others).
                let dir = std::path::Path::new(&model_spec.init_from);
                let init = crate::checkpoint::Checkpoint::open(dir)?;
                // (The tensors' shapes are checked as they load.)
                model.params.load_named(&crate::checkpoint::model_tensors(&init)?).map_err(|reason| {
                    WorkerError::Checkpoint { path: dir.join(crate::checkpoint::MODEL_FILE), reason }
                })?;
                tracing::info!(checkpoint = %dir.display(), step = init.manifest.step, "initialised from");
            }
            group_checks::agree_on_restored_step(sync.collective(), restored.map_or(0, |p| p.step), placement.device)?;
            // Every rank starts from rank 0's parameters, whatever happened before.
            sync.collective()
                .broadcast(&params, 0)
                .and_then(|w| w.wait())
                .map_err(|e| WorkerError::Collective(e.to_string()))?;
            if restored.is_none() {
                sync.opt.reset_master(model.params.flat());
            }
            (restored.map_or(Start::Fresh, |p| Start::Checkpoint(p.step)), restored.unwrap_or_default())
        };

        let cuda = placement.cuda_ordinal().and_then(|i| crate::cuda::context(i).ok());
        // The device's total memory, beside moxin_peak_memory_bytes (MoxinGpuMemoryNearLimit);
        // not exported on CPU.
        if let Some((_, total)) = cuda.as_ref().and_then(|ctx| ctx.mem_get_info().ok()) {
            metrics::gauge!("moxin_device_memory_total_bytes").set(total as f64);
        }
        let peak_flops = match (runtime.peak_tflops, &cuda) {
            (p, _) if p > 0.0 => Some(p * 1e12),
            (_, Some(ctx)) => ctx.name().ok().and_then(|n| crate::cuda::peak_bf16_flops(&n)),
            _ => None,
        };
        Ok(Trainer {
            spec: spec.clone(),
            stages: step::Stages::of(model.params.layout()),
            flops_per_token: shape.train_flops_per_token(train.seq_len),
            model,
            batches,
            objective,
            sync,
            checkpoints,
            placement,
            start,
            progress,
            stop_requested: Default::default(),
            handover_requested: Default::default(),
            leaving: Default::default(),
            next_peers: Default::default(),
            peers: assignment.peers.clone(),
            group_handover: false,
            handover: None,
            checkpoint_requested: Default::default(),
            group_stop: false,
            engine: step::EngineOptions {
                recompute: runtime.recompute() == runtime_spec::Recompute::Blocks,
                kernels,
                explicit_blocks,
                recompute_elementwise,
                split_projections: runtime.split_projections && explicit_blocks,
            },
            clock: PhaseClock::new(runtime.profile, placement.cuda_ordinal()),
            peak_flops,
            cuda,
            peak_memory: 0,
            checkpoint_blocking_s: 0.0,
            generation: assignment.generation,
            last_checkpoint: Instant::now(),
            group_checkpoint: false,
        })
    }

    /// Optimizer steps completed.
    pub fn step(&self) -> u64 {
        self.progress.step
    }

    /// Samples consumed.
    pub fn cursor(&self) -> u64 {
        self.progress.cursor
    }

    /// The step of the checkpoint this run resumed from, if any.
    pub fn resumed_from(&self) -> Option<u64> {
        match self.start {
            Start::Checkpoint(step) => Some(step),
            Start::Fresh | Start::Handover(_) => None,
        }
    }

    /// Where this trainer's state came from.
    pub fn start(&self) -> Start {
        self.start
    }

    /// After [`Trainer::run`] stopped for the group's next generation: the state this rank
    /// carries to it (`None` on a rank that left, or when the group checkpointed instead).
    pub fn take_handover(&mut self) -> Option<Handover> {
        self.handover.take()
    }

    /// Device and dtype in use.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// Samples per epoch of the training data.
    pub fn samples_per_epoch(&self) -> u64 {
        self.batches.samples_per_epoch()
    }

    /// This rank and the group size.
    pub fn rank_and_world(&mut self) -> (usize, usize) {
        let c = self.sync.collective();
        (c.rank(), c.world_size())
    }

    /// The collective backend in use (`solo`, `ring` or `nccl`).
    pub fn backend(&mut self) -> &'static str {
        self.sync.collective().backend()
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
        let checkpoints = *section!(self.spec, checkpoint);
        let every = if checkpoints.disabled { 0 } else { checkpoints.every_steps };
        let target = stop_after.map_or(train.steps, |s| s.min(train.steps));
        let mut saved_at = self.resumed_from();
        let mut first_step = true;
        while self.progress.step < target {
            let metrics = self.train_step()?;
            let step = self.progress.step;
            if std::mem::take(&mut first_step) {
                if let Some(line) = crate::cuda::gemm::summary() {
                    tracing::info!(step, "runtime.gemm = tuned: {line}");
                }
            }
            if step.is_multiple_of(train.log_every_steps as u64) || step == target {
                observer(&metrics).map_err(WorkerError::Observer)?;
            }
            if every > 0 && step.is_multiple_of(every) || self.group_checkpoint && !checkpoints.disabled {
                self.save_checkpoint()?;
                saved_at = Some(step);
            }
            if self.group_stop {
                tracing::info!(step, "stop requested; saving a checkpoint and stopping");
                break;
            }
            if self.group_handover {
                tracing::info!(step, "stopping for the group's next generation; handing the state over in memory");
                break;
            }
        }
        let mut handed_over = false;
        if self.group_handover && !self.group_stop && self.progress.step < train.steps {
            self.sync.wait_params()?;
            let leaving = self.leaving.load(Ordering::Relaxed);
            let next = self.next_peers.lock().map(|n| n.clone()).unwrap_or_default();
            let (rank, world) = self.rank_and_world();
            let absent: Vec<bool> = (0..world)
                .map(|r| {
                    (r == rank && leaving)
                        || next.as_ref().zip(self.peers.get(r)).is_some_and(|(next, own)| !next.contains(own))
                })
                .collect();
            let partitions = self.clamped_partitions();
            let (progress, generation) = (self.progress, self.generation);
            let (collective, opt) = self.sync.collective_and_optimizer();
            match handover::hand_off(collective, &absent, opt, &partitions, progress, generation)? {
                handover::HandOff::Stayed(h) => (self.handover, handed_over) = (Some(h), true),
                handover::HandOff::Left => handed_over = true,
                // Nobody to hand it to: checkpoint, as for a stop.
                handover::HandOff::NobodyStays => {}
            }
        }
        if !checkpoints.disabled && !handed_over && saved_at != Some(self.progress.step) {
            self.save_checkpoint()?;
        }
        // The run's last checkpoint is published before anyone (a resumed run, the next
        // generation of the group) can look for it: every rank's report has been answered
        // once all have passed the barrier, and the last report answered published it.
        self.checkpoints.wait()?;
        self.sync.wait_params()?;
        if self.sync.collective().world_size() > 1 {
            self.sync.collective().barrier().map_err(|e| WorkerError::Collective(e.to_string()))?;
        }
        Ok(if self.progress.step >= train.steps { RunEnd::Finished } else { RunEnd::Stopped })
    }

    /// One optimizer step over the next global batch: this rank's micro-batches forward and
    /// backward (gradients reduce-scatter bucket by bucket as backward produces them), then
    /// the group agrees on the norm and loss, clips, updates its partition and starts the
    /// parameter all-gathers, which the next step's forward waits for stage by stage (so the
    /// parameters are whole again only once [`Trainer::run`] returns).
    pub fn train_step(&mut self) -> Result<StepMetrics, WorkerError> {
        let started = Instant::now();
        let train = *section!(self.spec, train);
        let opt_spec = *section!(self.spec, optimizer);
        let schedule = *section!(self.spec, schedule);
        let lr = learning_rate(&schedule, opt_spec.lr, self.progress.step, train.steps);
        let device = self.placement.device;
        let micro = self.batches.micro_batches();
        let mut loss = Tensor::zeros([], (Kind::Float, device));
        self.clock.start();
        // Sources that generate their data (GRPO) need the parameters whole first.
        let rollout = if self.spec.grpo.is_some() {
            self.sync.wait_params()?;
            self.batches.begin_step(self.progress.cursor, &self.model, self.sync.collective())?
        } else {
            None
        };
        let rollout_s = rollout.map_or(0.0, |r| r.seconds);
        if rollout.is_some() {
            self.clock.lap("rollout");
        }
        self.objective.normalise(self.batches.loss_tokens(self.progress.cursor));
        for m in 0..micro {
            self.sync.begin_micro_batch(m, micro);
            let batch = self.batches.micro_batch(self.progress.cursor, m, device)?;
            self.clock.lap("data");
            let l = step::forward_backward(
                &self.model,
                &self.stages,
                &batch,
                self.objective.as_ref(),
                &self.engine,
                &mut self.sync,
                &mut self.clock,
            )?;
            loss += l.to_kind(Kind::Float);
        }
        // (In profile mode the clock's last lap waited for the device.)
        let compute_s = started.elapsed().as_secs_f64();
        let params = self.model.params.flat().shallow_clone();
        let every_seconds = section!(self.spec, checkpoint).every_seconds;
        let votes = Votes {
            stop: self.stop_requested.load(Ordering::Relaxed),
            checkpoint: every_seconds > 0.0 && self.last_checkpoint.elapsed().as_secs_f64() >= every_seconds
                || self.checkpoint_requested.swap(false, Ordering::Relaxed),
            handover: self.handover_requested.load(Ordering::Relaxed),
        };
        let synced = self.sync.finish(&params, &loss, votes, lr, opt_spec.grad_clip, &mut self.clock)?;
        self.group_checkpoint = synced.checkpoint;
        self.group_handover = synced.handover;
        if !synced.loss.is_finite() {
            return Err(WorkerError::Diverged(format!(
                "the loss became {} at step {}; lower optimizer.lr or check the data",
                synced.loss,
                self.progress.step + 1
            )));
        }
        self.group_stop = synced.stop;
        let step_time_s = started.elapsed().as_secs_f64();
        let world = self.sync.partitions().len();
        let step_tokens = self.batches.tokens_per_step();
        self.progress.step += 1;
        self.progress.cursor += self.batches.samples_per_step();
        self.progress.tokens += step_tokens;
        self.progress.elapsed_s += step_time_s;
        self.peak_memory = self.peak_memory.max(crate::device::memory_in_use(device, self.cuda.as_deref()));
        let tokens_per_s = step_tokens as f64 / step_time_s.max(1e-9);
        // (Not for GRPO: generation is not a training step's arithmetic.)
        let mfu = match (self.peak_flops, rollout) {
            (Some(peak), None) => tokens_per_s / world as f64 * self.flops_per_token / peak,
            _ => 0.0,
        };
        let policy = match self.objective.take_policy_sums() {
            Some(sums) if rollout.is_some() => crate::collective::all_sum(self.sync.collective(), &sums, device)
                .map_err(|e| WorkerError::Collective(e.to_string()))?,
            _ => vec![0.0; 3],
        };
        let per_token = |x: f64| if policy[0] > 0.0 { x / policy[0] } else { 0.0 };
        let r = rollout.unwrap_or_default();
        Ok(StepMetrics {
            rollout: rollout.is_some(),
            reward_mean: r.reward_mean,
            reward_std: r.reward_std,
            zero_std_fraction: r.zero_std_fraction,
            completion_len_mean: r.len_mean,
            completion_len_max: r.len_max,
            truncation_ratio: r.truncation_ratio,
            kl: per_token(policy[2]),
            clip_fraction: per_token(policy[1]),
            entropy: r.entropy,
            rollout_s,
            update_s: if rollout.is_some() { step_time_s - rollout_s } else { 0.0 },
            step: self.progress.step,
            loss: synced.loss,
            lr,
            grad_norm: synced.grad_norm,
            tokens: self.progress.tokens,
            tokens_per_s,
            elapsed_s: self.progress.elapsed_s,
            step_time_s,
            world_size: world as u32,
            generation: self.generation,
            data_cursor: self.progress.cursor,
            compute_s,
            optimizer_s: (step_time_s - compute_s - synced.comm.exposed_s).max(0.0),
            comm_s: synced.comm.busy_s,
            comm_exposed_s: synced.comm.exposed_s,
            mfu,
            peak_memory_bytes: self.peak_memory,
            checkpoint_blocking_s: std::mem::take(&mut self.checkpoint_blocking_s),
            checkpoint_write_s: self.checkpoints.take_write_seconds()?,
            phase_s: self.clock.take().into_iter().map(|(name, s)| (name.to_string(), s)).collect(),
        })
    }

    /// Checkpoints the current state (every rank of the group takes part); the write
    /// finishes in the background unless `checkpoint.synchronous`.
    pub fn save_checkpoint(&mut self) -> Result<(), WorkerError> {
        self.sync.wait_params()?;
        let partitions = self.clamped_partitions().into_iter().map(|r| (r.start, r.end)).collect();
        let keep_last = section!(self.spec, checkpoint).keep_last as usize;
        let files = self.batches.checkpoint_files();
        let progress = self.progress;
        let (collective, opt) = self.sync.collective_and_optimizer();
        self.checkpoint_blocking_s +=
            self.checkpoints.save(collective, partitions, &self.model, opt, progress, files, keep_last)?;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Every rank's partition, clamped to the real parameters.
    fn clamped_partitions(&self) -> Vec<std::ops::Range<i64>> {
        clamp(self.sync.partitions(), self.model.params.numel())
    }
}

/// `partitions` clamped to the first `numel` elements (the padding after them has no
/// optimizer state).
fn clamp(partitions: &[std::ops::Range<usize>], numel: i64) -> Vec<std::ops::Range<i64>> {
    partitions.iter().map(|r| (r.start as i64).min(numel)..(r.end as i64).min(numel)).collect()
}
