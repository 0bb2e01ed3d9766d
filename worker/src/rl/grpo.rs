//! GRPO's arithmetic (DeepSeekMath eq. 3–4 with the variants in
//! ../shared/reference/grpo.md): group-normalised advantages, per-token loss weights for
//! each aggregation, and the clipped surrogate with the k3 KL penalty as an [`Objective`]
//! over the target log-probs the chunked head computes.
//!
//! Per token `t` of completion `i`: `ρ = exp(ℓθ − ℓold)`,
//! `ℓ_it = −min(ρ·Â_i, clip(ρ, 1−ε, 1+ε_high)·Â_i) + β·(exp(ℓref − ℓθ) − (ℓref − ℓθ) − 1)`,
//! and the step's loss is `Σ w_it ℓ_it` with `w` from the aggregation. Prompt tokens and
//! padding have weight 0. With one policy update per rollout batch the old policy is the
//! current one, so `ℓold` is `ℓθ` itself (detached) and `ρ = 1` exactly.

use std::cell::Cell;
use std::ops::Range;

use tch::{Kind, Tensor};

use crate::trainer::objective::Objective;
use crate::trainer::Batch;

/// How token losses combine into the step's loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregation {
    /// `(1/G) Σ_i (1/|o_i|) Σ_t ℓ_it` over all completions (GRPO; TRL `grpo`).
    SeqMeanTokenMean,
    /// `(1/Σ_i |o_i|) Σ_i Σ_t ℓ_it` (DAPO; verl's default).
    TokenMean,
    /// `(1/(G·L)) Σ_i Σ_t ℓ_it` with `L` the maximum completion length (Dr. GRPO).
    DrGrpo,
}

/// The loss weight of each token of completion `i` of length `len`, in a step of
/// `completions` completions holding `total_tokens` tokens together, at most `max_len`
/// each.
pub fn token_weight(agg: Aggregation, len: usize, completions: usize, total_tokens: usize, max_len: usize) -> f64 {
    let per = |n: usize| 1.0 / n.max(1) as f64;
    match agg {
        Aggregation::SeqMeanTokenMean => per(completions) * per(len),
        Aggregation::TokenMean => per(total_tokens),
        Aggregation::DrGrpo => per(completions) * per(max_len),
    }
}

/// Group-relative advantages of `rewards` (consecutive groups of `group` completions of one
/// prompt): `r − mean(group)`, divided by the group's standard deviation (unbiased, + 1e-4
/// as TRL does) when `std_normalization`. A group whose rewards are all equal gets 0.
pub fn advantages(rewards: &[f64], group: usize, std_normalization: bool) -> Vec<f64> {
    rewards
        .chunks(group.max(1))
        .flat_map(|g| {
            let n = g.len() as f64;
            let mean = g.iter().sum::<f64>() / n;
            let var = if g.len() > 1 { g.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
            let scale = if std_normalization { 1.0 / (var.sqrt() + 1e-4) } else { 1.0 };
            g.iter().map(move |r| (r - mean) * scale)
        })
        .collect()
}

/// GRPO's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoConfig {
    /// Lower clip range ε (ratios below 1 − ε are clipped).
    pub epsilon: f64,
    /// Upper clip range (DAPO's clip-higher; = ε for plain GRPO).
    pub epsilon_high: f64,
    /// KL coefficient β (0: no reference model).
    pub beta: f64,
    /// The rollouts' sampling temperature: log-probs are taken of logits / temperature, the
    /// distribution the completions were drawn from (as TRL does).
    pub temperature: f64,
}

/// What a rollout batch adds to a [`Batch`]: per token `[b, t]`, the advantage of its
/// completion, and the log-probs of its target under the old policy (`None`: the current
/// one, i.e. the first update on these rollouts) and the reference model (`None` when β = 0).
#[derive(Debug)]
pub struct RlTerms {
    /// Â of each token's completion (0 on prompt and padding tokens).
    pub advantages: Tensor,
    /// ℓold, when the policy has moved since the rollouts were generated.
    pub old_logp: Option<Tensor>,
    /// ℓref.
    pub ref_logp: Option<Tensor>,
}

/// The GRPO objective; the batch's `weights` carry the aggregation's token weights.
#[derive(Debug)]
pub struct GrpoObjective {
    /// Hyper-parameters.
    pub config: GrpoConfig,
    /// Statistics of the tokens seen since the last [`Objective::take_policy_sums`]:
    /// (tokens with weight, tokens clipped, Σ KL).
    stats: Cell<(f64, f64, f64)>,
}

impl GrpoObjective {
    /// The objective with `config`.
    pub fn new(config: GrpoConfig) -> Self {
        GrpoObjective { config, stats: Cell::new((0.0, 0.0, 0.0)) }
    }
}

impl Objective for GrpoObjective {
    fn name(&self) -> &'static str {
        "grpo"
    }

    fn logit_scale(&self) -> f64 {
        if self.config.temperature > 0.0 {
            1.0 / self.config.temperature
        } else {
            1.0
        }
    }

    fn take_policy_sums(&self) -> Option<[f64; 3]> {
        let (tokens, clipped, kl) = self.stats.replace((0.0, 0.0, 0.0));
        Some([tokens, clipped, kl])
    }

    fn token_terms(&self, logp: &Tensor, batch: &Batch, rows: Range<i64>) -> (Tensor, Tensor) {
        let kind = logp.kind();
        let take = |t: &Tensor| t.reshape([-1]).narrow(0, rows.start, rows.end - rows.start).to_kind(kind);
        let rl = batch.rl.as_ref().expect("GRPO batches carry rollout terms");
        let w = batch.weights.as_ref().map_or_else(|| logp.ones_like(), take);
        let adv = take(&rl.advantages);
        let old = rl.old_logp.as_ref().map_or_else(|| logp.detach(), take);
        let c = self.config;
        let ratio = (logp - old).exp();
        let unclipped = &ratio * &adv;
        let clipped = ratio.clamp(1.0 - c.epsilon, 1.0 + c.epsilon_high) * &adv;
        // min(ρÂ, clip(ρ)Â): the gradient flows only where the unclipped term is the min.
        let use_unclipped = unclipped.le_tensor(&clipped);
        let surrogate = unclipped.minimum(&clipped);
        let d_surrogate = unclipped.where_self(&use_unclipped, &unclipped.zeros_like());
        let (mut loss_terms, mut d_terms) = (-surrogate, -d_surrogate);
        let active = w.gt(0.0);
        let mut kl_sum = 0.0;
        if let (Some(reference), true) = (&rl.ref_logp, c.beta > 0.0) {
            let d = take(reference) - logp;
            let e = d.exp();
            let kl = &e - &d - 1.0;
            kl_sum = (&kl * active.to_kind(kind)).sum(Kind::Double).double_value(&[]);
            loss_terms += &kl * c.beta;
            d_terms += (-e + 1.0) * c.beta;
        }
        let tokens = active.sum(Kind::Double).double_value(&[]);
        let clipped_count = use_unclipped.logical_not().logical_and(&active).sum(Kind::Double).double_value(&[]);
        let (t0, c0, k0) = self.stats.get();
        self.stats.set((t0 + tokens, c0 + clipped_count, k0 + kl_sum));
        ((&loss_terms * &w).sum(kind), d_terms * w)
    }

    fn normalise(&mut self, _loss_tokens: f64) {
        // The token weights in the batch already carry the aggregation's normalisation.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn t(v: &[f64]) -> Tensor {
        Tensor::from_slice(v).view([1, v.len() as i64])
    }

    fn batch(adv: &[f64], w: &[f64], old: Option<&[f64]>, reference: Option<&[f64]>) -> Batch {
        let n = adv.len() as i64;
        let zeros = Tensor::zeros([1, n], (Kind::Int64, Device::Cpu));
        Batch {
            inputs: zeros.shallow_clone(),
            targets: zeros,
            weights: Some(t(w)),
            packing: None,
            rl: Some(RlTerms { advantages: t(adv), old_logp: old.map(t), ref_logp: reference.map(t) }),
        }
    }

    #[test]
    fn advantages_are_group_relative() {
        let a = advantages(&[1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5], 4, true);
        let s = (1.0f64 / 3.0).sqrt() + 1e-4;
        for (got, want) in a.iter().zip([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0.0, 0.0, 0.0, 0.0]) {
            assert!((got - want).abs() < 1e-12, "{a:?}");
        }
        assert_eq!(advantages(&[1.0, 0.0], 2, false), vec![0.5, -0.5]);
    }

    #[test]
    fn aggregations_weight_tokens_as_defined() {
        // Two completions of 2 and 4 tokens; max length 8.
        assert_eq!(token_weight(Aggregation::SeqMeanTokenMean, 2, 2, 6, 8), 0.25);
        assert_eq!(token_weight(Aggregation::SeqMeanTokenMean, 4, 2, 6, 8), 0.125);
        assert_eq!(token_weight(Aggregation::TokenMean, 4, 2, 6, 8), 1.0 / 6.0);
        assert_eq!(token_weight(Aggregation::DrGrpo, 2, 2, 6, 8), 1.0 / 16.0);
    }

    /// At the first update on fresh rollouts ρ = 1 exactly: nothing is clipped and the
    /// gradient is −Â·w.
    #[test]
    fn the_ratio_is_one_at_the_first_update() {
        let obj = GrpoObjective::new(GrpoConfig { epsilon: 0.2, epsilon_high: 0.28, beta: 0.0, temperature: 1.0 });
        let logp = t(&[-1.3, -0.2, -2.0]).view([-1]);
        let b = batch(&[1.5, -0.5, 2.0], &[0.5, 0.5, 0.0], None, None);
        let (loss, grad) = obj.token_terms(&logp, &b, 0..3);
        assert!((loss.double_value(&[]) - -(1.5 * 0.5 - 0.5 * 0.5)).abs() < 1e-12);
        let g = Vec::<f64>::try_from(grad).unwrap();
        assert_eq!(g, vec![-0.75, 0.25, 0.0]);
        assert_eq!(obj.take_policy_sums(), Some([2.0, 0.0, 0.0]), "two weighted tokens, none clipped, no KL");
    }

    /// Hand-computed values of a moved policy with a reference model, and the analytic
    /// gradient equal to autograd's.
    #[test]
    fn clipped_objective_and_k3_kl_by_hand() {
        let c = GrpoConfig { epsilon: 0.2, epsilon_high: 0.28, beta: 0.1, temperature: 1.0 };
        let obj = GrpoObjective::new(c);
        // Token 0: ρ = e^0.5 = 1.6487 > 1.28, Â = +1 → clipped (surrogate 1.28, no gradient).
        // Token 1: ρ = e^0.5, Â = −1 → min(−1.6487, −1.28) = −1.6487, unclipped.
        // Token 2: ρ = e^−0.5 = 0.6065 < 0.8, Â = +2 → min(1.2131, 1.6) = 1.2131, unclipped.
        let lp = [-1.0, -1.0, -1.0];
        let old = [-1.5, -1.5, -0.5];
        let reference = [-1.2, -0.8, -1.0];
        let adv = [1.0, -1.0, 2.0];
        let w = [0.25, 0.25, 0.5];
        let logp = t(&lp).view([-1]).set_requires_grad(true);
        let b = batch(&adv, &w, Some(&old), Some(&reference));
        let (loss, grad) = obj.token_terms(&logp.detach(), &b, 0..3);
        let e = 0.5f64.exp();
        let kl = |r: f64, l: f64| (r - l).exp() - (r - l) - 1.0;
        let terms =
            [-1.28 + 0.1 * kl(-1.2, -1.0), e + 0.1 * kl(-0.8, -1.0), -2.0 * (-0.5f64).exp() + 0.1 * kl(-1.0, -1.0)];
        let want: f64 = terms.iter().zip(w).map(|(t, w)| t * w).sum();
        assert!((loss.double_value(&[]) - want).abs() < 1e-12, "{} vs {want}", loss.double_value(&[]));
        // Autograd of the same formula.
        let ratio = (&logp - t(&old).view([-1])).exp();
        let a = t(&adv).view([-1]);
        let surrogate = (&ratio * &a).minimum(&(ratio.clamp(0.8, 1.28) * &a));
        let d = t(&reference).view([-1]) - &logp;
        let l = ((-surrogate + (d.exp() - &d - 1.0) * 0.1) * t(&w).view([-1])).sum(Kind::Double);
        let auto = Tensor::run_backward(&[&l], &[&logp], false, false).pop().unwrap();
        let (g, a) = (Vec::<f64>::try_from(grad).unwrap(), Vec::<f64>::try_from(auto).unwrap());
        for (x, y) in g.iter().zip(&a) {
            assert!((x - y).abs() < 1e-12, "analytic {g:?} vs autograd {a:?}");
        }
        let [tokens, clipped, kl_sum] = obj.take_policy_sums().unwrap();
        assert_eq!((tokens, clipped), (3.0, 1.0));
        assert!((kl_sum - (kl(-1.2, -1.0) + kl(-0.8, -1.0))).abs() < 1e-12, "{kl_sum}");
    }
}
