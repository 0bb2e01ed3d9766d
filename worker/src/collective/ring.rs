//! The CPU backend: a ring of TCP connections (rank r sends to r+1, receives from r-1).
//!
//! Reduce-scatter and all-gather each take W-1 steps; in each, a rank sends one part to its
//! successor while receiving another from its predecessor, so every rank sends
//! (W-1)/W of the buffer per operation and 2(W-1)/W per all-reduce (bandwidth-optimal).
//! Sending runs on a scoped thread while the calling thread receives in fixed-size pieces
//! and reduces each piece as it lands, so the network and the additions overlap. There is
//! no per-element allocation: one receive buffer is reused for the life of the ring.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::time::{Duration, Instant};

use super::{check_ranges, even_ranges, shm, CollectiveError, Element, GroupKey, ReduceOp};

/// Bytes per shared-memory slot (and per piece the same-host path hands over).
const PIECE: usize = 1 << 20;

/// Bytes received from a socket (and reduced) at a time: fewer, larger reads measured a
/// few percent faster than 1 MiB and 256 KiB on loopback (bench all-reduce --tcp).
const TCP_PIECE: usize = 4 << 20;

/// One rank's end of a TCP ring.
pub struct TcpRing {
    rank: usize,
    world: usize,
    next: Option<TcpStream>,
    prev: Option<TcpStream>,
    /// Same-host fast path (see [`super::shm`]); `None` means data goes over the sockets.
    outbox: Option<shm::Outbox>,
    inbox: Option<shm::Inbox>,
    timeout: Duration,
    scratch: Vec<u8>,
}

impl TcpRing {
    /// Joins the ring: `listener` is this rank's bound listener (its address is
    /// `peers[rank]`), `peers` every rank's address, `group` the membership generation and
    /// its key (a connection from anyone but the predecessor of this generation is refused,
    /// see [`super::rendezvous`]). Blocks until both neighbours are connected or `timeout`
    /// passes.
    pub fn connect(
        rank: usize,
        peers: &[SocketAddr],
        listener: &TcpListener,
        group: &GroupKey,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let shared_memory = std::env::var("MOXIN_RING_SHM").map_or(true, |v| v != "0");
        Self::connect_with(rank, peers, listener, group, timeout, shared_memory)
    }

    /// As [`TcpRing::connect`], choosing whether same-host neighbours may use shared memory
    /// (`connect` allows it unless `MOXIN_RING_SHM=0`).
    pub fn connect_with(
        rank: usize,
        peers: &[SocketAddr],
        listener: &TcpListener,
        group: &GroupKey,
        timeout: Duration,
        shared_memory: bool,
    ) -> Result<Self, CollectiveError> {
        let world = peers.len();
        if rank >= world {
            return Err(CollectiveError::Usage(format!("rank {rank} outside a group of {world}")));
        }
        let mut ring = TcpRing {
            rank,
            world,
            next: None,
            prev: None,
            outbox: None,
            inbox: None,
            timeout,
            scratch: vec![0; TCP_PIECE],
        };
        if world == 1 {
            return Ok(ring);
        }
        let deadline = Instant::now() + timeout;
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        // Connect out (retrying while the successor starts listening) on a helper thread
        // while accepting the predecessor here, so a ring of any size forms without deadlock.
        let next_addr = peers[next_rank];
        let key = group.clone();
        let connector = std::thread::spawn(move || -> Result<TcpStream, CollectiveError> {
            loop {
                match TcpStream::connect_timeout(&next_addr, Duration::from_millis(500)) {
                    Ok(mut s) => {
                        s.set_read_timeout(Some(timeout)).map_err(|e| CollectiveError::Setup(e.to_string()))?;
                        key.answer(&mut s, rank as u32).map_err(|source| CollectiveError::Peer {
                            op: "connect",
                            peer: next_rank,
                            source,
                        })?;
                        return Ok(s);
                    }
                    Err(e) if Instant::now() < deadline => {
                        tracing::trace!("connecting to rank {next_rank} at {next_addr}: {e}; retrying");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(source) => return Err(CollectiveError::Peer { op: "connect", peer: next_rank, source }),
                }
            }
        });
        listener.set_nonblocking(true).map_err(|e| CollectiveError::Setup(e.to_string()))?;
        let prev = loop {
            match listener.accept() {
                Ok((mut s, from)) => {
                    s.set_nonblocking(false).map_err(|e| CollectiveError::Setup(e.to_string()))?;
                    match group.challenge(&mut s, prev_rank as u32) {
                        Ok(()) => break s,
                        Err(why) => tracing::warn!(
                            "refused a ring connection from {from}: {why} (generation {})",
                            group.generation()
                        ),
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    return Err(CollectiveError::Setup(format!(
                        "rank {prev_rank} did not connect within {timeout:?}: {e}"
                    )))
                }
            }
        };
        let next = connector.join().map_err(|_| CollectiveError::Setup("connector thread panicked".into()))??;
        for s in [&prev, &next] {
            s.set_nodelay(true).map_err(|e| CollectiveError::Setup(e.to_string()))?;
            s.set_read_timeout(Some(timeout)).map_err(|e| CollectiveError::Setup(e.to_string()))?;
            s.set_write_timeout(Some(timeout)).map_err(|e| CollectiveError::Setup(e.to_string()))?;
        }
        let (mut next, mut prev) = (next, prev);
        let (outbox, inbox) = shm::handshake(rank, group.generation(), PIECE, shared_memory, &mut next, &mut prev)
            .map_err(|e| CollectiveError::Setup(format!("shared-memory handshake: {e}")))?;
        tracing::debug!(rank, shm_out = outbox.is_some(), shm_in = inbox.is_some(), "ring connected");
        ring.outbox = outbox;
        ring.inbox = inbox;
        ring.next = Some(next);
        ring.prev = Some(prev);
        Ok(ring)
    }

    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn prev_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    /// One ring step: send `buf[send]` to the successor while receiving the predecessor's
    /// part into `buf[recv]`, either reducing into it (`reduce`) or overwriting it.
    fn exchange<T: Element>(
        &mut self,
        op: &'static str,
        buf: &mut [T],
        send: Range<usize>,
        recv: Range<usize>,
        reduce: bool,
    ) -> Result<(), CollectiveError> {
        let (next_rank, prev_rank, timeout) = (self.next_rank(), self.prev_rank(), self.timeout);
        let (send_part, recv_part) = disjoint_mut(buf, send, recv);
        metrics::counter!("moxin_collective_bytes_total", "op" => op).increment((send_part.len() * T::BYTES) as u64);
        let next = self.next.as_mut().expect("connected ring");
        let prev = self.prev.as_mut().expect("connected ring");
        let scratch = &mut self.scratch;
        let map_err = |peer: usize, source: std::io::Error| match source.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => CollectiveError::Timeout { op, peer, timeout },
            _ => CollectiveError::Peer { op, peer, source },
        };
        let (outbox, inbox) = (self.outbox.as_mut(), self.inbox.as_ref());
        let combine = |chunk: &mut [T], bytes: &[u8]| T::combine(chunk, bytes, reduce);
        std::thread::scope(|scope| {
            let sender = scope.spawn(move || match outbox {
                None => next.write_all(as_bytes(send_part)),
                Some(outbox) => {
                    // Fill slot k % 2, signal "ready k"; before reusing a slot wait for the
                    // successor's acknowledgement of the piece that used it.
                    let pieces = as_bytes(send_part).chunks(PIECE);
                    let count = pieces.len();
                    let mut ack = [0u8; 8];
                    for (k, piece) in pieces.enumerate() {
                        if k >= shm::SLOTS {
                            read_exact(next, &mut ack)?;
                        }
                        outbox.write(k % shm::SLOTS, piece);
                        next.write_all(&(k as u64).to_le_bytes())?;
                    }
                    for _ in 0..count.min(shm::SLOTS) {
                        read_exact(next, &mut ack)?;
                    }
                    Ok(())
                }
            });
            let received = (|| {
                let piece = if inbox.is_some() { PIECE } else { TCP_PIECE };
                for (k, chunk) in recv_part.chunks_mut(piece / T::BYTES).enumerate() {
                    let len = chunk.len() * T::BYTES;
                    match inbox {
                        // Gathering: the bytes go straight into place, no second copy.
                        None if !reduce => read_exact(prev, as_bytes_mut(chunk))?,
                        None => {
                            let bytes = &mut scratch[..len];
                            read_exact(prev, bytes)?;
                            combine(chunk, bytes);
                        }
                        Some(inbox) => {
                            let mut ready = [0u8; 8];
                            read_exact(prev, &mut ready)?;
                            if u64::from_le_bytes(ready) != k as u64 {
                                return Err(std::io::Error::other("ring out of step"));
                            }
                            combine(chunk, inbox.read(k % shm::SLOTS, len));
                            prev.write_all(&(k as u64).to_le_bytes())?;
                        }
                    }
                }
                Ok(())
            })();
            let sent = sender.join().expect("sender thread panicked");
            received.map_err(|e| map_err(prev_rank, e))?;
            sent.map_err(|e| map_err(next_rank, e))
        })
    }

    /// Reduce-scatter over `buf` split by `ranges` (see [`super::Collective::reduce_scatter`]).
    pub fn reduce_scatter<T: Element>(
        &mut self,
        buf: &mut [T],
        ranges: &[Range<usize>],
        op: ReduceOp,
    ) -> Result<(), CollectiveError> {
        check_ranges(buf.len(), ranges, self.world)?;
        let started = Instant::now();
        let w = self.world;
        for s in 0..w.saturating_sub(1) {
            let send = ranges[(self.rank + 2 * w - s - 1) % w].clone();
            let recv = ranges[(self.rank + 2 * w - s - 2) % w].clone();
            self.exchange("reduce_scatter", buf, send, recv, true)?;
        }
        if op == ReduceOp::Avg && w > 1 {
            let factor = 1.0 / w as f32;
            for v in &mut buf[ranges[self.rank].clone()] {
                *v = v.scale(factor);
            }
        }
        metrics::histogram!("moxin_collective_duration_seconds", "op" => "reduce_scatter")
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// All-gather over `buf` split by `ranges` (see [`super::Collective::all_gather`]).
    pub fn all_gather<T: Element>(&mut self, buf: &mut [T], ranges: &[Range<usize>]) -> Result<(), CollectiveError> {
        check_ranges(buf.len(), ranges, self.world)?;
        let started = Instant::now();
        let w = self.world;
        for s in 0..w.saturating_sub(1) {
            let send = ranges[(self.rank + w - s) % w].clone();
            let recv = ranges[(self.rank + 2 * w - s - 1) % w].clone();
            self.exchange("all_gather", buf, send, recv, false)?;
        }
        metrics::histogram!("moxin_collective_duration_seconds", "op" => "all_gather")
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// All-reduce: reduce-scatter then all-gather over even parts.
    pub fn all_reduce<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<(), CollectiveError> {
        let ranges = even_ranges(buf.len(), self.world);
        self.reduce_scatter(buf, &ranges, op)?;
        self.all_gather(buf, &ranges)
    }
}

impl TcpRing {
    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the ring.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Copies `root`'s `buf` to every rank.
    pub fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), CollectiveError> {
        if root >= self.world {
            return Err(CollectiveError::Usage(format!("broadcast root {root} outside a group of {}", self.world)));
        }
        if self.world == 1 {
            return Ok(());
        }
        let (next_rank, prev_rank, timeout) = (self.next_rank(), self.prev_rank(), self.timeout);
        let map_err = |peer: usize, source: std::io::Error| match source.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => CollectiveError::Timeout { op: "broadcast", peer, timeout },
            _ => CollectiveError::Peer { op: "broadcast", peer, source },
        };
        if self.rank != root {
            read_exact(self.prev.as_mut().unwrap(), buf).map_err(|e| map_err(prev_rank, e))?;
        }
        if next_rank != root {
            self.next.as_mut().unwrap().write_all(buf).map_err(|e| map_err(next_rank, e))?;
        }
        Ok(())
    }

    /// Returns once every rank has called it.
    pub fn barrier(&mut self) -> Result<(), CollectiveError> {
        let mut token = [1.0f32];
        self.all_reduce(&mut token, ReduceOp::Sum)?;
        // With one element only one rank receives data in each phase; a second ring pass
        // makes every rank wait for every other.
        let mut byte = [0u8];
        self.broadcast(&mut byte, 0)
    }
}

/// `read_exact` that reports EOF as a closed connection.
fn read_exact(stream: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    stream.read_exact(buf).map_err(|e| match e.kind() {
        ErrorKind::UnexpectedEof => std::io::Error::new(ErrorKind::ConnectionReset, "peer closed the connection"),
        _ => e,
    })
}

/// Two disjoint sub-slices of one buffer.
fn disjoint_mut<T>(buf: &mut [T], a: Range<usize>, b: Range<usize>) -> (&mut [T], &mut [T]) {
    assert!(a.is_empty() || b.is_empty() || a.end <= b.start || b.end <= a.start, "overlapping ranges {a:?} {b:?}");
    if a.is_empty() {
        return (&mut [], &mut buf[b]);
    }
    if b.is_empty() {
        return (&mut buf[a], &mut []);
    }
    if a.start < b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&mut lo[a], &mut hi[..b.end - b.start])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        let b_len = b.end - b.start;
        (&mut hi[..a.end - a.start], &mut lo[b.start..b.start + b_len])
    }
}

/// The bytes of a mutable slice of plain numbers, to receive into (see [`as_bytes`]).
fn as_bytes_mut<T: Element>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; in addition every bit pattern is a valid T, so any bytes
    // written through the view leave valid values; the lifetime is tied to `s`.
    #[allow(unsafe_code)]
    unsafe {
        std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(s))
    }
}

/// The bytes of a slice of plain numbers (f32 / bf16: no padding, every bit pattern valid),
/// in native order; only little-endian machines are supported (checked at compile time).
fn as_bytes<T: Element>(s: &[T]) -> &[u8] {
    const _: () = assert!(cfg!(target_endian = "little"), "the ring wire format is little-endian");
    // SAFETY: T is f32 or bf16 (the only Element impls): plain-old-data without padding,
    // so viewing its memory as bytes is sound; the lifetime is tied to `s`.
    #[allow(unsafe_code)]
    unsafe {
        std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s))
    }
}
