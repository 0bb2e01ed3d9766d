//! The checkpoint coordinator: saving a group's state at one step and resuming from it.
//!
//! Saving in a group: rank 0 stages `checkpoints/.tmp-step-N`, every rank writes its
//! optimizer partition there, rank 0 writes the model and the manifest (hashes last) and
//! publishes by renaming; barriers separate the phases. Resuming: the newest checkpoint
//! that verifies, if it fits this job (same model, data, sequence length and seed); its
//! optimizer partitions load into any partitioning, so a run can resume at another world
//! size.

use std::path::{Path, PathBuf};
use std::time::Instant;

use moxin_proto::v1::JobSpec;

use crate::checkpoint::{self, CheckpointManifest, RngState, SaveRequest};
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
}

impl Checkpointer {
    /// The checkpoints of `spec`'s run directory.
    pub fn new(spec: &JobSpec) -> Self {
        Checkpointer { run_dir: PathBuf::from(&spec.run_dir), spec: spec.clone() }
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Removes temporary directories of interrupted saves (rank 0 does this at start).
    pub fn sweep(&self) {
        checkpoint::sweep_temporaries(&self.run_dir);
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
        let tensors = ckpt.model_tensors()?;
        model
            .params
            .load_named(&tensors)
            .map_err(|reason| WorkerError::Checkpoint { path: ckpt.dir.join(checkpoint::MODEL_FILE), reason })?;
        let mut restored = 0;
        for i in 0..m.optimizer.len() {
            let (part, tensors) = ckpt.optimizer_part(i)?;
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

    /// Writes a checkpoint of the group's state at `progress`: every rank calls this with
    /// its optimizer; `partitions` are every rank's flat ranges (clamped to the parameters).
    #[allow(clippy::too_many_arguments)]
    pub fn save(
        &self,
        collective: &mut dyn Collective,
        partitions: Vec<(i64, i64)>,
        model: &Transformer,
        opt: &AdamW,
        progress: Progress,
        extra_files: Vec<(String, PathBuf)>,
        keep_last: usize,
    ) -> Result<PathBuf, WorkerError> {
        let started = Instant::now();
        let (rank, world) = (collective.rank(), collective.world_size());
        let barrier = |c: &mut dyn Collective| c.barrier().map_err(|e| WorkerError::Collective(e.to_string()));
        if rank == 0 {
            checkpoint::stage(&self.run_dir, progress.step)?;
        }
        barrier(collective)?;
        checkpoint::write_partition(&self.run_dir, progress.step, rank, &opt.state_tensors())?;
        barrier(collective)?;
        let dir = checkpoint::checkpoints_dir(&self.run_dir).join(format!("step-{:08}", progress.step));
        if rank == 0 {
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
            };
            checkpoint::publish(SaveRequest {
                run_dir: &self.run_dir,
                manifest,
                model: model.params.named_tensors(),
                partitions,
                extra_files,
                keep_last,
            })?;
            tracing::info!(step = progress.step, dir = %dir.display(), secs = started.elapsed().as_secs_f64(), "checkpoint saved");
        }
        barrier(collective)?;
        Ok(dir)
    }
}
