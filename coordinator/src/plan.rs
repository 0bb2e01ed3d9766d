//! ZeRO-1 partition plan: which contiguous range of the flat parameter buffer each rank's
//! optimizer owns.

use std::ops::Range;

use crate::presets::ModelShape;

/// Elements per partition are rounded up to this, so partitions start on 256-byte
/// boundaries (fp32) and every rank's range has the same length (as NCCL's
/// reduce-scatter requires).
pub const PARTITION_ALIGN: u64 = 64;

/// Parameters of a Mistral-style model of `shape` (the length of the flat buffer before
/// padding). Must equal the worker's `ModelConfig::param_count` (tested there).
pub fn flat_param_count(shape: &ModelShape) -> u64 {
    let (d, v, l) = (shape.dim as u64, shape.vocab_size as u64, shape.n_layers as u64);
    let hd = d / shape.n_heads as u64;
    let attn = d * hd * (2 * shape.n_heads as u64 + 2 * shape.n_kv_heads as u64);
    let mlp = 3 * d * shape.ffn_dim as u64;
    2 * v * d + l * (attn + mlp + 2 * d) + d
}

/// Equal, aligned, contiguous ranges tiling `0..padded` (padded >= `numel`), one per rank.
/// Ranks past the end of the real parameters own only padding.
pub fn zero1_partitions(numel: u64, world: u32) -> Vec<Range<u64>> {
    let world = world.max(1) as u64;
    let chunk = numel.div_ceil(world).div_ceil(PARTITION_ALIGN) * PARTITION_ALIGN;
    (0..world).map(|r| r * chunk..(r + 1) * chunk).collect()
}

/// The samples rank `rank` of `world` trains on within each global batch of `global_batch`
/// (which validation guarantees `world` divides): contiguous, equal slices in rank order.
pub fn rank_samples(global_batch: u32, world: u32, rank: u32) -> Range<u32> {
    let per_rank = global_batch / world.max(1);
    rank * per_rank..(rank + 1) * per_rank
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_tile_and_cover() {
        for (numel, world) in [(1u64, 1u32), (10, 3), (1000, 4), (8_114_180_096, 8), (5, 8)] {
            let p = zero1_partitions(numel, world);
            assert_eq!(p.len(), world as usize);
            assert_eq!(p[0].start, 0);
            assert!(p.windows(2).all(|w| w[0].end == w[1].start));
            assert!(p.last().unwrap().end >= numel);
            assert!(p.iter().all(|r| r.end - r.start == p[0].end - p[0].start && r.start % PARTITION_ALIGN == 0));
        }
        assert_eq!(flat_param_count(&crate::presets::load("moxin-7b").unwrap()), 8_114_180_096);
    }
}
