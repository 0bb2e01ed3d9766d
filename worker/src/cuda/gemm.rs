//! GEMMs through cuBLASLt with each problem's algorithm chosen by timing (`runtime.gemm =
//! "tuned"`), the way `torch.compile`'s max-autotune or a hand-tuned trainer picks kernels.
//!
//! Why: ATen asks cuBLAS for one algorithm per call from its heuristics. A GPU kernel trace
//! of the training step (BENCHMARKS.md) put the step's GEMMs at ~710 TFLOP/s against ~750
//! for compile's, and the GEMMs are where the rest of the gap to compile is. Here every
//! distinct problem (shapes, strides, dtypes, alignment) is timed once over cuBLASLt's top
//! candidates and the fastest one is kept for the rest of the run.
//!
//! The step's GEMMs call [`mm`], [`mm_into`], [`addmm`] and [`addmm_`]: ATen's own calls
//! unless [`install`] has switched the process to the tuned engine, and ATen's again for
//! anything the engine does not take (CPU tensors, fp32 inputs, degenerate or unsupported
//! strides, a cuBLASLt error — logged once per problem). libtorch launches on the legacy
//! default stream, so the engine does too: its GEMMs are ordered with torch's kernels.
//!
//! Tensors are row-major; cuBLASLt is column-major. `D = A·B` row-major is `Dᵀ = Bᵀ·Aᵀ`
//! column-major, and a row-major matrix with row stride `ld` is its transpose stored
//! column-major with the same `ld`, so [`Problem::of`] passes B as cuBLASLt's first operand
//! and A as its second, each transposed or not by its strides, without copying anything.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublaslt as lt;

use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::WorkerError;

/// `a · b` `[rows(a), cols(b)]` in `a`'s dtype.
pub fn mm(a: &Tensor, b: &Tensor) -> Tensor {
    if engaged(a) && a.dim() == 2 && b.dim() == 2 {
        let d = Tensor::empty([a.size()[0], b.size()[1]], (a.kind(), a.device()));
        if run(&d, a, b, None) {
            return d;
        }
    }
    a.mm(b)
}

/// `d = a · b`, written into `d` (which may be a strided view, e.g. a block of columns).
pub fn mm_into(d: &Tensor, a: &Tensor, b: &Tensor) {
    if !(engaged(a) && run(d, a, b, None)) {
        let _ = a.mm_out(d, b);
    }
}

/// `c + a · b` as a new tensor: one GEMM with β = 1 reading `c`.
pub fn addmm(c: &Tensor, a: &Tensor, b: &Tensor) -> Tensor {
    if engaged(a) {
        let d = Tensor::empty(c.size(), (c.kind(), c.device()));
        if run(&d, a, b, Some(c)) {
            return d;
        }
    }
    c.addmm(a, b)
}

/// `d += a · b` in place.
pub fn addmm_(d: &Tensor, a: &Tensor, b: &Tensor) {
    if !(engaged(a) && run(d, a, b, Some(d))) {
        let _ = d.shallow_clone().addmm_(a, b);
    }
}

/// `d = a · b`, or `d += a · b` with `accumulate`, on the tuned engine: false when it is
/// not installed or does not take the problem (nothing was done; the caller runs ATen).
pub fn try_product(d: &Tensor, a: &Tensor, b: &Tensor, accumulate: bool) -> bool {
    engaged(a) && run(d, a, b, accumulate.then_some(d))
}

/// Whether the tuned engine is installed and `a` is on a GPU.
pub fn engaged(a: &Tensor) -> bool {
    // An atomic, not the lock: every GEMM of a GPU step asks, installed or not.
    a.device() != Device::Cpu && INSTALLED.load(Ordering::Relaxed)
}

/// Switches this process's GEMMs (the calls above) to cuBLASLt with tuned algorithms on
/// device `ordinal`, trying up to `candidates` of cuBLASLt's heuristic picks per problem.
pub fn install(ordinal: usize, candidates: usize) -> Result<(), WorkerError> {
    let mut slot = ENGINE.lock().map_err(|_| WorkerError::Device("the GEMM engine's lock is poisoned".into()))?;
    match slot.as_ref() {
        None => {
            *slot = Some(Engine::new(ordinal, candidates.clamp(1, 64))?);
            INSTALLED.store(true, Ordering::Relaxed);
        }
        Some(e) if e.ordinal != ordinal => {
            return Err(WorkerError::Device(format!(
                "the tuned GEMM engine serves CUDA device {} in this process; device {ordinal} was asked for",
                e.ordinal
            )))
        }
        Some(_) => {}
    }
    Ok(())
}

/// What the engine tuned so far: per problem its dimensions, cuBLASLt's first pick's and
/// the chosen algorithm's time, and how many candidates ran. `None` when not installed.
pub fn report() -> Option<Value> {
    let engine = ENGINE.lock().ok()?;
    let engine = engine.as_ref()?;
    let mut problems: Vec<Value> = engine
        .plans
        .iter()
        .filter_map(|(p, plan)| plan.as_ref().ok().map(|plan| (p, plan)))
        .map(|(p, plan)| {
            json!({
                "m": p.m, "n": p.n, "k": p.k, "trans_a": p.a.transposed, "trans_b": p.b.transposed,
                "out": format!("{:?}", p.out), "adds_c": p.c.is_some(),
                "first_pick_ms": plan.first_pick_ms, "chosen_ms": plan.chosen_ms,
                "candidates": plan.candidates, "chosen": plan.chosen,
            })
        })
        .collect();
    // Longest first; untimed ones (accumulating in place, null times) last.
    let ms = |v: &Value| v["first_pick_ms"].as_f64().unwrap_or(-1.0);
    problems.sort_by(|a, b| ms(b).total_cmp(&ms(a)));
    Some(json!({ "problems": problems, "fallbacks": engine.fallbacks }))
}

/// One line on what tuning gained: problems timed, and the sum over them of one call with
/// cuBLASLt's first pick against one with the chosen algorithm. `None` when not installed.
pub fn summary() -> Option<String> {
    let engine = ENGINE.lock().ok()?;
    let engine = engine.as_ref()?;
    let timed: Vec<&Plan> = engine
        .plans
        .values()
        .filter_map(|p| p.as_ref().ok())
        .filter(|p| p.tuned && p.first_pick_ms.is_finite())
        .collect();
    let first: f64 = timed.iter().map(|p| p.first_pick_ms).sum();
    let chosen: f64 = timed.iter().map(|p| p.chosen_ms).sum();
    Some(format!(
        "{} GEMM problems timed; one call of each takes {chosen:.2} ms with the chosen algorithms, {first:.2} ms \
         with cuBLASLt's first picks ({:.3}x); {} problems run on libtorch's GEMMs instead",
        timed.len(),
        first / chosen.max(1e-9),
        engine.fallbacks
    ))
}

/// One operand as cuBLASLt reads it: stored column-major `rows × cols` with leading
/// dimension `ld`, and used transposed or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Operand {
    /// Rows of the stored (column-major) matrix.
    pub rows: i64,
    /// Columns of the stored matrix.
    pub cols: i64,
    /// Elements between the starts of consecutive stored columns.
    pub ld: i64,
    /// Whether the product uses the stored matrix transposed.
    pub transposed: bool,
}

/// One GEMM problem in cuBLASLt's terms: `D (m × n) = op(A) (m × k) · op(B) (k × n) [+ C]`,
/// column-major, where cuBLASLt's A is the caller's `b` and its B the caller's `a`. Two
/// calls with equal problems can share one algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Problem {
    /// Rows of D (the caller's columns).
    pub m: i64,
    /// Columns of D (the caller's rows).
    pub n: i64,
    /// The inner dimension.
    pub k: i64,
    /// cuBLASLt's A: the caller's `b`.
    pub a: Operand,
    /// cuBLASLt's B: the caller's `a`.
    pub b: Operand,
    /// C's leading dimension (same shape and dtype as D), when the product adds to it.
    pub c: Option<i64>,
    /// D's leading dimension (the caller's row stride).
    pub ldd: i64,
    /// A's and B's dtype (bf16 or fp16).
    pub input: Kind,
    /// C's and D's dtype (the inputs' or fp32).
    pub out: Kind,
    /// The largest power of two (≤ 16 bytes) dividing each pointer: A, B, C, D.
    pub align: [u8; 4],
}

/// How a row-major `rows × cols` matrix with strides `(s0, s1)` is stored in column-major
/// terms: `Some((transposed, ld))` where `transposed` means the storage holds the matrix
/// itself column-major (its strides are `(1, ld)`), else its transpose (`(ld, 1)`).
fn storage(rows: i64, cols: i64, s0: i64, s1: i64) -> Option<(bool, i64)> {
    if rows < 2 || cols < 2 {
        return None; // size-1 dimensions have arbitrary strides; ATen handles them
    }
    if s1 == 1 && s0 >= cols {
        Some((false, s0))
    } else if s0 == 1 && s1 >= rows {
        Some((true, s1))
    } else {
        None
    }
}

fn alignment(ptr: usize) -> u8 {
    (1u8..=16).rev().filter(|a| a.is_power_of_two()).find(|&a| ptr.is_multiple_of(a as usize)).unwrap_or(1)
}

impl Problem {
    /// The problem for `d = a · b [+ c]` on row-major tensors, or `None` when the engine
    /// does not take it (shapes or strides it cannot express, dtypes other than bf16/fp16
    /// inputs with a same-dtype or fp32 output).
    pub fn of(d: &Tensor, a: &Tensor, b: &Tensor, c: Option<&Tensor>) -> Option<Problem> {
        let (sa, sb, sd) = (a.size(), b.size(), d.size());
        if sa.len() != 2 || sb.len() != 2 || sd.len() != 2 || sa[1] != sb[0] || sd != [sa[0], sb[1]] {
            return None;
        }
        let (input, out) = (a.kind(), d.kind());
        if !matches!(input, Kind::BFloat16 | Kind::Half) || b.kind() != input || !(out == input || out == Kind::Float) {
            return None;
        }
        let (r, c_cols, inner) = (sa[0], sb[1], sa[1]);
        let (ta, lda) = strides_of(a)?;
        let (tb, ldb) = strides_of(b)?;
        let (td, ldd) = strides_of(d)?;
        if td {
            return None; // D must be row-major: it is cuBLASLt's column-major Dᵀ
        }
        let ldc = match c {
            None => None,
            Some(c) => {
                if c.size() != sd || c.kind() != out {
                    return None;
                }
                let (tc, ldc) = strides_of(c)?;
                if tc {
                    return None;
                }
                Some(ldc)
            }
        };
        // cuBLASLt's A is our B: op(A) must be Bᵀ (c_cols × inner). B row-major is stored
        // as Bᵀ (no transpose); B column-major is stored as B (transpose it).
        let lt_a = if tb {
            Operand { rows: inner, cols: c_cols, ld: ldb, transposed: true }
        } else {
            Operand { rows: c_cols, cols: inner, ld: ldb, transposed: false }
        };
        // cuBLASLt's B is our A: op(B) must be Aᵀ (inner × r).
        let lt_b = if ta {
            Operand { rows: r, cols: inner, ld: lda, transposed: true }
        } else {
            Operand { rows: inner, cols: r, ld: lda, transposed: false }
        };
        let ptr = |t: &Tensor| t.data_ptr() as usize;
        let align_d = alignment(ptr(d));
        let align = [alignment(ptr(b)), alignment(ptr(a)), c.map_or(align_d, |c| alignment(ptr(c))), align_d];
        Some(Problem { m: c_cols, n: r, k: inner, a: lt_a, b: lt_b, c: ldc, ldd, input, out, align })
    }
}

fn strides_of(t: &Tensor) -> Option<(bool, i64)> {
    let (size, stride) = (t.size(), t.stride());
    storage(size[0], size[1], stride[0], stride[1])
}

static ENGINE: Mutex<Option<Engine>> = Mutex::new(None);
/// Whether `ENGINE` holds an engine (set once, never cleared).
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// One call's tensors: `d = a · b [+ c]`.
#[derive(Clone, Copy)]
struct Operands<'t> {
    d: &'t Tensor,
    a: &'t Tensor,
    b: &'t Tensor,
    c: Option<&'t Tensor>,
}

/// Runs `d = a·b [+ c]` on the engine; false when it does not take the problem (the caller
/// runs ATen). With `c` aliasing `d` (accumulation) the problem is not timed (timing would
/// add to `d` again). Its descriptors are those of the same product written without C (C's
/// layout is D's), so it shares that problem's plan: tuned when that product has run
/// unaliased (a first micro-batch's overwrite), cuBLASLt's first pick until then.
fn run(d: &Tensor, a: &Tensor, b: &Tensor, c: Option<&Tensor>) -> bool {
    let Some(problem) = Problem::of(d, a, b, c) else { return false };
    let Ok(mut slot) = ENGINE.lock() else { return false };
    let Some(engine) = slot.as_mut() else { return false };
    // Every operand on the engine's device: cuBLASLt runs in the current context.
    let device = Device::Cuda(engine.ordinal);
    if [d, a, b].into_iter().chain(c).any(|t| t.device() != device) {
        return false;
    }
    let aliased = c.is_some_and(|c| c.data_ptr() == d.data_ptr());
    let problem = if aliased { Problem { c: None, ..problem } } else { problem };
    match engine.plans.get(&problem) {
        Some(Err(_)) => return false, // refused before, and logged then
        None if engine.plans.len() >= MAX_PROBLEMS => return false, // shapes that keep changing
        _ => {}
    }
    match engine.matmul(&problem, Operands { d, a, b, c }, aliased) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("tuned GEMM {problem:?} runs on libtorch's GEMM instead: {e}");
            engine.fallbacks += 1;
            engine.plans.insert(problem, Err(e.to_string()));
            false
        }
    }
}

/// cuBLASLt heuristic candidates timed per problem.
pub const CANDIDATES: usize = 16;
/// Bytes of device workspace cuBLASLt may use (what PyTorch gives cuBLAS on Hopper).
const WORKSPACE: usize = 32 << 20;
/// Timed launches per candidate, after one untimed.
const REPEATS: usize = 3;
/// Distinct problems the engine plans; later new ones run on libtorch's GEMMs (a training
/// step has a few dozen; this bounds a run whose shapes keep changing).
const MAX_PROBLEMS: usize = 512;

/// The cuBLASLt handle, a workspace and the plans of this process.
struct Engine {
    ordinal: usize,
    handle: Handle,
    ctx: Arc<cudarc::driver::CudaContext>,
    workspace: Tensor,
    candidates: usize,
    plans: HashMap<Problem, Result<Plan, String>>,
    /// Problems refused (each logged once).
    fallbacks: u64,
}

// SAFETY: the cuBLASLt handle and descriptors are raw pointers that cuBLASLt lets any one
// thread use at a time; they are only reached through `ENGINE`'s lock.
#[allow(unsafe_code)]
unsafe impl Send for Engine {}

struct Handle(lt::sys::cublasLtHandle_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by `create_handle` and dropped once.
        #[allow(unsafe_code)]
        let _ = unsafe { lt::result::destroy_handle(self.0) };
    }
}

/// A problem's descriptors and chosen algorithm.
struct Plan {
    desc: lt::sys::cublasLtMatmulDesc_t,
    /// cuBLASLt's A, B, C, D; C is null when the product adds nothing or adds to D in
    /// place, and D's layout serves as C's (as cuBLASLt documents for C = D).
    layouts: [lt::sys::cublasLtMatrixLayout_t; 4],
    algo: lt::sys::cublasLtMatmulAlgo_t,
    /// False when only cuBLASLt's first pick was taken (first seen accumulating in place).
    tuned: bool,
    first_pick_ms: f64,
    chosen_ms: f64,
    candidates: usize,
    chosen: usize,
}

impl Plan {
    fn c_layout(&self) -> lt::sys::cublasLtMatrixLayout_t {
        if self.layouts[2].is_null() {
            self.layouts[3]
        } else {
            self.layouts[2]
        }
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created for this plan and is destroyed once.
        #[allow(unsafe_code)]
        unsafe {
            let _ = lt::result::destroy_matmul_desc(self.desc);
            for l in self.layouts.into_iter().filter(|l| !l.is_null()) {
                let _ = lt::result::destroy_matrix_layout(l);
            }
        }
    }
}

fn data_type(kind: Kind) -> lt::sys::cudaDataType {
    match kind {
        Kind::BFloat16 => lt::sys::cudaDataType::CUDA_R_16BF,
        Kind::Half => lt::sys::cudaDataType::CUDA_R_16F,
        _ => lt::sys::cudaDataType::CUDA_R_32F,
    }
}

fn lt_err(what: &str) -> impl Fn(lt::result::CublasError) -> WorkerError + '_ {
    move |e| WorkerError::Device(format!("cuBLASLt {what}: {e:?}"))
}

impl Engine {
    fn new(ordinal: usize, candidates: usize) -> Result<Engine, WorkerError> {
        // SAFETY: only tries to dlopen cuBLASLt by its usual names. libtorch has loaded its
        // own (pip's libcublasLt.so.13), and `libraries::plan` put a `libcublasLt.so` link to
        // that file first in the search path, so the loader returns the copy already mapped.
        #[allow(unsafe_code)]
        if !unsafe { lt::sys::is_culib_present() } {
            return Err(WorkerError::Device(
                "runtime.gemm = \"tuned\" needs cuBLASLt (libcublasLt.so), which was not found beside libtorch \
                 or in the loader's path; use runtime.gemm = \"aten\""
                    .into(),
            ));
        }
        // Two cuBLASLt libraries in one process (a CUDA toolkit's beside torch's) would each
        // keep their own state; refuse rather than run on the other one.
        let mapped = super::libraries::mapped_libraries("libcublasLt.so");
        if mapped.len() > 1 {
            return Err(WorkerError::Device(format!(
                "runtime.gemm = \"tuned\": this process has two cuBLASLt libraries mapped ({}); put the one \
                 beside libtorch first in LD_LIBRARY_PATH or use runtime.gemm = \"aten\"",
                mapped.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
        let ctx = super::context(ordinal)?;
        ctx.bind_to_thread().map_err(|e| WorkerError::Device(format!("CUDA device {ordinal}: {e:?}")))?;
        let handle = Handle(lt::result::create_handle().map_err(lt_err("handle"))?);
        let workspace = Tensor::f_empty([WORKSPACE as i64], (Kind::Uint8, Device::Cuda(ordinal)))
            .map_err(|e| WorkerError::Device(format!("the tuned GEMMs' {WORKSPACE}-byte workspace: {e}")))?;
        Ok(Engine { ordinal, handle, ctx, workspace, candidates, plans: HashMap::new(), fallbacks: 0 })
    }

    fn matmul(&mut self, p: &Problem, ops: Operands<'_>, aliased: bool) -> Result<(), WorkerError> {
        self.ctx.bind_to_thread().map_err(|e| WorkerError::Device(format!("CUDA device {}: {e:?}", self.ordinal)))?;
        match self.plans.get(p) {
            Some(Err(e)) => return Err(WorkerError::Device(e.clone())),
            None => {
                let plan = self.plan(p, ops, aliased)?;
                self.plans.insert(*p, Ok(plan));
            }
            // First seen accumulating in place, now unaliased: time it now, keeping the
            // first pick if that fails.
            Some(Ok(plan)) if !plan.tuned && !aliased => {
                if let Ok(plan) = self.plan(p, ops, aliased) {
                    self.plans.insert(*p, Ok(plan));
                }
            }
            Some(Ok(_)) => {}
        }
        match self.plans.get(p) {
            Some(Ok(plan)) => self.launch(plan, &plan.algo, ops).map_err(lt_err("matmul")),
            _ => Err(WorkerError::Device(format!("no plan for {p:?}"))),
        }
    }

    /// Descriptors for `p`, cuBLASLt's candidates, and (unless `aliased`) each timed on
    /// the call's own operands, the fastest kept.
    fn plan(&self, p: &Problem, ops: Operands<'_>, aliased: bool) -> Result<Plan, WorkerError> {
        use lt::sys::cublasLtMatmulDescAttributes_t as DescAttr;
        use lt::sys::cublasLtMatmulPreferenceAttributes_t as PrefAttr;
        let desc =
            lt::result::create_matmul_desc(lt::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, data_type(Kind::Float))
                .map_err(lt_err("matmul descriptor"))?;
        let layout = |kind: Kind, rows: i64, cols: i64, ld: i64| {
            lt::result::create_matrix_layout(data_type(kind), rows as u64, cols as u64, ld).map_err(lt_err("layout"))
        };
        let mut plan = Plan {
            desc,
            layouts: [std::ptr::null_mut(); 4],
            algo: lt::sys::cublasLtMatmulAlgo_t { data: [0; 8] },
            tuned: !aliased,
            first_pick_ms: f64::NAN,
            chosen_ms: f64::NAN,
            candidates: 0,
            chosen: 0,
        };
        // Filled one by one so that `plan`'s Drop frees whatever was created on an error.
        plan.layouts[0] = layout(p.input, p.a.rows, p.a.cols, p.a.ld)?;
        plan.layouts[1] = layout(p.input, p.b.rows, p.b.cols, p.b.ld)?;
        plan.layouts[3] = layout(p.out, p.m, p.n, p.ldd)?;
        if let Some(ldc) = p.c {
            plan.layouts[2] = layout(p.out, p.m, p.n, ldc)?;
        }
        let c_layout = plan.c_layout();
        let pref = lt::result::create_matmul_pref().map_err(lt_err("preference"))?;
        let mut found = vec![
            lt::sys::cublasLtMatmulHeuristicResult_t {
                algo: lt::sys::cublasLtMatmulAlgo_t { data: [0; 8] },
                workspaceSize: 0,
                state: lt::sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED,
                wavesCount: 0.0,
                reserved: [0; 4],
            };
            self.candidates
        ];
        let mut count: std::ffi::c_int = 0;
        // SAFETY: every descriptor is live; attribute buffers have the sizes passed; `found`
        // holds `candidates` results.
        #[allow(unsafe_code)]
        let heuristics = unsafe {
            let ops = [
                (DescAttr::CUBLASLT_MATMUL_DESC_TRANSA, p.a.transposed),
                (DescAttr::CUBLASLT_MATMUL_DESC_TRANSB, p.b.transposed),
            ];
            let mut status = Ok(());
            for (attr, transposed) in ops {
                let op: i32 = transposed.into();
                status = status.and_then(|()| {
                    lt::result::set_matmul_desc_attribute(
                        desc,
                        attr,
                        (&op as *const i32).cast(),
                        std::mem::size_of::<i32>(),
                    )
                });
            }
            let bytes = WORKSPACE as u64;
            status = status.and_then(|()| {
                lt::result::set_matmul_pref_attribute(
                    pref,
                    PrefAttr::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    (&bytes as *const u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            });
            let aligns = [
                PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ];
            for (attr, align) in aligns.into_iter().zip(p.align) {
                let align = u32::from(align);
                status = status.and_then(|()| {
                    lt::result::set_matmul_pref_attribute(
                        pref,
                        attr,
                        (&align as *const u32).cast(),
                        std::mem::size_of::<u32>(),
                    )
                });
            }
            let status = status.and_then(|()| {
                lt::sys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle.0,
                    desc,
                    plan.layouts[0],
                    plan.layouts[1],
                    c_layout,
                    plan.layouts[3],
                    pref,
                    self.candidates as std::ffi::c_int,
                    found.as_mut_ptr(),
                    &mut count,
                )
                .result()
            });
            let _ = lt::result::destroy_matmul_pref(pref);
            status
        };
        heuristics.map_err(lt_err("heuristics"))?;
        let usable: Vec<lt::sys::cublasLtMatmulAlgo_t> = found[..(count.max(0) as usize).min(found.len())]
            .iter()
            .filter(|r| r.state == lt::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS && r.workspaceSize <= WORKSPACE)
            .map(|r| r.algo)
            .collect();
        let Some(first) = usable.first() else {
            return Err(WorkerError::Device(format!("cuBLASLt has no algorithm for {p:?}")));
        };
        plan.algo = *first;
        if aliased {
            return Ok(plan); // timing would add the product to `d` again
        }
        let stream = self.ctx.default_stream();
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut best = f64::INFINITY;
        for (i, algo) in usable.iter().enumerate() {
            let timed = (|| -> Result<f64, String> {
                self.launch(&plan, algo, ops).map_err(|e| format!("{e:?}"))?;
                let start = stream.record_event(flags).map_err(|e| format!("{e:?}"))?;
                for _ in 0..REPEATS {
                    self.launch(&plan, algo, ops).map_err(|e| format!("{e:?}"))?;
                }
                let end = stream.record_event(flags).map_err(|e| format!("{e:?}"))?;
                Ok(f64::from(start.elapsed_ms(&end).map_err(|e| format!("{e:?}"))?) / REPEATS as f64)
            })();
            // A candidate that fails is skipped; the others still compete.
            let Ok(ms) = timed else { continue };
            if i == 0 {
                plan.first_pick_ms = ms;
            }
            plan.candidates += 1;
            if ms < best {
                (best, plan.algo, plan.chosen) = (ms, *algo, i);
            }
        }
        if plan.candidates == 0 {
            return Err(WorkerError::Device(format!("no cuBLASLt algorithm ran for {p:?}")));
        }
        plan.chosen_ms = best;
        Ok(plan)
    }

    fn launch(
        &self,
        plan: &Plan,
        algo: &lt::sys::cublasLtMatmulAlgo_t,
        ops: Operands<'_>,
    ) -> Result<(), lt::result::CublasError> {
        let Operands { d, a, b, c } = ops;
        let (alpha, beta) = (1.0f32, if c.is_some() { 1.0f32 } else { 0.0 });
        let c_ptr = c.map_or(d.data_ptr(), Tensor::data_ptr);
        // SAFETY: the plan's descriptors describe these tensors (`Problem::of` built them
        // from their sizes and strides), which stay alive for the call; the workspace holds
        // WORKSPACE bytes; the null stream is libtorch's.
        #[allow(unsafe_code)]
        unsafe {
            lt::result::matmul(
                self.handle.0,
                plan.desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                b.data_ptr(),
                plan.layouts[0],
                a.data_ptr(),
                plan.layouts[1],
                c_ptr,
                plan.c_layout(),
                d.data_ptr(),
                plan.layouts[3],
                algo,
                self.workspace.data_ptr(),
                WORKSPACE,
                std::ptr::null_mut(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cuBLASLt's semantics on raw column-major storage, in f64: `D = op(A)·op(B) (+ C)`.
    fn reference(p: &Problem, a: &[f64], b: &[f64], c: Option<&[f64]>, d: &mut [f64]) {
        let at = |o: &Operand, buf: &[f64], i: i64, j: i64| {
            // element (i, j) of op(X)
            let (r, c) = if o.transposed { (j, i) } else { (i, j) };
            buf[(r + c * o.ld) as usize]
        };
        for i in 0..p.m {
            for j in 0..p.n {
                let mut s: f64 = (0..p.k).map(|q| at(&p.a, a, i, q) * at(&p.b, b, q, j)).sum();
                if let (Some(ldc), Some(c)) = (p.c, c) {
                    s += c[(i + j * ldc) as usize];
                }
                d[(i + j * p.ldd) as usize] = s;
            }
        }
    }

    /// The storage a view reads, from its first element (views here start at offset 0
    /// of `base` or at `offset`).
    fn flat(base: &Tensor, offset: i64) -> Vec<f64> {
        let all: Vec<f64> = Vec::try_from(base.reshape([-1]).to_kind(Kind::Double)).unwrap();
        all[offset as usize..].to_vec()
    }

    #[test]
    fn problems_map_row_major_views_onto_cublaslt_operands() {
        tch::manual_seed(5);
        let bf = |s: &[i64]| Tensor::randn(s, (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        // a: plain [6, 5], a transposed view of [5, 6], a block of columns of [6, 9]
        // (offset 2); b likewise. d: plain or a block of columns of a wider output.
        let a_bases = [(bf(&[6, 5]), "plain"), (bf(&[5, 6]), "transposed"), (bf(&[6, 9]), "columns")];
        let b_bases = [(bf(&[5, 7]), "plain"), (bf(&[7, 5]), "transposed"), (bf(&[5, 10]), "columns")];
        let view = |t: &Tensor, how: &str| match how {
            "plain" => (t.shallow_clone(), 0),
            "transposed" => (t.tr(), 0),
            _ => (t.narrow(1, 2, t.size()[1] - if t.size()[0] == 6 { 4 } else { 3 }), 2),
        };
        for (a_base, a_how) in &a_bases {
            for (b_base, b_how) in &b_bases {
                for (d_wide, accumulate) in [(false, false), (true, false), (false, true), (true, true)] {
                    let (a, a_off) = view(a_base, a_how);
                    let (b, b_off) = view(b_base, b_how);
                    assert_eq!((a.size(), b.size()), (vec![6, 5], vec![5, 7]), "{a_how} {b_how}");
                    let d_base = Tensor::zeros([6, if d_wide { 11 } else { 7 }], (Kind::Float, Device::Cpu));
                    let (d, d_off) = if d_wide { (d_base.narrow(1, 3, 7), 3) } else { (d_base.shallow_clone(), 0) };
                    let c = accumulate.then(|| Tensor::randn([6, 7], (Kind::Float, Device::Cpu)));
                    let p = Problem::of(&d, &a, &b, c.as_ref()).expect("a problem the engine takes");
                    assert_eq!((p.m, p.n, p.k, p.input, p.out), (7, 6, 5, Kind::BFloat16, Kind::Float));
                    let (fa, fb) = (flat(a_base, a_off), flat(b_base, b_off));
                    let fc = c.as_ref().map(|c| flat(c, 0));
                    let mut fd = flat(&d_base, d_off);
                    // cuBLASLt's A is our b, its B our a.
                    reference(&p, &fb, &fa, fc.as_deref(), &mut fd);
                    let got = Tensor::from_slice(&fd[..(5 * p.ldd + 7) as usize]);
                    let got = got.as_strided([6, 7], [p.ldd, 1], None);
                    let mut want = a.to_kind(Kind::Double).mm(&b.to_kind(Kind::Double));
                    if let Some(c) = &c {
                        want += c.to_kind(Kind::Double);
                    }
                    let err = f64::try_from((&got - &want).abs().max()).unwrap();
                    assert!(err < 1e-9, "a {a_how}, b {b_how}, wide d {d_wide}, accumulate {accumulate}: {err}");
                }
            }
        }
    }

    #[test]
    fn problems_the_engine_does_not_take_are_left_to_aten() {
        let t = |s: &[i64], k: Kind| Tensor::zeros(s, (k, Device::Cpu));
        let (a, b, d) = (t(&[4, 3], Kind::BFloat16), t(&[3, 5], Kind::BFloat16), t(&[4, 5], Kind::BFloat16));
        assert!(Problem::of(&d, &a, &b, None).is_some());
        // fp32 inputs, mixed inputs, an fp16 output of bf16 inputs
        assert!(
            Problem::of(&t(&[4, 5], Kind::Float), &t(&[4, 3], Kind::Float), &t(&[3, 5], Kind::Float), None).is_none()
        );
        assert!(Problem::of(&d, &a, &t(&[3, 5], Kind::Half), None).is_none());
        assert!(Problem::of(&t(&[4, 5], Kind::Half), &a, &b, None).is_none());
        // a column-major D, a D of the wrong shape, a row vector, a strided-both-ways view
        assert!(Problem::of(&t(&[5, 4], Kind::BFloat16).tr(), &a, &b, None).is_none());
        assert!(Problem::of(&t(&[4, 6], Kind::BFloat16), &a, &b, None).is_none());
        assert!(Problem::of(&t(&[1, 5], Kind::BFloat16), &t(&[1, 3], Kind::BFloat16), &b, None).is_none());
        let every_other = t(&[8, 6], Kind::BFloat16).slice(0, 0, 8, 2).slice(1, 0, 6, 2);
        assert_eq!((every_other.size(), every_other.stride()), (vec![4, 3], vec![12, 2]));
        assert!(Problem::of(&d, &every_other, &b, None).is_none());
        // C of another dtype than D
        assert!(Problem::of(&d, &a, &b, Some(&t(&[4, 5], Kind::Float))).is_none());
        // Nothing installed: the calls are ATen's.
        let x = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([3, 5], (Kind::Float, Device::Cpu));
        assert!(!engaged(&x));
        assert_eq!(mm(&x, &w), x.mm(&w));
        assert_eq!(addmm(&x.mm(&w), &x, &w), x.mm(&w) * 2.0);
        assert!(report().is_none());
    }

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_16() {
        assert_eq!([alignment(0), alignment(8), alignment(12), alignment(6), alignment(3)], [16, 8, 4, 2, 1]);
    }
}
