//! Integration tests of the `moxin-train` binary (one test binary, modules per area).

mod cluster_cli;
mod common;
mod data_cli;
mod deploy_cli;
mod device_cli;
mod faults_cli;
mod grpo_cli;
mod hf_cli;
mod kubernetes_cli;
mod pipeline_cli;
mod security_cli;
mod sft_cli;
mod slurm_cli;
mod status_cli;
mod train_cli;
