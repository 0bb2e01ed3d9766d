//! A decoder block's forward and backward written out by hand (`runtime.block_backward =
//! "explicit"`), as llm.c does, instead of recorded and replayed by autograd.
//!
//! Why: with autograd, each elementwise piece of the block (RoPE's four ops, SwiGLU's two,
//! the residual adds, the gradient concatenations of the fused projections) is a separate
//! kernel forward and several backward, and every intermediate it saves is another tensor.
//! Written out, each piece is one pass, and with [`Pieces::Fused`] one CUDA kernel
//! (`cuda/kernels.cu`): RMSNorm with the residual gradient folded into its backward, RoPE
//! in place on the projection's output, its backward packing the attention gradients
//! straight into the projection's layout, SwiGLU. The products are the same GEMMs autograd
//! runs. Attention alone keeps a small autograd graph (q, k, v → SDPA), so it runs the same
//! attention kernels as the rest of the engine and as PyTorch.
//!
//! Per block, with `x` the input, `R` rows (tokens), `n = RMSNorm`:
//!
//! | forward                                  | backward                                             |
//! |------------------------------------------|------------------------------------------------------|
//! | `n1 = n(x)`, `qkv = n1·Wqkvᵀ`, RoPE(q, k) | `dqkv = RoPEᵀ(SDPA′(d_attn))`, `dWqkv = dqkvᵀ·n1`     |
//! | `attn = SDPA(q, k, v)`                   | `d_attn = dh·Wo`, `dWo = dhᵀ·attn`                    |
//! | `h = x + attn·Woᵀ`                       | `dx = dh + n′(dqkv·Wqkv)`                             |
//! | `n2 = n(h)`, `gu = n2·Wguᵀ`              | `dgu = SwiGLU′(dy·Wd)`, `dWgu = dguᵀ·n2`, `dWd = dyᵀ·a` |
//! | `a = SwiGLU(gu)`, `y = h + a·Wdᵀ`        | `dh = dy + n′(dgu·Wgu)`                               |
//!
//! Tested against autograd in fp64 on the CPU (ATen pieces, `step_tests`); the fused
//! pieces against the ATen ones on the GPU (`moxin-train bench kernels`).

use tch::{Kind, Tensor};

use super::step::GradSink;
use crate::cuda::gemm;
use crate::cuda::kernels::{Kernels, RMSNORM_MAX_DIM};
use crate::model::{Packing, Transformer};
use crate::WorkerError;

/// How the elementwise pieces run.
#[derive(Clone, Copy)]
pub enum Pieces<'a> {
    /// Composed from ATen operations (any device and dtype).
    Aten,
    /// moxin-train's CUDA kernels (bf16 on CUDA).
    Fused(&'a Kernels),
}

impl<'a> Pieces<'a> {
    /// The fused kernels where they apply to `model` (bf16 on CUDA, row lengths and
    /// alignments the kernels take: multiples of 4 and 8-byte aligned norm gains), ATen
    /// otherwise.
    pub fn for_model(model: &Transformer, kernels: Option<&'a Kernels>) -> Self {
        let s = &model.shape;
        let gains_aligned = (0..s.n_layers as usize).all(|i| {
            let l = model.layer(i);
            [&l.input_norm, &l.post_norm].iter().all(|g| (g.data_ptr() as usize).is_multiple_of(8))
        });
        let fits = model.params.flat().kind() == Kind::BFloat16
            && matches!(model.device(), tch::Device::Cuda(_))
            && (s.dim as i64) <= RMSNORM_MAX_DIM
            && s.dim.is_multiple_of(4)
            && s.ffn_dim.is_multiple_of(4)
            && s.head_dim().is_multiple_of(4)
            && gains_aligned;
        match kernels {
            Some(k) if fits => Pieces::Fused(k),
            _ => Pieces::Aten,
        }
    }
}

/// What backward needs of a block's forward.
pub struct Tape {
    x: Tensor,
    /// The RMSNorm and SwiGLU outputs, unless backward recomputes them.
    n1: Option<Tensor>,
    rstd1: Tensor,
    /// Attention's inputs (leaves cut from the roped projection) and output, with the graph
    /// between them.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn: Tensor,
    h: Tensor,
    n2: Option<Tensor>,
    rstd2: Tensor,
    gate_up: Tensor,
    act: Option<Tensor>,
}

/// A block's parameters (leaf names after `model.layers.{i}.`), in the order
/// [`backward`] takes their leaf indices.
pub const BLOCK_PARAMS: [&str; 6] = [
    "input_layernorm.weight",
    "self_attn.qkv",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_up",
    "mlp.down_proj.weight",
];
const INPUT_NORM: usize = 0;
const QKV: usize = 1;
const O: usize = 2;
const POST_NORM: usize = 3;
const GATE_UP: usize = 4;
const DOWN: usize = 5;

/// The parts of block `i`'s fused projections, in rows of their weights (q, k, v; gate,
/// up), when `split` asks for one GEMM per part.
fn projection_parts(model: &Transformer, split: bool) -> (Option<[i64; 3]>, Option<[i64; 2]>) {
    let s = &model.shape;
    let (q, kv, ffn) = ((s.n_heads * s.head_dim()) as i64, (s.n_kv_heads * s.head_dim()) as i64, s.ffn_dim as i64);
    (split.then_some([q, kv, kv]), split.then_some([ffn, ffn]))
}

/// Block `i` on `x` `[b, t, dim]` (no graph): the output and the tape for [`backward`].
/// With `keep_elementwise` false the tape leaves out the RMSNorm and SwiGLU outputs, which
/// backward recomputes from what it keeps (one fused pass each on the GPU) — the cheap
/// recomputation torch.compile's partitioner does too. With `split` the fused projections
/// (q/k/v, gate/up) run as one GEMM per part, each writing its columns of the fused output.
pub fn forward(
    model: &Transformer,
    i: usize,
    x: &Tensor,
    packing: Option<&Packing>,
    pieces: Pieces<'_>,
    keep_elementwise: bool,
    split: bool,
) -> Result<(Tensor, Tape), WorkerError> {
    let s = &model.shape;
    let l = model.layer(i);
    let (b, t, dim) = (x.size()[0], x.size()[1], x.size()[2]);
    let (heads, kv_heads, hd) = (s.n_heads as i64, s.n_kv_heads as i64, s.head_dim() as i64);
    let positions = packing.map(|p| &p.positions);
    let (qkv_parts, gate_up_parts) = projection_parts(model, split);
    let _no_grad = tch::no_grad_guard();

    let (n1, rstd1) = pieces.rms_norm(x, &l.input_norm, s.norm_eps)?;
    let qkv = project(&n1, &l.w_qkv, qkv_parts.as_ref().map(|p| p.as_slice()));
    pieces.rope(model, &qkv, positions, heads, kv_heads)?;
    let split = |offset: i64, n: i64| {
        qkv.narrow(2, offset * hd, n * hd).view([b, t, n, hd]).transpose(1, 2).detach().set_requires_grad(true)
    };
    let (q, k, v) = (split(0, heads), split(heads, kv_heads), split(heads + kv_heads, kv_heads));
    let attn = tch::with_grad(|| model.self_attention(&q, &k, &v, packing).transpose(1, 2).reshape([b, t, heads * hd]));
    let h = plus_linear(x, &attn.detach(), &l.wo);
    let (n2, rstd2) = pieces.rms_norm(&h, &l.post_norm, s.norm_eps)?;
    let gate_up = project(&n2, &l.w_gate_up, gate_up_parts.as_ref().map(|p| p.as_slice()));
    let act = pieces.swiglu(&gate_up)?;
    let y = plus_linear(&h, &act, &l.w_down);
    debug_assert_eq!(y.size(), [b, t, dim]);
    let keep = |t: Tensor| keep_elementwise.then_some(t);
    let tape = Tape {
        x: x.shallow_clone(),
        n1: keep(n1),
        rstd1,
        q,
        k,
        v,
        attn,
        h,
        n2: keep(n2),
        rstd2,
        gate_up,
        act: keep(act),
    };
    Ok((y, tape))
}

/// Backward of block `i` for `dy` (the gradient of its output): returns the gradient of its
/// input and adds its parameters' gradients to `sink` (leaves `leaves`, in
/// [`BLOCK_PARAMS`]' order) as they are computed — the weight gradients as products the
/// sink's GEMM writes in place. Each saved tensor is released as soon as its last use is
/// done, so the transients of one block's backward mostly reuse its own tape's memory.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    model: &Transformer,
    i: usize,
    tape: Tape,
    dy: &Tensor,
    packing: Option<&Packing>,
    pieces: Pieces<'_>,
    sink: &mut dyn GradSink,
    leaves: [usize; 6],
    split: bool,
) -> Result<Tensor, WorkerError> {
    let (l, eps) = (model.layer(i), model.shape.norm_eps);
    let positions = packing.map(|p| &p.positions);
    let (qkv_parts, gate_up_parts) = projection_parts(model, split);
    let Tape { x, n1, rstd1, q, k, v, attn, h, n2, rstd2, gate_up, act } = tape;
    let rows2 = |t: &Tensor| t.reshape([-1, *t.size().last().expect("a matrix")]);
    let _no_grad = tch::no_grad_guard();
    let dy2 = rows2(dy);

    // MLP: y = h + SwiGLU(gu)·Wdᵀ, gu = n2·Wguᵀ.
    let act = match act {
        Some(a) => a,
        None => pieces.swiglu(&gate_up)?,
    };
    sink.add_product(leaves[DOWN], &dy2.tr(), &rows2(&act))?;
    let d_act = gemm::mm(&dy2, &l.w_down).view(act.size().as_slice());
    drop(act);
    let d_gate_up = pieces.swiglu_backward(&gate_up, &d_act)?;
    drop((gate_up, d_act));
    let n2 = match n2 {
        Some(n) => n,
        None => pieces.rms_norm(&h, &l.post_norm, eps)?.0,
    };
    let d_gate_up2 = rows2(&d_gate_up);
    let gate_up_parts = gate_up_parts.as_ref().map(|p| p.as_slice());
    weight_grad(sink, leaves[GATE_UP], &d_gate_up2, &rows2(&n2), gate_up_parts)?;
    drop(n2);
    let d_n2 = project_back(&d_gate_up2, &l.w_gate_up, gate_up_parts).view(h.size().as_slice());
    drop((d_gate_up, d_gate_up2));
    let (dh, post_norm) = pieces.rms_norm_backward(&h, &l.post_norm, &rstd2, &d_n2, Some(dy))?;
    sink.add(leaves[POST_NORM], &post_norm)?;
    drop((h, d_n2));

    // Attention: h = x + attn·Woᵀ.
    let dh2 = rows2(&dh);
    sink.add_product(leaves[O], &dh2.tr(), &rows2(&attn.detach()))?;
    let d_attn = gemm::mm(&dh2, &l.wo);
    let grads = tch::with_grad(|| {
        let surrogate = attn.reshape([-1]).dot(&d_attn.reshape([-1]));
        Tensor::f_run_backward(&[surrogate], &[&q, &k, &v], false, false)
    })?;
    drop((attn, d_attn, q, k, v));
    let d_qkv = pieces.rope_backward_pack(model, [&grads[0], &grads[1], &grads[2]], positions)?;
    drop(grads);
    let n1 = match n1 {
        Some(n) => n,
        None => pieces.rms_norm(&x, &l.input_norm, eps)?.0,
    };
    let d_qkv2 = rows2(&d_qkv);
    let qkv_parts = qkv_parts.as_ref().map(|p| p.as_slice());
    weight_grad(sink, leaves[QKV], &d_qkv2, &rows2(&n1), qkv_parts)?;
    drop(n1);
    let d_n1 = project_back(&d_qkv2, &l.w_qkv, qkv_parts).view(x.size().as_slice());
    drop((d_qkv, d_qkv2));
    let (dx, input_norm) = pieces.rms_norm_backward(&x, &l.input_norm, &rstd1, &d_n1, Some(&dh))?;
    sink.add(leaves[INPUT_NORM], &input_norm)?;
    Ok(dx)
}

/// `a·wᵀ` for a fused projection `w` `[Σ parts, in]`: one GEMM, or with `parts` one per
/// part, each writing its block of columns of the one output (cuBLAS takes the strided
/// output as it is), so what follows reads the fused layout either way.
pub(crate) fn project(a: &Tensor, w: &Tensor, parts: Option<&[i64]>) -> Tensor {
    let mut size = a.size();
    let rows = a.reshape([-1, *size.last().expect("a matrix")]);
    *size.last_mut().expect("a matrix") = w.size()[0];
    let Some(parts) = parts else {
        return if gemm::engaged(a) {
            gemm::mm(&rows, &w.tr()).view(size.as_slice())
        } else {
            crate::model::linear(a, w)
        };
    };
    let out = Tensor::empty([rows.size()[0], w.size()[0]], (a.kind(), a.device()));
    let mut offset = 0;
    for &n in parts {
        gemm::mm_into(&out.narrow(1, offset, n), &rows, &w.narrow(0, offset, n).tr());
        offset += n;
    }
    out.view(size.as_slice())
}

/// The input gradient of [`project`] for its output gradient `d` `[rows, Σ parts]`:
/// `d·w`, or with `parts` the sum of each part's product (accumulated in the activations'
/// dtype, as autograd sums the input gradients of separate projections).
pub(crate) fn project_back(d: &Tensor, w: &Tensor, parts: Option<&[i64]>) -> Tensor {
    let Some(parts) = parts else { return gemm::mm(d, w) };
    let mut sum: Option<Tensor> = None;
    let mut offset = 0;
    for &n in parts {
        let (dp, wp) = (d.narrow(1, offset, n), w.narrow(0, offset, n));
        sum = Some(match sum {
            None => gemm::mm(&dp, &wp),
            Some(acc) => {
                gemm::addmm_(&acc, &dp, &wp);
                acc
            }
        });
        offset += n;
    }
    sum.expect("a projection has parts")
}

/// The weight gradient of [`project`], `dᵀ·a`, handed to `sink`: one product, or with
/// `parts` one per part, each into its rows of the leaf.
fn weight_grad(
    sink: &mut dyn GradSink,
    leaf: usize,
    d: &Tensor,
    a: &Tensor,
    parts: Option<&[i64]>,
) -> Result<(), WorkerError> {
    let Some(parts) = parts else { return sink.add_product(leaf, &d.tr(), a) };
    let mut offset = 0;
    let mut products = Vec::with_capacity(parts.len());
    for &n in parts {
        products.push(d.narrow(1, offset, n).tr());
        offset += n;
    }
    sink.add_product_rows(leaf, &products, a)
}

/// `x + a·wᵀ` as one GEMM that adds into a copy of `x` (`addmm`, β = 1) instead of a GEMM
/// and a separate add over its output. `x` `[.., out]`, `a` `[.., in]`, `w` `[out, in]`.
pub(crate) fn plus_linear(x: &Tensor, a: &Tensor, w: &Tensor) -> Tensor {
    let rows = |t: &Tensor| t.reshape([-1, *t.size().last().expect("a matrix")]);
    gemm::addmm(&rows(x), &rows(a), &w.tr()).view(x.size().as_slice())
}

/// The precision the ATen pieces compute in: fp64 for an fp64 model (tests), else fp32.
fn compute_kind(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

impl Pieces<'_> {
    /// RMSNorm of `x` `[.., D]`: `(y, rstd)`, `rstd` `[rows]` in the compute precision.
    pub fn rms_norm(self, x: &Tensor, weight: &Tensor, eps: f64) -> Result<(Tensor, Tensor), WorkerError> {
        if let Pieces::Fused(k) = self {
            return k.rmsnorm_forward(&x.contiguous(), weight, eps);
        }
        let ck = compute_kind(x.kind());
        let xf = x.to_kind(ck);
        let rstd = (xf.square().mean_dim([-1i64].as_slice(), true, ck) + eps).rsqrt();
        let y = (&xf * &rstd * weight.to_kind(ck)).to_kind(x.kind());
        Ok((y, rstd.reshape([-1])))
    }

    /// RMSNorm backward: `(dx + residual, d weight)`.
    pub fn rms_norm_backward(
        self,
        x: &Tensor,
        weight: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
        residual: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor), WorkerError> {
        if let Pieces::Fused(k) = self {
            let residual = residual.map(Tensor::contiguous);
            return k.rmsnorm_backward(&x.contiguous(), weight, rstd, &dy.contiguous(), residual.as_ref());
        }
        let dim = *x.size().last().expect("a row");
        let ck = compute_kind(x.kind());
        let (xf, dyf) = (x.to_kind(ck).reshape([-1, dim]), dy.to_kind(ck).reshape([-1, dim]));
        let r = rstd.reshape([-1, 1]);
        let g = &dyf * weight.to_kind(ck);
        let dot = (&g * &xf).sum_dim_intlist([-1i64].as_slice(), true, ck);
        let dx = &g * &r - &xf * r.pow_tensor_scalar(3) * dot / dim as f64;
        let d_weight = (&dyf * &xf * &r).sum_dim_intlist([0i64].as_slice(), false, ck).to_kind(weight.kind());
        let mut dx = dx.to_kind(x.kind()).view(x.size().as_slice());
        if let Some(res) = residual {
            dx += res;
        }
        Ok((dx, d_weight))
    }

    /// RoPE in place on the query and key heads of `qkv` `[b, t, (H + 2K)·hd]`, at each
    /// token's position in its row, or at explicit `positions` (packed rows; the fused
    /// kernels' positions path is checked on a GPU by `moxin-train bench kernels`:
    /// `rope_packed`).
    pub fn rope(
        self,
        model: &Transformer,
        qkv: &Tensor,
        positions: Option<&Tensor>,
        heads: i64,
        kv_heads: i64,
    ) -> Result<(), WorkerError> {
        let hd = model.shape.head_dim() as i64;
        if let Pieces::Fused(k) = self {
            return k.rope_forward(qkv, model.rope().tables(), positions, heads + kv_heads, hd);
        }
        let (b, t) = (qkv.size()[0], qkv.size()[1]);
        for (offset, n) in [(0, heads), (heads, kv_heads)] {
            let mut part = qkv.narrow(2, offset * hd, n * hd).view([b, t, n, hd]).transpose(1, 2);
            let rotated = match positions {
                Some(p) => model.rope().apply_at(&part, p),
                None => model.rope().apply(&part, 0),
            };
            part.copy_(&rotated);
        }
        Ok(())
    }

    /// RoPE backward of the attention's input gradients, packed as `[b, t, (H + 2K)·hd]`.
    pub fn rope_backward_pack(
        self,
        model: &Transformer,
        grads: [&Tensor; 3],
        positions: Option<&Tensor>,
    ) -> Result<Tensor, WorkerError> {
        if let Pieces::Fused(k) = self {
            // The kernel takes any strides but needs each head's values side by side.
            let [dq, dk, dv] = grads.map(|g| if g.stride()[3] == 1 { g.shallow_clone() } else { g.contiguous() });
            return k.rope_backward_pack([&dq, &dk, &dv], model.rope().tables(), positions);
        }
        let [dq, dk, dv] = grads;
        let rope = model.rope();
        let rows = |g: Tensor| {
            let (b, n, t, hd) = (g.size()[0], g.size()[1], g.size()[2], g.size()[3]);
            g.transpose(1, 2).reshape([b, t, n * hd])
        };
        let q = rows(rope.apply_transpose(dq, positions));
        let k = rows(rope.apply_transpose(dk, positions));
        Ok(Tensor::cat(&[q, k, rows(dv.shallow_clone())], 2))
    }

    /// SwiGLU of `gate_up` `[.., 2F]`.
    pub fn swiglu(self, gate_up: &Tensor) -> Result<Tensor, WorkerError> {
        if let Pieces::Fused(k) = self {
            return k.swiglu_forward(&gate_up.contiguous());
        }
        let f = *gate_up.size().last().expect("a row") / 2;
        let parts = gate_up.split(f, -1);
        Ok(parts[0].silu() * &parts[1])
    }

    /// SwiGLU backward: `d gate_up` for `d_act`.
    pub fn swiglu_backward(self, gate_up: &Tensor, d_act: &Tensor) -> Result<Tensor, WorkerError> {
        if let Pieces::Fused(k) = self {
            return k.swiglu_backward(&gate_up.contiguous(), &d_act.contiguous());
        }
        let f = *gate_up.size().last().expect("a row") / 2;
        let parts = gate_up.split(f, -1);
        let (g, u) = (&parts[0], &parts[1]);
        let s = g.sigmoid();
        let d_gate = d_act * u * &s * (g * (1.0 - &s) + 1.0);
        let d_up = d_act * g * s;
        Ok(Tensor::cat(&[d_gate, d_up], -1))
    }
}
