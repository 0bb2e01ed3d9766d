//! Collective communication between the ranks of a group, on tensors: all-reduce,
//! reduce-scatter, all-gather, broadcast and barrier.
//!
//! [`Collective`] is what the training step talks to. Operations take a 1-D contiguous
//! tensor (fp32 or bf16, on the CPU or a GPU), work on it in place, and return a [`Work`]
//! handle at once, so gradient buckets can be in flight while backward continues; the
//! tensor's region belongs to the collective until the handle is waited on. Backends:
//!
//! * [`Solo`]: a group of one (every operation is already complete), so single-process
//!   training runs the same step as a group;
//! * [`ring::RingCollective`]: the CPU ring over TCP (or same-host shared memory) on its
//!   own thread; CUDA tensors travel through host memory, which lets several workers share
//!   one GPU;
//! * [`nccl::NcclCollective`]: NCCL on a side stream for CUDA tensors.
//!
//! Every wait is bounded by the group's timeout, so a dead or stuck peer surfaces as a
//! [`CollectiveError`], never a hang.

pub mod nccl;
pub mod rendezvous;
pub mod ring;
mod ring_collective;
mod shm;

pub use rendezvous::GroupKey;
pub use ring_collective::RingCollective;

use std::ops::Range;
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};

/// Element types the CPU ring moves: fp32 and bf16 (bf16 is summed in fp32).
pub trait Element: Copy + Send + Sync + 'static {
    /// Bytes per element.
    const BYTES: usize;
    /// `self + other`.
    fn add(self, other: Self) -> Self;
    /// `self * factor`.
    fn scale(self, factor: f32) -> Self;
    /// Decodes one element from little-endian bytes.
    fn from_le(bytes: &[u8]) -> Self;

    /// `dst[i] (+)= element i of bytes` (little-endian), adding when `reduce`, else copying.
    /// The default decodes element by element; fp32 overrides it with a straight loop over
    /// aligned memory that the compiler vectorises (the ring's hot loop).
    fn combine(dst: &mut [Self], bytes: &[u8], reduce: bool) {
        for (d, src) in dst.iter_mut().zip(bytes.chunks_exact(Self::BYTES)) {
            let v = Self::from_le(src);
            *d = if reduce { d.add(v) } else { v };
        }
    }
}

impl Element for f32 {
    const BYTES: usize = 4;
    fn add(self, other: Self) -> Self {
        self + other
    }
    fn scale(self, factor: f32) -> Self {
        self * factor
    }
    fn from_le(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    fn combine(dst: &mut [Self], bytes: &[u8], reduce: bool) {
        const _: () = assert!(cfg!(target_endian = "little"), "the ring wire format is little-endian");
        // SAFETY: any 4 aligned bytes are a valid f32; `align_to` only yields the aligned
        // middle part, and we fall back to decoding when the buffer is not aligned.
        #[allow(unsafe_code)]
        let (head, src, _) = unsafe { bytes.align_to::<f32>() };
        if !head.is_empty() || src.len() < dst.len() {
            for (d, s) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                let v = f32::from_le(s);
                *d = if reduce { *d + v } else { v };
            }
        } else if reduce {
            for (d, s) in dst.iter_mut().zip(src) {
                *d += *s;
            }
        } else {
            dst.copy_from_slice(&src[..dst.len()]);
        }
    }
}

impl Element for half::bf16 {
    const BYTES: usize = 2;
    fn add(self, other: Self) -> Self {
        half::bf16::from_f32(self.to_f32() + other.to_f32())
    }
    fn scale(self, factor: f32) -> Self {
        half::bf16::from_f32(self.to_f32() * factor)
    }
    fn from_le(b: &[u8]) -> Self {
        half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))
    }
}

/// How reduced values combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Sum over ranks.
    Sum,
    /// Mean over ranks.
    Avg,
}

/// A failed collective. The group is unusable afterwards; the coordinator re-forms it.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A peer did not send or receive within the timeout.
    #[error("{op}: rank {peer} did not respond within {timeout:?} (peer dead or stuck)")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The peer rank.
        peer: usize,
        /// The timeout.
        timeout: Duration,
    },
    /// A peer closed its connection or the network failed.
    #[error("{op}: connection to rank {peer} failed: {source}")]
    Peer {
        /// The operation.
        op: &'static str,
        /// The peer rank.
        peer: usize,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The group could not be formed.
    #[error("forming the group: {0}")]
    Setup(String),
    /// The backend (NCCL, CUDA) reported an error.
    #[error("{op}: {message}")]
    Backend {
        /// The operation.
        op: &'static str,
        /// What the backend said.
        message: String,
    },
    /// Caller error (sizes, ranges, dtypes, devices).
    #[error("{0}")]
    Usage(String),
}

/// Collective operations of one rank in a group.
///
/// Each operation works in place on `buf`, a 1-D contiguous fp32 or bf16 tensor, and
/// returns when the operation is *enqueued*; the returned [`Work`] completes it. Until
/// then the caller must neither read nor write `buf` (the region of it the operation
/// touches). Operations complete in the order they were issued.
pub trait Collective {
    /// This rank.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world_size(&self) -> usize;
    /// Backend name for logs and metrics: `solo`, `ring` or `nccl`.
    fn backend(&self) -> &'static str;
    /// After completion every rank's `buf` holds the element-wise reduction over ranks.
    fn all_reduce(&mut self, buf: &Tensor, op: ReduceOp) -> Result<Work, CollectiveError>;
    /// `ranges` split `buf` into one contiguous part per rank, in rank order (parts may be
    /// empty or uneven). After completion `buf[ranges[rank]]` holds the reduction over
    /// ranks of that part; the rest of `buf` is unspecified.
    fn reduce_scatter(&mut self, buf: &Tensor, ranges: &[Range<usize>], op: ReduceOp) -> Result<Work, CollectiveError>;
    /// Each rank contributes `buf[ranges[rank]]`; after completion every rank's `buf`
    /// holds all parts.
    fn all_gather(&mut self, buf: &Tensor, ranges: &[Range<usize>]) -> Result<Work, CollectiveError>;
    /// Copies `root`'s `buf` to every rank.
    fn broadcast(&mut self, buf: &Tensor, root: usize) -> Result<Work, CollectiveError>;
    /// Returns once every rank has called it (and everything issued before has completed).
    fn barrier(&mut self) -> Result<(), CollectiveError>;

    /// Whether an operation on `buf` may stay in flight while autograd graphs hold other
    /// views of the same storage. Backends that write results through raw pointers (NCCL,
    /// the ring on CPU memory) can; one that finishes with a tensor copy (the ring staging
    /// CUDA memory through the host) cannot: the copy bumps the storage's version counter,
    /// and backward would then refuse every saved view of it.
    fn overlaps_autograd(&self, _buf: &Tensor) -> bool {
        true
    }
}

/// Every rank's `values` summed over the group (fp32 on the wire: exact for counts
/// below 2^24), on every rank. For small statistics outside the training step.
pub fn all_sum(
    collective: &mut dyn Collective,
    values: &[f64],
    device: tch::Device,
) -> Result<Vec<f64>, CollectiveError> {
    let t = Tensor::from_slice(&values.iter().map(|&v| v as f32).collect::<Vec<_>>()).to_device(device);
    collective.all_reduce(&t, ReduceOp::Sum)?.wait()?;
    let host =
        Vec::<f32>::try_from(t.to_device(tch::Device::Cpu)).map_err(|e| CollectiveError::Usage(e.to_string()))?;
    Ok(host.into_iter().map(f64::from).collect())
}

/// What a backend measured of a completed operation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BackendTime {
    /// Seconds the operation itself ran.
    pub busy_s: f64,
    /// Seconds of it not hidden behind computation, if the backend measures that itself
    /// (NCCL does, on the GPU); `None` means "the time the caller was blocked".
    pub exposed_s: Option<f64>,
}

/// Timings of a completed operation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OpTime {
    /// Seconds the operation ran.
    pub busy_s: f64,
    /// Seconds the caller waited for it (communication not hidden behind computation).
    pub exposed_s: f64,
}

/// Completion of an operation in flight (see [`Work`]).
pub trait Pending {
    /// Blocks until the operation has completed or failed (bounded by the group timeout).
    fn wait(self: Box<Self>) -> Result<BackendTime, CollectiveError>;
}

/// A collective operation in flight. [`Work::wait`] completes it and reports how long the
/// caller was blocked (the communication time not hidden behind computation). Dropping a
/// `Work` also waits, so a buffer is never released while a backend still uses it.
#[must_use = "a collective completes only when waited on"]
pub struct Work {
    pending: Option<Box<dyn Pending>>,
}

impl std::fmt::Debug for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.pending.is_some() { "Work(in flight)" } else { "Work(done)" })
    }
}

impl Work {
    /// An operation that has already completed.
    pub fn done() -> Self {
        Work { pending: None }
    }

    /// An operation that completes when `pending` does.
    pub fn new(pending: Box<dyn Pending>) -> Self {
        Work { pending: Some(pending) }
    }

    /// Waits for completion; returns how long the operation ran and how much of that was
    /// not hidden behind computation (on the CPU ring: the time blocked here).
    pub fn wait(mut self) -> Result<OpTime, CollectiveError> {
        let started = Instant::now();
        match self.pending.take() {
            Some(p) => p.wait().map(|t| OpTime {
                busy_s: t.busy_s,
                exposed_s: t.exposed_s.unwrap_or_else(|| started.elapsed().as_secs_f64()),
            }),
            None => Ok(OpTime::default()),
        }
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            if let Err(e) = p.wait() {
                tracing::warn!("a collective dropped without waiting failed: {e}");
            }
        }
    }
}

/// The group of one: every operation is the identity and completes at once.
#[derive(Debug, Default, Clone, Copy)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "solo"
    }
    fn all_reduce(&mut self, buf: &Tensor, _op: ReduceOp) -> Result<Work, CollectiveError> {
        check_buffer("all_reduce", buf)?;
        Ok(Work::done())
    }
    fn reduce_scatter(
        &mut self,
        buf: &Tensor,
        ranges: &[Range<usize>],
        _op: ReduceOp,
    ) -> Result<Work, CollectiveError> {
        check_ranges(check_buffer("reduce_scatter", buf)?, ranges, 1)?;
        Ok(Work::done())
    }
    fn all_gather(&mut self, buf: &Tensor, ranges: &[Range<usize>]) -> Result<Work, CollectiveError> {
        check_ranges(check_buffer("all_gather", buf)?, ranges, 1)?;
        Ok(Work::done())
    }
    fn broadcast(&mut self, buf: &Tensor, root: usize) -> Result<Work, CollectiveError> {
        check_buffer("broadcast", buf)?;
        if root != 0 {
            return Err(CollectiveError::Usage(format!("broadcast root {root} outside a group of 1")));
        }
        Ok(Work::done())
    }
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// Checks that `buf` is a 1-D contiguous fp32/bf16 tensor; returns its length.
pub(crate) fn check_buffer(op: &str, buf: &Tensor) -> Result<usize, CollectiveError> {
    if buf.dim() != 1 || !buf.is_contiguous() {
        return Err(CollectiveError::Usage(format!(
            "{op}: expected a 1-D contiguous tensor, got shape {:?}",
            buf.size()
        )));
    }
    match buf.kind() {
        Kind::Float | Kind::BFloat16 => Ok(buf.numel()),
        k => Err(CollectiveError::Usage(format!("{op}: dtype {k:?} is not supported (fp32 or bf16)"))),
    }
}

/// `len` elements split into `world` contiguous ranges, as even as possible (the first
/// `len % world` ranges get one more). Ranges may be empty when `len < world`.
pub fn even_ranges(len: usize, world: usize) -> Vec<Range<usize>> {
    let (base, extra) = (len / world, len % world);
    let mut start = 0;
    (0..world)
        .map(|r| {
            let n = base + usize::from(r < extra);
            let range = start..start + n;
            start += n;
            range
        })
        .collect()
}

/// The parts of `partitions` (ranges tiling a whole buffer) that fall into `window`, made
/// relative to `window.start`: the ranges a collective over the sub-buffer `window` uses.
pub fn clip_ranges(partitions: &[Range<usize>], window: Range<usize>) -> Vec<Range<usize>> {
    partitions
        .iter()
        .map(|p| {
            let (s, e) = (p.start.clamp(window.start, window.end), p.end.clamp(window.start, window.end));
            s - window.start..e - window.start
        })
        .collect()
}

/// Checks that `ranges` tile `0..len` in order with one range per rank.
pub(crate) fn check_ranges(len: usize, ranges: &[Range<usize>], world: usize) -> Result<(), CollectiveError> {
    if ranges.len() != world {
        return Err(CollectiveError::Usage(format!("{} ranges for {world} ranks", ranges.len())));
    }
    let mut next = 0;
    for r in ranges {
        if r.start != next || r.end < r.start {
            return Err(CollectiveError::Usage(format!("ranges {ranges:?} do not tile 0..{len}")));
        }
        next = r.end;
    }
    if next != len {
        return Err(CollectiveError::Usage(format!("ranges {ranges:?} do not tile 0..{len}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
