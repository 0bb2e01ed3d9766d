//! One home for what a Mistral-style model *is*, independent of libtorch: its shape
//! ([`ModelShape`]), its parameters ([`ParamDecl`], grouped into autograd leaves by
//! [`ParamGroup`]), where each sits in the flat parameter buffer ([`FlatLayout`]), how
//! ZeRO-1 splits that buffer over ranks ([`zero1_partitions`]), and what training it costs
//! in FLOPs and per-GPU memory ([`memory`]), how checkpoints of it are laid out on disk,
//! written and committed ([`checkpoint`]), and how it reads as a Hugging Face config ([`hf`]).
//!
//! The coordinator (which never links libtorch) plans partitions and validates jobs with it;
//! the worker's `ParamStore` lays out tensors with it; `model-info` and `plan` print it; the
//! Hugging Face mapping names tensors with it. Because every one of them uses these
//! functions, the flat order is the same on every rank and in every tool.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod checkpoint;
mod flat;
pub mod hf;
pub mod memory;
mod params;
mod shape;

pub use flat::{zero1_partition_len, zero1_partitions, FlatLayout, LeafSlot, ParamSlot, PARTITION_ALIGN};
pub use params::{Init, ParamDecl, ParamGroup};
pub use shape::{ModelShape, ParamClass, ShapeInvalid, ShapeTooLarge, MAX_PARAMS};

#[cfg(test)]
mod hostile_input_tests;
