use std::path::PathBuf;

/// Everything that can go wrong reading, writing or verifying training data. Every variant
/// names the file involved and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A prepared directory has no manifest.
    #[error("{path}: no manifest.json; prepare the data first with `moxin-train data prepare --input <files> --out {dir}`", dir = path.parent().map(|p| p.display().to_string()).unwrap_or_default())]
    ManifestMissing {
        /// Where the manifest was expected.
        path: PathBuf,
    },
    /// The manifest exists but is not valid.
    #[error("{path}: invalid manifest: {reason}")]
    ManifestInvalid {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A shard listed in the manifest is missing.
    #[error("{path}: shard listed in the manifest is missing; re-run `moxin-train data prepare`")]
    ShardMissing {
        /// The shard file.
        path: PathBuf,
    },
    /// A shard's size does not match the manifest.
    #[error("{path}: shard is {actual} bytes but the manifest says {expected}; the file is truncated or was replaced, re-run `moxin-train data prepare`")]
    ShardSize {
        /// The shard file.
        path: PathBuf,
        /// Size the manifest records.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// A file's checksum does not match the manifest.
    #[error("{path}: sha256 {actual} does not match the manifest ({expected}); the file is corrupt, re-run `moxin-train data prepare`")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Checksum the manifest records.
        expected: String,
        /// Checksum of the file on disk.
        actual: String,
    },
    /// The data's vocabulary does not fit the model.
    #[error("{path}: tokenizer vocabulary has {data_vocab} ids but the model's vocab_size is {model_vocab}; use a model with vocab_size >= {data_vocab} or prepare the data with a smaller tokenizer")]
    VocabMismatch {
        /// The manifest file.
        path: PathBuf,
        /// Vocabulary size recorded for the data.
        data_vocab: u32,
        /// Vocabulary size of the model.
        model_vocab: u32,
    },
    /// Too little data for even one sample.
    #[error("{path}: {tokens} tokens cannot make one sample of seq_len {seq_len} (needs {needed}); add more text or lower train.seq_len")]
    TooFewTokens {
        /// The manifest file.
        path: PathBuf,
        /// Tokens available.
        tokens: u64,
        /// Requested sequence length.
        seq_len: u32,
        /// Tokens needed.
        needed: u64,
    },
    /// A tokenizer could not be trained, loaded or used.
    #[error("{path}: tokenizer error: {reason}")]
    Tokenizer {
        /// The tokenizer file (or input being tokenized).
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// An input file could not be used.
    #[error("{path}: {reason}")]
    Input {
        /// The input file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }
}
