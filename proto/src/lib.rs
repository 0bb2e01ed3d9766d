//! Protobuf and gRPC types of moxin-train (package `moxin.v1`).
//!
//! The coordinator resolves user configuration into a [`v1::JobSpec`]; workers train from
//! it alone. Generated from `proto/moxin/v1/*.proto` at build time without protoc.
#![forbid(unsafe_code)]
#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

/// Version 1 of the wire contract.
pub mod v1 {
    tonic::include_proto!("moxin.v1");
}

/// Version of this build, sent by workers at registration so the coordinator can refuse
/// incompatible peers.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");
