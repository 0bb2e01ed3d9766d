//! The moxin-train coordinator: the single source of truth for a job.
//!
//! It owns the user-facing configuration schema ([`config`]): TOML files, overridable by
//! `MOXIN__SECTION__KEY` environment variables and `--set section.key=value`, validated
//! here and nowhere else. A validated configuration becomes a [`moxin_proto::v1::JobSpec`]
//! ([`job`]), which is all a worker ever sees.
//!
//! The gRPC control plane (registration, ranks, heartbeats, data and optimizer-state
//! assignment) builds on the same [`job::ResolvedJob`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backend;
pub mod config;
pub mod grpo;
pub mod job;
pub mod membership;
pub mod pipeline;
pub mod plan;
pub mod presets;
pub mod rundir;
pub mod runtime;
pub mod server;

pub use config::{ConfigError, JobConfig};
pub use job::{resolve_job, ResolvedJob};

#[cfg(test)]
mod hostile_input_tests;
#[cfg(test)]
mod server_tests;
