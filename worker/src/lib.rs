//! The moxin-train worker: trains a Mistral-style model from a [`moxin_proto::v1::JobSpec`].
//!
//! * [`model`]: the decoder (RMSNorm, RoPE, GQA, SwiGLU, sliding-window attention) with HF
//!   parameter names, and a KV cache for incremental decoding;
//! * [`params`]: all parameters as views of one flat buffer (laid out by `moxin-layout`);
//! * [`optim`]: AdamW over flat fp32 partitions and the LR schedule;
//! * [`trainer`]: the training step composed from parts (batch source, objective,
//!   block-by-block forward/backward, ZeRO-1 gradient sync, checkpoint coordinator);
//! * [`collective`]: collectives on tensors (world of one, CPU ring, NCCL);
//! * [`cuda`]: the CUDA driver, NCCL and NVRTC, loaded at run time;
//! * [`checkpoint`]: atomic, verified, pruned checkpoints;
//! * [`generate`]: sampling (temperature, top-p, stop token) on the KV cache;
//! * [`driver`]: what `train` and a cluster worker share: stop signals, how a run ended
//!   and its exit code, the panic guard, step metrics for Prometheus;
//! * [`eval`]: held-out loss of a checkpoint; [`doctor`]: what this machine can run.
//!
//! The worker never reads user configuration files: everything arrives in the JobSpec.
#![warn(missing_docs)]
#![deny(unsafe_code)]

pub mod agent;
pub mod checkpoint;
pub mod collective;
pub mod cuda;
pub mod device;
pub mod doctor;
pub mod driver;
pub mod eval;
pub mod generate;
pub mod hf;
pub mod model;
pub mod optim;
pub mod params;
pub mod rl;
pub mod selftest;
pub mod trainer;

use std::path::PathBuf;

/// Errors of the worker. Each names the file or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// I/O on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Training data problem.
    #[error(transparent)]
    Data(#[from] moxin_data::DataError),
    /// An input file (a Hugging Face model folder, a token list) is missing or unusable.
    #[error("{path}: {reason}")]
    Input {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong, and what to do.
        reason: String,
    },
    /// A checkpoint is missing, corrupt or incompatible.
    #[error("{path}: {reason}")]
    Checkpoint {
        /// The checkpoint file or directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A command's arguments do not fit what it was given (a sampling option, a prompt
    /// longer than the model's context, a count of 0).
    #[error("{0}")]
    Usage(String),
    /// The job spec is incomplete or inconsistent (a coordinator bug or version skew).
    #[error("invalid job spec: {0}")]
    Spec(String),
    /// A run directory cannot be resumed with this job.
    #[error("cannot resume {run_dir}: {reason}")]
    Resume {
        /// The run directory.
        run_dir: PathBuf,
        /// Why, and what to do.
        reason: String,
    },
    /// The requested device is unusable.
    #[error("device: {0}")]
    Device(String),
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A collective failed (a peer died, hung or the network broke).
    #[error("collective: {0}")]
    Collective(String),
    /// A step observer (metrics sink) failed.
    #[error("{0}")]
    Observer(String),
    /// The coordinator refused a request or cannot be reached at all.
    #[error("coordinator: {0}")]
    Coordinator(String),
    /// The connection to a coordinator that was reachable broke (it died or restarted).
    #[error("coordinator: {0}")]
    CoordinatorLost(String),
    /// Training diverged (a non-finite loss or gradient norm).
    #[error("training diverged: {0}")]
    Diverged(String),
    /// The process could not set itself up (a thread, the async runtime, an endpoint).
    #[error("{0}")]
    Setup(String),
    /// Code on the training path panicked (see [`driver::guard`]).
    #[error("{0}")]
    Panic(String),
}

impl WorkerError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        WorkerError::Io { path: path.into(), source }
    }
}

#[cfg(test)]
mod model_tests;

#[cfg(test)]
mod trainer_tests;

#[cfg(test)]
mod step_tests;

#[cfg(test)]
mod hostile_input_tests;
