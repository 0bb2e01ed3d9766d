//! Writing checkpoint files fast: the bytes go from memory to the file from several
//! threads at once (positioned writes into a file of the final size) while one more thread
//! hashes them, so each byte is read from memory for writing and for hashing concurrently,
//! instead of being serialised into a copy, written, and read back from disk to be hashed.
//! The file is fsynced before its digest is reported.
//!
//! One sha256 stream runs at about 1 GB/s on a server core (1.03 GB/s measured on the
//! GPU machine's Xeon), slower than that machine's disk: a file larger than
//! [`HASH_RANGE`] is hashed as consecutive ranges by several threads at once, each range
//! reported with its own digest (the manifest's `file_parts`, which the loader verifies in
//! parallel too).
//!
//! One safetensors file can also be written by several processes at once, each writing
//! (and hashing) its own byte range of it ([`write_safetensors_part`]): the model of a
//! large job is split across the ranks of its group this way, and `model.safetensors`
//! stays one file that any safetensors reader opens on its own.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use moxin_proto::v1::WrittenFile;
use sha2::{Digest, Sha256};

use super::CheckpointError;

/// Bytes per positioned write.
const CHUNK: usize = 16 << 20;

/// Bytes hashed as one digest: larger files are reported as ranges of this size.
pub const HASH_RANGE: usize = 1 << 30;

/// Threads writing one file besides those hashing it (more do not help a buffered write
/// into one file: the kernel serialises them on the inode).
const WRITERS: usize = 2;

/// Threads hashing checkpoint bytes at once in this process. A rank writes its share of
/// the model and up to four optimizer files at the same time, each file with hashing
/// threads of its own; the budget keeps them together to a quarter of the cores (beside
/// training), at least two, which still hash faster than disks write (one sha256 stream
/// ≈ 1 GB/s; with one on the 2-core CI machine, hashing bounded the writer at 1.7 GB/s).
static HASH_PERMITS: Permits = Permits::new(None);

/// A counting semaphore: at most `capacity` holders at once (`None`: a quarter of the
/// cores, at least two, fixed on first use).
struct Permits {
    available: Mutex<Option<usize>>,
    freed: Condvar,
}

impl Permits {
    const fn new(capacity: Option<usize>) -> Self {
        Permits { available: Mutex::new(capacity), freed: Condvar::new() }
    }

    /// Waits for a permit; it is returned when the guard drops.
    fn acquire(&self) -> Permit<'_> {
        let mut available = self.available.lock().unwrap_or_else(|e| e.into_inner());
        if available.is_none() {
            *available = Some(quarter_of_the_cores().max(2));
        }
        while *available == Some(0) {
            available = self.freed.wait(available).unwrap_or_else(|e| e.into_inner());
        }
        if let Some(count) = available.as_mut() {
            *count -= 1;
        }
        Permit(self)
    }
}

/// A quarter of the cores this process may use (0 on fewer than four).
fn quarter_of_the_cores() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get()) / 4
}

struct Permit<'a>(&'a Permits);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut available = self.0.available.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = available.as_mut() {
            *count += 1;
        }
        self.0.freed.notify_one();
    }
}

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

/// What one file's writer reports: the whole file's digest (`file_bytes` 0), or, for a file
/// written in parts or larger than [`HASH_RANGE`], one digest per consecutive byte range.
pub type WrittenRanges = Vec<WrittenFile>;

/// Writes `tensors` as a safetensors file at `path` (replacing it), hashing while writing.
pub fn write_safetensors(path: &Path, tensors: &[TensorBytes<'_>]) -> Result<WrittenRanges, CheckpointError> {
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
) -> Result<WrittenRanges, CheckpointError> {
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
    write_range(path, offset as u64, file_bytes, &segments)
}

/// Copies the file `source` to `dest`, hashing what was written.
pub fn copy_file(source: &Path, dest: &Path) -> Result<WrittenRanges, CheckpointError> {
    let bytes = std::fs::read(source).map_err(|e| CheckpointError::io(source, e))?;
    write_segments(dest, &[&bytes])
}

/// Writes the concatenation of `segments` to `path` (replacing it) and fsyncs it: writer
/// threads claim [`CHUNK`]-sized pieces while other threads hash it, range by range.
pub fn write_segments(path: &Path, segments: &[&[u8]]) -> Result<WrittenRanges, CheckpointError> {
    write_segments_in_ranges(path, segments, HASH_RANGE)
}

/// [`write_segments`] with hash ranges of `hash_range` bytes (tests use small ones).
pub(crate) fn write_segments_in_ranges(
    path: &Path,
    segments: &[&[u8]],
    hash_range: usize,
) -> Result<WrittenRanges, CheckpointError> {
    let file = File::create(path).map_err(|e| CheckpointError::io(path, e))?;
    let total: usize = segments.iter().map(|s| s.len()).sum();
    write_into(path, file, 0, total as u64, segments, hash_range)
}

/// Writes the concatenation of `segments` at `offset` of the file `path` of `file_bytes`
/// bytes (created if missing, never truncated: other writers may be filling the rest).
fn write_range(
    path: &Path,
    offset: u64,
    file_bytes: u64,
    segments: &[&[u8]],
) -> Result<WrittenRanges, CheckpointError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| CheckpointError::io(path, e))?;
    write_into(path, file, offset, file_bytes, segments, HASH_RANGE)
}

fn write_into(
    path: &Path,
    file: File,
    base: u64,
    file_bytes: u64,
    segments: &[&[u8]],
    hash_range: usize,
) -> Result<WrittenRanges, CheckpointError> {
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
    // Consecutive hash ranges (one, possibly empty, for a small file).
    let ranges: Vec<(usize, usize)> = (0..total.div_ceil(hash_range.max(1)).max(1))
        .map(|i| (i * hash_range, ((i + 1) * hash_range).min(total)))
        .collect();
    // Up to a quarter of the cores per file, each range hashed under a permit of the
    // process-wide budget (the model and partition files are written at once while
    // training goes on; at 1 GB/s per stream, 4 of a 16-core machine's hash 4 GB/s).
    let hashers = quarter_of_the_cores().clamp(1, ranges.len());
    let next = AtomicUsize::new(0);
    let next_range = AtomicUsize::new(0);
    let (digests, written) = std::thread::scope(|scope| {
        let hash = || {
            let mut done = Vec::new();
            loop {
                let i = next_range.fetch_add(1, Ordering::Relaxed);
                let Some(&(start, end)) = ranges.get(i) else { return done };
                let _permit = HASH_PERMITS.acquire();
                let mut sha = Sha256::new();
                for piece in byte_window(segments, start, end) {
                    sha.update(piece);
                }
                done.push((i, hex::encode(sha.finalize())));
            }
        };
        let hashers: Vec<_> = (0..hashers).map(|_| scope.spawn(hash)).collect();
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
        let mut digests = vec![String::new(); ranges.len()];
        for h in hashers {
            for (i, digest) in h.join().unwrap_or_default() {
                digests[i] = digest;
            }
        }
        (digests, written)
    });
    written.map_err(io)?;
    file.sync_all().map_err(io)?;
    if digests.iter().any(String::is_empty) {
        return Err(CheckpointError::Invalid { path: path.into(), reason: "a hashing thread panicked".into() });
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if ranges.len() == 1 && base == 0 && total as u64 == file_bytes {
        let sha256 = digests.into_iter().next().unwrap_or_default();
        return Ok(vec![WrittenFile { name, sha256, bytes: total as u64, file_bytes: 0, offset: 0 }]);
    }
    Ok(ranges
        .iter()
        .zip(digests)
        .map(|(&(start, end), sha256)| WrittenFile {
            name: name.clone(),
            sha256,
            bytes: (end - start) as u64,
            file_bytes,
            offset: base + start as u64,
        })
        .collect())
}

/// The pieces of the concatenation of `segments` between byte `start` and byte `end`.
fn byte_window<'a>(segments: &'a [&'a [u8]], start: usize, end: usize) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut at = 0usize;
    segments.iter().filter_map(move |segment| {
        let (from, to) = (at, at + segment.len());
        at = to;
        let (lo, hi) = (start.max(from), end.min(to));
        (lo < hi).then(|| &segment[lo - from..hi - from])
    })
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
        let [written] = &write_safetensors(&path, &tensors).unwrap()[..] else { panic!("a small file is one range") };
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
        assert_eq!(again[0].sha256, written.sha256);
    }

    #[test]
    fn a_file_larger_than_the_hash_range_is_reported_as_ranges_that_tile_it() {
        let dir = tempfile::tempdir().unwrap();
        let a: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 256) as u8).collect();
        let b: Vec<u8> = (0..555u32).map(|i| (i * 13 % 256) as u8).collect();
        let path = dir.path().join("big.bin");
        let file = File::create(&path).unwrap();
        // Ranges of 400 bytes over 1555: the third spans the two segments, the last is short.
        let ranges = write_into(&path, file, 0, 1555, &[&a, &b], 400).unwrap();
        let whole: Vec<u8> = a.iter().chain(&b).copied().collect();
        assert_eq!(std::fs::read(&path).unwrap(), whole);
        let tiles: Vec<(u64, u64)> = ranges.iter().map(|r| (r.offset, r.bytes)).collect();
        assert_eq!(tiles, [(0, 400), (400, 400), (800, 400), (1200, 355)]);
        for r in &ranges {
            assert_eq!(r.file_bytes, 1555);
            assert_eq!(r.name, "big.bin");
            let bytes = &whole[r.offset as usize..(r.offset + r.bytes) as usize];
            assert_eq!(r.sha256, hex::encode(Sha256::digest(bytes)));
        }
        // A writer of bytes 1000.. of a file: its ranges sit at their offsets in the file.
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let part = write_into(&path, file, 1000, 1555, &[&b], 400).unwrap();
        let tiles: Vec<(u64, u64)> = part.iter().map(|r| (r.offset, r.bytes)).collect();
        assert_eq!(tiles, [(1000, 400), (1400, 155)]);
        assert_eq!(part[1].sha256, hex::encode(Sha256::digest(&b[400..])));
    }

    #[test]
    fn permits_bound_how_many_hold_one_at_once() {
        let permits = Permits::new(Some(2));
        let (inside, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..5 {
                        let _permit = permits.acquire();
                        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(1));
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            }
        });
        assert_eq!(most.load(Ordering::SeqCst), 2, "never more than the capacity, and it is used");
        assert_eq!(*permits.available.lock().unwrap(), Some(2), "every permit came back");
    }

    #[test]
    fn byte_windows_cross_segment_boundaries() {
        let segments: [&[u8]; 3] = [b"abc", b"", b"defgh"];
        let window = |s, e| byte_window(&segments, s, e).flatten().copied().collect::<Vec<u8>>();
        assert_eq!(window(0, 8), b"abcdefgh");
        assert_eq!(window(2, 5), b"cde");
        assert_eq!(window(3, 3), b"");
        assert_eq!(window(7, 8), b"h");
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
