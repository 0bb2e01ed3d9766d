//! One micro-batch's forward and backward pass, block by block.
//!
//! libtorch offers no backward hooks to tch, so instead of one backward over the whole
//! graph the step differentiates one stage at a time: each decoder block's input is a leaf
//! cut from the previous block's output, and backward runs stage by stage from the head to
//! the embedding, handing each block's parameter gradients to a [`GradSink`] the moment
//! they exist. That is what lets gradient buckets reduce while earlier blocks are still in
//! backward, lets a block be recomputed instead of stored (`recompute`), and lets the head
//! and the embedding use hand-written gradients (the chunked head in
//! [`super::objective`], an `index_add` for the embedding) instead of materialising logits
//! or a dense embedding gradient. Gradients equal whole-graph autograd's (tested). With
//! `explicit_blocks` the blocks run their hand-written forward and backward
//! ([`super::block`]) instead of autograd's.

use moxin_layout::FlatLayout;
use tch::Tensor;

use super::batch::Batch;
use super::block::{self, Pieces, BLOCK_PARAMS};
use super::objective::{head_forward_backward, Objective};
use super::profile::PhaseClock;
use crate::model::Transformer;
use crate::WorkerError;

/// Receives gradients as backward produces them, in the flat layout's leaf indices, and
/// says when the parameters a forward stage needs are in place (they may still be arriving
/// from the previous step's all-gather).
pub trait GradSink {
    /// Blocks until the parameters of forward stage `stage` are current: stage 0 is the
    /// embedding (and every norm gain), `1 + i` block `i`, `layers + 1` the head.
    fn params_ready(&mut self, _stage: usize) -> Result<(), WorkerError> {
        Ok(())
    }
    /// Adds `grad` (shaped like the leaf, any float dtype) to leaf `leaf`'s gradient.
    fn add(&mut self, leaf: usize, grad: &Tensor) -> Result<(), WorkerError>;
    /// Adds the product `a · b` (the leaf's 2-D shape) to leaf `leaf`'s gradient; a sink
    /// that owns the storage lets the GEMM write it there (see [`super::grads`]).
    fn add_product(&mut self, leaf: usize, a: &Tensor, b: &Tensor) -> Result<(), WorkerError> {
        self.add(leaf, &a.mm(b))
    }
    /// Adds the products `aᵢ · b`, stacked by rows, to leaf `leaf`'s gradient: a fused
    /// projection's weight gradient one part at a time (`runtime.split_projections`).
    fn add_product_rows(&mut self, leaf: usize, parts: &[Tensor], b: &Tensor) -> Result<(), WorkerError> {
        self.add(leaf, &Tensor::cat(&parts.iter().map(|a| a.mm(b)).collect::<Vec<_>>(), 0))
    }
    /// Leaf `leaf`'s gradient storage, shaped like the leaf, for code that accumulates into
    /// it in place.
    fn region(&mut self, leaf: usize) -> Tensor;
    /// Leaf `leaf`'s gradient for this micro-batch is complete.
    fn done(&mut self, leaf: usize) -> Result<(), WorkerError>;
}

/// Which leaves belong to which stage.
#[derive(Debug, Clone)]
pub struct Stages {
    embed: usize,
    /// Each block's leaves, in [`BLOCK_PARAMS`]' order.
    blocks: Vec<[usize; 6]>,
    final_norm: usize,
    head: usize,
}

impl Stages {
    /// Block `i`'s leaves in [`BLOCK_PARAMS`]' order: input norm, qkv, o, post norm,
    /// gate/up, down.
    pub fn block_leaves(&self, i: usize) -> [usize; 6] {
        self.blocks[i]
    }

    /// The stages of `layout` (a Mistral-style model's).
    pub fn of(layout: &FlatLayout) -> Self {
        let index = |name: &str| layout.leaves.iter().position(|l| l.name == name).expect("model leaf");
        let layers = layout.leaves.iter().filter_map(|l| l.layer).max().map_or(0, |m| m as usize + 1);
        let blocks = (0..layers).map(|i| BLOCK_PARAMS.map(|leaf| index(&format!("model.layers.{i}.{leaf}")))).collect();
        Stages {
            embed: index("model.embed_tokens.weight"),
            blocks,
            final_norm: index("model.norm.weight"),
            head: index("lm_head.weight"),
        }
    }
}

/// How the step computes.
#[derive(Clone, Default)]
pub struct EngineOptions {
    /// Keep only each block's input after forward and run the block again in backward.
    pub recompute: bool,
    /// Fused CUDA kernels to use where they apply (`runtime.kernels = "fused"`).
    pub kernels: Option<std::sync::Arc<crate::cuda::kernels::Kernels>>,
    /// Run the blocks' hand-written forward and backward instead of autograd
    /// (`runtime.block_backward = "explicit"`).
    pub explicit_blocks: bool,
    /// With hand-written blocks, recompute the RMSNorm and SwiGLU outputs in backward
    /// instead of keeping them (`runtime.recompute = "elementwise"`).
    pub recompute_elementwise: bool,
    /// With hand-written blocks, one GEMM per part of the fused projections
    /// (`runtime.split_projections`).
    pub split_projections: bool,
}

/// Runs `batch` forward and backward through `model` for `objective`, handing gradients to
/// `sink`; returns the micro-batch's loss (a 0-d tensor on the device). `clock` times the
/// phases: `forward` (embedding and blocks), `head` (final norm, LM head and objective,
/// both ways), `backward` (blocks) and `embedding_backward`.
pub fn forward_backward(
    model: &Transformer,
    stages: &Stages,
    batch: &Batch,
    objective: &dyn Objective,
    opts: &EngineOptions,
    sink: &mut dyn GradSink,
    clock: &mut PhaseClock,
) -> Result<Tensor, WorkerError> {
    let recompute = opts.recompute;
    let params = &model.params;
    let packing = batch.packing.as_ref();
    let pieces = Pieces::for_model(model, opts.kernels.as_deref());
    // Forward: each block's input is a fresh leaf, so each block's graph stands alone.
    sink.params_ready(0)?;
    let mut inputs = vec![tch::no_grad(|| model.embed(&batch.inputs)).set_requires_grad(true)];
    let mut outputs = Vec::with_capacity(stages.blocks.len());
    let mut tapes = Vec::with_capacity(stages.blocks.len());
    for i in 0..stages.blocks.len() {
        sink.params_ready(1 + i)?;
        let x = inputs.last().expect("input");
        let y = if opts.explicit_blocks {
            let (y, tape) =
                block::forward(model, i, x, packing, pieces, !opts.recompute_elementwise, opts.split_projections)?;
            if !recompute {
                tapes.push(tape);
            }
            y
        } else if recompute {
            tch::no_grad(|| model.block_packed(i, x, packing))
        } else {
            model.block_packed(i, x, packing)
        };
        inputs.push(y.detach().set_requires_grad(true));
        if !recompute && !opts.explicit_blocks {
            outputs.push(y);
        }
    }
    clock.lap("forward");
    let last = inputs.last().expect("input");
    let hidden = model.final_norm(last);

    // Head: hand-written gradients, chunk by chunk.
    sink.params_ready(stages.blocks.len() + 1)?;
    // Logits at the objective's scale (GRPO: 1 / sampling temperature), through the hidden
    // states: logits = (s·h)·Wᵀ, so d/dW comes out right and d/dh is s times the head's.
    let scale = objective.logit_scale();
    let head_input = if scale == 1.0 { hidden.detach() } else { tch::no_grad(|| hidden.detach() * scale) };
    let head_leaf = stages.head;
    let mut add_head_grad = |a: &Tensor, b: &Tensor| sink.add_product(head_leaf, a, b);
    let head = head_forward_backward(
        &head_input,
        model.lm_head(),
        batch,
        objective,
        &mut add_head_grad,
        opts.kernels.as_deref(),
    )?;
    sink.done(stages.head)?;
    let d_hidden = if scale == 1.0 { head.d_hidden } else { tch::no_grad(|| head.d_hidden * scale) };

    // Final norm.
    let norm_leaf = params.leaf_at(stages.final_norm);
    let mut grads = backward(&hidden, &d_hidden, &[last, norm_leaf])?;
    sink.add(stages.final_norm, &grads[1])?;
    sink.done(stages.final_norm)?;
    let mut d_x = grads.swap_remove(0);
    clock.lap("head");

    // Blocks, last to first.
    for i in (0..stages.blocks.len()).rev() {
        inputs.pop();
        let x = inputs.last().expect("block input");
        if opts.explicit_blocks {
            let tape = match tapes.pop() {
                Some(tape) => tape,
                None => block::forward(model, i, x, packing, pieces, true, opts.split_projections)?.1,
            };
            let dx =
                block::backward(model, i, tape, &d_x, packing, pieces, sink, stages.blocks[i], opts.split_projections)?;
            for &leaf in &stages.blocks[i] {
                sink.done(leaf)?;
            }
            d_x = dx;
            continue;
        }
        let y = if recompute {
            model.block_packed(i, x, batch.packing.as_ref())
        } else {
            outputs.pop().expect("block output")
        };
        let mut wrt: Vec<&Tensor> = vec![x];
        wrt.extend(stages.blocks[i].iter().map(|&l| params.leaf_at(l)));
        let grads = backward(&y, &d_x, &wrt)?;
        for (&leaf, g) in stages.blocks[i].iter().zip(&grads[1..]) {
            sink.add(leaf, g)?;
        }
        for &leaf in &stages.blocks[i] {
            sink.done(leaf)?;
        }
        d_x = grads.into_iter().next().expect("input gradient");
    }

    clock.lap("backward");
    // Embedding: scatter-add the input gradient into the touched rows.
    let mut embed_grad = sink.region(stages.embed);
    tch::no_grad(|| {
        let dim = d_x.size()[2];
        let rows = d_x.reshape([-1, dim]).to_kind(embed_grad.kind());
        let _ = embed_grad.index_add_(0, &batch.inputs.reshape([-1]), &rows);
    });
    sink.done(stages.embed)?;
    clock.lap("embedding_backward");
    Ok(head.loss)
}

/// Gradients of `output` (given `d_output`, the gradient flowing into it) with respect to
/// `wrt`. Backward of `sum(output · d_output)` hands `d_output` to `output`'s graph exactly.
fn backward(output: &Tensor, d_output: &Tensor, wrt: &[&Tensor]) -> Result<Vec<Tensor>, WorkerError> {
    // A dot product reads both once and writes nothing; `(output · d_output).sum()` would
    // write the product and read it again.
    let surrogate = output.reshape([-1]).dot(&d_output.to_kind(output.kind()).reshape([-1]));
    Ok(Tensor::f_run_backward(&[surrogate], wrt, false, false)?)
}
