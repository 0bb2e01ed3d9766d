//! Optimizer state carried in memory from one generation of a group to the next, so a
//! graceful resize (a worker released, a worker joining) costs no checkpoint write or read.
//!
//! ZeRO-1 keeps each rank's optimizer partition (fp32 master weights and Adam moments) in
//! that rank's memory only; the parameters are the master weights all-gathered. When a
//! group stops for a new generation without anyone dying:
//!
//! 1. **Hand-off, in the old group** ([`hand_off`]): the ranks agree on who is leaving;
//!    each leaving rank broadcasts its partition and one staying rank keeps it, so the
//!    stayers together hold the whole state, as a [`Handover`] of flat segments.
//! 2. **Adoption, in the new group** ([`adopt`]): every rank publishes what it holds (a
//!    joiner holds nothing); if the holders agree on the step and their segments tile the
//!    parameters exactly, each segment is broadcast chunk by chunk (only where another
//!    rank's new partition needs it) and every rank loads the overlap with its new
//!    partition. Otherwise the group restores from the newest checkpoint, as after a
//!    failure; every rank decides from the same gathered facts, so all decide alike.
//!
//! The numbers moved are the numbers a checkpoint would hold, so continuing from a
//! handover is bit-identical to resuming from a checkpoint written at the same step.

use std::ops::Range;

use tch::{Device, Kind, Tensor};

use super::Progress;
use crate::collective::{Collective, CollectiveError, ReduceOp};
use crate::optim::AdamW;
use crate::WorkerError;

/// Elements per broadcast: bounds the scratch memory a transfer needs (3 × 64 MiB).
const CHUNK: i64 = 1 << 24;

/// Optimizer state for the flat range `start..start + len` (fp32 each).
pub struct Segment {
    /// First element in the flat parameter buffer.
    pub start: i64,
    /// Master weights, first and second Adam moments.
    pub state: [Tensor; 3],
}

impl Segment {
    fn len(&self) -> i64 {
        self.state[0].size()[0]
    }
}

/// What a rank carries from a group that stopped for a new generation.
pub struct Handover {
    /// The generation whose group handed the state over.
    pub generation: u64,
    /// Where training stood (wall time as this rank measured it).
    pub progress: Progress,
    /// AdamW steps taken (bias correction).
    pub adam_step: u64,
    /// The state this rank holds, sorted by start.
    pub segments: Vec<Segment>,
}

fn comm(e: CollectiveError) -> WorkerError {
    WorkerError::Collective(e.to_string())
}

fn broadcast(collective: &mut dyn Collective, buf: &Tensor, root: usize) -> Result<(), WorkerError> {
    collective.broadcast(buf, root).and_then(|w| w.wait()).map(|_| ()).map_err(comm)
}

/// Sends `state` (on `root`) to the other ranks chunk by chunk: `receive(offset, chunk)` is
/// called on every rank but `root` with each received chunk (three tensors, `offset`
/// elements into the segment).
fn send_segment(
    collective: &mut dyn Collective,
    root: usize,
    len: i64,
    state: Option<&[Tensor; 3]>,
    device: Device,
    mut receive: impl FnMut(i64, &[Tensor; 3]) -> Result<(), WorkerError>,
) -> Result<(), WorkerError> {
    let scratch: [Tensor; 3] = match state {
        Some(_) => [Tensor::new(), Tensor::new(), Tensor::new()],
        None => std::array::from_fn(|_| Tensor::empty([len.min(CHUNK)], (Kind::Float, device))),
    };
    let mut offset = 0;
    while offset < len {
        let n = CHUNK.min(len - offset);
        let bufs: [Tensor; 3] = match state {
            Some(s) => std::array::from_fn(|i| s[i].narrow(0, offset, n)),
            None => std::array::from_fn(|i| scratch[i].narrow(0, 0, n)),
        };
        for b in &bufs {
            broadcast(collective, b, root)?;
        }
        if state.is_none() {
            receive(offset, &bufs)?;
        }
        offset += n;
    }
    Ok(())
}

/// How a hand-off ended for one rank.
pub enum HandOff {
    /// This rank stays and carries this state.
    Stayed(Handover),
    /// This rank leaves; its state went to a rank that stays.
    Left,
    /// Every rank leaves: nothing was handed over (checkpoint instead).
    NobodyStays,
}

/// The old group's half: called by every rank once the group agreed to stop for a new
/// generation; `absent[r]` says whether this rank knows that rank `r` will not be in it
/// (itself when released; any rank missing from the next assignment it received), and
/// a rank leaves when any rank says so. `partitions` are every rank's flat ranges,
/// clamped to the parameters.
pub fn hand_off(
    collective: &mut dyn Collective,
    absent: &[bool],
    opt: &AdamW,
    partitions: &[Range<i64>],
    progress: Progress,
    generation: u64,
) -> Result<HandOff, WorkerError> {
    let (rank, world) = (collective.rank(), collective.world_size());
    let device = opt.device();
    let votes: Vec<f32> = (0..world).map(|r| f32::from(u8::from(absent.get(r).copied().unwrap_or(false)))).collect();
    let votes_t = Tensor::from_slice(&votes).to_device(device);
    collective.all_reduce(&votes_t, ReduceOp::Sum).and_then(|w| w.wait()).map_err(comm)?;
    let votes = Vec::<f32>::try_from(votes_t.to_device(Device::Cpu)).map_err(WorkerError::Torch)?;
    let stayers: Vec<usize> = (0..world).filter(|&r| votes[r] < 0.5).collect();
    let leavers: Vec<usize> = (0..world).filter(|&r| votes[r] >= 0.5).collect();
    let leaving = leavers.contains(&rank);
    if stayers.is_empty() {
        return Ok(HandOff::NobodyStays);
    }
    let own_state = || opt.detached_state();
    let mut segments = Vec::new();
    if !leaving && !opt.is_empty() {
        segments.push(Segment { start: opt.start, state: own_state() });
    }
    for (i, &leaver) in leavers.iter().enumerate() {
        let range = partitions[leaver].clone();
        let len = range.end - range.start;
        if len == 0 {
            continue;
        }
        let keeper = stayers[i % stayers.len()];
        if rank == leaver {
            let state = own_state();
            send_segment(collective, leaver, len, Some(&state), device, |_, _| Ok(()))?;
        } else if rank == keeper {
            let kept: [Tensor; 3] = std::array::from_fn(|_| Tensor::empty([len], (Kind::Float, device)));
            send_segment(collective, leaver, len, None, device, |offset, chunk| {
                for (dst, src) in kept.iter().zip(chunk) {
                    tch::no_grad(|| dst.narrow(0, offset, src.size()[0]).copy_(src));
                }
                Ok(())
            })?;
            segments.push(Segment { start: range.start, state: kept });
        } else {
            send_segment(collective, leaver, len, None, device, |_, _| Ok(()))?;
        }
    }
    if leaving {
        return Ok(HandOff::Left);
    }
    segments.sort_by_key(|s| s.start);
    Ok(HandOff::Stayed(Handover { generation, progress, adam_step: opt.step, segments }))
}

/// Words of one rank's header: has-state flag, six u64 values (4 words each), segment count.
const HEADER: usize = 1 + 6 * 4 + 1;

/// A u64 as four 16-bit words, each exact in fp32 (what the collectives carry).
fn put_u64(out: &mut Vec<f32>, v: u64) {
    out.extend((0..4).map(|i| ((v >> (16 * i)) & 0xffff) as f32));
}

fn get_u64(words: &[f32]) -> u64 {
    (0..4).fold(0, |acc, i| acc | (words[i] as u64) << (16 * i))
}

/// Every rank's `record` (each exactly `len` words), gathered on every rank.
fn all_gather_words(
    collective: &mut dyn Collective,
    record: &[f32],
    len: usize,
    device: Device,
) -> Result<Vec<f32>, WorkerError> {
    let (rank, world) = (collective.rank(), collective.world_size());
    let mut all = vec![0f32; world * len];
    all[rank * len..(rank + 1) * len].copy_from_slice(record);
    let t = Tensor::from_slice(&all).to_device(device);
    let ranges: Vec<Range<usize>> = (0..world).map(|r| r * len..(r + 1) * len).collect();
    collective.all_gather(&t, &ranges).and_then(|w| w.wait()).map_err(comm)?;
    Vec::<f32>::try_from(t.to_device(Device::Cpu)).map_err(WorkerError::Torch)
}

/// What one rank said it holds.
#[derive(Debug, Clone, PartialEq)]
struct Holding {
    generation: u64,
    progress: (u64, u64, u64, u64),
    adam_step: u64,
    segments: usize,
}

/// The new group's half: called by every rank of a new group, each with whatever it
/// carried (`None` for a joiner). `partitions` are the new group's ranges (clamped to the
/// `numel` parameters); `newest_checkpoint` the newest published checkpoint's step as this
/// rank sees the run directory (rank 0's view decides). When the group can continue from
/// memory, loads this rank's new partition into `opt` and returns where training stood;
/// `Ok(None)` means "restore from the newest checkpoint" (decided alike on every rank).
pub fn adopt(
    collective: &mut dyn Collective,
    carried: Option<Handover>,
    opt: &mut AdamW,
    partitions: &[Range<i64>],
    numel: i64,
    newest_checkpoint: Option<u64>,
) -> Result<Option<Progress>, WorkerError> {
    let (rank, world) = (collective.rank(), collective.world_size());
    let device = opt.device();
    let mut header = Vec::with_capacity(HEADER);
    header.push(f32::from(u8::from(carried.is_some())));
    let c = carried.as_ref();
    put_u64(&mut header, c.map_or(0, |h| h.generation));
    put_u64(&mut header, c.map_or(0, |h| h.progress.step));
    put_u64(&mut header, c.map_or(0, |h| h.progress.cursor));
    put_u64(&mut header, c.map_or(0, |h| h.progress.tokens));
    put_u64(&mut header, c.map_or(0, |h| h.progress.elapsed_s.to_bits()));
    put_u64(&mut header, c.map_or(0, |h| h.adam_step));
    header.push(c.map_or(0, |h| h.segments.len()) as f32);
    // Rank 0's view of the run directory rides in a seventh value after the header.
    let mut record = header;
    put_u64(&mut record, newest_checkpoint.map_or(0, |s| s + 1));
    let width = HEADER + 4;
    let gathered = all_gather_words(collective, &record, width, device)?;
    let holdings: Vec<Option<Holding>> = (0..world)
        .map(|r| {
            let w = &gathered[r * width..(r + 1) * width];
            (w[0] > 0.5).then(|| Holding {
                generation: get_u64(&w[1..]),
                progress: (get_u64(&w[5..]), get_u64(&w[9..]), get_u64(&w[13..]), get_u64(&w[17..])),
                adam_step: get_u64(&w[21..]),
                segments: w[25] as usize,
            })
        })
        .collect();
    let newest_on_disk = get_u64(&gathered[HEADER..width]).checked_sub(1);
    let holders: Vec<usize> = (0..world).filter(|&r| holdings[r].is_some()).collect();
    let Some(&first) = holders.first() else { return Ok(None) };
    let reference = holdings[first].clone().expect("a holder");
    let refuse = |why: String| {
        tracing::warn!("the carried optimizer state is not usable ({why}); restoring from the newest checkpoint");
        Ok(None)
    };
    if let Some(r) = holders.iter().find(|&&r| {
        let h = holdings[r].as_ref().expect("a holder");
        // Wall time is each rank's own measure; the rest must match exactly.
        let agreed = |h: &Holding| (h.generation, h.progress.0, h.progress.1, h.progress.2, h.adam_step);
        agreed(h) != agreed(&reference)
    }) {
        return refuse(format!("ranks {first} and {r} carry state from different generations or steps"));
    }
    let step = reference.progress.0;
    if let Some(disk) = newest_on_disk.filter(|&d| d > step) {
        return refuse(format!("step {step} in memory, but a checkpoint of step {disk} exists"));
    }

    // Which segments everyone holds.
    let max_segments = holders.iter().map(|&r| holdings[r].as_ref().map_or(0, |h| h.segments)).max().unwrap_or(0);
    if max_segments == 0 {
        return refuse("no rank carries any of it".into());
    }
    let mut record = Vec::with_capacity(max_segments * 8);
    for s in carried.iter().flat_map(|h| &h.segments) {
        put_u64(&mut record, s.start as u64);
        put_u64(&mut record, s.len() as u64);
    }
    record.resize(max_segments * 8, 0.0);
    let gathered = all_gather_words(collective, &record, max_segments * 8, device)?;
    let mut held: Vec<(usize, Range<i64>)> = Vec::new();
    for &r in &holders {
        let count = holdings[r].as_ref().map_or(0, |h| h.segments);
        for i in 0..count {
            let w = &gathered[(r * max_segments + i) * 8..];
            let start = get_u64(w) as i64;
            held.push((r, start..start + get_u64(&w[4..]) as i64));
        }
    }
    held.sort_by_key(|(_, range)| range.start);
    let mut next = 0;
    for (_, range) in &held {
        if range.start != next {
            return refuse(format!("the carried state does not cover elements {next}..{} exactly", range.start));
        }
        next = range.end;
    }
    if next != numel {
        return refuse(format!("the carried state covers {next} of {numel} parameters"));
    }

    // Move it: each holder's segments, in the order above; nobody else needs a chunk that
    // only its holder's own new partition overlaps.
    let step_tensor = Tensor::from_slice(&[reference.adam_step as i64]);
    let mut restored = 0;
    let mine = carried.map(|h| h.segments).unwrap_or_default();
    let mut load = |opt: &mut AdamW, start: i64, chunk: &[Tensor; 3]| -> Result<(), WorkerError> {
        let n = chunk[0].size()[0];
        let tensors = [
            ("master".to_string(), chunk[0].shallow_clone()),
            ("exp_avg".to_string(), chunk[1].shallow_clone()),
            ("exp_avg_sq".to_string(), chunk[2].shallow_clone()),
            ("step".to_string(), step_tensor.shallow_clone()),
        ];
        restored += opt.load_overlap(start, start + n, &tensors).map_err(WorkerError::Spec)?;
        Ok(())
    };
    for (holder, range) in held {
        let others_need =
            (0..world).any(|r| r != holder && partitions[r].start < range.end && range.start < partitions[r].end);
        let own = (rank == holder).then(|| mine.iter().find(|s| s.start == range.start)).flatten();
        if rank == holder {
            let own = own.ok_or_else(|| WorkerError::Spec(format!("segment at {} went missing", range.start)))?;
            load(opt, range.start, &own.state)?;
            if others_need {
                send_segment(collective, holder, range.end - range.start, Some(&own.state), device, |_, _| Ok(()))?;
            }
        } else if others_need {
            send_segment(collective, holder, range.end - range.start, None, device, |offset, chunk| {
                load(opt, range.start + offset, chunk)
            })?;
        }
    }
    if restored != opt.len() {
        return Err(WorkerError::Spec(format!(
            "rank {rank}: the carried state filled {restored} of this partition's {} elements",
            opt.len()
        )));
    }
    let (step, cursor, tokens, elapsed) = reference.progress;
    tracing::info!(step, from_generation = reference.generation, "continuing from the group's state in memory");
    Ok(Some(Progress { step, cursor, tokens, elapsed_s: f64::from_bits(elapsed) }))
}
