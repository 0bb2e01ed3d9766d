//! The block-by-block step against whole-graph autograd, and the fused head against the
//! plain cross-entropy.

use tch::{Device, Kind, Tensor};

use crate::model::Packing;
use crate::model_tests::{max_diff, model, tokens};
use crate::trainer::grads::{gemm_into, FlatGrads};
use crate::trainer::objective::{head_forward_backward, head_loss, CrossEntropy, Objective};
use crate::trainer::profile::PhaseClock;
use crate::trainer::step::{forward_backward, EngineOptions, GradSink, Stages};
use crate::trainer::Batch;
use crate::WorkerError;

/// The real gradient buffer, checking the protocol: every leaf finished once.
struct Collect {
    grads: FlatGrads,
    done: Vec<usize>,
}

impl GradSink for Collect {
    fn add(&mut self, leaf: usize, grad: &Tensor) -> Result<(), WorkerError> {
        assert!(!self.done.contains(&leaf), "leaf {leaf} written after it was finished");
        self.grads.add(leaf, grad);
        Ok(())
    }
    fn add_product(&mut self, leaf: usize, a: &Tensor, b: &Tensor) -> Result<(), WorkerError> {
        assert!(!self.done.contains(&leaf), "leaf {leaf} written after it was finished");
        self.grads.add_product(leaf, a, b)
    }
    fn add_product_rows(&mut self, leaf: usize, parts: &[Tensor], b: &Tensor) -> Result<(), WorkerError> {
        assert!(!self.done.contains(&leaf), "leaf {leaf} written after it was finished");
        self.grads.add_product_rows(leaf, parts, b)
    }
    fn region(&mut self, leaf: usize) -> Tensor {
        self.grads.region(leaf)
    }
    fn done(&mut self, leaf: usize) -> Result<(), WorkerError> {
        assert!(!self.done.contains(&leaf), "leaf {leaf} finished twice");
        self.done.push(leaf);
        Ok(())
    }
}

fn batch(len: i64, weights: bool) -> Batch {
    let rows = tokens(2, len + 1, 61, 11);
    let weights = weights.then(|| {
        tch::manual_seed(3);
        Tensor::rand([2, len], (Kind::Double, Device::Cpu)).ge(0.3).to_kind(Kind::Double)
    });
    Batch { inputs: rows.narrow(1, 0, len), targets: rows.narrow(1, 1, len), weights, packing: None, rl: None }
}

/// `batch` with each row holding two packed sequences (8 and `len − 8` tokens).
fn packed_batch(len: i64, window: i64) -> Batch {
    let segments = Tensor::arange(len, (Kind::Int64, Device::Cpu)).ge(8).to_kind(Kind::Int64).repeat([2, 1]);
    let positions = Tensor::arange(len, (Kind::Int64, Device::Cpu)) - segments.get(0) * 8;
    let packing = Packing::new(positions.repeat([2, 1]), &segments, window);
    Batch { packing: Some(packing), ..batch(len, false) }
}

/// Whole-graph autograd: logits for the whole batch, log-softmax, weighted mean.
fn reference(m: &crate::model::Transformer, b: &Batch, scale: f64) -> (f64, Tensor) {
    let hidden = match &b.packing {
        Some(p) => m.hidden_packed(&b.inputs, p),
        None => m.hidden(&b.inputs, None),
    };
    let logits = crate::model::linear(&hidden, m.lm_head());
    let logp = logits.log_softmax(-1, Kind::Double).gather(2, &b.targets.unsqueeze(2), false).squeeze_dim(2);
    let w = b.weights.as_ref().map_or_else(|| logp.ones_like(), |w| w.shallow_clone());
    let loss = -(logp * w).sum(Kind::Double) * scale;
    let layout = m.params.layout();
    let leaves: Vec<&Tensor> = (0..layout.leaves.len()).map(|i| m.params.leaf_at(i)).collect();
    let grads = Tensor::run_backward(&[&loss], &leaves, false, false);
    let flat = Tensor::zeros([layout.numel], (Kind::Double, Device::Cpu));
    for (l, g) in layout.leaves.iter().zip(grads) {
        flat.narrow(0, l.offset, l.numel).copy_(&g.reshape([-1]));
    }
    (loss.double_value(&[]), flat)
}

#[test]
fn block_by_block_gradients_equal_whole_graph_autograd() {
    // Window 7 < 20 tokens also sends attention through the windowed blocks. Explicit
    // blocks (hand-written backward, ATen pieces) alone, with recomputation, and packed.
    // The last two split the fused projections into one GEMM per part.
    let cases = [
        (64, false, false, false, false, false),
        (7, false, true, false, false, false),
        (7, true, false, false, false, false),
        (64, false, true, true, false, false),
        (7, false, false, true, false, false),
        (7, true, true, true, false, false),
        (64, false, false, true, true, false),
        (7, false, false, false, true, false),
        (7, false, true, true, false, true),
        (64, true, false, true, true, true),
    ];
    for (window, recompute, weights, explicit_blocks, packed, split_projections) in cases {
        let m = model(window, 21);
        let b = if packed { packed_batch(20, window as i64) } else { batch(20, weights) };
        let scale = 1.0 / 40.0;
        let (want_loss, want) = reference(&m, &b, scale);
        let layout = m.params.layout();
        let mut sink =
            Collect { grads: FlatGrads::new(layout, layout.numel, Kind::Double, Device::Cpu), done: Vec::new() };
        let objective = CrossEntropy { scale };
        // Recomputing elementwise outputs rides along with the explicit cases that keep
        // whole blocks: it must not change a bit either.
        let opts = EngineOptions {
            recompute,
            kernels: None,
            explicit_blocks,
            recompute_elementwise: explicit_blocks && !weights,
            split_projections,
        };
        let mut clock = PhaseClock::new(true, None);
        clock.start();
        let loss = forward_backward(&m, &Stages::of(layout), &b, &objective, &opts, &mut sink, &mut clock).unwrap();
        let phases: Vec<_> = clock.take().into_iter().map(|(name, _)| name).collect();
        assert_eq!(phases, ["forward", "head", "backward", "embedding_backward"]);
        assert!((loss.double_value(&[]) - want_loss).abs() < 1e-12, "loss {} vs {want_loss}", loss.double_value(&[]));
        assert_eq!(sink.done.len(), layout.leaves.len(), "every leaf reported once");
        sink.grads.zero_unwritten();
        let err = max_diff(sink.grads.buffer(), &want) / want.abs().max().double_value(&[]);
        assert!(
            err < 1e-10,
            "window {window} recompute {recompute} weights {weights} explicit {explicit_blocks} packed {packed} \
             split {split_projections}: relative error {err}"
        );
    }
}

#[test]
fn chunked_head_matches_full_cross_entropy_in_fp32() {
    // fp32, several chunks (the chunk size is large, so use a large vocabulary), and the
    // no-grad path used by eval: chunks of 32 and 8 rows (ATen's products), and of 128 and
    // 72 rows (oneDNN's, see `model::linear`).
    chunked_head_case(40, 1 << 21);
    chunked_head_case(200, 1 << 19);
}

fn chunked_head_case(n: i64, vocab: i64) {
    tch::manual_seed(5);
    let d = 16i64;
    let hidden = Tensor::randn([2, n / 2, d], (Kind::Float, Device::Cpu));
    let weight = Tensor::randn([vocab, d], (Kind::Float, Device::Cpu)) * 0.1;
    let targets = Tensor::randint(vocab, [2, n / 2], (Kind::Int64, Device::Cpu));
    let b = Batch {
        inputs: targets.zeros_like(),
        targets: targets.shallow_clone(),
        weights: None,
        packing: None,
        rl: None,
    };
    let objective = CrossEntropy::mean_over(n as f64);

    let h = hidden.detach().set_requires_grad(true);
    let w = weight.detach().set_requires_grad(true);
    let loss = h.matmul(&w.tr()).view([n, vocab]).cross_entropy_for_logits(&targets.view([-1]));
    let grads = Tensor::run_backward(&[&loss], &[&h, &w], false, false);

    let gw = Tensor::zeros([vocab, d], (Kind::Float, Device::Cpu));
    let mut add = |a: &Tensor, b: &Tensor| {
        gemm_into(&gw, a, b, false);
        Ok(())
    };
    let out = head_forward_backward(&hidden, &weight, &b, &objective, &mut add, None).unwrap();
    assert!((out.loss.double_value(&[]) - loss.double_value(&[])).abs() < 1e-5);
    assert!(max_diff(&out.d_hidden, &grads[0]) < 1e-6, "{n} rows: {}", max_diff(&out.d_hidden, &grads[0]));
    assert!(max_diff(&gw, &grads[1]) < 1e-7, "{n} rows: {}", max_diff(&gw, &grads[1]));
    let eval = head_loss(&hidden, &weight, &b, &objective);
    assert!((eval.double_value(&[]) - loss.double_value(&[])).abs() < 1e-5);
    assert_eq!(objective.name(), "cross_entropy");
}
