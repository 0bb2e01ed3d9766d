use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::DataError;

/// File name of the manifest inside a prepared directory.
pub const MANIFEST_FILE: &str = "manifest.json";
const FORMAT: &str = "moxin-tokens-v1";

/// Width of the stored token ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    /// Little-endian u16, used when every id fits (vocabularies up to 65,536).
    U16,
    /// Little-endian u32.
    U32,
}

impl TokenDtype {
    /// The narrowest dtype that holds ids `0..vocab_size`.
    pub fn for_vocab(vocab_size: u32) -> Self {
        if vocab_size <= 1 << 16 {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }

    /// Bytes per token.
    pub fn bytes(self) -> u64 {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }
}

/// The tokenizer a prepared directory was made with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// Tokenizer file, relative to the prepared directory (Hugging Face `tokenizer.json`).
    pub file: String,
    /// sha256 of that file.
    pub sha256: String,
    /// Number of ids the tokenizer can produce (including special tokens).
    pub vocab_size: u32,
    /// Id appended after every document.
    pub eos_id: u32,
    /// Beginning-of-sequence id, if the tokenizer has one.
    pub bos_id: Option<u32>,
}

/// One shard of token ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// Shard file, relative to the prepared directory.
    pub file: String,
    /// Tokens in the shard.
    pub tokens: u64,
    /// sha256 of the shard file.
    pub sha256: String,
}

/// `manifest.json` of a prepared directory: what is there and how to check it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format tag, `moxin-tokens-v1`.
    pub format: String,
    /// Where the text came from (input paths, or the built-in corpus and its parameters).
    pub source: String,
    /// The tokenizer.
    pub tokenizer: TokenizerInfo,
    /// Width of stored ids.
    pub dtype: TokenDtype,
    /// Documents tokenized.
    pub documents: u64,
    /// Tokens over all shards (EOS separators included).
    pub total_tokens: u64,
    /// Shards in order; their concatenation is the token stream.
    pub shards: Vec<ShardInfo>,
}

impl Manifest {
    pub(crate) fn new(
        source: String,
        tokenizer: TokenizerInfo,
        dtype: TokenDtype,
        documents: u64,
        shards: Vec<ShardInfo>,
    ) -> Self {
        let total_tokens = shards.iter().map(|s| s.tokens).sum();
        Manifest { format: FORMAT.to_string(), source, tokenizer, dtype, documents, total_tokens, shards }
    }

    /// Reads and sanity-checks `<dir>/manifest.json` (does not touch the shards).
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(DataError::ManifestMissing { path }),
            Err(e) => return Err(DataError::io(path, e)),
        };
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| DataError::ManifestInvalid { path: path.clone(), reason: e.to_string() })?;
        let invalid = |reason: String| DataError::ManifestInvalid { path: path.clone(), reason };
        if manifest.format != FORMAT {
            return Err(invalid(format!("format {:?}, expected {FORMAT:?}", manifest.format)));
        }
        let sum = manifest.shards.iter().try_fold(0u64, |sum, s| sum.checked_add(s.tokens));
        if sum != Some(manifest.total_tokens) {
            let sum = sum.map_or("more than 2^64".into(), |s| s.to_string());
            return Err(invalid(format!("total_tokens {} but the shards add up to {sum}", manifest.total_tokens)));
        }
        if manifest.tokenizer.eos_id >= manifest.tokenizer.vocab_size {
            return Err(invalid(format!(
                "eos_id {} outside the vocabulary of {}",
                manifest.tokenizer.eos_id, manifest.tokenizer.vocab_size
            )));
        }
        if TokenDtype::for_vocab(manifest.tokenizer.vocab_size).bytes() > manifest.dtype.bytes() {
            return Err(invalid(format!(
                "dtype {:?} cannot hold a vocabulary of {}",
                manifest.dtype, manifest.tokenizer.vocab_size
            )));
        }
        check_file_name("tokenizer.file", &manifest.tokenizer.file).map_err(invalid)?;
        for shard in &manifest.shards {
            check_file_name("shard file", &shard.file).map_err(invalid)?;
        }
        Ok(manifest)
    }

    /// Writes the manifest (pretty JSON) atomically: a temporary file renamed into place.
    pub(crate) fn write(&self, dir: &Path) -> Result<(), DataError> {
        let path = dir.join(MANIFEST_FILE);
        let tmp = dir.join(format!(".{MANIFEST_FILE}.tmp"));
        let json = serde_json::to_string_pretty(self).expect("manifest serialises");
        std::fs::write(&tmp, json + "\n").map_err(|e| DataError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| DataError::io(&path, e))
    }

    /// sha256 of the manifest file as stored, used to pin a job to exactly this data.
    pub fn file_sha256(dir: &Path) -> Result<String, DataError> {
        sha256_file(&dir.join(MANIFEST_FILE))
    }

    /// Checks every shard exists with the recorded size and, if `checksums`, the recorded
    /// sha256; and that the tokenizer file matches. Returns the shard paths in order.
    pub fn verify(&self, dir: &Path, checksums: bool) -> Result<Vec<PathBuf>, DataError> {
        let mut paths = Vec::with_capacity(self.shards.len());
        for shard in &self.shards {
            let path = dir.join(&shard.file);
            let meta = match std::fs::metadata(&path) {
                Ok(meta) => meta,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(DataError::ShardMissing { path }),
                Err(e) => return Err(DataError::io(path, e)),
            };
            let expected = shard.tokens.checked_mul(self.dtype.bytes()).ok_or_else(|| DataError::ManifestInvalid {
                path: dir.join(MANIFEST_FILE),
                reason: format!("shard {}: {} tokens cannot be stored", shard.file, shard.tokens),
            })?;
            if meta.len() != expected {
                return Err(DataError::ShardSize { path, expected, actual: meta.len() });
            }
            if checksums {
                check_sha256(&path, &shard.sha256)?;
            }
            paths.push(path);
        }
        if checksums {
            check_sha256(&dir.join(&self.tokenizer.file), &self.tokenizer.sha256)?;
        }
        Ok(paths)
    }

    /// Errors unless a model with `model_vocab` ids can embed every id of this data.
    pub fn check_vocab(&self, dir: &Path, model_vocab: u32) -> Result<(), DataError> {
        if self.tokenizer.vocab_size > model_vocab {
            return Err(DataError::VocabMismatch {
                path: dir.join(MANIFEST_FILE),
                data_vocab: self.tokenizer.vocab_size,
                model_vocab,
            });
        }
        Ok(())
    }

    /// Samples of `seq_len + 1` tokens (stride `seq_len`) in the token stream.
    pub fn num_samples(&self, dir: &Path, seq_len: u32) -> Result<u64, DataError> {
        if seq_len == 0 {
            return Err(DataError::Input {
                path: dir.to_path_buf(),
                reason: "seq_len 0: a sample needs a token".into(),
            });
        }
        let needed = seq_len as u64 + 1;
        if self.total_tokens < needed {
            return Err(DataError::TooFewTokens {
                path: dir.join(MANIFEST_FILE),
                tokens: self.total_tokens,
                seq_len,
                needed,
            });
        }
        Ok((self.total_tokens - 1) / seq_len as u64)
    }
}

/// `Ok` when `name`, a file a manifest names (`what`), is a plain file name inside the
/// prepared directory: one path component, not empty, not hidden (so neither `.` nor
/// `..`), without a separator or NUL, and not the manifest itself. The error says why not.
pub(crate) fn check_file_name(what: &str, name: &str) -> Result<(), String> {
    let plain =
        !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\', '\0']) && name != MANIFEST_FILE;
    if plain {
        Ok(())
    } else {
        Err(format!("{what} {name:?} is not a plain file name inside the prepared directory"))
    }
}

/// sha256 of a file as lowercase hex, streamed (shared with checkpoint verification).
pub fn sha256_hex(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// [`sha256_hex`] with errors phrased for a prepared directory.
pub(crate) fn sha256_file(path: &Path) -> Result<String, DataError> {
    sha256_hex(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DataError::Input {
            path: path.to_path_buf(),
            reason: "file listed in the manifest is missing; re-run `moxin-train data prepare`".into(),
        },
        _ => DataError::io(path, e),
    })
}

fn check_sha256(path: &Path, expected: &str) -> Result<(), DataError> {
    let actual = sha256_file(path)?;
    if actual != expected {
        return Err(DataError::Checksum { path: path.to_path_buf(), expected: expected.into(), actual });
    }
    Ok(())
}
