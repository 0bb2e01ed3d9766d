//! Integration tests of the `moxin-train` binary (one test binary, modules per area).

mod common;
mod cluster_cli;
mod data_cli;
mod train_cli;
