//! Training data for moxin-train: tokenizers, prepared token shards and the sample loader.
//!
//! * [`prepare`] turns `.txt` / `.jsonl` files into a *prepared directory*: a tokenizer,
//!   little-endian token shards (documents separated by EOS) and a [`Manifest`] with
//!   sizes and checksums.
//! * [`TokenDataset`] memory-maps a prepared directory after verifying it.
//! * [`SampleOrder`] is the seeded, random-access order in which fixed windows of
//!   `seq_len + 1` tokens are served. A position in it (the *cursor*: samples consumed so
//!   far) is all the state needed to resume exactly, on any number of ranks.
//! * [`builtin`] generates the small corpus the default job trains on offline.
//! * [`sft`] prepares conversations for supervised fine-tuning (chat template, loss masks)
//!   and packs them into rows.
//!
//! This crate links no libtorch: the coordinator uses it to validate data it never trains on.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod builtin;
mod error;
#[cfg(any(test, feature = "hostile-input"))]
pub mod json_mutations;
mod loader;
mod manifest;
mod order;
mod output_dir;
mod prepare;
pub mod process;
mod rng;
pub mod sft;
mod tokenizer;

pub use error::DataError;

/// `line` without the UTF-8 byte order mark some editors (Windows Notepad, Excel exports)
/// put at the start of a file: `first` says whether it is a file's first line.
pub fn without_bom(line: &str, first: bool) -> &str {
    if first {
        line.strip_prefix('\u{feff}').unwrap_or(line)
    } else {
        line
    }
}
pub use loader::TokenDataset;
pub use manifest::{sha256_hex, Manifest, ShardInfo, TokenDtype, TokenizerInfo, MANIFEST_FILE};
pub use order::SampleOrder;
pub use prepare::{prepare, PrepareOptions, TokenizerSource};
pub use rng::SplitMix64;
pub use tokenizer::{load_tokenizer, train_bpe, TextTokenizer};

#[cfg(test)]
mod hostile_input_tests;
