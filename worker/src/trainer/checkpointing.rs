//! The checkpoint coordinator: saving a group's state at one step and resuming from it.
//!
//! Saving in a group: every rank copies its optimizer partition and its share of the model
//! off the training path into host memory and hands the copy to a background writer, and
//! training goes on. Each writer writes its files into the generation's staging directory,
//! hashing while writing, and reports them to the [`Committer`] (the coordinator, or this
//! process in `train`), which writes the manifest last and publishes once every rank has
//! reported. At most one checkpoint per rank is in flight: the next save, and the end of a
//! run, wait for the previous one. `checkpoint.synchronous = true` waits at once (and ends
//! with a barrier, so the checkpoint is published when `save` returns). Resuming: the newest
//! checkpoint that verifies, if it fits this job (same model, data, sequence length and
//! seed); its optimizer partitions load into any partitioning, so a run can resume at
//! another world size.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use moxin_proto::v1::{CheckpointPart, JobSpec, OptimizerFile};
use tch::Tensor;

use crate::checkpoint::{self, CheckpointManifest, Committed, Committer, RngState};
use crate::collective::Collective;
use crate::model::Transformer;
use crate::optim::AdamW;
use crate::WorkerError;

/// Name of the data-order algorithm recorded in checkpoints.
const DATA_ORDER: &str = "feistel6-splitmix64-v1";

/// How far a run has got: everything besides parameters and optimizer state that a resumed
/// run needs to continue exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Progress {
    /// Optimizer steps completed.
    pub step: u64,
    /// Samples consumed.
    pub cursor: u64,
    /// Tokens trained on.
    pub tokens: u64,
    /// Training wall time, seconds.
    pub elapsed_s: f64,
}

/// Saves and restores checkpoints of one job's run directory.
pub struct Checkpointer {
    run_dir: PathBuf,
    spec: JobSpec,
    /// The background write in flight, if any.
    writing: Option<Writing>,
    /// Seconds of background writes completed since [`Checkpointer::take_write_seconds`].
    completed_write_s: f64,
    /// Where the optimizer partition and (rank 0) the model are copied at a checkpoint.
    optimizer_snapshot: Snapshot,
    model_snapshot: Snapshot,
    /// The membership generation of this rank's group (names the staging directory).
    generation: u64,
    /// Where finished files are reported.
    committer: Arc<dyn Committer>,
}

struct Writing {
    step: u64,
    handle: std::thread::JoinHandle<Result<f64, WorkerError>>,
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        if let Some(w) = self.writing.take() {
            match w.handle.join() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(step = w.step, "checkpoint not completed: {e}"),
                Err(_) => tracing::warn!(step = w.step, "the checkpoint writer panicked"),
            }
        }
    }
}

/// Host buffers that checkpoint snapshots are copied into, allocated once and reused:
/// pinned (page-locked) when the state lives on a GPU, so the device-to-host copy runs at
/// full bus speed and no time goes to faulting in fresh pages at every checkpoint. The
/// background writer reads them; the next snapshot waits for it first.
#[derive(Default)]
struct Snapshot {
    buffers: Vec<Tensor>,
}

impl Snapshot {
    /// Copies `tensors` into the buffers (allocating them on first use or when shapes
    /// change) and returns views of the copies, which training cannot change any more.
    fn take(&mut self, tensors: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
        let fits = self.buffers.len() == tensors.len()
            && self.buffers.iter().zip(tensors).all(|(b, (_, t))| b.size() == t.size() && b.kind() == t.kind());
        if !fits {
            self.buffers = tensors
                .iter()
                .map(|(_, t)| {
                    let buffer = Tensor::empty(t.size(), (t.kind(), tch::Device::Cpu));
                    match t.device() {
                        tch::Device::Cuda(i) => buffer.pin_memory(tch::Device::Cuda(i)),
                        _ => buffer,
                    }
                })
                .collect();
        }
        self.buffers
            .iter_mut()
            .zip(tensors)
            .map(|(buffer, (name, t))| {
                buffer.copy_(t);
                (name.clone(), buffer.shallow_clone())
            })
            .collect()
    }
}

impl Checkpointer {
    /// The checkpoints of `spec`'s run directory, saved by a group of generation
    /// `generation` and committed by `committer`.
    pub fn new(spec: &JobSpec, generation: u64, committer: Arc<dyn Committer>) -> Self {
        Checkpointer {
            run_dir: PathBuf::from(&spec.run_dir),
            spec: spec.clone(),
            writing: None,
            completed_write_s: 0.0,
            optimizer_snapshot: Snapshot::default(),
            model_snapshot: Snapshot::default(),
            generation,
            committer,
        }
    }

    /// Waits for the checkpoint in flight, if any, to be written (and, on rank 0,
    /// published); its error, if it failed.
    pub fn wait(&mut self) -> Result<(), WorkerError> {
        let Some(w) = self.writing.take() else { return Ok(()) };
        let seconds = w.handle.join().map_err(|_| WorkerError::Checkpoint {
            path: self.run_dir.clone(),
            reason: format!("the writer of step {} panicked", w.step),
        })??;
        self.completed_write_s += seconds;
        metrics::gauge!("moxin_checkpoint_write_seconds").set(seconds);
        Ok(())
    }

    /// Background write seconds completed since the last call (0 if none); collects a
    /// finished write without waiting for one still running.
    pub fn take_write_seconds(&mut self) -> Result<f64, WorkerError> {
        if self.writing.as_ref().is_some_and(|w| w.handle.is_finished()) {
            self.wait()?;
        }
        Ok(std::mem::take(&mut self.completed_write_s))
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Loads the newest valid checkpoint into `model` and `opt`, if there is one; refuses
    /// one that does not fit this job, saying why and what to do.
    pub fn restore_latest(&self, model: &mut Transformer, opt: &mut AdamW) -> Result<Option<Progress>, WorkerError> {
        let Some(ckpt) = checkpoint::latest_valid(&self.run_dir)? else { return Ok(None) };
        let m = &ckpt.manifest;
        let refuse = |reason: String| WorkerError::Resume { run_dir: self.run_dir.clone(), reason };
        if m.model != model.shape {
            let (saved, now) = (
                serde_json::to_value(&m.model).unwrap_or_default(),
                serde_json::to_value(&model.shape).unwrap_or_default(),
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
        let data_sha = self.spec.data.as_ref().map(|d| d.manifest_sha256.clone()).unwrap_or_default();
        if m.data_manifest_sha256 != data_sha {
            return Err(refuse(format!(
                "{} was trained on other data (manifest sha256 {}, now {data_sha}); the data cursor would be \
                 meaningless. Pass a new --out to start a fresh run",
                ckpt.dir.display(),
                m.data_manifest_sha256,
            )));
        }
        let seq_len = self.spec.train.as_ref().map_or(0, |t| t.seq_len);
        if m.seq_len != seq_len || m.rng.seed != self.spec.seed {
            return Err(refuse(format!(
                "{} used seq_len {} and seed {}, this job has seq_len {seq_len} and seed {}; pass a new --out",
                ckpt.dir.display(),
                m.seq_len,
                m.rng.seed,
                self.spec.seed
            )));
        }
        let tensors = checkpoint::model_tensors(&ckpt)?;
        model
            .params
            .load_named(&tensors)
            .map_err(|reason| WorkerError::Checkpoint { path: ckpt.dir.join(checkpoint::MODEL_FILE), reason })?;
        let mut restored = 0;
        let (own_start, own_end) = (opt.start, opt.end);
        for i in 0..m.optimizer.len() {
            // Only files overlapping this rank's partition are read (at another world size,
            // or when a partition was split into several files, that is not all of them).
            if m.optimizer[i].end <= own_start || m.optimizer[i].start >= own_end {
                continue;
            }
            let (part, tensors) = checkpoint::optimizer_part(&ckpt, i)?;
            restored += opt
                .load_overlap(part.start, part.end, &tensors)
                .map_err(|reason| WorkerError::Checkpoint { path: ckpt.dir.join(&part.file), reason })?;
        }
        if restored != opt.len() {
            return Err(WorkerError::Checkpoint {
                path: ckpt.dir.clone(),
                reason: format!("optimizer partitions cover {restored} of {} elements", opt.len()),
            });
        }
        opt.write_params(model.params.flat());
        tracing::info!(step = m.step, dir = %ckpt.dir.display(), "resumed from checkpoint");
        Ok(Some(Progress { step: m.step, cursor: m.data_cursor, tokens: m.tokens, elapsed_s: m.elapsed_s }))
    }

    /// Checkpoints the group's state at `progress`: every rank calls this with its
    /// optimizer; `partitions` are every rank's flat ranges (clamped to the parameters).
    /// Returns once the state is copied off the training path (or, synchronous, once the
    /// checkpoint is published); the seconds training waited.
    #[allow(clippy::too_many_arguments)]
    pub fn save(
        &mut self,
        collective: &mut dyn Collective,
        partitions: Vec<(i64, i64)>,
        model: &Transformer,
        opt: &AdamW,
        progress: Progress,
        extra_files: Vec<(String, crate::checkpoint::CarriedFile)>,
        keep_last: usize,
    ) -> Result<f64, WorkerError> {
        let started = Instant::now();
        let synchronous = self.spec.checkpoint.as_ref().is_some_and(|c| c.synchronous);
        self.wait()?;
        let waited = started.elapsed().as_secs_f64();
        let (rank, world) = (collective.rank(), collective.world_size());
        let copying = Instant::now();
        let state = self.optimizer_snapshot.take(&opt.state_tensors());
        // Every rank writes its share of the model file, so no rank writes much more than
        // the others (rank 0 alone would write the whole model on top of its partition).
        let named = model.params.named_tensors();
        let model_part = checkpoint::ModelPart::of(&named, rank, world)?;
        let model_state = self.model_snapshot.take(&named[model_part.part.clone()]);
        let bytes: i64 =
            state.iter().chain(&model_state).map(|(_, t)| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64).sum();
        tracing::info!(
            step = progress.step,
            "checkpoint snapshot: waited {waited:.3} s for the previous write, copied {:.2} GB off the training path in {:.3} s",
            bytes as f64 / 1e9,
            copying.elapsed().as_secs_f64()
        );
        let manifest = CheckpointManifest {
            format: String::new(),
            step: progress.step,
            data_cursor: progress.cursor,
            tokens: progress.tokens,
            elapsed_s: progress.elapsed_s,
            rng: RngState { seed: self.spec.seed, data_order: DATA_ORDER.into() },
            world_size: world as u32,
            seq_len: self.spec.train.as_ref().map_or(0, |t| t.seq_len),
            model: model.shape.clone(),
            data_manifest_sha256: self.spec.data.as_ref().map(|d| d.manifest_sha256.clone()).unwrap_or_default(),
            resolved_config_toml: self.spec.resolved_config_toml.clone(),
            optimizer: Vec::new(),
            files: Default::default(),
            file_parts: Default::default(),
            file_bytes: Default::default(),
            build: checkpoint::build_info(),
            token_ids: None,
        };
        let (start, end) = partitions[rank];
        let file_bytes = self.spec.checkpoint.as_ref().map_or(0, |c| c.optimizer_file_bytes);
        let partition = checkpoint::partition_files(rank, start, end, file_bytes);
        let mut part = CheckpointPart {
            worker_id: String::new(),
            generation: self.generation,
            step: progress.step,
            rank: rank as u32,
            world_size: world as u32,
            files: Vec::new(),
            optimizer_files: partition.iter().map(OptimizerFile::from).collect(),
            manifest_json: if rank == 0 {
                serde_json::to_string(&manifest).map_err(|e| WorkerError::Spec(format!("checkpoint manifest: {e}")))?
            } else {
                String::new()
            },
            keep_last: keep_last as u32,
        };
        // The model and the files copied in are rank 0's to write.
        let extra_files = if rank == 0 { extra_files } else { Vec::new() };
        let staging = checkpoint::staging_dir(&self.run_dir, progress.step, self.generation);
        let committer = self.committer.clone();
        let step = progress.step;
        let write = move || -> Result<f64, WorkerError> {
            let began = Instant::now();
            std::fs::create_dir_all(&staging).map_err(|e| WorkerError::io(&staging, e))?;
            part.files =
                checkpoint::write_rank_files(&staging, &partition, &state, (&model_part, model_state), &extra_files)?;
            checkpoint::record_part(&staging, &part)?;
            match committer.commit(part)? {
                Committed::Accepted => {}
                Committed::Published(dir) => {
                    tracing::info!(step, dir = %dir.display(), secs = began.elapsed().as_secs_f64(), "checkpoint saved");
                }
                Committed::Abandoned(why) => tracing::warn!(step, "checkpoint abandoned: {why}"),
            }
            Ok(began.elapsed().as_secs_f64())
        };
        let handle = std::thread::Builder::new()
            .name(format!("moxin-ckpt-{step}"))
            .spawn(write)
            .map_err(|e| WorkerError::Setup(format!("cannot start the checkpoint writer: {e}")))?;
        self.writing = Some(Writing { step, handle });
        if synchronous {
            self.wait()?;
            collective.barrier().map_err(|e| WorkerError::Collective(e.to_string()))?;
        }
        let blocking = started.elapsed().as_secs_f64();
        metrics::gauge!("moxin_checkpoint_blocking_seconds").set(blocking);
        Ok(blocking)
    }
}
