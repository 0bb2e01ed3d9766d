//! The flat gradient buffer: one tensor in the parameters' flat layout (fp32, or bf16 with
//! `grad_reduce = "bf16"`), written leaf by leaf as backward produces gradients.
//!
//! A leaf is *written* once something has stored into it this step; the first write of a
//! step overwrites (so the buffer is never zeroed as a whole), later ones — the next
//! micro-batches — accumulate. Weight gradients of the matrices arrive as products
//! `a · b` ([`FlatGrads::add_product`]) that the GEMM writes straight into the buffer in
//! its dtype: on CUDA a bf16 × bf16 product with fp32 output, so a gradient is never
//! rounded to bf16 on its way into fp32 and there is no bf16 temporary and copy per
//! matrix.

use std::ops::Range;

use moxin_layout::FlatLayout;
use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Device, Kind, Tensor};

use super::step::GradSink;
use crate::WorkerError;

/// The gradient of every leaf, in one flat buffer.
pub struct FlatGrads {
    buffer: Tensor,
    names: Vec<String>,
    ranges: Vec<Range<i64>>,
    shapes: Vec<Vec<i64>>,
    written: Vec<bool>,
}

impl FlatGrads {
    /// A buffer of `padded` elements (≥ the layout's) of `kind` on `device`, zeroed.
    pub fn new(layout: &FlatLayout, padded: i64, kind: Kind, device: Device) -> Self {
        FlatGrads {
            buffer: Tensor::zeros([padded], (kind, device)),
            names: layout.leaves.iter().map(|l| l.name.clone()).collect(),
            ranges: layout.leaves.iter().map(|l| l.offset..l.offset + l.numel).collect(),
            shapes: layout.leaves.iter().map(|l| l.shape.clone()).collect(),
            written: vec![false; layout.leaves.len()],
        }
    }

    /// The whole buffer (padding included).
    pub fn buffer(&self) -> &Tensor {
        &self.buffer
    }

    /// Leaves in the layout.
    pub fn leaves(&self) -> usize {
        self.ranges.len()
    }

    /// Starts a step: the next write of each leaf overwrites it.
    pub fn begin_step(&mut self) {
        self.written.iter_mut().for_each(|w| *w = false);
    }

    /// Zeroes the leaves nothing wrote this step (parameters the batch did not reach).
    pub fn zero_unwritten(&mut self) {
        for leaf in 0..self.written.len() {
            if !self.written[leaf] {
                let _ = tch::no_grad(|| self.flat(leaf).zero_());
                self.written[leaf] = true;
            }
        }
    }

    fn flat(&self, leaf: usize) -> Tensor {
        let r = &self.ranges[leaf];
        self.buffer.narrow(0, r.start, r.end - r.start)
    }

    /// Leaf `leaf`'s gradient, shaped like the leaf (a view of the buffer).
    pub fn leaf(&self, leaf: usize) -> Tensor {
        self.flat(leaf).view(self.shapes[leaf].as_slice())
    }

    /// Adds `grad` (shaped like the leaf, any float dtype; undefined = zero) to leaf `leaf`.
    pub fn add(&mut self, leaf: usize, grad: &Tensor) {
        let mut dst = self.flat(leaf);
        tch::no_grad(|| match (grad.defined(), self.written[leaf]) {
            (true, false) => dst.copy_(&grad.reshape([-1])),
            (true, true) => {
                let _ = dst.g_add_(&grad.reshape([-1]).to_kind(dst.kind()));
            }
            (false, false) => {
                let _ = dst.zero_();
            }
            (false, true) => {}
        });
        self.written[leaf] = true;
    }

    /// Adds the product `a · b` (`[rows, k] · [k, cols]`, the leaf's 2-D shape) to leaf
    /// `leaf`, written by the GEMM itself.
    pub fn add_product(&mut self, leaf: usize, a: &Tensor, b: &Tensor) -> Result<(), WorkerError> {
        self.add_product_rows(leaf, std::slice::from_ref(a), b)
    }

    /// As [`FlatGrads::add_product`] for a product in row blocks: `aᵢ · b` goes to the
    /// leaf's rows after those of `a₀ … aᵢ₋₁`, each GEMM writing its own rows.
    pub fn add_product_rows(&mut self, leaf: usize, parts: &[Tensor], b: &Tensor) -> Result<(), WorkerError> {
        let (rows, cols) = (parts.iter().map(|a| a.size()[0]).sum::<i64>(), b.size()[1]);
        if self.shapes[leaf] != [rows, cols] || parts.iter().any(|a| a.size()[1] != b.size()[0]) {
            return Err(WorkerError::Spec(format!(
                "the gradient of {} is {:?}, and a product of {:?} · {:?} was handed for it",
                self.names[leaf],
                self.shapes[leaf],
                parts.iter().map(Tensor::size).collect::<Vec<_>>(),
                b.size()
            )));
        }
        let dst = self.flat(leaf).view([rows, cols]);
        let overwrite = !self.written[leaf];
        let mut offset = 0;
        for a in parts {
            let n = a.size()[0];
            tch::no_grad(|| gemm_into(&dst.narrow(0, offset, n), a, b, overwrite));
            offset += n;
        }
        self.written[leaf] = true;
        Ok(())
    }

    /// Leaf `leaf`'s gradient storage for code that accumulates into it in place (zeroed
    /// first if nothing wrote it this step).
    pub fn region(&mut self, leaf: usize) -> Tensor {
        if !self.written[leaf] {
            let _ = tch::no_grad(|| self.flat(leaf).zero_());
            self.written[leaf] = true;
        }
        self.leaf(leaf)
    }
}

/// A sink with no buckets: gradients land in the buffer and nothing waits for them.
impl GradSink for FlatGrads {
    fn add(&mut self, leaf: usize, grad: &Tensor) -> Result<(), WorkerError> {
        FlatGrads::add(self, leaf, grad);
        Ok(())
    }
    fn add_product(&mut self, leaf: usize, a: &Tensor, b: &Tensor) -> Result<(), WorkerError> {
        FlatGrads::add_product(self, leaf, a, b)
    }
    fn add_product_rows(&mut self, leaf: usize, parts: &[Tensor], b: &Tensor) -> Result<(), WorkerError> {
        FlatGrads::add_product_rows(self, leaf, parts, b)
    }
    fn region(&mut self, leaf: usize) -> Tensor {
        FlatGrads::region(self, leaf)
    }
    fn done(&mut self, _leaf: usize) -> Result<(), WorkerError> {
        Ok(())
    }
}

/// Set once ATen refused a bf16/fp16 → fp32 product on this libtorch (`mm.dtype_out`,
/// `addmm.dtype_out`), so it is not asked again at every GEMM.
static NO_FP32_OUT: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];

/// Whether bf16 products may be written as fp32 (`MOXIN_GEMM_FP32_OUT=0` turns it off, to
/// measure the two ways against each other on a GPU).
fn fp32_out_allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| std::env::var("MOXIN_GEMM_FP32_OUT").map_or(true, |v| v != "0"))
}

/// `dst = a · b` (`overwrite`) or `dst += a · b`, with the GEMM writing `dst`'s dtype: on
/// CUDA a bf16 (or fp16) product goes into an fp32 `dst` directly (cuBLAS accumulates in
/// fp32 either way); elsewhere, and if ATen refuses that, through a temporary in the
/// inputs' dtype (logged once).
pub fn gemm_into(dst: &Tensor, a: &Tensor, b: &Tensor, overwrite: bool) {
    // (MOXIN_GEMM_FP32_OUT=0 keeps mixed-dtype products off the tuned engine too.)
    if (dst.kind() == a.kind() || fp32_out_allowed()) && crate::cuda::gemm::try_product(dst, a, b, !overwrite) {
        return;
    }
    let mut dst = dst.shallow_clone();
    if dst.kind() == a.kind() {
        let _ = if overwrite { a.mm_out(&dst, b) } else { dst.addmm_(a, b) };
        return;
    }
    let half = |k: Kind| matches!(k, Kind::BFloat16 | Kind::Half);
    let flag = &NO_FP32_OUT[usize::from(!overwrite)];
    if dst.device() != Device::Cpu
        && dst.kind() == Kind::Float
        && half(a.kind())
        && a.kind() == b.kind()
        && !flag.load(Ordering::Relaxed)
        && fp32_out_allowed()
    {
        let done = if overwrite {
            a.f_mm_dtype_out(&dst, b, Kind::Float)
        } else {
            dst.f_addmm_dtype_out(&dst, a, b, Kind::Float)
        };
        match done {
            Ok(_) => return,
            Err(e) => {
                flag.store(true, Ordering::Relaxed);
                let op = if overwrite { "mm" } else { "addmm" };
                let first_line = e.to_string().lines().next().unwrap_or_default().to_string();
                tracing::warn!(
                    "this libtorch refuses a {:?} product written as fp32 ({op}.dtype_out: {first_line}); weight \
                     gradients go through a {:?} temporary instead",
                    a.kind(),
                    a.kind()
                );
            }
        }
    }
    let product = a.mm(b);
    if overwrite {
        dst.copy_(&product);
    } else {
        let _ = dst.g_add_(&product.to_kind(dst.kind()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_overwrite_then_accumulate_in_the_buffers_dtype() {
        let shape = crate::model_tests::config(64);
        let layout = FlatLayout::of(&shape);
        let down = layout.leaves.iter().position(|l| l.name == "model.layers.0.mlp.down_proj.weight").unwrap();
        let [rows, cols] = [layout.leaves[down].shape[0], layout.leaves[down].shape[1]];
        for (grad_kind, input_kind) in [(Kind::Float, Kind::Float), (Kind::Float, Kind::BFloat16)] {
            let mut g = FlatGrads::new(&layout, layout.numel + 3, grad_kind, Device::Cpu);
            let _ = g.buffer.fill_(7.0); // last step's gradients: the first write must ignore them
            tch::manual_seed(1);
            let a = Tensor::randn([rows, 5], (Kind::Float, Device::Cpu)).to_kind(input_kind);
            let b = Tensor::randn([5, cols], (Kind::Float, Device::Cpu)).to_kind(input_kind);
            let want = a.to_kind(Kind::Float).mm(&b.to_kind(Kind::Float));
            g.begin_step();
            g.add_product(down, &a.tr().contiguous().tr(), &b).unwrap();
            let tol = if input_kind == Kind::Float { 1e-6 } else { 0.05 };
            assert!(f64::try_from((g.leaf(down) - &want).abs().max()).unwrap() < tol);
            g.add_product(down, &a, &b).unwrap();
            // A product of the wrong shape is an error naming the leaf, and changes nothing.
            let err = g.add_product(down, &b.tr(), &a.tr()).unwrap_err().to_string();
            assert!(err.contains("mlp.down_proj.weight"), "{err}");
            assert!(f64::try_from((g.leaf(down) - &want * 2.0).abs().max()).unwrap() < 2.0 * tol);
            // Untouched leaves are zeroed at the end of the step, touched ones kept.
            g.zero_unwritten();
            assert_eq!(f64::try_from(g.leaf(0).abs().sum(Kind::Double)).unwrap(), 0.0);
            assert!(f64::try_from((g.leaf(down) - &want * 2.0).abs().max()).unwrap() < 2.0 * tol);
            assert_eq!(g.leaves(), layout.leaves.len());
        }
    }
}
