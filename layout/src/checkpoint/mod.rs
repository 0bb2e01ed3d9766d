//! The checkpoint format, without libtorch: `<run dir>/checkpoints/step-<8 digits>/` holds
//! `model.safetensors` (Hugging Face names, readable on its own; written by all ranks of
//! the group, each its own byte range, with a digest per range), each ZeRO-1 partition as
//! `optimizer.part-<rank>.safetensors` or, when large, up to four
//! `optimizer.part-<rank>-<k>.safetensors` of consecutive ranges (in global flat
//! coordinates, so any world size can load them), files copied in (the tokenizer), and
//! `manifest.json`
//! (step, data cursor, RNG state, resolved config, build, sha256 of every file), written
//! last.
//!
//! Writing ([`write`]) hashes while writing. Committing ([`Commits`]) is done by whoever
//! owns the run directory (the coordinator of a cluster job, the process of a `train`):
//! each rank reports the files it wrote with their digests, and once every rank of the
//! generation has, the manifest is written and the staging directory renamed into place.
//! A crash at any point leaves either the previous checkpoints untouched or a hidden
//! staging directory that is never mistaken for a checkpoint (and is swept later).

mod commit;
pub mod write;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ModelShape;
#[cfg(test)]
pub(crate) use commit::tests::part as test_part;
pub use commit::{record_part, Commits};

/// `format` of checkpoints this build writes and reads.
pub const FORMAT: &str = "moxin-checkpoint-v1";
/// Manifest file name.
pub const MANIFEST: &str = "manifest.json";
/// Model weights file name.
pub const MODEL_FILE: &str = "model.safetensors";
/// Tokenizer copied from the training data.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The chat template a fine-tuned model's conversations (SFT) or prompts (GRPO) were
/// rendered with (the JSON `data prepare-sft --template` takes).
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.json";

/// Errors reading, writing or committing checkpoints; each names the path at fault.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// I/O on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A checkpoint (or a report about one) is missing, corrupt or inconsistent.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A report for a generation that was replaced: its checkpoint is abandoned (not a
    /// fault of the reporter, whose group is about to stop).
    #[error("{path}: generation {generation} was replaced by generation {by}: the checkpoint is abandoned")]
    Superseded {
        /// The staging directory.
        path: PathBuf,
        /// The reporter's generation.
        generation: u64,
        /// The generation now.
        by: u64,
    },
    /// The run has checkpoints but none verifies.
    #[error("cannot resume {run_dir}: {reason}")]
    NoneValid {
        /// The run directory.
        run_dir: PathBuf,
        /// Why, and what to do.
        reason: String,
        /// What is wrong with each checkpoint, for readers that do not resume.
        problems: String,
    },
}

impl CheckpointError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CheckpointError::Io { path: path.into(), source }
    }
}

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

/// A rank's report of an optimizer file (the wire form) as the manifest lists it.
impl From<&moxin_proto::v1::OptimizerFile> for PartitionFile {
    fn from(o: &moxin_proto::v1::OptimizerFile) -> Self {
        PartitionFile { file: o.file.clone(), start: o.start, end: o.end }
    }
}

impl From<&PartitionFile> for moxin_proto::v1::OptimizerFile {
    fn from(p: &PartitionFile) -> Self {
        moxin_proto::v1::OptimizerFile { file: p.file.clone(), start: p.start, end: p.end }
    }
}

/// A byte range of a file written by several ranks, with its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePart {
    /// First byte.
    pub offset: u64,
    /// Length.
    pub bytes: u64,
    /// sha256 of those bytes.
    pub sha256: String,
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
    /// [`FORMAT`].
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
    /// sha256 of every other file in the directory written whole by one rank.
    pub files: std::collections::BTreeMap<String, String>,
    /// Files written by several ranks (the model): each range's sha256, in file order,
    /// tiling the file.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub file_parts: std::collections::BTreeMap<String, Vec<FilePart>>,
    /// The size of every file in `files` and `file_parts`, in bytes (absent in checkpoints
    /// of older builds): what [`Checkpoint::looks_whole`] checks without hashing.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub file_bytes: std::collections::BTreeMap<String, u64>,
    /// The software that wrote it (absent in checkpoints of older builds).
    #[serde(default)]
    pub build: BuildInfo,
    /// Special token ids, when known apart from the tokenizer (a model imported from
    /// Hugging Face: its `config.json`'s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<crate::hf::TokenIds>,
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

/// A checkpoint found on disk and verified.
#[derive(Debug)]
pub struct Checkpoint {
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: CheckpointManifest,
}

impl CheckpointManifest {
    /// Every file the manifest lists exists in `dir`, at its recorded size where one is
    /// recorded.
    fn check_sizes(&self, dir: &Path) -> Result<(), CheckpointError> {
        for name in self.files.keys().chain(self.file_parts.keys()) {
            let path = dir.join(name);
            let size = std::fs::metadata(&path).map_err(|e| CheckpointError::io(&path, e))?.len();
            if let Some(&want) = self.file_bytes.get(name).filter(|&&want| want != size) {
                return Err(CheckpointError::Invalid {
                    path,
                    reason: format!("{size} bytes, the manifest says {want}; the file is truncated or corrupt"),
                });
            }
        }
        Ok(())
    }

    /// Records a writer's report of one file (see [`write::WrittenRanges`]): its digest in
    /// `files`, or one byte range's in `file_parts`. False when the file is already
    /// recorded whole (a second report of it) or now comes whole after parts.
    pub fn record_written(&mut self, f: &moxin_proto::v1::WrittenFile) -> bool {
        if f.file_bytes == 0 {
            !self.file_parts.contains_key(&f.name) && self.files.insert(f.name.clone(), f.sha256.clone()).is_none()
        } else {
            let part = FilePart { offset: f.offset, bytes: f.bytes, sha256: f.sha256.clone() };
            self.file_parts.entry(f.name.clone()).or_default().push(part);
            !self.files.contains_key(&f.name)
        }
    }

    /// Reads the manifest of the checkpoint in `dir` without verifying its files (see
    /// [`Checkpoint::open`] for that).
    pub fn read(dir: &Path) -> Result<Self, CheckpointError> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| CheckpointError::Invalid {
            path: path.clone(),
            reason: format!(
                "cannot read the manifest ({e}); is this a checkpoint directory (checkpoints/step-NNNNNNNN)?"
            ),
        })?;
        let manifest: CheckpointManifest = serde_json::from_str(&text)
            .map_err(|e| CheckpointError::Invalid { path: path.clone(), reason: format!("invalid manifest: {e}") })?;
        if manifest.format != FORMAT {
            return Err(CheckpointError::Invalid {
                path,
                reason: format!("format {:?}, expected {FORMAT:?}", manifest.format),
            });
        }
        if let Err(e) = manifest.model.check_size() {
            return Err(CheckpointError::Invalid { path, reason: format!("invalid manifest: model.{e}") });
        }
        // Every name is a file of this directory: never a path that leaves it.
        let names = manifest.files.keys().map(|n| ("files", n));
        let names = names.chain(manifest.file_parts.keys().map(|n| ("file_parts", n)));
        if let Some((field, name)) =
            names.chain(manifest.optimizer.iter().map(|p| ("optimizer", &p.file))).find(|(_, n)| !is_plain_file_name(n))
        {
            return Err(CheckpointError::Invalid {
                path,
                reason: format!(
                    "invalid manifest: {field} names {name:?}, which is not a plain file name of the checkpoint \
                     directory"
                ),
            });
        }
        // The optimizer files tile the flat buffer from its start (the committer checked it
        // when it published; a manifest edited since may say anything).
        let mut next = 0;
        for o in &manifest.optimizer {
            if o.start != next || o.end < o.start {
                return Err(CheckpointError::Invalid {
                    path,
                    reason: format!(
                        "invalid manifest: optimizer file {} covers [{}, {}), expected a range from {next}; the \
                         optimizer files must tile the parameters in order",
                        o.file, o.start, o.end
                    ),
                });
            }
            next = o.end;
        }
        Ok(manifest)
    }
}

/// Whether `name` is a name a checkpoint's files may have: one path component inside the
/// checkpoint directory (not empty, not hidden, so neither `.` nor `..`; no separator or
/// NUL), and not the manifest itself.
pub(crate) fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\', '\0']) && name != MANIFEST
}

impl Checkpoint {
    /// Whether `dir` looks like a whole checkpoint without reading its data: the manifest
    /// reads, and every file it lists is there at its recorded size. A checkpoint cut short
    /// or missing files fails this; one with flipped bits passes it (only [`Checkpoint::open`]
    /// hashes).
    pub fn looks_whole(dir: &Path) -> Result<(), CheckpointError> {
        let manifest = CheckpointManifest::read(dir)?;
        manifest.check_sizes(dir)
    }

    /// Reads and verifies the checkpoint in `dir`: the manifest, the files' sizes, and every
    /// file's sha256 (files are hashed in parallel).
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let manifest = CheckpointManifest::read(dir)?;
        manifest.check_sizes(dir)?;
        // One check per whole file and per part of a file written in parts, in parallel.
        let mut checks: Vec<(&String, Option<&FilePart>, &String)> =
            manifest.files.iter().map(|(file, want)| (file, None, want)).collect();
        for (file, parts) in &manifest.file_parts {
            let path = dir.join(file);
            let size = std::fs::metadata(&path).map_err(|e| CheckpointError::io(&path, e))?.len();
            // The parts tile the file, in order (a manifest from disk may say anything).
            let mut expected = 0u64;
            for p in parts {
                let end = p.offset.checked_add(p.bytes).filter(|_| p.offset == expected);
                expected = end.ok_or_else(|| CheckpointError::Invalid {
                    path: path.clone(),
                    reason: format!(
                        "the manifest's part of bytes {}+{} does not continue at byte {expected}; the manifest is \
                         corrupt",
                        p.offset, p.bytes
                    ),
                })?;
            }
            if size != expected {
                return Err(CheckpointError::Invalid {
                    path,
                    reason: format!("{size} bytes, the manifest says {expected}; the file is truncated or corrupt"),
                });
            }
            checks.extend(parts.iter().map(|p| (file, Some(p), &p.sha256)));
        }
        // Hashed by a bounded pool of threads taking the next check in turn.
        let next = std::sync::atomic::AtomicUsize::new(0);
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get()).clamp(1, 16).min(checks.len());
        let verify = |(file, part, want): (&String, Option<&FilePart>, &String)| {
            let file_path = dir.join(file);
            let got = match part {
                None => moxin_data::sha256_hex(&file_path),
                Some(p) => sha256_range(&file_path, p.offset, p.bytes),
            }
            .map_err(|e| CheckpointError::io(&file_path, e))?;
            if got != *want {
                let which = part.map_or(String::new(), |p| format!(" of bytes {}..{}", p.offset, p.offset + p.bytes));
                return Err(CheckpointError::Invalid {
                    path: file_path,
                    reason: format!("sha256{which} {got} does not match the manifest ({want}); the file is corrupt"),
                });
            }
            Ok(())
        };
        let results: Vec<Result<(), CheckpointError>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(&check) = checks.get(i) else { break done };
                            done.push(verify(check));
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| {
                    w.join().unwrap_or_else(|_| {
                        vec![Err(CheckpointError::Invalid {
                            path: dir.to_path_buf(),
                            reason: "a verifying thread panicked".into(),
                        })]
                    })
                })
                .collect()
        });
        results.into_iter().collect::<Result<(), _>>()?;
        Ok(Checkpoint { dir: dir.to_path_buf(), manifest })
    }
}

/// sha256 (hex) of `bytes` bytes of the file at `offset` (a short file is an error).
fn sha256_range(path: &Path, offset: u64, bytes: u64) -> std::io::Result<String> {
    use sha2::Digest;
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path)?;
    let mut sha = sha2::Sha256::new();
    let mut buf = vec![0u8; (4 << 20).min(bytes as usize)];
    let mut done = 0u64;
    while done < bytes {
        let n = buf.len().min((bytes - done) as usize);
        file.read_exact_at(&mut buf[..n], offset + done)?;
        sha.update(&buf[..n]);
        done += n as u64;
    }
    Ok(hex::encode(sha.finalize()))
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

/// File name of optimizer partition `index` (the rank that owns it), when it is one file.
pub fn partition_file(index: usize) -> String {
    format!("optimizer.part-{index:05}.safetensors")
}

/// Bytes of optimizer state per parameter element: the fp32 master weight and the two fp32
/// Adam moments.
pub const OPTIMIZER_BYTES_PER_ELEMENT: u64 = 12;

/// The smallest optimizer file worth splitting off unless a job says otherwise
/// (`checkpoint.optimizer_file_mib`): below this, another file adds more per-file work
/// (creation, fsync, a manifest entry) than its parallel stream gains.
pub const DEFAULT_PARTITION_FILE_BYTES: u64 = 1 << 30;

/// The most files one partition is split into. Buffered writes into one file are
/// serialised on its inode, so one file goes at one stream's speed: on the GPU machine's
/// disk 1.1 GB/s for one buffered stream, 1.9–2.0 GB/s for four at once (BENCHMARKS.md).
/// The model file is written beside them, so four partition files make five streams.
pub const PARTITION_FILES_MAX: u64 = 4;

/// How rank `index`'s optimizer partition, the flat elements `[start, end)`, is stored: one
/// file for a partition under 2 × `min_file_bytes` of state (0:
/// [`DEFAULT_PARTITION_FILE_BYTES`]), else up to [`PARTITION_FILES_MAX`] files of
/// consecutive, near-equal element ranges that tile it, written at the same time. The
/// manifest lists every file with its range, and a loader reads those that overlap its own
/// partition, so the split is invisible to resuming (at any world size).
pub fn partition_files(index: usize, start: i64, end: i64, min_file_bytes: u64) -> Vec<PartitionFile> {
    let min_file_bytes = if min_file_bytes == 0 { DEFAULT_PARTITION_FILE_BYTES } else { min_file_bytes };
    let elements = (end - start).max(0) as u64;
    let bytes = elements.saturating_mul(OPTIMIZER_BYTES_PER_ELEMENT);
    // Never more files than elements, so no file is empty.
    let files = (bytes / min_file_bytes).clamp(1, PARTITION_FILES_MAX).min(elements.max(1));
    if files == 1 {
        return vec![PartitionFile { file: partition_file(index), start, end }];
    }
    (0..files)
        .map(|k| PartitionFile {
            file: format!("optimizer.part-{index:05}-{k}.safetensors"),
            start: start + (elements as u128 * k as u128 / files as u128) as i64,
            end: start + (elements as u128 * (k + 1) as u128 / files as u128) as i64,
        })
        .collect()
}

/// The staging directory every rank of generation `generation` writes the checkpoint of
/// `step` into (hidden, so never mistaken for a checkpoint). Created by whichever rank gets
/// there first; a generation's name is its own, so a dying group never writes into the
/// directory of the one that replaced it.
pub fn staging_dir(run_dir: &Path, step: u64, generation: u64) -> PathBuf {
    checkpoints_dir(run_dir).join(format!(".tmp-{}-g{generation}", step_dir_name(step)))
}

/// The staging directories of a run (checkpoints being written, or left unpublished).
pub fn staging_dirs(run_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(checkpoints_dir(run_dir)) else { return Vec::new() };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(".tmp-step-")))
        .collect();
    dirs.sort();
    dirs
}

/// Published checkpoint directories of a run, newest first.
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let dir = checkpoints_dir(run_dir);
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(CheckpointError::io(&dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| CheckpointError::io(&dir, e))?;
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
pub fn latest_valid(run_dir: &Path) -> Result<Option<Checkpoint>, CheckpointError> {
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
    let problems = format!("none of its {} checkpoint(s) is valid ({})", found.len(), problems.join("; "));
    Err(CheckpointError::NoneValid {
        run_dir: run_dir.to_path_buf(),
        reason: format!(
            "{problems}; nothing was changed. To start over from step 0 deliberately, move {} away or pass a new \
             --out",
            checkpoints_dir(run_dir).display()
        ),
        problems,
    })
}

/// Removes staging directories of checkpoints that were never committed.
pub fn sweep_temporaries(run_dir: &Path) {
    sweep(run_dir, |_| true);
}

/// Removes the staging directories whose name `abandoned` accepts.
fn sweep(run_dir: &Path, abandoned: impl Fn(&str) -> bool) {
    let Ok(entries) = std::fs::read_dir(checkpoints_dir(run_dir)) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_str().is_some_and(|n| n.starts_with(".tmp-") && abandoned(n)) {
            tracing::info!(dir = %entry.path().display(), "removing an uncommitted checkpoint");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_is_one_file_until_it_is_worth_splitting_then_files_tile_it() {
        let elements_for = |bytes: u64| (bytes / OPTIMIZER_BYTES_PER_ELEMENT) as i64;
        let one = partition_files(3, 100, 100 + elements_for(2 * DEFAULT_PARTITION_FILE_BYTES) - 1, 0);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].file, partition_file(3));
        assert_eq!(partition_files(0, 0, 0, 0), [PartitionFile { file: partition_file(0), start: 0, end: 0 }]);
        let two = partition_files(1, 7, 7 + elements_for(2 * DEFAULT_PARTITION_FILE_BYTES) + 1, 0);
        assert_eq!(two.len(), 2);
        // moxin-7b over 8 GPUs: 1,014,272,512 elements per rank, 12.2 GB of state → the most files.
        let many = partition_files(0, 0, 1_014_272_512, 0);
        assert_eq!(many.len() as u64, PARTITION_FILES_MAX);
        for files in [&two, &many] {
            for pair in files.windows(2) {
                assert_eq!(pair[0].end, pair[1].start, "consecutive ranges");
                assert_ne!(pair[0].file, pair[1].file);
            }
            assert!(files.iter().all(|f| is_plain_file_name(&f.file)));
        }
        assert_eq!(
            (two[0].start, two.last().unwrap().end),
            (7, 7 + elements_for(2 * DEFAULT_PARTITION_FILE_BYTES) + 1)
        );
        assert_eq!(many.last().unwrap().end, 1_014_272_512);
        // A job's own minimum (checkpoint.optimizer_file_mib): 3,000 bytes of state, 750 per file.
        let small: Vec<(i64, i64)> = partition_files(2, 0, 250, 750).iter().map(|f| (f.start, f.end)).collect();
        assert_eq!(small, [(0, 62), (62, 125), (125, 187), (187, 250)]);
        // Never an empty file: 2 elements in files of at least 1 byte are 2 files.
        let tiny: Vec<(i64, i64)> = partition_files(0, 5, 7, 1).iter().map(|f| (f.start, f.end)).collect();
        assert_eq!(tiny, [(5, 6), (6, 7)]);
        let sizes: Vec<i64> = many.iter().map(|f| f.end - f.start).collect();
        assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
    }
}
