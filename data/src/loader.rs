use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::{DataError, Manifest, SampleOrder, TokenDtype};

/// A verified, memory-mapped prepared directory served as fixed windows of `seq_len + 1`
/// tokens: sample `i` is tokens `[i * seq_len, i * seq_len + seq_len + 1)` of the
/// concatenated shards (consecutive samples overlap by the one token that is the last
/// target of one and the first input of the next).
pub struct TokenDataset {
    dir: PathBuf,
    manifest: Manifest,
    shards: Vec<Mmap>,
    /// Token offset at which each shard starts in the stream, plus the total at the end.
    starts: Vec<u64>,
    seq_len: u32,
    num_samples: u64,
}

impl TokenDataset {
    /// Opens `dir` for samples of `seq_len` tokens fed to a model with `model_vocab` ids,
    /// verifying the manifest, shard sizes and (if `verify_checksums`) every sha256.
    pub fn open(dir: &Path, seq_len: u32, model_vocab: u32, verify_checksums: bool) -> Result<Self, DataError> {
        let manifest = Manifest::load(dir)?;
        manifest.check_vocab(dir, model_vocab)?;
        let num_samples = manifest.num_samples(dir, seq_len)?;
        let paths = manifest.verify(dir, verify_checksums)?;
        let mut shards = Vec::with_capacity(paths.len());
        let mut starts = vec![0u64];
        for (path, info) in paths.iter().zip(&manifest.shards) {
            let file = File::open(path).map_err(|e| DataError::io(path, e))?;
            // SAFETY: shards are immutable once their manifest is published; prepare never
            // rewrites a shard in place (it unpublishes the manifest and recreates files).
            #[allow(unsafe_code)]
            let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::io(path, e))?;
            shards.push(map);
            starts.push(starts.last().unwrap() + info.tokens);
        }
        Ok(TokenDataset { dir: dir.to_path_buf(), manifest, shards, starts, seq_len, num_samples })
    }

    /// The manifest this dataset was opened from.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The prepared directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Samples per epoch.
    pub fn num_samples(&self) -> u64 {
        self.num_samples
    }

    /// Tokens per sample fed to the model (each sample reads one more, the last target).
    pub fn seq_len(&self) -> u32 {
        self.seq_len
    }

    /// Writes sample `index` (`seq_len + 1` ids) into `out`.
    pub fn read_sample(&self, index: u64, out: &mut [i64]) {
        assert!(index < self.num_samples, "sample {index} out of {}", self.num_samples);
        assert_eq!(out.len(), self.seq_len as usize + 1);
        let mut pos = index * self.seq_len as u64;
        let mut written = 0;
        while written < out.len() {
            let shard = self.starts.partition_point(|&s| s <= pos) - 1;
            let within = (pos - self.starts[shard]) as usize;
            let available = (self.starts[shard + 1] - pos) as usize;
            let n = available.min(out.len() - written);
            self.copy_tokens(shard, within, &mut out[written..written + n]);
            written += n;
            pos += n as u64;
        }
    }

    /// Appends the samples at cursors `cursor..cursor + count` of `order` to `out`
    /// (`count * (seq_len + 1)` ids, row-major).
    pub fn read_batch(&self, order: &SampleOrder, cursor: u64, count: usize, out: &mut Vec<i64>) {
        assert_eq!(order.num_samples(), self.num_samples, "order built for another dataset");
        let row = self.seq_len as usize + 1;
        let start = out.len();
        out.resize(start + count * row, 0);
        for (i, chunk) in out[start..].chunks_mut(row).enumerate() {
            self.read_sample(order.sample_at(cursor + i as u64), chunk);
        }
    }

    fn copy_tokens(&self, shard: usize, first: usize, out: &mut [i64]) {
        let bytes = &self.shards[shard][..];
        match self.manifest.dtype {
            TokenDtype::U16 => {
                let src = &bytes[first * 2..(first + out.len()) * 2];
                for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = u16::from_le_bytes([b[0], b[1]]) as i64;
                }
            }
            TokenDtype::U32 => {
                let src = &bytes[first * 4..(first + out.len()) * 4];
                for (o, b) in out.iter_mut().zip(src.chunks_exact(4)) {
                    *o = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{prepare, PrepareOptions, TokenizerSource};

    fn prepared(shard_tokens: u64) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let input = tmp.path().join("in.jsonl");
        let docs: Vec<String> =
            crate::builtin::corpus(3, 40).into_iter().map(|t| serde_json::json!({ "text": t }).to_string()).collect();
        std::fs::write(&input, docs.join("\n")).unwrap();
        let out = tmp.path().join("prepared");
        let mut opts = PrepareOptions::new(vec![input], out.clone(), TokenizerSource::Train { vocab_size: 320 });
        opts.shard_tokens = shard_tokens;
        prepare(&opts).unwrap();
        (tmp, out)
    }

    #[test]
    fn windows_cross_shards_like_one_stream() {
        let (_tmp, one) = prepared(u64::MAX);
        let (_tmp2, many) = prepared(97);
        let a = TokenDataset::open(&one, 16, 320, true).unwrap();
        let b = TokenDataset::open(&many, 16, 320, true).unwrap();
        assert!(b.manifest().shards.len() > 3);
        assert_eq!(a.num_samples(), b.num_samples());
        let (mut x, mut y) = (vec![0i64; 17], vec![0i64; 17]);
        for i in 0..a.num_samples() {
            a.read_sample(i, &mut x);
            b.read_sample(i, &mut y);
            assert_eq!(x, y, "sample {i}");
        }
        // Consecutive windows overlap by exactly one token.
        let mut next = vec![0i64; 17];
        a.read_sample(0, &mut x);
        a.read_sample(1, &mut next);
        assert_eq!(x[16], next[0]);
    }

    #[test]
    fn corrupt_truncated_and_missing_shards_are_named() {
        let (_tmp, dir) = prepared(200);
        let shard = dir.join("shard-00001.bin");
        let original = std::fs::read(&shard).unwrap();

        let mut flipped = original.clone();
        flipped[3] ^= 0x40;
        std::fs::write(&shard, &flipped).unwrap();
        let err = TokenDataset::open(&dir, 16, 320, true).err().unwrap().to_string();
        assert!(err.contains("shard-00001.bin") && err.contains("sha256"), "{err}");

        std::fs::write(&shard, &original[..original.len() - 2]).unwrap();
        let err = TokenDataset::open(&dir, 16, 320, false).err().unwrap().to_string();
        assert!(err.contains("shard-00001.bin") && err.contains("truncated"), "{err}");

        std::fs::remove_file(&shard).unwrap();
        let err = TokenDataset::open(&dir, 16, 320, false).err().unwrap().to_string();
        assert!(err.contains("shard-00001.bin") && err.contains("missing"), "{err}");
    }

    #[test]
    fn vocab_and_length_checks() {
        let (_tmp, dir) = prepared(u64::MAX);
        let err = TokenDataset::open(&dir, 16, 100, false).err().unwrap().to_string();
        assert!(err.contains("manifest.json") && err.contains("vocab_size is 100"), "{err}");
        let err = TokenDataset::open(&dir, 10_000_000, 320, false).err().unwrap().to_string();
        assert!(err.contains("seq_len"), "{err}");
        let err = TokenDataset::open(&dir.join("nope"), 16, 320, false).err().unwrap().to_string();
        assert!(err.contains("no manifest.json") && err.contains("data prepare"), "{err}");
    }
}
