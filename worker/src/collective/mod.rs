//! Collective communication between the ranks of a group: all-reduce, reduce-scatter,
//! all-gather, broadcast and barrier over flat buffers.
//!
//! [`Collective`] is the interface the trainer uses; backends plug in behind it: the CPU
//! ring over TCP ([`ring::TcpRing`]) here, NCCL on GPUs. Every call is bounded by a timeout,
//! so a dead or stuck peer surfaces as a [`CollectiveError`], never a hang.

pub mod ring;
mod shm;

use std::ops::Range;
use std::time::Duration;

/// Element types the collectives move: fp32 and bf16 (summed in fp32).
pub trait Element: Copy + Send + Sync + 'static {
    /// Bytes per element.
    const BYTES: usize;
    /// `self + other`.
    fn add(self, other: Self) -> Self;
    /// `self * factor`.
    fn scale(self, factor: f32) -> Self;
    /// Decodes one element from little-endian bytes.
    fn from_le(bytes: &[u8]) -> Self;
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
    /// Caller error (sizes, ranges).
    #[error("{0}")]
    Usage(String),
}

/// Collective operations of one rank in a group.
pub trait Collective: Send {
    /// This rank.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world_size(&self) -> usize;
    /// After the call every rank's `buf` holds the element-wise reduction over ranks.
    fn all_reduce_f32(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<(), CollectiveError>;
    /// `ranges` split `buf` into one contiguous part per rank, in rank order. After the call
    /// `buf[ranges[rank]]` holds the reduction over ranks of that part; the rest of `buf` is
    /// unspecified.
    fn reduce_scatter_f32(
        &mut self,
        buf: &mut [f32],
        ranges: &[Range<usize>],
        op: ReduceOp,
    ) -> Result<(), CollectiveError>;
    /// Each rank contributes `buf[ranges[rank]]`; after the call every rank's `buf` holds all parts.
    fn all_gather_f32(&mut self, buf: &mut [f32], ranges: &[Range<usize>]) -> Result<(), CollectiveError>;
    /// Copies `root`'s `buf` to every rank.
    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), CollectiveError>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), CollectiveError>;
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
