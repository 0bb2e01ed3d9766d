//! Writing checkpoint files fast: the bytes go from memory to the file from several
//! threads at once (positioned writes into a file of the final size) while one more thread
//! hashes them, so each byte is read from memory for writing and for hashing concurrently,
//! instead of being serialised into a copy, written, and read back from disk to be hashed.
//! The file is fsynced before its digest is reported.
//!
//! One safetensors file can also be written by several processes at once, each writing
//! (and hashing) its own byte range of it ([`write_safetensors_part`]): the model of a
//! large job is split across the ranks of its group this way, and `model.safetensors`
//! stays one file that any safetensors reader opens on its own.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use moxin_proto::v1::WrittenFile;
use sha2::{Digest, Sha256};

use super::CheckpointError;

/// Bytes per positioned write.
const CHUNK: usize = 16 << 20;

/// Threads writing one file besides the one hashing it (more do not help a buffered write
/// into one file: the kernel serialises them on the inode).
const WRITERS: usize = 2;

/// A tensor as safetensors stores it: its name, dtype tag (`"BF16"`, `"F32"`, ...), shape
/// and row-major bytes.
#[derive(Debug, Clone, Copy)]
pub struct TensorBytes<'a> {
    /// Tensor name.
    pub name: &'a str,
    /// safetensors dtype tag.
    pub dtype: &'a str,
    /// Shape.
    pub shape: &'a [i64],
    /// Contiguous little-endian data.
    pub data: &'a [u8],
}

/// Bytes per element of a safetensors dtype tag.
pub fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "BF16" | "F16" | "I16" | "U16" => 2,
        "F32" | "I32" | "U32" => 4,
        "F64" | "I64" | "U64" => 8,
        _ => return None,
    })
}

/// What the header says of a tensor: name, dtype tag and shape.
#[derive(Debug, Clone, Copy)]
pub struct TensorMeta<'a> {
    /// Tensor name.
    pub name: &'a str,
    /// safetensors dtype tag.
    pub dtype: &'a str,
    /// Shape.
    pub shape: &'a [i64],
}

impl TensorMeta<'_> {
    /// Bytes of the tensor's data.
    pub fn data_bytes(&self) -> Result<usize, String> {
        let size =
            dtype_size(self.dtype).ok_or_else(|| format!("tensor {}: unknown dtype {:?}", self.name, self.dtype))?;
        let impossible = || format!("tensor {}: impossible shape {:?}", self.name, self.shape);
        if self.shape.iter().any(|&d| d < 0) {
            return Err(impossible());
        }
        // A shape from elsewhere may claim more bytes than an address space holds.
        let elements = self.shape.iter().try_fold(1usize, |n, &d| usize::try_from(d).ok()?.checked_mul(n));
        elements.and_then(|n| n.checked_mul(size)).ok_or_else(impossible)
    }
}

impl<'a> TensorBytes<'a> {
    fn meta(&self) -> TensorMeta<'a> {
        TensorMeta { name: self.name, dtype: self.dtype, shape: self.shape }
    }

    fn check(&self) -> Result<(), String> {
        let needed = self.meta().data_bytes()?;
        if needed != self.data.len() {
            return Err(format!(
                "tensor {}: shape {:?} of {} needs {needed} bytes, got {}",
                self.name,
                self.shape,
                self.dtype,
                self.data.len()
            ));
        }
        Ok(())
    }
}

/// The safetensors prefix (header length, then the JSON header padded with spaces to a
/// multiple of 8 bytes) for `tensors` stored back to back in the order given. The order
/// is part of the file, so the same tensors always make the same bytes.
pub fn safetensors_header(tensors: &[TensorMeta<'_>]) -> Result<Vec<u8>, String> {
    let mut json = String::from("{");
    let mut offset = 0usize;
    for (i, t) in tensors.iter().enumerate() {
        let bytes = t.data_bytes()?;
        if i > 0 {
            json.push(',');
        }
        let name = serde_json::to_string(t.name).map_err(|e| e.to_string())?;
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        let end = offset.checked_add(bytes).ok_or_else(|| format!("tensor {}: the data exceeds usize", t.name))?;
        json.push_str(&format!(
            "{name}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
            t.dtype,
            shape.join(",")
        ));
        offset = end;
    }
    json.push('}');
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut prefix = (json.len() as u64).to_le_bytes().to_vec();
    prefix.extend_from_slice(json.as_bytes());
    Ok(prefix)
}

/// Writes `tensors` as a safetensors file at `path` (replacing it), hashing while writing.
pub fn write_safetensors(path: &Path, tensors: &[TensorBytes<'_>]) -> Result<WrittenFile, CheckpointError> {
    let invalid = |reason| CheckpointError::Invalid { path: path.into(), reason };
    tensors.iter().try_for_each(TensorBytes::check).map_err(invalid)?;
    let metas: Vec<TensorMeta<'_>> = tensors.iter().map(TensorBytes::meta).collect();
    let header = safetensors_header(&metas).map_err(invalid)?;
    let segments: Vec<&[u8]> = std::iter::once(header.as_slice()).chain(tensors.iter().map(|t| t.data)).collect();
    write_segments(path, &segments)
}

/// How the safetensors file of `tensors` is split between `writers` processes: writer `w`
/// writes the data of tensors `parts[w]` (contiguous, in order, possibly empty), and
/// writer 0 the header too. Whole tensors, balanced by bytes: a tensor goes to the writer
/// in whose share of the data its first byte lies.
pub fn split_safetensors(tensors: &[TensorMeta<'_>], writers: usize) -> Result<Vec<std::ops::Range<usize>>, String> {
    let writers = writers.max(1);
    let sizes: Vec<usize> = tensors.iter().map(TensorMeta::data_bytes).collect::<Result<_, _>>()?;
    let total =
        sizes.iter().try_fold(0usize, |a, &b| a.checked_add(b)).ok_or("the tensors' data exceeds usize")?.max(1);
    let mut parts = vec![0..0; writers];
    let mut offset = 0usize;
    for (i, size) in sizes.iter().enumerate() {
        let w = ((offset as u128 * writers as u128 / total as u128) as usize).min(writers - 1);
        if parts[w].start == parts[w].end {
            parts[w] = i..i;
        }
        parts[w].end = i + 1;
        offset += size;
    }
    // Empty parts sit where their neighbours meet, so the parts stay in order.
    let mut next = 0;
    for p in &mut parts {
        if p.start == p.end {
            *p = next..next;
        }
        next = p.end;
    }
    Ok(parts)
}

/// Writes this writer's share of the safetensors file of `all` (see
/// [`split_safetensors`]): the data of `data` — the tensors `part` of `all`, in order —
/// at their offsets, and with `header` the header before them. Every writer creates the
/// file at its final size and writes only its range, so they may run at once (on one
/// machine or on a shared filesystem); the report covers that range.
pub fn write_safetensors_part(
    path: &Path,
    all: &[TensorMeta<'_>],
    part: std::ops::Range<usize>,
    data: &[&[u8]],
    header: bool,
) -> Result<WrittenFile, CheckpointError> {
    let invalid = |reason: String| CheckpointError::Invalid { path: path.into(), reason };
    let prefix = safetensors_header(all).map_err(invalid)?;
    let sizes: Vec<usize> = all.iter().map(TensorMeta::data_bytes).collect::<Result<_, _>>().map_err(invalid)?;
    if part.end > all.len() || data.len() != part.len() {
        return Err(invalid(format!("part {part:?} of {} tensors with {} buffers", all.len(), data.len())));
    }
    for (i, d) in part.clone().zip(data) {
        if d.len() != sizes[i] {
            return Err(invalid(format!("tensor {}: needs {} bytes, got {}", all[i].name, sizes[i], d.len())));
        }
    }
    let file_bytes = sizes
        .iter()
        .try_fold(prefix.len(), |a, &b| a.checked_add(b))
        .ok_or_else(|| invalid("the tensors' data exceeds usize".into()))? as u64;
    let data_start = prefix.len() + sizes[..part.start].iter().sum::<usize>();
    let (offset, segments): (usize, Vec<&[u8]>) = if header {
        if part.start != 0 {
            return Err(invalid(format!("the header's writer must write from the first tensor, not {part:?}")));
        }
        (0, std::iter::once(prefix.as_slice()).chain(data.iter().copied()).collect())
    } else {
        (data_start, data.to_vec())
    };
    let mut written = write_range(path, offset as u64, file_bytes, &segments)?;
    // A writer of the whole file reports it whole.
    if written.bytes != file_bytes {
        written.file_bytes = file_bytes;
        written.offset = offset as u64;
    }
    Ok(written)
}

/// Copies the file `source` to `dest`, hashing what was written.
pub fn copy_file(source: &Path, dest: &Path) -> Result<WrittenFile, CheckpointError> {
    let bytes = std::fs::read(source).map_err(|e| CheckpointError::io(source, e))?;
    write_segments(dest, &[&bytes])
}

/// Writes the concatenation of `segments` to `path` (replacing it) and fsyncs it: writer
/// threads claim [`CHUNK`]-sized pieces while another thread hashes the whole in order.
pub fn write_segments(path: &Path, segments: &[&[u8]]) -> Result<WrittenFile, CheckpointError> {
    let file = File::create(path).map_err(|e| CheckpointError::io(path, e))?;
    let total: usize = segments.iter().map(|s| s.len()).sum();
    write_into(path, file, 0, total as u64, segments)
}

/// Writes the concatenation of `segments` at `offset` of the file `path` of `file_bytes`
/// bytes (created if missing, never truncated: other writers may be filling the rest).
fn write_range(path: &Path, offset: u64, file_bytes: u64, segments: &[&[u8]]) -> Result<WrittenFile, CheckpointError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| CheckpointError::io(path, e))?;
    write_into(path, file, offset, file_bytes, segments)
}

fn write_into(
    path: &Path,
    file: File,
    base: u64,
    file_bytes: u64,
    segments: &[&[u8]],
) -> Result<WrittenFile, CheckpointError> {
    let io = |e| CheckpointError::io(path, e);
    let total: usize = segments.iter().map(|s| s.len()).sum();
    if base + total as u64 > file_bytes {
        return Err(CheckpointError::Invalid {
            path: path.into(),
            reason: format!("{total} bytes at offset {base} do not fit a file of {file_bytes} bytes"),
        });
    }
    // Every writer sets the same final size, so the order they do it in does not matter.
    file.set_len(file_bytes).map_err(io)?;
    let mut chunks = Vec::new();
    let mut offset = base;
    for segment in segments {
        for piece in segment.chunks(CHUNK) {
            chunks.push((offset, piece));
            offset += piece.len() as u64;
        }
    }
    let next = AtomicUsize::new(0);
    let (digest, written) = std::thread::scope(|scope| {
        let hasher = scope.spawn(|| {
            let mut sha = Sha256::new();
            for segment in segments {
                sha.update(segment);
            }
            hex::encode(sha.finalize())
        });
        let write = || -> std::io::Result<()> {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((offset, piece)) = chunks.get(i) else { return Ok(()) };
                file.write_all_at(piece, *offset)?;
            }
        };
        let writers: Vec<_> = (1..WRITERS.min(chunks.len().max(1))).map(|_| scope.spawn(write)).collect();
        let mut written = write();
        for w in writers {
            let result = w.join().unwrap_or_else(|_| Err(std::io::Error::other("a writer thread panicked")));
            written = written.and(result);
        }
        (hasher.join().unwrap_or_default(), written)
    });
    written.map_err(io)?;
    file.sync_all().map_err(io)?;
    if digest.is_empty() {
        return Err(CheckpointError::Invalid { path: path.into(), reason: "the hashing thread panicked".into() });
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(WrittenFile { name, sha256: digest, bytes: total as u64, file_bytes: 0, offset: 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_bytes_and_digest_match_a_plain_write() {
        let dir = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..(CHUNK * 2 + 12345)).map(|i| (i * 31 % 251) as u8).collect();
        let small = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let tensors = [
            TensorBytes { name: "a.weight", dtype: "U8", shape: &[big.len() as i64], data: &big },
            TensorBytes { name: "b \"quoted\"", dtype: "F32", shape: &[1, 2], data: &small },
        ];
        let path = dir.path().join("x.safetensors");
        let written = write_safetensors(&path, &tensors).unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(written.bytes as usize, on_disk.len());
        assert_eq!(written.sha256, moxin_data::sha256_hex(&path).unwrap());
        assert_eq!(written.name, "x.safetensors");
        let header_len = u64::from_le_bytes(on_disk[..8].try_into().unwrap()) as usize;
        assert_eq!(header_len % 8, 0);
        let header: serde_json::Value = serde_json::from_slice(&on_disk[8..8 + header_len]).unwrap();
        assert_eq!(header["b \"quoted\""]["data_offsets"], serde_json::json!([big.len(), big.len() + 8]));
        assert_eq!(&on_disk[8 + header_len..8 + header_len + big.len()], &big[..]);
        // Same tensors, same bytes.
        let again = write_safetensors(&dir.path().join("y.safetensors"), &tensors).unwrap();
        assert_eq!(again.sha256, written.sha256);
    }

    #[test]
    fn inconsistent_tensors_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bad = [TensorBytes { name: "w", dtype: "F32", shape: &[3], data: &[0u8; 8] }];
        let e = write_safetensors(&dir.path().join("w.safetensors"), &bad).unwrap_err().to_string();
        assert!(e.contains("needs 12 bytes, got 8"), "{e}");
        let bad = [TensorBytes { name: "w", dtype: "F7", shape: &[1], data: &[0u8] }];
        assert!(write_safetensors(&dir.path().join("w.safetensors"), &bad).is_err());
    }
}
