//! The group plan: which contiguous range of the flat parameter buffer each rank's
//! optimizer owns (ZeRO-1, from [`moxin_layout`]) and which samples of every global batch
//! each rank trains on. [`assignment`] is the one place an [`Assignment`] is made, for a
//! cluster's generations and for single-process `train` alike.

use std::ops::Range;

use moxin_layout::ModelShape;
pub use moxin_layout::{zero1_partitions, PARTITION_ALIGN};
use moxin_proto::v1::{Assignment, CollectiveBackend, DataAssignment, JobSpec, PartitionRange};

/// The samples rank `rank` of `world` trains on within each global batch of `global_batch`
/// (which validation guarantees `world` divides): contiguous, equal slices in rank order.
pub fn rank_samples(global_batch: u32, world: u32, rank: u32) -> Range<u32> {
    let per_rank = global_batch / world.max(1);
    rank * per_rank..(rank + 1) * per_rank
}

/// Who the other ranks of a generation are and how to reach them.
#[derive(Debug, Clone)]
pub struct GroupPlan {
    /// Membership generation (0 for a single process).
    pub generation: u64,
    /// Collective address of every rank, in rank order (empty for a single process).
    pub peers: Vec<String>,
    /// Collective timeout.
    pub collective_timeout_ms: u32,
    /// Backend the group uses.
    pub backend: CollectiveBackend,
    /// The generation's secret (see `Assignment.group_key`); empty for a single process.
    pub group_key: Vec<u8>,
}

/// Rank `rank`'s assignment in a group of `world` for `spec` (a validated job) whose data
/// has `samples_per_epoch` samples.
pub fn assignment(spec: &JobSpec, samples_per_epoch: u64, group: &GroupPlan, world: u32, rank: u32) -> Assignment {
    let train = spec.train.unwrap_or_default();
    let shape = spec.model.as_ref().map(ModelShape::from);
    let numel = shape.map_or(0, |s| s.param_count());
    let samples = rank_samples(train.global_batch_size, world, rank);
    Assignment {
        generation: group.generation,
        rank,
        world_size: world,
        data: Some(DataAssignment {
            global_batch_size: train.global_batch_size,
            rank_first_sample: samples.start,
            rank_samples: samples.len() as u32,
            micro_batch_size: train.micro_batch_size,
            accumulation_steps: samples.len() as u32 / train.micro_batch_size.max(1),
            samples_per_epoch,
        }),
        partitions: zero1_partitions(numel, world)
            .into_iter()
            .map(|r| PartitionRange { start: r.start, end: r.end })
            .collect(),
        peers: group.peers.clone(),
        collective_timeout_ms: group.collective_timeout_ms,
        backend: group.backend as i32,
        group_key: group.group_key.clone(),
    }
}

/// The assignment of a single-process run (`moxin-train train`).
pub fn solo_assignment(spec: &JobSpec, samples_per_epoch: u64) -> Assignment {
    let group = GroupPlan {
        generation: 0,
        peers: Vec::new(),
        collective_timeout_ms: 60_000,
        backend: CollectiveBackend::Solo,
        group_key: Vec::new(),
    };
    assignment(spec, samples_per_epoch, &group, 1, 0)
}
