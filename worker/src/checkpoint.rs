//! Checkpoints from the worker's side: the format, verification and commit protocol live
//! in [`moxin_layout::checkpoint`] (libtorch-free, shared with the coordinator); this module
//! turns tensors into files and back, and says where a rank's finished files are reported
//! ([`Committer`]): to the coordinator in a cluster job, to the process itself in `train`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub use moxin_layout::checkpoint::{
    checkpoints_dir, latest_valid, list, partition_file, partition_files, record_part, staging_dir, write, BuildInfo,
    Checkpoint, CheckpointError, CheckpointManifest, Commits, PartitionFile, RngState, CHAT_TEMPLATE_FILE, FORMAT,
    MANIFEST, MODEL_FILE, OPTIMIZER_BYTES_PER_ELEMENT, TOKENIZER_FILE,
};
use moxin_proto::v1::CheckpointPart;
use tch::{Kind, Tensor};

use crate::WorkerError;

impl From<CheckpointError> for WorkerError {
    fn from(e: CheckpointError) -> Self {
        match e {
            CheckpointError::Io { path, source } => WorkerError::Io { path, source },
            CheckpointError::Invalid { path, reason } => WorkerError::Checkpoint { path, reason },
            CheckpointError::NoneValid { run_dir, reason, .. } => WorkerError::Resume { run_dir, reason },
            superseded @ CheckpointError::Superseded { .. } => {
                WorkerError::Checkpoint { path: PathBuf::new(), reason: superseded.to_string() }
            }
        }
    }
}

/// This process's build, as checkpoint manifests record it.
pub fn build_info() -> BuildInfo {
    BuildInfo {
        moxin_train: env!("CARGO_PKG_VERSION").into(),
        git_commit: env!("MOXIN_GIT_COMMIT").into(),
        git_dirty: env!("MOXIN_GIT_DIRTY").into(),
        torch: crate::cuda::libraries::torch_lib_dir()
            .and_then(|d| crate::cuda::libraries::torch_version(&d))
            .unwrap_or_else(|| "unknown".into()),
    }
}

/// Loads the model tensors of a verified checkpoint.
pub fn model_tensors(ckpt: &Checkpoint) -> Result<Vec<(String, Tensor)>, WorkerError> {
    let path = ckpt.dir.join(MODEL_FILE);
    Tensor::read_safetensors(&path).map_err(|e| WorkerError::Checkpoint { path, reason: e.to_string() })
}

/// The model of a verified checkpoint, its parameters as `kind` on `device`.
pub fn load_model(
    ckpt: &Checkpoint,
    kind: Kind,
    device: tch::Device,
) -> Result<crate::model::Transformer, WorkerError> {
    let mut model = crate::model::Transformer::new(ckpt.manifest.model.clone(), kind, device);
    model
        .params
        .load_named(&model_tensors(ckpt)?)
        .map_err(|reason| WorkerError::Checkpoint { path: ckpt.dir.join(MODEL_FILE), reason })?;
    Ok(model)
}

/// Loads optimizer partition `index` of a verified checkpoint: its range and
/// `(master, exp_avg, exp_avg_sq, step)`.
pub fn optimizer_part(ckpt: &Checkpoint, index: usize) -> Result<(PartitionFile, Vec<(String, Tensor)>), WorkerError> {
    let part = ckpt.manifest.optimizer.get(index).cloned().ok_or_else(|| WorkerError::Checkpoint {
        path: ckpt.dir.join(MANIFEST),
        reason: format!("no optimizer partition {index}"),
    })?;
    let path = ckpt.dir.join(&part.file);
    let tensors =
        Tensor::read_safetensors(&path).map_err(|e| WorkerError::Checkpoint { path, reason: e.to_string() })?;
    Ok((part, tensors))
}

fn safetensors_dtype(kind: Kind) -> Result<&'static str, WorkerError> {
    Ok(match kind {
        Kind::Float => "F32",
        Kind::BFloat16 => "BF16",
        Kind::Half => "F16",
        Kind::Double => "F64",
        Kind::Int64 => "I64",
        Kind::Int => "I32",
        Kind::Uint8 => "U8",
        other => return Err(WorkerError::Spec(format!("cannot checkpoint a {other:?} tensor"))),
    })
}

/// Writes host tensors as a safetensors file, hashing while writing (see
/// [`write::write_safetensors`]); tensors not contiguous on the CPU are copied first.
pub fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<write::WrittenRanges, WorkerError> {
    let host: Vec<Tensor> = tensors.iter().map(|(_, t)| on_host(t)).collect();
    let shapes: Vec<Vec<i64>> = host.iter().map(|t| t.size()).collect();
    let dtypes: Vec<&str> = host.iter().map(|t| safetensors_dtype(t.kind())).collect::<Result<_, _>>()?;
    let bytes: Vec<&[u8]> = host.iter().map(host_bytes).collect();
    let views: Vec<write::TensorBytes<'_>> = tensors
        .iter()
        .enumerate()
        .map(|(i, (name, _))| write::TensorBytes { name, dtype: dtypes[i], shape: &shapes[i], data: bytes[i] })
        .collect();
    Ok(write::write_safetensors(path, &views)?)
}

/// A rank's share of the model file, which all ranks of a group write at once (see
/// [`write::split_safetensors`]).
pub struct ModelPart {
    /// Every tensor's name, dtype tag and shape, in file order (the header).
    pub metas: Vec<(String, &'static str, Vec<i64>)>,
    /// The tensors this rank writes (indices into `metas`); rank 0 writes the header too.
    pub part: std::ops::Range<usize>,
    /// Whether this rank writes the header.
    pub header: bool,
}

impl ModelPart {
    /// Rank `rank` of `world`'s share of the model whose parameters are `named`.
    pub fn of(named: &[(String, Tensor)], rank: usize, world: usize) -> Result<Self, WorkerError> {
        let metas: Vec<(String, &'static str, Vec<i64>)> = named
            .iter()
            .map(|(n, t)| Ok((n.clone(), safetensors_dtype(t.kind())?, t.size())))
            .collect::<Result<_, WorkerError>>()?;
        let views = Self::views(&metas);
        let parts = write::split_safetensors(&views, world).map_err(WorkerError::Spec)?;
        let part = parts.get(rank).cloned().unwrap_or(0..0);
        Ok(ModelPart { metas, part, header: rank == 0 })
    }

    fn views<'a>(metas: &'a [(String, &'static str, Vec<i64>)]) -> Vec<write::TensorMeta<'a>> {
        metas.iter().map(|(name, dtype, shape)| write::TensorMeta { name, dtype, shape }).collect()
    }

    /// Writes `tensors` (host copies of the tensors `self.part`) into the model file in `dir`.
    fn write(&self, dir: &Path, tensors: &[(String, Tensor)]) -> Result<write::WrittenRanges, WorkerError> {
        let host: Vec<Tensor> = tensors.iter().map(|(_, t)| on_host(t)).collect();
        let bytes: Vec<&[u8]> = host.iter().map(host_bytes).collect();
        let views = Self::views(&self.metas);
        Ok(write::write_safetensors_part(&dir.join(MODEL_FILE), &views, self.part.clone(), &bytes, self.header)?)
    }

    /// Whether this rank writes any of the file.
    pub fn is_empty(&self) -> bool {
        self.part.is_empty() && !self.header
    }
}

/// `t` contiguous in host memory (a copy only when it is not already).
fn on_host(t: &Tensor) -> Tensor {
    if t.device() == tch::Device::Cpu && t.is_contiguous() {
        t.shallow_clone()
    } else {
        t.to_device(tch::Device::Cpu).contiguous()
    }
}

/// A file a checkpoint carries besides its tensors, so it is self-contained (the tokenizer,
/// the chat template); rank 0 writes them.
#[derive(Debug, Clone, PartialEq)]
pub enum CarriedFile {
    /// A copy of this file.
    Copy(PathBuf),
    /// These bytes.
    Contents(Vec<u8>),
}

/// Writes this rank's files of a checkpoint into `staging`, all at the same time: its
/// optimizer partition as the files `partition` (from [`partition_files`], in flat order),
/// its part of the model (`model`: host copies of the tensors `model_part.part`), and the
/// files copied in.
///
/// `state` is the whole partition's state: the tensors of one element per flat parameter
/// element ([`crate::optim::PER_ELEMENT_STATE`]: master weights, moments) are narrowed to
/// each file's range; the others (the step counter) go whole into every file.
pub fn write_rank_files(
    staging: &Path,
    partition: &[PartitionFile],
    state: &[(String, Tensor)],
    (model_part, model): (&ModelPart, Vec<(String, Tensor)>),
    extra_files: &[(String, CarriedFile)],
) -> Result<Vec<moxin_proto::v1::WrittenFile>, WorkerError> {
    let (first, elements) = match (partition.first(), partition.last()) {
        (Some(first), Some(last)) => (first.start, last.end - first.start),
        _ => return Err(WorkerError::Spec("a checkpoint needs at least one optimizer partition file".into())),
    };
    for (name, t) in state {
        if crate::optim::PER_ELEMENT_STATE.contains(&name.as_str()) && t.size() != [elements] {
            return Err(WorkerError::Spec(format!(
                "optimizer state {name} has shape {:?}, the partition {elements} elements",
                t.size()
            )));
        }
    }
    let pieces: Vec<Vec<(String, Tensor)>> = partition
        .iter()
        .map(|file| {
            state
                .iter()
                .map(|(name, t)| {
                    let t = if crate::optim::PER_ELEMENT_STATE.contains(&name.as_str()) {
                        t.narrow(0, file.start - first, file.end - file.start)
                    } else {
                        t.shallow_clone()
                    };
                    (name.clone(), t)
                })
                .collect()
        })
        .collect();
    let panicked = |what: &str| WorkerError::Panic(format!("the {what} writer panicked"));
    std::thread::scope(|scope| {
        let model = (!model_part.is_empty()).then(|| scope.spawn(move || model_part.write(staging, &model)));
        let writers: Vec<_> = partition
            .iter()
            .zip(pieces)
            .map(|(file, tensors)| scope.spawn(move || write_tensors(&staging.join(&file.file), &tensors)))
            .collect();
        let copied: Vec<_> = extra_files
            .iter()
            .map(|(name, file)| match file {
                CarriedFile::Copy(source) => write::copy_file(source, &staging.join(name)),
                CarriedFile::Contents(bytes) => write::write_segments(&staging.join(name), &[bytes]),
            })
            .collect();
        // Every writer is joined before any error is returned, so a failure in one never
        // leaves another to panic the scope.
        let mut results: Vec<Result<write::WrittenRanges, WorkerError>> =
            copied.into_iter().map(|r| r.map_err(WorkerError::from)).collect();
        results.extend(writers.into_iter().map(|w| w.join().unwrap_or_else(|_| Err(panicked("optimizer file")))));
        results.extend(model.map(|m| m.join().unwrap_or_else(|_| Err(panicked("model")))));
        let mut files = Vec::new();
        for result in results {
            files.extend(result?);
        }
        Ok(files)
    })
}

/// sha256 of a file (the reference path of `bench checkpoint-write` reads files back).
pub fn sha256_file_for_bench(path: &Path) -> Result<String, WorkerError> {
    moxin_data::sha256_hex(path).map_err(|e| WorkerError::io(path, e))
}

/// The bytes of a contiguous CPU tensor.
#[allow(unsafe_code)]
fn host_bytes(t: &Tensor) -> &[u8] {
    debug_assert!(t.device() == tch::Device::Cpu && t.is_contiguous());
    let len = t.numel() * t.kind().elt_size_in_bytes();
    if len == 0 {
        return &[];
    }
    // SAFETY: `t` is a contiguous CPU tensor, so its storage holds `len` initialised bytes
    // from `data_ptr()`; the slice borrows `t`, which keeps the storage alive, and nothing
    // writes to these host copies while the writer reads them (the next snapshot into the
    // same buffers waits for the writer, see `trainer::checkpointing`).
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) }
}

/// What became of a rank's report of its checkpoint files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Committed {
    /// Recorded; the checkpoint is published once every rank has reported.
    Accepted,
    /// This report completed the checkpoint, published here.
    Published(PathBuf),
    /// The checkpoint will never be published (its group was replaced, or the coordinator
    /// was lost): the previous one stays the newest. Not an error for training.
    Abandoned(String),
}

/// Where a rank reports the files it wrote for a checkpoint. Whoever owns the run
/// directory commits: the coordinator of a cluster job, the process itself in `train`.
pub trait Committer: Send + Sync {
    /// Reports one rank's part; blocks until the committer has answered.
    fn commit(&self, part: CheckpointPart) -> Result<Committed, WorkerError>;
}

/// The process commits its own checkpoints (`train`, and groups of ranks in one process).
pub struct LocalCommits(Mutex<Commits>);

impl LocalCommits {
    /// The committer of `run_dir` (held under the run directory's lock): publishes a
    /// checkpoint an earlier run wrote completely but did not publish, and sweeps the
    /// staging directories of the others.
    pub fn new(run_dir: &Path) -> Self {
        let mut commits = Commits::new(run_dir);
        commits.recover();
        moxin_layout::checkpoint::sweep_temporaries(run_dir);
        LocalCommits(Mutex::new(commits))
    }
}

impl Committer for LocalCommits {
    fn commit(&self, part: CheckpointPart) -> Result<Committed, WorkerError> {
        let mut commits = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(match commits.add(part)? {
            Some(dir) => Committed::Published(dir),
            None => Committed::Accepted,
        })
    }
}
