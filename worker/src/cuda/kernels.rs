//! Fused CUDA kernels, compiled at run time with NVRTC (shipped with torch's CUDA
//! libraries) for the device in use, and launched on torch's stream (the legacy default
//! stream), so they are ordered with torch's own kernels. Switched on by
//! `runtime.kernels = "fused"`; each has an ATen equivalent that is the reference in
//! `moxin-train bench kernels` and the GPU check script.
//!
//! * AdamW over the flat partition in one pass (gradient clip factor, weight decay, bias
//!   correction, and the bf16 copy of the updated weights folded in);
//! * cross-entropy in two passes over bf16 logits (row log-sum-exp and target log-prob;
//!   then the gradient in place), so the head never materialises fp32 logits;
//! * the elementwise pieces of a decoder block and their backward — RMSNorm (the residual
//!   gradient folded into its backward), RoPE (its backward packs the attention gradients
//!   into the qkv projection's layout) and SwiGLU — for the hand-written block backward
//!   (`runtime.block_backward = "explicit"`, `trainer::block`).

use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use tch::{Device, Kind, Tensor};

use crate::WorkerError;

const SOURCE: &str = include_str!("kernels.cu");
const THREADS: u32 = 256;

/// The compiled kernels for one device.
pub struct Kernels {
    stream: Arc<CudaStream>,
    adamw_g32: CudaFunction,
    adamw_g16: CudaFunction,
    ce_row_stats: CudaFunction,
    ce_grad: CudaFunction,
    rmsnorm_fwd: CudaFunction,
    rmsnorm_bwd: CudaFunction,
    rope_fwd: CudaFunction,
    rope_bwd_pack: CudaFunction,
    swiglu_fwd: CudaFunction,
    swiglu_bwd: CudaFunction,
    sm_count: u32,
}

fn err(what: &str, e: impl std::fmt::Debug) -> WorkerError {
    WorkerError::Device(format!("fused kernels: {what}: {e:?}"))
}

impl Kernels {
    /// The kernels for CUDA device `ordinal`, compiled on first use.
    pub fn for_device(ordinal: usize) -> Result<Arc<Kernels>, WorkerError> {
        type PerDevice = Vec<(usize, Arc<Kernels>)>;
        static CACHE: OnceLock<Mutex<PerDevice>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, k)) = cache.iter().find(|(o, _)| *o == ordinal) {
            return Ok(k.clone());
        }
        let k = Arc::new(Self::compile(ordinal)?);
        cache.push((ordinal, k.clone()));
        Ok(k)
    }

    fn compile(ordinal: usize) -> Result<Kernels, WorkerError> {
        let ctx = super::context(ordinal)?;
        let (major, minor) = ctx.compute_capability().map_err(|e| err("compute capability", e))?;
        let ptx = compile_ptx(major, minor)?;
        let module = ctx.load_module(ptx).map_err(|e| err("loading the module", e))?;
        let f = |name: &str| module.load_function(name).map_err(|e| err(name, e));
        let sm_count = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| err("SM count", e))? as u32;
        Ok(Kernels {
            stream: ctx.default_stream(),
            adamw_g32: f("adamw_g32")?,
            adamw_g16: f("adamw_g16")?,
            ce_row_stats: f("ce_row_stats")?,
            ce_grad: f("ce_grad")?,
            rmsnorm_fwd: f("rmsnorm_fwd")?,
            rmsnorm_bwd: f("rmsnorm_bwd")?,
            rope_fwd: f("rope_fwd")?,
            rope_bwd_pack: f("rope_bwd_pack")?,
            swiglu_fwd: f("swiglu_fwd")?,
            swiglu_bwd: f("swiglu_bwd")?,
            sm_count,
        })
    }

    /// torch's stream (the legacy default stream), which every kernel here runs on unless
    /// told otherwise.
    pub fn compute_stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A new non-blocking stream on this device (ordered with torch's by events only).
    pub fn new_side_stream(&self) -> Result<Arc<CudaStream>, WorkerError> {
        self.stream.context().new_stream().map_err(|e| err("creating a stream", e))
    }

    /// Blocks for AdamW running beside other work on a side stream: one per SM on a
    /// quarter of the SMs. A full grid (8 blocks of 256 threads on every SM) would take
    /// every SM until a stage's update is done and keep the next forward's GEMMs off them,
    /// serialising the two again. A Hopper GEMM's thread block needs a whole SM's registers,
    /// so each SM running an AdamW block is lost to the GEMMs meanwhile: the cap trades the
    /// forward's speed while the update runs against the update keeping ahead of the
    /// forward stage by stage (the GPU check measures the result, `runtime.optimizer_stream`).
    pub fn side_stream_blocks(&self) -> u32 {
        (self.sm_count / 4).max(1)
    }

    fn grid_for(&self, n: i64) -> LaunchConfig {
        let blocks = (n as u64).div_ceil(THREADS as u64).min(self.sm_count as u64 * 8).max(1) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    /// One AdamW step on the partition, on `stream` (torch's, [`Kernels::compute_stream`],
    /// or a side stream the caller orders with events): `state` is `[master, exp_avg,
    /// exp_avg_sq, grad]` — fp32 state of `n` elements and an fp32 or bf16 gradient — with the
    /// gradient times `grad_scale`; elements `[0, decay_end)` are decayed by `decay`
    /// (= 1 − lr·wd); writes the updated weights as bf16 into `out` when given. At most
    /// `max_blocks` thread blocks when given (see [`Kernels::side_stream_blocks`]).
    pub fn adamw_on(
        &self,
        stream: &Arc<CudaStream>,
        state: [&Tensor; 4],
        out: Option<&Tensor>,
        decay_end: i64,
        hyper: AdamWStep,
        max_blocks: Option<u32>,
    ) -> Result<(), WorkerError> {
        let [master, exp_avg, exp_avg_sq, grad] = state;
        let n = master.numel() as i64;
        for (name, t, kind) in [
            ("master", master, Kind::Float),
            ("exp_avg", exp_avg, Kind::Float),
            ("exp_avg_sq", exp_avg_sq, Kind::Float),
        ] {
            check(name, t, kind, n)?;
        }
        check("grad", grad, grad.kind(), n)?;
        if let Some(o) = out {
            check("out", o, Kind::BFloat16, n)?;
        }
        let func = match grad.kind() {
            Kind::Float => &self.adamw_g32,
            Kind::BFloat16 => &self.adamw_g16,
            k => return Err(err("grad dtype", k)),
        };
        if n == 0 {
            return Ok(());
        }
        let (p, m, v, g) = (ptr(master), ptr(exp_avg), ptr(exp_avg_sq), ptr(grad));
        let o = out.map_or(0u64, ptr);
        let mut b = stream.launch_builder(func);
        b.arg(&p).arg(&m).arg(&v).arg(&g).arg(&o).arg(&n).arg(&decay_end);
        b.arg(&hyper.decay).arg(&hyper.beta1).arg(&hyper.beta2).arg(&hyper.eps);
        b.arg(&hyper.step_size).arg(&hyper.inv_bias2_sqrt).arg(&hyper.grad_scale);
        let mut grid = self.grid_for(n);
        grid.grid_dim.0 = grid.grid_dim.0.min(max_blocks.unwrap_or(u32::MAX).max(1));
        // SAFETY: every pointer addresses `n` live elements of the kernel's types on this
        // device (checked above); the tensors outlive the launch (stream-ordered use).
        #[allow(unsafe_code)]
        unsafe { b.launch(grid) }.map_err(|e| err("adamw launch", e))?;
        Ok(())
    }

    /// Cross-entropy pass 1 on bf16 `logits` `[rows, V]`: returns `(lse, logp)` `[rows]`
    /// (fp32): each row's log-sum-exp and its target's log-probability.
    pub fn ce_row_stats(&self, logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor), WorkerError> {
        let (rows, vocab) = (logits.size()[0], logits.size()[1]);
        check("logits", logits, Kind::BFloat16, rows * vocab)?;
        check("targets", targets, Kind::Int64, rows)?;
        let lse = Tensor::empty([rows], (Kind::Float, logits.device()));
        let logp = Tensor::empty([rows], (Kind::Float, logits.device()));
        if rows == 0 {
            return Ok((lse, logp));
        }
        let (l, t, lo, lp, v) = (ptr(logits), ptr(targets), ptr(&lse), ptr(&logp), vocab as i32);
        let mut b = self.stream.launch_builder(&self.ce_row_stats);
        b.arg(&l).arg(&t).arg(&lo).arg(&lp).arg(&v);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: shapes and dtypes checked; outputs freshly allocated on this device.
        #[allow(unsafe_code)]
        unsafe { b.launch(cfg) }.map_err(|e| err("ce_row_stats launch", e))?;
        Ok((lse, logp))
    }

    /// Cross-entropy pass 2: turns `logits` (bf16 `[rows, V]`) in place into the gradient
    /// `coef[r] · (softmax − onehot(target))` given pass 1's `lse`.
    pub fn ce_grad(&self, logits: &Tensor, targets: &Tensor, lse: &Tensor, coef: &Tensor) -> Result<(), WorkerError> {
        let (rows, vocab) = (logits.size()[0], logits.size()[1]);
        check("logits", logits, Kind::BFloat16, rows * vocab)?;
        check("targets", targets, Kind::Int64, rows)?;
        check("lse", lse, Kind::Float, rows)?;
        check("coef", coef, Kind::Float, rows)?;
        if rows == 0 {
            return Ok(());
        }
        let (l, t, ls, c, v) = (ptr(logits), ptr(targets), ptr(lse), ptr(coef), vocab as i32);
        let mut b = self.stream.launch_builder(&self.ce_grad);
        b.arg(&l).arg(&t).arg(&ls).arg(&c).arg(&v);
        let column_blocks = (vocab as u32).div_ceil(THREADS * 4).max(1);
        let cfg =
            LaunchConfig { grid_dim: (column_blocks, rows as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: shapes and dtypes checked; in place on the caller's logits.
        #[allow(unsafe_code)]
        unsafe { b.launch(cfg) }.map_err(|e| err("ce_grad launch", e))?;
        Ok(())
    }

    /// RMSNorm of bf16 `x` `[rows, D]` with gain `weight` `[D]`: returns `(y, rstd)`, `y`
    /// bf16 like `x` and `rstd` fp32 `[rows]` (1 / RMS, what backward needs).
    pub fn rmsnorm_forward(&self, x: &Tensor, weight: &Tensor, eps: f64) -> Result<(Tensor, Tensor), WorkerError> {
        let (rows, dim) = rows_dim(x, 4)?;
        check_rows("x", x, rows, dim, 8)?;
        check_rows("weight", weight, 1, dim, 8)?;
        let y = x.empty_like();
        let rstd = Tensor::empty([rows], (Kind::Float, x.device()));
        if rows == 0 {
            return Ok((y, rstd));
        }
        let (xp, wp, yp, rp, d, e) = (ptr(x), ptr(weight), ptr(&y), ptr(&rstd), dim as i32, eps as f32);
        let mut b = self.stream.launch_builder(&self.rmsnorm_fwd);
        b.arg(&xp).arg(&wp).arg(&yp).arg(&rp).arg(&d).arg(&e);
        // SAFETY: shapes, dtypes, contiguity and alignment checked; one block per row, each
        // of `norm_threads(dim)` threads covering its columns; outputs freshly allocated.
        #[allow(unsafe_code)]
        unsafe { b.launch(per_row(rows, norm_threads(dim)?)) }.map_err(|e| err("rmsnorm_fwd launch", e))?;
        Ok((y, rstd))
    }

    /// RMSNorm backward: `(dx, dweight)` for `dy` given forward's `x`, `weight` and `rstd`;
    /// `dx` (bf16) includes `residual` when given (the gradient through the skip connection),
    /// `dweight` is fp32 `[D]`.
    pub fn rmsnorm_backward(
        &self,
        x: &Tensor,
        weight: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
        residual: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor), WorkerError> {
        let (rows, dim) = rows_dim(x, 4)?;
        let threads = norm_threads(dim)?;
        check_rows("x", x, rows, dim, 8)?;
        check_rows("weight", weight, 1, dim, 8)?;
        check("rstd", rstd, Kind::Float, rows)?;
        check_rows("dy", dy, rows, dim, 8)?;
        if let Some(r) = residual {
            check_rows("residual", r, rows, dim, 8)?;
        }
        // Enough blocks to fill the device several times over; each sums its rows' share of
        // the weight gradient, and the shares are added up once here.
        let blocks = (rows.max(1) as u32).min(self.sm_count * 16);
        let dx = x.empty_like();
        let part = Tensor::empty([blocks as i64, dim], (Kind::Float, x.device()));
        if rows == 0 {
            return Ok((dx, part.sum_dim_intlist([0i64].as_slice(), false, Kind::Float)));
        }
        let (xp, wp, rp, dp, sp, op, pp) =
            (ptr(x), ptr(weight), ptr(rstd), ptr(dy), residual.map_or(0u64, ptr), ptr(&dx), ptr(&part));
        let d = dim as i32;
        let mut b = self.stream.launch_builder(&self.rmsnorm_bwd);
        b.arg(&xp).arg(&wp).arg(&rp).arg(&dp).arg(&sp).arg(&op).arg(&pp).arg(&rows).arg(&d);
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: shapes, dtypes, contiguity and alignment checked; `threads` covers a row
        // (norm_threads); outputs freshly allocated.
        #[allow(unsafe_code)]
        unsafe { b.launch(cfg) }.map_err(|e| err("rmsnorm_bwd launch", e))?;
        Ok((dx, part.sum_dim_intlist([0i64].as_slice(), false, Kind::Float)))
    }

    /// RoPE in place on the query and key heads (the first `rot_heads`) of `qkv`
    /// `[batch, T, W]` (bf16, contiguous), with the model's `cos` / `signed_sin` tables
    /// `[positions, hd]`, at `positions` `[batch, T]` (i64) or `0..T`.
    pub fn rope_forward(
        &self,
        qkv: &Tensor,
        tables: (&Tensor, &Tensor),
        positions: Option<&Tensor>,
        rot_heads: i64,
        hd: i64,
    ) -> Result<(), WorkerError> {
        let size = qkv.size();
        let (batch, t, w) = (size[0], size[1], size[2]);
        let rows = batch * t;
        check_rows("qkv", qkv, rows, w, 4)?;
        check_tables(tables, hd, t, positions.is_some())?;
        if w % 2 != 0 || rot_heads * hd > w {
            return Err(err("qkv", (size, rot_heads, hd)));
        }
        let positions = positions.map(Tensor::contiguous);
        if let Some(p) = &positions {
            check("positions", p, Kind::Int64, rows)?;
        }
        if rows == 0 || rot_heads == 0 {
            return Ok(());
        }
        let (q, c, s, p) = (ptr(qkv), ptr(tables.0), ptr(tables.1), positions.as_ref().map_or(0u64, ptr));
        let (t32, w32, rh, hd32, max_pos) =
            (t as i32, w as i32, rot_heads as i32, hd as i32, tables.0.size()[0] as i32);
        let mut b = self.stream.launch_builder(&self.rope_fwd);
        b.arg(&q).arg(&c).arg(&s).arg(&p).arg(&t32).arg(&w32).arg(&rh).arg(&hd32).arg(&max_pos);
        // SAFETY: shapes, dtypes and alignment checked; one block per row, in place on the
        // caller's qkv.
        #[allow(unsafe_code)]
        unsafe { b.launch(per_row(rows, item_threads(rot_heads * hd / 4))) }.map_err(|e| err("rope_fwd launch", e))?;
        Ok(())
    }

    /// RoPE backward: the gradients `dq` `[B, H, T, hd]`, `dk` and `dv` `[B, K, T, hd]` (any
    /// even strides with a contiguous last dimension) as one `[B, T, (H + 2K)·hd]` bf16
    /// tensor, the layout of the qkv projection's output, with q and k rotated back.
    pub fn rope_backward_pack(
        &self,
        grads: [&Tensor; 3],
        tables: (&Tensor, &Tensor),
        positions: Option<&Tensor>,
    ) -> Result<Tensor, WorkerError> {
        let [dq, dk, dv] = grads;
        let (batch, heads, t, hd) = (dq.size()[0], dq.size()[1], dq.size()[2], dq.size()[3]);
        let kv_heads = dk.size()[1];
        for (name, g, h) in [("dq", dq, heads), ("dk", dk, kv_heads), ("dv", dv, kv_heads)] {
            let stride = g.stride();
            if g.size() != [batch, h, t, hd]
                || g.kind() != Kind::BFloat16
                || !matches!(g.device(), Device::Cuda(_))
                || stride[3] != 1
                || stride[..3].iter().any(|s| s % 2 != 0)
                || !ptr(g).is_multiple_of(4)
            {
                return Err(err(name, (g.size(), g.kind(), stride)));
            }
        }
        check_tables(tables, hd, t, positions.is_some())?;
        let rows = batch * t;
        let positions = positions.map(Tensor::contiguous);
        if let Some(p) = &positions {
            check("positions", p, Kind::Int64, rows)?;
        }
        let out = Tensor::empty([batch, t, (heads + 2 * kv_heads) * hd], (Kind::BFloat16, dq.device()));
        if rows == 0 {
            return Ok(out);
        }
        let [qs, ks, vs] = [dq.stride(), dk.stride(), dv.stride()];
        let (q, k, v, c, s, p, o) =
            (ptr(dq), ptr(dk), ptr(dv), ptr(tables.0), ptr(tables.1), positions.as_ref().map_or(0u64, ptr), ptr(&out));
        let (t32, h32, k32, hd32) = (t as i32, heads as i32, kv_heads as i32, hd as i32);
        let max_pos = tables.0.size()[0] as i32;
        let mut b = self.stream.launch_builder(&self.rope_bwd_pack);
        b.arg(&q).arg(&k).arg(&v);
        b.arg(&qs[0]).arg(&qs[1]).arg(&qs[2]).arg(&ks[0]).arg(&ks[1]).arg(&ks[2]).arg(&vs[0]).arg(&vs[1]).arg(&vs[2]);
        b.arg(&c).arg(&s).arg(&p).arg(&o).arg(&t32).arg(&h32).arg(&k32).arg(&hd32).arg(&max_pos);
        let threads = item_threads((heads + 2 * kv_heads) * hd / 4);
        // SAFETY: shapes, dtypes, strides and alignment checked (every index the kernel forms
        // lies in its tensor); one block per row; the output is freshly allocated.
        #[allow(unsafe_code)]
        unsafe { b.launch(per_row(rows, threads)) }.map_err(|e| err("rope_bwd_pack launch", e))?;
        Ok(out)
    }

    /// SwiGLU of `gate_up` `[.., 2F]` (bf16, gate then up; `F` a multiple of 4):
    /// `silu(gate) · up` `[.., F]`.
    pub fn swiglu_forward(&self, gate_up: &Tensor) -> Result<Tensor, WorkerError> {
        let (rows, two_f) = rows_dim(gate_up, 8)?;
        check_rows("gate_up", gate_up, rows, two_f, 8)?;
        let f = two_f / 2;
        let mut size = gate_up.size();
        *size.last_mut().expect("rows_dim checked") = f;
        let out = Tensor::empty(size.as_slice(), (Kind::BFloat16, gate_up.device()));
        if rows == 0 {
            return Ok(out);
        }
        let (g, o, f32_) = (ptr(gate_up), ptr(&out), f as i32);
        let mut b = self.stream.launch_builder(&self.swiglu_fwd);
        b.arg(&g).arg(&o).arg(&f32_);
        // SAFETY: shape, dtype, contiguity and alignment checked; one block per row; output
        // freshly allocated.
        #[allow(unsafe_code)]
        unsafe { b.launch(per_row(rows, item_threads(f / 4))) }.map_err(|e| err("swiglu_fwd launch", e))?;
        Ok(out)
    }

    /// SwiGLU backward: `d gate_up` `[.., 2F]` for `d_out` `[.., F]`.
    pub fn swiglu_backward(&self, gate_up: &Tensor, d_out: &Tensor) -> Result<Tensor, WorkerError> {
        let (rows, two_f) = rows_dim(gate_up, 8)?;
        check_rows("gate_up", gate_up, rows, two_f, 8)?;
        check_rows("d_out", d_out, rows, two_f / 2, 8)?;
        let f = two_f / 2;
        let out = gate_up.empty_like();
        if rows == 0 {
            return Ok(out);
        }
        let (g, d, o, f32_) = (ptr(gate_up), ptr(d_out), ptr(&out), f as i32);
        let mut b = self.stream.launch_builder(&self.swiglu_bwd);
        b.arg(&g).arg(&d).arg(&o).arg(&f32_);
        // SAFETY: shapes, dtypes, contiguity and alignment checked; one block per row; output
        // freshly allocated.
        #[allow(unsafe_code)]
        unsafe { b.launch(per_row(rows, item_threads(f / 4))) }.map_err(|e| err("swiglu_bwd launch", e))?;
        Ok(out)
    }
}

/// Columns each thread of the RMSNorm kernels holds (`NORM_QUADS` quads in kernels.cu).
const NORM_COLUMNS_PER_THREAD: i64 = 16;

/// Threads per block of the RMSNorm kernels for rows of `dim`: whole warps, each thread
/// holding at most [`NORM_COLUMNS_PER_THREAD`] columns.
fn norm_threads(dim: i64) -> Result<u32, WorkerError> {
    if dim > RMSNORM_MAX_DIM {
        return Err(err("rmsnorm", format!("rows of {dim} exceed {RMSNORM_MAX_DIM}")));
    }
    let columns_per_warp = 32 * NORM_COLUMNS_PER_THREAD;
    Ok(((dim.max(1) + columns_per_warp - 1) / columns_per_warp) as u32 * 32)
}

/// Threads per block for `items` per row: whole warps, at most [`THREADS`].
fn item_threads(items: i64) -> u32 {
    (items.max(1) as u32).div_ceil(32).min(THREADS / 32) * 32
}

/// One block of `threads` per row.
fn per_row(rows: i64, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// `(rows, last dimension)` of `t`; the last dimension must be a multiple of `multiple`
/// (bf16 values are loaded several to a word), and rows fit a grid of one block per row.
fn rows_dim(t: &Tensor, multiple: i64) -> Result<(i64, i64), WorkerError> {
    let size = t.size();
    let last = *size.last().ok_or_else(|| err("a block kernel's input", "a scalar"))?;
    if last % multiple != 0 {
        return Err(err("a block kernel's input", format!("row length {last} is not a multiple of {multiple}")));
    }
    let rows = t.numel() as i64 / last.max(1);
    if rows > i32::MAX as i64 {
        return Err(err("a block kernel's input", format!("{rows} rows")));
    }
    Ok((rows, last))
}

/// A contiguous CUDA bf16 tensor of `rows × cols` elements whose data is aligned to
/// `align` bytes (the widest load the kernels make from it).
fn check_rows(name: &str, t: &Tensor, rows: i64, cols: i64, align: u64) -> Result<(), WorkerError> {
    check(name, t, Kind::BFloat16, rows * cols)?;
    if !ptr(t).is_multiple_of(align) {
        return Err(err(name, format!("data not aligned to {align} bytes")));
    }
    Ok(())
}

/// RoPE tables: contiguous bf16 `[positions, hd]` covering `t` positions (or any, with
/// explicit positions, which the kernels clamp to the tables), `hd` a multiple of 4.
fn check_tables(tables: (&Tensor, &Tensor), hd: i64, t: i64, explicit_positions: bool) -> Result<(), WorkerError> {
    for (name, table) in [("cos", tables.0), ("signed_sin", tables.1)] {
        let size = table.size();
        let positions = size.first().copied().unwrap_or(0);
        check_rows(name, table, positions, hd, 4)?;
        if size.len() != 2 || (!explicit_positions && positions < t) || hd % 4 != 0 || positions > i32::MAX as i64 {
            return Err(err(name, (size, hd, t)));
        }
    }
    Ok(())
}

/// Whether the NVRTC library can be opened.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    #[allow(unsafe_code)]
    unsafe {
        cudarc::nvrtc::sys::is_culib_present()
    }
}

/// Compiles the kernels to PTX for compute capability `major.minor` (no GPU needed, only
/// the NVRTC library); returns the PTX text.
pub fn compile_ptx(major: i32, minor: i32) -> Result<cudarc::nvrtc::Ptx, WorkerError> {
    if !nvrtc_present() {
        return Err(WorkerError::Device(
            "fused kernels: the NVRTC library (libnvrtc) was not found; it ships in torch's nvidia/cu13/lib, \
             see `moxin-train doctor`"
                .into(),
        ));
    }
    let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
    let opts = cudarc::nvrtc::CompileOptions { arch: Some(arch), ..Default::default() };
    cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts).map_err(|e| err("NVRTC compilation", e))
}

/// Names of the kernels in the source.
pub const KERNEL_NAMES: [&str; 10] = [
    "adamw_g32",
    "adamw_g16",
    "ce_row_stats",
    "ce_grad",
    "rmsnorm_fwd",
    "rmsnorm_bwd",
    "rope_fwd",
    "rope_bwd_pack",
    "swiglu_fwd",
    "swiglu_bwd",
];

/// The widest row the RMSNorm kernels take: a block of at most 1024 threads holds a row in
/// registers, [`NORM_COLUMNS_PER_THREAD`] columns each.
pub const RMSNORM_MAX_DIM: i64 = 1024 * NORM_COLUMNS_PER_THREAD;

/// Scalars of one AdamW step (see [`Kernels::adamw_on`]).
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// 1 − lr · weight_decay.
    pub decay: f32,
    /// β1.
    pub beta1: f32,
    /// β2.
    pub beta2: f32,
    /// ε.
    pub eps: f32,
    /// lr / (1 − β1^t).
    pub step_size: f32,
    /// 1 / sqrt(1 − β2^t).
    pub inv_bias2_sqrt: f32,
    /// Gradient multiplier (the clipping factor).
    pub grad_scale: f32,
}

fn ptr(t: &Tensor) -> u64 {
    t.data_ptr() as u64
}

fn check(name: &str, t: &Tensor, kind: Kind, numel: i64) -> Result<(), WorkerError> {
    if !matches!(t.device(), Device::Cuda(_)) || t.kind() != kind || !t.is_contiguous() || t.numel() as i64 != numel {
        return Err(WorkerError::Device(format!(
            "fused kernel argument {name}: expected a contiguous CUDA {kind:?} tensor of {numel} elements, got {:?} {:?} {:?}",
            t.device(),
            t.kind(),
            t.size()
        )));
    }
    Ok(())
}
