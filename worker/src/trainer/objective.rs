//! Objectives, and the fused LM head that evaluates them.
//!
//! Every objective moxin-train trains with is a function of each token's target
//! log-probability: next-token cross-entropy (pre-training, and SFT with a loss mask), and
//! the clipped policy-gradient losses of GRPO. So an [`Objective`] only says, for a chunk of
//! tokens, what their loss is and its derivative with respect to each target log-prob; the
//! head ([`head_forward_backward`]) does the rest for any objective: it projects a chunk of
//! hidden states to logits, takes the log-softmax, asks the objective, and turns the answer
//! into gradients for the hidden states and the head weight — chunk by chunk, so the fp32
//! logits of the whole batch (vocab × tokens × 4 bytes; 2 GB for 16k tokens of a 32k vocab)
//! never exist, and no graph is kept for them.

use std::ops::Range;

use tch::{Device, Kind, Tensor};

use super::batch::Batch;
use crate::cuda::kernels::Kernels;
use crate::WorkerError;

use moxin_layout::memory::HEAD_CHUNK_BYTES;

/// A training objective over target log-probabilities.
pub trait Objective {
    /// Name for logs.
    fn name(&self) -> &'static str;
    /// For the target log-probs `logp` `[n]` (fp32) of token rows `rows` of `batch`
    /// (flattened `[b·t]`), returns this chunk's contribution to the step's loss (a 0-d
    /// fp32 tensor) and `d loss / d logp` `[n]`.
    fn token_terms(&self, logp: &Tensor, batch: &Batch, rows: Range<i64>) -> (Tensor, Tensor);
    /// Called before each step with the number of loss tokens of the whole step (all
    /// ranks, all micro-batches), which a per-token mean divides by.
    fn normalise(&mut self, loss_tokens: f64);
    /// The factor the logits are multiplied by before the softmax (GRPO: 1 / the
    /// sampling temperature, so log-probs are those of the policy that sampled).
    fn logit_scale(&self) -> f64 {
        1.0
    }
    /// Policy statistics summed since the last call, `[tokens, clipped tokens, Σ KL]`,
    /// for objectives that have them (GRPO).
    fn take_policy_sums(&self) -> Option<[f64; 3]> {
        None
    }
}

/// Next-token cross-entropy, as a mean over the step's loss tokens on all ranks:
/// `loss = Σ w_t · (−log p_t) / N` (w = 1 without a mask, N = `loss_tokens`).
#[derive(Debug, Clone, Copy)]
pub struct CrossEntropy {
    /// 1 / (loss tokens of the whole step).
    pub scale: f64,
}

impl CrossEntropy {
    /// Mean over `loss_tokens` tokens.
    pub fn mean_over(loss_tokens: f64) -> Self {
        CrossEntropy { scale: 1.0 / loss_tokens.max(1.0) }
    }
}

impl Objective for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }

    fn normalise(&mut self, loss_tokens: f64) {
        *self = CrossEntropy::mean_over(loss_tokens);
    }

    fn token_terms(&self, logp: &Tensor, batch: &Batch, rows: Range<i64>) -> (Tensor, Tensor) {
        match &batch.weights {
            None => ((logp.sum(logp.kind()) * -self.scale), logp.full_like(-self.scale)),
            Some(w) => {
                let w = w.reshape([-1]).narrow(0, rows.start, rows.end - rows.start).to_kind(logp.kind());
                ((logp * &w).sum(logp.kind()) * -self.scale, w * -self.scale)
            }
        }
    }
}

/// What the head returns for a micro-batch.
pub struct HeadOutput {
    /// The micro-batch's loss contribution (0-d fp32, on the device).
    pub loss: Tensor,
    /// Gradient of the loss with respect to the head's input `[b, t, dim]`.
    pub d_hidden: Tensor,
}

/// Rows per chunk for a vocabulary of `vocab` with logits of `element_bytes` each (fp32
/// through ATen, bf16 with the fused kernels): one chunk of logits is `HEAD_CHUNK_BYTES`.
fn chunk_rows(vocab: i64, element_bytes: i64) -> i64 {
    (HEAD_CHUNK_BYTES as i64 / element_bytes / vocab.max(1)).max(1)
}

/// The precision of the softmax: fp32, or fp64 for an fp64 model (tests).
fn softmax_kind(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// Target log-probs of one chunk: `(fp32 logits, their logsumexp [n, 1], logp of targets [n])`.
fn chunk_log_probs(h: &Tensor, weight: &Tensor, targets: &Tensor) -> (Tensor, Tensor, Tensor) {
    let logits = crate::model::linear(h, weight).to_kind(softmax_kind(h.kind()));
    let lse = logits.logsumexp([-1], true);
    let logp = logits.gather(1, &targets.unsqueeze(1), false).squeeze_dim(1) - lse.squeeze_dim(1);
    (logits, lse, logp)
}

/// The LM head and `objective` on `hidden` `[b, t, dim]` (a tensor without graph) with head
/// weight `weight` `[vocab, dim]`: returns the loss and `d loss / d hidden`, and hands
/// `d loss / d weight` chunk by chunk to `add_weight_grad(a, b)` as products `a · b`
/// (`[vocab, rows] · [rows, dim]`) to add to the weight's gradient. With `kernels` (bf16 on
/// CUDA) the softmax and its gradient run as two fused passes over the bf16 logits instead
/// of materialising them in fp32.
pub fn head_forward_backward(
    hidden: &Tensor,
    weight: &Tensor,
    batch: &Batch,
    objective: &dyn Objective,
    add_weight_grad: &mut dyn FnMut(&Tensor, &Tensor) -> Result<(), WorkerError>,
    kernels: Option<&Kernels>,
) -> Result<HeadOutput, WorkerError> {
    let kernels = kernels.filter(|_| hidden.kind() == Kind::BFloat16 && hidden.device() != Device::Cpu);
    tch::no_grad(|| {
        let (b, t, d) = (hidden.size()[0], hidden.size()[1], hidden.size()[2]);
        let n = b * t;
        let h_all = hidden.reshape([n, d]);
        let targets = batch.targets.reshape([-1]);
        let weight = weight.detach();
        let d_hidden = Tensor::empty([n, d], (hidden.kind(), hidden.device()));
        let mut loss = Tensor::zeros([], (softmax_kind(hidden.kind()), hidden.device()));
        let step = chunk_rows(weight.size()[0], if kernels.is_some() { 2 } else { 4 });
        let weight_t =
            (weight.device() == Device::Cpu && weight.kind() == Kind::Float).then(|| weight.tr().contiguous());
        let mut start = 0;
        while start < n {
            let rows = step.min(n - start);
            let h = h_all.narrow(0, start, rows);
            let tgt = targets.narrow(0, start, rows);
            let g = if let Some(k) = kernels {
                let logits = crate::cuda::gemm::mm(&h, &weight.tr());
                let (lse, logp) = k.ce_row_stats(&logits, &tgt)?;
                let (chunk_loss, d_logp) = objective.token_terms(&logp, batch, start..start + rows);
                loss += chunk_loss;
                k.ce_grad(&logits, &tgt, &lse, &(-d_logp).to_kind(Kind::Float).contiguous())?;
                logits
            } else {
                let (mut logits, lse, logp) = chunk_log_probs(&h, &weight, &tgt);
                let (chunk_loss, d_logp) = objective.token_terms(&logp, batch, start..start + rows);
                loss += chunk_loss;
                // d loss / d logits = d_logp · (onehot − softmax), built in the logits' memory.
                let _ = logits.g_sub_(&lse).exp_();
                let minus_one = Tensor::full([rows, 1], -1.0, (logits.kind(), logits.device()));
                let _ = logits.scatter_add_(1, &tgt.unsqueeze(1), &minus_one);
                let _ = logits.g_mul_(&(-d_logp).unsqueeze(1));
                logits.to_kind(h.kind())
            };
            if let Some(weight_t) = &weight_t {
                // d_hidden = g · W as oneDNN's linear with Wᵀ (see `model::linear`).
                d_hidden.narrow(0, start, rows).copy_(&crate::model::linear(&g, weight_t));
            } else {
                crate::cuda::gemm::mm_into(&d_hidden.narrow(0, start, rows), &g, &weight);
            }
            add_weight_grad(&g.tr(), &h)?;
            start += rows;
        }
        Ok(HeadOutput { loss, d_hidden: d_hidden.view([b, t, d]) })
    })
}

/// Log-probabilities `[n]` (fp32) of `targets` `[n]` under the head `weight` applied to
/// `hidden` `[n, dim]`, in chunks (never the whole `[n, vocab]` at once), without gradients.
pub fn target_log_probs(hidden: &Tensor, weight: &Tensor, targets: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let n = hidden.size()[0];
        let step = chunk_rows(weight.size()[0], 4);
        let mut parts = Vec::new();
        let mut start = 0;
        while start < n {
            let rows = step.min(n - start);
            let (_, _, logp) = chunk_log_probs(&hidden.narrow(0, start, rows), weight, &targets.narrow(0, start, rows));
            parts.push(logp.to_kind(Kind::Float));
            start += rows;
        }
        Tensor::cat(&parts, 0)
    })
}

/// The loss of `objective` on `batch` given final hidden states, without gradients (eval).
pub fn head_loss(hidden: &Tensor, weight: &Tensor, batch: &Batch, objective: &dyn Objective) -> Tensor {
    tch::no_grad(|| {
        let (b, t, d) = (hidden.size()[0], hidden.size()[1], hidden.size()[2]);
        let n = b * t;
        let h_all = hidden.reshape([n, d]);
        let targets = batch.targets.reshape([-1]);
        let mut loss = Tensor::zeros([], (softmax_kind(hidden.kind()), hidden.device()));
        let step = chunk_rows(weight.size()[0], 4);
        let mut start = 0;
        while start < n {
            let rows = step.min(n - start);
            let (_, _, logp) = chunk_log_probs(&h_all.narrow(0, start, rows), weight, &targets.narrow(0, start, rows));
            loss += objective.token_terms(&logp, batch, start..start + rows).0;
            start += rows;
        }
        loss
    })
}
