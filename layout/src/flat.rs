//! Where every parameter sits in the one flat buffer, and how ZeRO-1 splits that buffer.
//!
//! Order: weight-decayed groups (matrices) first, then the others (norm gains), each in
//! declaration order. So the decayed region is one prefix `0..decay_numel`, a ZeRO-1 rank
//! updates one contiguous slice, and a group's members are back to back (one leaf).

use std::ops::Range;

use crate::params::{ParamDecl, ParamGroup};
use crate::shape::ModelShape;

/// Elements per ZeRO-1 partition are rounded up to this, so partitions start on 256-byte
/// boundaries (fp32) and every rank's range has the same length (as NCCL's reduce-scatter
/// and all-gather require).
pub const PARTITION_ALIGN: u64 = 64;

/// An autograd leaf: one parameter group's contiguous slice of the flat buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct LeafSlot {
    /// Group name (`model.layers.3.self_attn.qkv`, or the single member's name).
    pub name: String,
    /// First flat element.
    pub offset: i64,
    /// Elements.
    pub numel: i64,
    /// Shape of the leaf tensor.
    pub shape: Vec<i64>,
    /// Its members: indices into [`FlatLayout::params`].
    pub members: Range<usize>,
    /// The decoder block it belongs to (`None` for embedding, final norm and LM head).
    pub layer: Option<u32>,
}

/// One named parameter (a Hugging Face tensor) and where it lives.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSlot {
    /// Declaration.
    pub decl: ParamDecl,
    /// First flat element.
    pub offset: i64,
    /// Index of its leaf in [`FlatLayout::leaves`].
    pub leaf: usize,
    /// First row of the parameter within its (row-fused) leaf.
    pub row: i64,
}

/// The flat layout of a model's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct FlatLayout {
    /// Leaves in declaration order.
    pub leaves: Vec<LeafSlot>,
    /// Parameters in declaration order.
    pub params: Vec<ParamSlot>,
    /// `0..decay_numel` is weight-decayed.
    pub decay_numel: i64,
    /// Elements of all parameters.
    pub numel: i64,
}

impl FlatLayout {
    /// The layout of `shape`'s parameters.
    pub fn of(shape: &ModelShape) -> Self {
        Self::new(shape.param_groups())
    }

    /// Lays out `groups`: decayed groups first, then the others, each in declaration order.
    pub fn new(groups: Vec<ParamGroup>) -> Self {
        let numel: i64 = groups.iter().map(ParamGroup::numel).sum();
        let decay_numel: i64 = groups.iter().filter(|g| g.decays()).map(ParamGroup::numel).sum();
        let (mut next_decay, mut next_plain) = (0i64, decay_numel);
        let mut leaves = Vec::with_capacity(groups.len());
        let mut params = Vec::new();
        for group in groups {
            let slot = if group.decays() { &mut next_decay } else { &mut next_plain };
            let offset = *slot;
            *slot += group.numel();
            let shape = group.leaf_shape();
            let layer = layer_of(&group.name);
            let first = params.len();
            let (mut row, mut member_offset) = (0i64, offset);
            for decl in group.members {
                let n = decl.numel();
                let rows = decl.shape[0];
                params.push(ParamSlot { decl, offset: member_offset, leaf: leaves.len(), row });
                row += rows;
                member_offset += n;
            }
            leaves.push(LeafSlot {
                name: group.name,
                offset,
                numel: member_offset - offset,
                shape,
                members: first..params.len(),
                layer,
            });
        }
        FlatLayout { leaves, params, decay_numel, numel }
    }

    /// The leaf named `name`.
    pub fn leaf(&self, name: &str) -> Option<&LeafSlot> {
        self.leaves.iter().find(|l| l.name == name)
    }

    /// The parameter named `name`.
    pub fn param(&self, name: &str) -> Option<&ParamSlot> {
        self.params.iter().find(|p| p.decl.name == name)
    }

    /// The flat ranges covered by `leaves` (indices), merged where adjacent, in order.
    pub fn ranges_of(&self, leaves: impl IntoIterator<Item = usize>) -> Vec<Range<i64>> {
        let mut ranges: Vec<Range<i64>> =
            leaves.into_iter().map(|i| self.leaves[i].offset..self.leaves[i].offset + self.leaves[i].numel).collect();
        ranges.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<i64>> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match merged.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => merged.push(r),
            }
        }
        merged
    }
}

/// `model.layers.<i>.…` → `Some(i)`.
fn layer_of(name: &str) -> Option<u32> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

/// Equal, aligned, contiguous ranges tiling `0..padded` (`padded >= numel`), one per rank.
/// Ranks past the end of the real parameters own only padding.
pub fn zero1_partitions(numel: u64, world: u32) -> Vec<Range<u64>> {
    let chunk = zero1_partition_len(numel, world);
    (0..world.max(1) as u64).map(|r| r * chunk..(r + 1) * chunk).collect()
}

/// The length of every rank's range in [`zero1_partitions`] (without listing them).
pub fn zero1_partition_len(numel: u64, world: u32) -> u64 {
    numel.div_ceil(world.max(1) as u64).div_ceil(PARTITION_ALIGN) * PARTITION_ALIGN
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::tests::moxin_7b;

    #[test]
    fn layout_tiles_the_buffer_decayed_first() {
        let shape =
            ModelShape { n_layers: 2, vocab_size: 50, dim: 16, n_heads: 4, n_kv_heads: 2, ffn_dim: 24, ..moxin_7b() };
        let l = FlatLayout::of(&shape);
        assert_eq!(l.numel as u64, shape.param_count());
        let mut covered: Vec<Range<i64>> = l.leaves.iter().map(|x| x.offset..x.offset + x.numel).collect();
        covered.sort_by_key(|r| r.start);
        assert_eq!(covered[0].start, 0);
        assert!(covered.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!(covered.last().unwrap().end, l.numel);
        for leaf in &l.leaves {
            assert_eq!(leaf.shape.len() >= 2, leaf.offset < l.decay_numel, "{}", leaf.name);
            let members = &l.params[leaf.members.clone()];
            assert_eq!(members[0].offset, leaf.offset);
            assert_eq!(members.iter().map(|p| p.decl.numel()).sum::<i64>(), leaf.numel);
        }
        let qkv = l.leaf("model.layers.1.self_attn.qkv").unwrap();
        assert_eq!((qkv.shape.clone(), qkv.layer), (vec![16 + 8 + 8, 16], Some(1)));
        let k = l.param("model.layers.1.self_attn.k_proj.weight").unwrap();
        assert_eq!((k.row, k.offset), (16, qkv.offset + 16 * 16));
        assert_eq!(l.leaf("lm_head.weight").unwrap().layer, None);
        // Norms sit after every matrix.
        assert!(l.leaf("model.norm.weight").unwrap().offset >= l.decay_numel);
        let all = l.ranges_of(0..l.leaves.len());
        assert_eq!(all, vec![0..l.numel]);
    }

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
    }
}
