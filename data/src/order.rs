use crate::rng::mix64;

/// The seeded order in which samples are served: epoch `e` visits every sample of
/// `0..num_samples` exactly once, in a pseudo-random permutation keyed by `(seed, e)`.
///
/// The permutation is a Feistel network over the smallest even power of two covering
/// `num_samples`, with cycle-walking to stay inside the domain. It is computed per index
/// in O(1) memory, so a position in the order (the *cursor*: samples consumed since the
/// start of training) is random-access. That is what lets any rank compute its own slice of
/// any global step, and lets a resumed run continue from a cursor with no replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleOrder {
    num_samples: u64,
    seed: u64,
    half_bits: u32,
}

const ROUNDS: u64 = 6;

impl SampleOrder {
    /// The order over `num_samples` samples (must be > 0) for `seed`.
    pub fn new(num_samples: u64, seed: u64) -> Self {
        assert!(num_samples > 0, "SampleOrder over zero samples");
        let bits = (64 - (num_samples - 1).leading_zeros()).max(2);
        let half_bits = bits.div_ceil(2);
        SampleOrder { num_samples, seed, half_bits }
    }

    /// Samples in one epoch.
    pub fn num_samples(&self) -> u64 {
        self.num_samples
    }

    /// The sample index served at `cursor` (0-based count of samples consumed so far).
    pub fn sample_at(&self, cursor: u64) -> u64 {
        let epoch = cursor / self.num_samples;
        let position = cursor % self.num_samples;
        self.permute(epoch, position)
    }

    /// The epoch that `cursor` falls in.
    pub fn epoch_of(&self, cursor: u64) -> u64 {
        cursor / self.num_samples
    }

    fn permute(&self, epoch: u64, position: u64) -> u64 {
        let key = mix64(self.seed ^ mix64(epoch.wrapping_add(0x5851_F42D_4C95_7F2D)));
        let mut x = position;
        // Cycle-walking: the domain is < 4x num_samples, so this loops ~2 times on average.
        loop {
            x = self.feistel(key, x);
            if x < self.num_samples {
                return x;
            }
        }
    }

    fn feistel(&self, key: u64, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut left, mut right) = (x >> self.half_bits, x & mask);
        for round in 0..ROUNDS {
            let f = mix64(key ^ mix64(right ^ (round << 56))) & mask;
            (left, right) = (right, left ^ f);
        }
        (left << self.half_bits) | right
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_epoch_is_a_permutation() {
        for n in [1u64, 2, 3, 7, 64, 1000, 4097] {
            let order = SampleOrder::new(n, 42);
            for epoch in 0..3 {
                let mut seen = vec![false; n as usize];
                for i in 0..n {
                    let s = order.sample_at(epoch * n + i);
                    assert!(s < n);
                    assert!(!seen[s as usize], "sample {s} twice in epoch {epoch} (n={n})");
                    seen[s as usize] = true;
                }
            }
        }
    }

    #[test]
    fn seeded_and_epochs_differ() {
        let a = SampleOrder::new(1000, 1);
        let b = SampleOrder::new(1000, 2);
        let first: Vec<u64> = (0..20).map(|i| a.sample_at(i)).collect();
        assert_eq!(first, (0..20).map(|i| a.sample_at(i)).collect::<Vec<_>>());
        assert_ne!(first, (0..20).map(|i| b.sample_at(i)).collect::<Vec<_>>());
        assert_ne!(first, (1000..1020).map(|i| a.sample_at(i)).collect::<Vec<_>>());
        assert_ne!(first, (0..20).collect::<Vec<_>>());
    }
}
