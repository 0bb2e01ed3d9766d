//! Checkpoints: `<run dir>/checkpoints/step-<8 digits>/` holding `model.safetensors` (HF
//! names), one `optimizer.part-<rank>.safetensors` per optimizer partition, and
//! `manifest.json` (step, data cursor, RNG state, resolved config, sha256 of every file).
//!
//! Commit protocol: everything is written into a hidden temporary directory, fsynced, the
//! manifest written last, then the directory is renamed into place and the parent fsynced.
//! A crash at any point leaves either the previous checkpoints untouched or a temporary
//! directory that is never mistaken for a checkpoint (and is swept on the next start).
//! Old checkpoints are pruned only after a new one is published.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::WorkerError;
use moxin_layout::ModelShape;

const FORMAT: &str = "moxin-checkpoint-v1";
/// Manifest file name.
pub const MANIFEST: &str = "manifest.json";
/// Model weights file name.
pub const MODEL_FILE: &str = "model.safetensors";
/// Tokenizer copied from the training data.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// One optimizer partition file: the flat range it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionFile {
    /// File name inside the checkpoint directory.
    pub file: String,
    /// First flat element.
    pub start: i64,
    /// One past the last flat element.
    pub end: i64,
}

/// Random state needed to continue a run exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// Master seed of the job.
    pub seed: u64,
    /// Name of the data-order algorithm (the order is a pure function of seed and cursor).
    pub data_order: String,
}

/// `manifest.json` of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointManifest {
    /// `moxin-checkpoint-v1`.
    pub format: String,
    /// Optimizer steps completed.
    pub step: u64,
    /// Samples consumed (the data cursor to continue from).
    pub data_cursor: u64,
    /// Tokens trained on so far.
    pub tokens: u64,
    /// Training wall time so far, seconds.
    pub elapsed_s: f64,
    /// Random state.
    pub rng: RngState,
    /// Ranks that trained it.
    pub world_size: u32,
    /// Sequence length trained on.
    pub seq_len: u32,
    /// Model shape.
    pub model: ModelShape,
    /// sha256 of the training data's manifest.
    pub data_manifest_sha256: String,
    /// The resolved job configuration (TOML).
    pub resolved_config_toml: String,
    /// Optimizer partitions.
    pub optimizer: Vec<PartitionFile>,
    /// sha256 of every other file in the directory.
    pub files: std::collections::BTreeMap<String, String>,
    /// The software that wrote it (absent in checkpoints of older builds).
    #[serde(default)]
    pub build: BuildInfo,
}

/// Which build wrote a checkpoint: enough to reproduce or to explain a difference.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildInfo {
    /// moxin-train's version.
    pub moxin_train: String,
    /// The git commit it was built from ("unknown" outside a git checkout).
    pub git_commit: String,
    /// Whether that checkout had uncommitted changes ("true", "false" or "unknown").
    pub git_dirty: String,
    /// The libtorch version it ran on.
    pub torch: String,
}

impl BuildInfo {
    /// This process's build.
    pub fn current() -> Self {
        BuildInfo {
            moxin_train: env!("CARGO_PKG_VERSION").into(),
            git_commit: env!("MOXIN_GIT_COMMIT").into(),
            git_dirty: env!("MOXIN_GIT_DIRTY").into(),
            torch: crate::cuda::libraries::torch_lib_dir()
                .and_then(|d| crate::cuda::libraries::torch_version(&d))
                .unwrap_or_else(|| "unknown".into()),
        }
    }
}

/// A checkpoint found on disk and verified.
#[derive(Debug)]
pub struct Checkpoint {
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: CheckpointManifest,
}

impl Checkpoint {
    /// Reads and verifies the checkpoint in `dir` (manifest and every file's sha256).
    pub fn open(dir: &Path) -> Result<Self, WorkerError> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| WorkerError::Checkpoint {
            path: path.clone(),
            reason: format!(
                "cannot read the manifest ({e}); is this a checkpoint directory (checkpoints/step-NNNNNNNN)?"
            ),
        })?;
        let manifest: CheckpointManifest = serde_json::from_str(&text)
            .map_err(|e| WorkerError::Checkpoint { path: path.clone(), reason: format!("invalid manifest: {e}") })?;
        if manifest.format != FORMAT {
            return Err(WorkerError::Checkpoint {
                path,
                reason: format!("format {:?}, expected {FORMAT:?}", manifest.format),
            });
        }
        for (file, want) in &manifest.files {
            let file_path = dir.join(file);
            let got = sha256_file(&file_path)?;
            if &got != want {
                return Err(WorkerError::Checkpoint {
                    path: file_path,
                    reason: format!("sha256 {got} does not match the manifest ({want}); the file is corrupt"),
                });
            }
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), manifest })
    }

    /// Loads the model tensors.
    pub fn model_tensors(&self) -> Result<Vec<(String, Tensor)>, WorkerError> {
        let path = self.dir.join(MODEL_FILE);
        Tensor::read_safetensors(&path).map_err(|e| WorkerError::Checkpoint { path, reason: e.to_string() })
    }

    /// Loads optimizer partition `index`: `(master, exp_avg, exp_avg_sq, step)`.
    pub fn optimizer_part(&self, index: usize) -> Result<(PartitionFile, Vec<(String, Tensor)>), WorkerError> {
        let part = self.manifest.optimizer.get(index).cloned().ok_or_else(|| WorkerError::Checkpoint {
            path: self.dir.join(MANIFEST),
            reason: format!("no optimizer partition {index}"),
        })?;
        let path = self.dir.join(&part.file);
        let tensors =
            Tensor::read_safetensors(&path).map_err(|e| WorkerError::Checkpoint { path, reason: e.to_string() })?;
        Ok((part, tensors))
    }
}

/// The checkpoints directory of a run.
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn parse_step(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    (digits.len() == 8 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok())?
}

/// Published checkpoint directories of a run, newest first.
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>, WorkerError> {
    let dir = checkpoints_dir(run_dir);
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(WorkerError::io(&dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| WorkerError::io(&dir, e))?;
        if let Some(step) = entry.file_name().to_str().and_then(parse_step) {
            found.push((step, entry.path()));
        }
    }
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    Ok(found)
}

/// The newest checkpoint of the run that verifies, skipping (and reporting) broken ones.
/// `None` only when the run has no checkpoints at all: when every one is broken, starting
/// again from step 0 would silently overwrite them, so that is an error saying how to start
/// over deliberately.
pub fn latest_valid(run_dir: &Path) -> Result<Option<Checkpoint>, WorkerError> {
    let found = list(run_dir)?;
    let mut problems = Vec::new();
    for (_, dir) in &found {
        match Checkpoint::open(dir) {
            Ok(ckpt) => return Ok(Some(ckpt)),
            Err(e) => {
                tracing::warn!("skipping invalid checkpoint: {e}");
                problems.push(e.to_string());
            }
        }
    }
    if found.is_empty() {
        return Ok(None);
    }
    Err(WorkerError::Resume {
        run_dir: run_dir.to_path_buf(),
        reason: format!(
            "none of its {} checkpoint(s) is valid ({}); nothing was changed. To start over from step 0 \
             deliberately, move {} away or pass a new --out",
            found.len(),
            problems.join("; "),
            checkpoints_dir(run_dir).display()
        ),
    })
}

/// Removes temporary directories left by interrupted saves.
pub fn sweep_temporaries(run_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(checkpoints_dir(run_dir)) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_str().is_some_and(|n| n.starts_with(".tmp-")) {
            tracing::info!(dir = %entry.path().display(), "removing an interrupted checkpoint");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// What publishing a checkpoint needs besides the optimizer partitions.
pub struct SaveRequest<'a> {
    /// Run directory.
    pub run_dir: &'a Path,
    /// Manifest fields (files and optimizer are filled in by [`publish`]).
    pub manifest: CheckpointManifest,
    /// Model tensors with HF names.
    pub model: Vec<(String, Tensor)>,
    /// Optimizer partitions already written into the staging directory: `(start, end)` of
    /// partition `i`, whose file is [`partition_file`]`(i)`.
    pub partitions: Vec<(i64, i64)>,
    /// Files copied in as they are, `(name in the checkpoint, source)`: e.g. the tokenizer,
    /// so a checkpoint is self-contained for generation and export.
    pub extra_files: Vec<(String, PathBuf)>,
    /// Keep this many newest checkpoints.
    pub keep_last: usize,
}

/// File name of optimizer partition `index`.
pub fn partition_file(index: usize) -> String {
    format!("optimizer.part-{index:05}.safetensors")
}

/// Creates (afresh) the staging directory for the checkpoint of `step`. Every rank of a
/// group writes its partition into the same directory, so its name depends only on the step.
pub fn stage(run_dir: &Path, step: u64) -> Result<PathBuf, WorkerError> {
    let root = checkpoints_dir(run_dir);
    std::fs::create_dir_all(&root).map_err(|e| WorkerError::io(&root, e))?;
    let tmp = staging_dir(run_dir, step);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| WorkerError::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| WorkerError::io(&tmp, e))?;
    Ok(tmp)
}

fn staging_dir(run_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run_dir).join(format!(".tmp-{}", step_dir_name(step)))
}

/// Writes optimizer partition `index` into the staging directory of `step` (fsynced). The
/// file appears under its final name only once complete, so its existence tells rank 0
/// (see [`wait_for_partitions`]) that this rank is done.
pub fn write_partition(
    run_dir: &Path,
    step: u64,
    index: usize,
    tensors: &[(String, Tensor)],
) -> Result<(), WorkerError> {
    let dir = staging_dir(run_dir, step);
    let partial = format!("{}.partial", partition_file(index));
    write_safetensors(&dir, &partial, tensors)?;
    let done = dir.join(partition_file(index));
    std::fs::rename(dir.join(&partial), &done).map_err(|e| WorkerError::io(&done, e))
}

/// Waits until the staging directory of `step` holds all `count` partition files, checking
/// `cancelled` between looks; `Ok(false)` if cancelled (the group broke: the checkpoint is
/// abandoned and its staging directory swept later).
pub fn wait_for_partitions(
    run_dir: &Path,
    step: u64,
    count: usize,
    cancelled: &std::sync::atomic::AtomicBool,
    deadline: std::time::Instant,
) -> Result<bool, WorkerError> {
    let dir = staging_dir(run_dir, step);
    loop {
        let missing: Vec<usize> = (0..count).filter(|i| !dir.join(partition_file(*i)).exists()).collect();
        if missing.is_empty() {
            return Ok(true);
        }
        if cancelled.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(false);
        }
        if std::time::Instant::now() > deadline {
            // A rank died while writing: the group is broken, and this checkpoint with it.
            return Err(WorkerError::Collective(format!(
                "checkpoint of step {step}: rank(s) {missing:?} did not write their optimizer partitions in time; \
                 the checkpoint is abandoned"
            )));
        }
        if !dir.exists() {
            return Err(WorkerError::Checkpoint { path: dir, reason: "the staging directory vanished".into() });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Writes the model, extra files and manifest (with every file's sha256, last) into the
/// staging directory, renames it into place, and prunes old checkpoints.
pub fn publish(req: SaveRequest<'_>) -> Result<PathBuf, WorkerError> {
    let root = checkpoints_dir(req.run_dir);
    let name = step_dir_name(req.manifest.step);
    let tmp = staging_dir(req.run_dir, req.manifest.step);
    let mut manifest = req.manifest;
    manifest.format = FORMAT.into();
    manifest.files.clear();
    manifest.optimizer.clear();
    write_safetensors(&tmp, MODEL_FILE, &req.model)?;
    for (name, source) in &req.extra_files {
        let dest = tmp.join(name);
        std::fs::copy(source, &dest).map_err(|e| WorkerError::io(source, e))?;
        File::open(&dest).and_then(|f| f.sync_all()).map_err(|e| WorkerError::io(&dest, e))?;
    }
    for (i, (start, end)) in req.partitions.iter().enumerate() {
        manifest.optimizer.push(PartitionFile { file: partition_file(i), start: *start, end: *end });
    }
    let names = std::iter::once(MODEL_FILE.to_string())
        .chain(req.extra_files.iter().map(|(n, _)| n.clone()))
        .chain((0..req.partitions.len()).map(partition_file));
    for file in names {
        manifest.files.insert(file.clone(), sha256_file(&tmp.join(&file))?);
    }
    let manifest_path = tmp.join(MANIFEST);
    let json = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
    write_synced(&manifest_path, json.as_bytes())?;
    sync_dir(&tmp)?;

    let dest = root.join(&name);
    if dest.exists() {
        // Same step saved before (a resumed run passing it again): replace it.
        let old = root.join(format!(".tmp-old-{name}-{}", std::process::id()));
        std::fs::rename(&dest, &old).map_err(|e| WorkerError::io(&dest, e))?;
        std::fs::rename(&tmp, &dest).map_err(|e| WorkerError::io(&dest, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, &dest).map_err(|e| WorkerError::io(&dest, e))?;
    }
    sync_dir(&root)?;

    // Only checkpoints older than this one count: a newer, broken one (skipped at resume)
    // must not push the one just published out.
    let older = list(req.run_dir)?.into_iter().filter(|(step, _)| *step < manifest.step);
    for (_, dir) in older.skip(req.keep_last.max(1) - 1) {
        tracing::debug!(dir = %dir.display(), "pruning old checkpoint");
        std::fs::remove_dir_all(&dir).map_err(|e| WorkerError::io(&dir, e))?;
    }
    Ok(dest)
}

fn write_safetensors(dir: &Path, file: &str, tensors: &[(String, Tensor)]) -> Result<(), WorkerError> {
    let path = dir.join(file);
    let contiguous: Vec<(&str, Tensor)> =
        tensors.iter().map(|(n, t)| (n.as_str(), t.to_device(tch::Device::Cpu).contiguous())).collect();
    Tensor::write_safetensors(&contiguous, &path)
        .map_err(|e| WorkerError::Checkpoint { path: path.clone(), reason: e.to_string() })?;
    File::open(&path).and_then(|f| f.sync_all()).map_err(|e| WorkerError::io(&path, e))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), WorkerError> {
    let mut f = File::create(path).map_err(|e| WorkerError::io(path, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| WorkerError::io(path, e))
}

fn sync_dir(dir: &Path) -> Result<(), WorkerError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| WorkerError::io(dir, e))
}

/// sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, WorkerError> {
    moxin_data::sha256_hex(path).map_err(|e| WorkerError::io(path, e))
}
