//! Fused CUDA kernels, compiled at run time with NVRTC (shipped with torch's CUDA
//! libraries) for the device in use, and launched on torch's stream (the legacy default
//! stream), so they are ordered with torch's own kernels. Switched on by
//! `runtime.kernels = "fused"`; each has an ATen equivalent that is the reference in
//! `moxin-train bench kernels` and the GPU check script.
//!
//! * AdamW over the flat partition in one pass (gradient clip factor, weight decay, bias
//!   correction, and the bf16 copy of the updated weights folded in);
//! * cross-entropy in two passes over bf16 logits (row log-sum-exp and target log-prob;
//!   then the gradient in place), so the head never materialises fp32 logits.

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
            sm_count,
        })
    }

    fn grid_for(&self, n: i64) -> LaunchConfig {
        let blocks = (n as u64).div_ceil(THREADS as u64).min(self.sm_count as u64 * 8).max(1) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    /// One AdamW step on the partition: `master`, `exp_avg`, `exp_avg_sq` (fp32, `n`
    /// elements) and `grad` (fp32 or bf16, `n` elements) times `grad_scale`; elements
    /// `[0, decay_end)` are decayed by `decay` (= 1 − lr·wd); writes the updated weights as
    /// bf16 into `out` when given.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw(
        &self,
        master: &Tensor,
        exp_avg: &Tensor,
        exp_avg_sq: &Tensor,
        grad: &Tensor,
        out: Option<&Tensor>,
        decay_end: i64,
        hyper: AdamWStep,
    ) -> Result<(), WorkerError> {
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
        let mut b = self.stream.launch_builder(func);
        b.arg(&p).arg(&m).arg(&v).arg(&g).arg(&o).arg(&n).arg(&decay_end);
        b.arg(&hyper.decay).arg(&hyper.beta1).arg(&hyper.beta2).arg(&hyper.eps);
        b.arg(&hyper.step_size).arg(&hyper.inv_bias2_sqrt).arg(&hyper.grad_scale);
        // SAFETY: every pointer addresses `n` live elements of the kernel's types on this
        // device (checked above); the tensors outlive the launch (stream-ordered use).
        #[allow(unsafe_code)]
        unsafe { b.launch(self.grid_for(n)) }.map_err(|e| err("adamw launch", e))?;
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
pub const KERNEL_NAMES: [&str; 4] = ["adamw_g32", "adamw_g16", "ce_row_stats", "ce_grad"];

/// Scalars of one AdamW step (see [`Kernels::adamw`]).
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
