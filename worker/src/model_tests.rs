//! Model tests against straightforward reference computations.

use tch::{Device, Kind, Tensor};

use moxin_layout::ModelShape;

use crate::generate::{generate, SamplingOptions};
use crate::model::{linear, rms_norm, KvCache, Rope, Transformer, ONEDNN_MIN_ROWS};

pub(crate) fn config(window: u32) -> ModelShape {
    ModelShape {
        vocab_size: 61,
        dim: 48,
        n_layers: 2,
        n_heads: 6,
        n_kv_heads: 2,
        ffn_dim: 80,
        max_seq_len: 64,
        sliding_window: window,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        init_std: 0.1,
    }
}

pub(crate) fn model(window: u32, seed: i64) -> Transformer {
    let mut m = Transformer::new(config(window), Kind::Double, Device::Cpu);
    m.params.initialise(seed as u64);
    // Non-trivial norm gains so a wrong norm placement would show.
    tch::no_grad(|| {
        for p in m.params.params() {
            if p.decl.name.contains("norm") {
                let mut t = p.tensor.shallow_clone();
                // Deterministic, not from torch's global RNG, which tests on other threads
                // reseed and draw from concurrently.
                let wiggle = (Tensor::arange(t.numel() as i64, (t.kind(), t.device())) * 0.7 + seed as f64).sin();
                let _ = t.g_add_(&(wiggle.view(t.size().as_slice()) * 0.1));
            }
        }
    });
    m
}

pub(crate) fn tokens(batch: i64, len: i64, vocab: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randint(vocab, [batch, len], (Kind::Int64, Device::Cpu))
}

pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn rms_norm_matches_formula() {
    let x = Tensor::randn([3, 5, 8], (Kind::Double, Device::Cpu));
    let w = Tensor::randn([8], (Kind::Double, Device::Cpu));
    let got = rms_norm(&x, &w, 1e-5);
    let want = &x / (x.square().mean_dim(-1, true, Kind::Double) + 1e-5).sqrt() * &w;
    assert!(max_diff(&got, &want) < 1e-6, "{}", max_diff(&got, &want));
}

#[test]
fn rope_matches_rotate_half_formula() {
    let (hd, theta, start) = (8i64, 10000.0f64, 3i64);
    let rope = Rope::new(hd, 32, theta, Kind::Double, Device::Cpu);
    let x = Tensor::randn([1, 2, 4, hd], (Kind::Double, Device::Cpu));
    let got = rope.apply(&x, start);
    for h in 0..2 {
        for t in 0..4 {
            let pos = (start + t) as f64;
            for i in 0..hd / 2 {
                let angle = pos * theta.powf(-2.0 * i as f64 / hd as f64);
                let (a, b) = (x.double_value(&[0, h, t, i]), x.double_value(&[0, h, t, i + hd / 2]));
                let want_a = a * angle.cos() - b * angle.sin();
                let want_b = b * angle.cos() + a * angle.sin();
                assert!((got.double_value(&[0, h, t, i]) - want_a).abs() < 1e-5);
                assert!((got.double_value(&[0, h, t, i + hd / 2]) - want_b).abs() < 1e-5);
            }
        }
    }
}

/// The whole decoder written out naively: explicit per-head attention with a
/// hand-built causal sliding-window mask and K/V heads repeated for GQA.
pub(crate) fn reference_logits(m: &Transformer, tokens: &Tensor) -> Tensor {
    let c = &m.shape;
    let p = |n: &str| m.params.get(n).detach();
    let (b, t) = (tokens.size()[0], tokens.size()[1]);
    let hd = c.head_dim() as i64;
    let (dim, n_heads, n_kv_heads, window) =
        (c.dim as i64, c.n_heads as i64, c.n_kv_heads as i64, c.sliding_window as i64);
    let norm = |x: &Tensor, w: &Tensor| x / (x.square().mean_dim(-1, true, Kind::Double) + c.norm_eps).sqrt() * w;
    let rope = Rope::new(hd, c.max_seq_len as i64, c.rope_theta, Kind::Double, Device::Cpu);
    let mut x = p("model.embed_tokens.weight").index_select(0, &tokens.view([-1])).view([b, t, dim]);
    for i in 0..c.n_layers {
        let l = format!("model.layers.{i}");
        let h = norm(&x, &p(&format!("{l}.input_layernorm.weight")));
        let proj = |w: &str, n: i64| {
            h.matmul(&p(&format!("{l}.self_attn.{w}.weight")).tr()).view([b, t, n, hd]).transpose(1, 2)
        };
        let q = rope.apply(&proj("q_proj", n_heads), 0);
        let k = rope.apply(&proj("k_proj", n_kv_heads), 0).repeat_interleave_self_int(n_heads / n_kv_heads, 1, None);
        let v = proj("v_proj", n_kv_heads).repeat_interleave_self_int(n_heads / n_kv_heads, 1, None);
        let mut scores = q.matmul(&k.transpose(-2, -1)) / (hd as f64).sqrt();
        let mut mask = vec![0f64; (t * t) as usize];
        for qi in 0..t {
            for ki in 0..t {
                if ki > qi || qi - ki >= window {
                    mask[(qi * t + ki) as usize] = f64::NEG_INFINITY;
                }
            }
        }
        scores += Tensor::from_slice(&mask).view([t, t]);
        let attn = scores.softmax(-1, Kind::Double).matmul(&v).transpose(1, 2).reshape([b, t, dim]);
        x = &x + attn.matmul(&p(&format!("{l}.self_attn.o_proj.weight")).tr());
        let h = norm(&x, &p(&format!("{l}.post_attention_layernorm.weight")));
        let gate = h.matmul(&p(&format!("{l}.mlp.gate_proj.weight")).tr());
        let silu = &gate * gate.sigmoid();
        let up = h.matmul(&p(&format!("{l}.mlp.up_proj.weight")).tr());
        x = &x + (silu * up).matmul(&p(&format!("{l}.mlp.down_proj.weight")).tr());
    }
    norm(&x, &p("model.norm.weight")).matmul(&p("lm_head.weight").tr())
}

#[test]
fn forward_matches_naive_reference_with_and_without_window() {
    for window in [64, 7] {
        let m = model(window, 1);
        let x = tokens(2, 20, 61, 2);
        let got = tch::no_grad(|| m.forward(&x, None));
        let want = tch::no_grad(|| reference_logits(&m, &x));
        assert!(max_diff(&got, &want) < 1e-9, "window {window}: {}", max_diff(&got, &want));
    }
}

#[test]
fn kv_cache_decoding_matches_full_forward_across_the_window() {
    // 30 tokens through a window of 7: the rolling cache must drop old keys exactly.
    let m = model(7, 3);
    let x = tokens(2, 30, 61, 4);
    let full = tch::no_grad(|| m.forward(&x, None));
    let mut cache = KvCache::new();
    let mut pieces = Vec::new();
    tch::no_grad(|| {
        // A multi-token prefill longer than the window, then a chunk, then one at a time.
        pieces.push(m.forward(&x.narrow(1, 0, 10), Some(&mut cache)));
        pieces.push(m.forward(&x.narrow(1, 10, 3), Some(&mut cache)));
        for i in 13..30 {
            pieces.push(m.forward(&x.narrow(1, i, 1), Some(&mut cache)));
        }
    });
    assert_eq!(cache.next_position(), 30);
    let inc = Tensor::cat(&pieces, 1);
    assert!(max_diff(&full, &inc) < 1e-9, "{}", max_diff(&full, &inc));
}

#[test]
fn parameter_names_and_counts() {
    let c = config(8);
    let m = Transformer::new(c.clone(), Kind::Float, Device::Cpu);
    assert_eq!(c.param_count() as i64, m.params.numel());
    let names: Vec<_> = m.params.params().iter().map(|p| p.decl.name.as_str()).collect();
    assert_eq!(names[0], "model.embed_tokens.weight");
    assert!(names.contains(&"model.layers.1.self_attn.k_proj.weight"));
    assert!(names.contains(&"model.layers.0.mlp.down_proj.weight"));
    assert_eq!(*names.last().unwrap(), "lm_head.weight");
    assert_eq!(m.params.get("model.layers.0.self_attn.k_proj.weight").size(), [16, 48]);
    // Decayed matrices first in the flat buffer, norm gains after.
    let norms: i64 = m.params.params().iter().filter(|p| !p.decl.decays()).map(|p| p.decl.numel()).sum();
    assert_eq!(m.params.decay_numel() + norms, m.params.numel());
}

#[test]
fn params_are_views_of_the_flat_buffer() {
    let m = model(8, 5);
    let flat = m.params.flat().shallow_clone();
    tch::no_grad(|| {
        let mut f = flat.shallow_clone();
        let _ = f.g_add_scalar_(1.0);
    });
    let p = &m.params.params()[3];
    let slice = flat.narrow(0, p.offset, p.decl.numel()).view(p.decl.shape.as_slice());
    assert_eq!(max_diff(&p.tensor.detach(), &slice), 0.0);
}

#[test]
fn initialisation_is_seeded_and_scaled() {
    let a = model(8, 7);
    let b = model(8, 7);
    assert_eq!(max_diff(a.params.flat(), b.params.flat()), 0.0);
    let c = Transformer::new(config(8), Kind::Float, Device::Cpu);
    let mut big =
        Transformer::new(ModelShape { dim: 256, ffn_dim: 512, n_heads: 4, ..config(8) }, Kind::Float, Device::Cpu);
    big.params.initialise(0);
    let std = |n: &str| big.params.get(n).std(true).double_value(&[]);
    assert!((std("model.layers.0.self_attn.q_proj.weight") - 0.1).abs() < 0.005);
    // Output projections: init_std / sqrt(2 * n_layers) = 0.1 / 2.
    assert!((std("model.layers.0.mlp.down_proj.weight") - 0.05).abs() < 0.003);
    assert!((std("model.layers.0.self_attn.o_proj.weight") - 0.05).abs() < 0.003);
    assert_eq!(c.params.get("model.norm.weight").sum(Kind::Float).double_value(&[]), 0.0);
    assert_eq!(big.params.get("model.norm.weight").mean(Kind::Float).double_value(&[]), 1.0);
}

#[test]
fn greedy_generation_follows_full_forward_argmax_and_stops() {
    let m = model(7, 9);
    let prompt: Vec<i64> = vec![3, 14, 15, 9, 2, 6];
    let opts = SamplingOptions { temperature: 0.0, max_new_tokens: 12, ..Default::default() };
    let out = generate(&m, &[prompt.clone(), prompt.clone()], &opts).unwrap();
    assert_eq!(out[0], out[1]);
    let mut seq = prompt.clone();
    for &tok in &out[0] {
        let x = Tensor::from_slice(&seq).view([1, -1]);
        let want =
            tch::no_grad(|| m.forward(&x, None)).select(1, seq.len() as i64 - 1).argmax(-1, false).int64_value(&[0]);
        assert_eq!(tok, want);
        seq.push(tok);
    }
    // A stop token ends the sequence right after it is produced.
    let stop = out[0][4];
    let first = out[0].iter().position(|&t| t == stop).unwrap();
    let stopped =
        generate(&m, std::slice::from_ref(&prompt), &SamplingOptions { stop_token: Some(stop), ..opts.clone() })
            .unwrap();
    assert_eq!(stopped[0], out[0][..=first].to_vec());
    // Tiny top-p is greedy; sampling is reproducible from the seed.
    let nucleus = SamplingOptions { temperature: 1.0, top_p: 1e-6, ..opts.clone() };
    assert_eq!(generate(&m, std::slice::from_ref(&prompt), &nucleus).unwrap()[0], out[0]);
    let sampled = SamplingOptions { temperature: 1.0, top_p: 0.9, seed: 5, ..opts.clone() };
    let s1 = generate(&m, std::slice::from_ref(&prompt), &sampled).unwrap();
    assert_eq!(s1, generate(&m, std::slice::from_ref(&prompt), &sampled).unwrap());
    assert!(s1[0].iter().all(|&t| (0..61).contains(&t)));
    let too_long = SamplingOptions { max_new_tokens: 100, ..opts };
    assert!(generate(&m, &[prompt], &too_long).unwrap_err().contains("max_seq_len"));
}

/// Packed rows (SFT): a sequence's logits in a pack are its logits alone (positions
/// restart, attention stays inside it, the sliding window still applies), and changing
/// another sequence in the pack changes nothing of it.
#[test]
fn packed_sequences_do_not_see_each_other() {
    use crate::model::Packing;
    let window = 6;
    let m = model(window, 5);
    let head = |h: Tensor| h.matmul(&m.lm_head().tr());
    let (a, b) = (tokens(1, 9, 61, 1), tokens(1, 12, 61, 2));
    let pad = Tensor::zeros([1, 3], (Kind::Int64, Device::Cpu));
    let row = |b_tokens: &Tensor| Tensor::cat(&[&a, b_tokens, &pad], 1);
    let positions = Tensor::cat(
        &[
            Tensor::arange(9, (Kind::Int64, Device::Cpu)),
            Tensor::arange(12, (Kind::Int64, Device::Cpu)),
            Tensor::arange(3, (Kind::Int64, Device::Cpu)),
        ],
        0,
    )
    .unsqueeze(0);
    let segments = Tensor::cat(
        &[
            Tensor::zeros([9], (Kind::Int64, Device::Cpu)),
            Tensor::ones([12], (Kind::Int64, Device::Cpu)),
            Tensor::full([3], -1, (Kind::Int64, Device::Cpu)),
        ],
        0,
    )
    .unsqueeze(0);
    let packing = Packing::new(positions, &segments, window as i64);
    let packed = head(m.hidden_packed(&row(&b), &packing));
    let alone_a = m.forward(&a, None);
    let alone_b = m.forward(&b, None);
    assert!(max_diff(&packed.narrow(1, 0, 9), &alone_a) < 1e-10);
    assert!(max_diff(&packed.narrow(1, 9, 12), &alone_b) < 1e-10, "the second sequence starts at position 0");
    let other = tokens(1, 12, 61, 3);
    let changed = head(m.hidden_packed(&row(&other), &packing));
    assert_eq!(max_diff(&changed.narrow(1, 0, 9), &packed.narrow(1, 0, 9)), 0.0, "another sequence changed nothing");
    assert!(changed.isfinite().all().int64_value(&[]) == 1, "padding rows stay finite");
}

/// Prompts of different lengths decoded in one batch (left-padded, per-row positions,
/// padding masked) give what each gives alone, greedy, also once the sequences outgrow
/// the sliding window.
#[test]
fn batched_generation_of_ragged_prompts_equals_one_at_a_time() {
    let m = model(6, 9);
    let prompts: Vec<Vec<i64>> = [(3, 1), (7, 2), (5, 3), (1, 4)]
        .iter()
        .map(|&(len, seed)| Vec::<i64>::try_from(tokens(1, len, 61, seed).view([-1])).unwrap())
        .collect();
    let opts = SamplingOptions { temperature: 0.0, max_new_tokens: 12, ..Default::default() };
    let batched = generate(&m, &prompts, &opts).unwrap();
    for (p, got) in prompts.iter().zip(&batched) {
        let alone = generate(&m, std::slice::from_ref(p), &opts).unwrap();
        assert_eq!(got, &alone[0], "prompt of {} tokens", p.len());
    }
}

/// The grouped-products attention is SDPA's causal, grouped-query attention: the same
/// outputs and gradients in fp64, and within bf16's rounding in bf16.
#[test]
fn grouped_causal_attention_matches_sdpa() {
    use crate::model::grouped_causal_attention;
    let (b, heads, kv_heads, t, hd) = (2, 6, 2, 17, 8);
    for (kind, tolerance) in [(Kind::Double, 1e-12), (Kind::BFloat16, 0.05)] {
        tch::manual_seed(7);
        let make =
            |h: i64| Tensor::randn([b, h, t, hd], (Kind::Double, Device::Cpu)).to_kind(kind).set_requires_grad(true);
        let (q, k, v) = (make(heads), make(kv_heads), make(kv_heads));
        let upstream = Tensor::randn([b, heads, t, hd], (Kind::Double, Device::Cpu)).to_kind(kind);
        let ours = grouped_causal_attention(&q, &k, &v);
        let reference = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, None, true);
        let grads = |out: &Tensor| Tensor::run_backward(&[(out * &upstream).sum(kind)], &[&q, &k, &v], false, false);
        let as_f64 = |t: &Tensor| t.to_kind(Kind::Double);
        assert!(max_diff(&as_f64(&ours), &as_f64(&reference)) < tolerance, "{kind:?} outputs");
        for (name, (a, r)) in ["q", "k", "v"].iter().zip(grads(&ours).iter().zip(grads(&reference).iter())) {
            let scale = as_f64(r).abs().max().double_value(&[]).max(1.0);
            assert!(max_diff(&as_f64(a), &as_f64(r)) < tolerance * scale, "{kind:?} d{name}");
        }
    }
}

/// The CPU fp32 projection through oneDNN equals ATen's `linear` (an fp64 reference) in its
/// output and in the gradients autograd gives the input and the weight (also when the
/// weight is a view of a larger buffer, as parameters are), above and below the row
/// threshold, for 2-D and 3-D inputs.
#[test]
fn linear_equals_aten_linear_with_gradients() {
    for rows in [ONEDNN_MIN_ROWS - 1, ONEDNN_MIN_ROWS, 3 * ONEDNN_MIN_ROWS] {
        for three_d in [false, true] {
            let (k, n) = (48i64, 80i64);
            let x_shape: Vec<i64> = if three_d { vec![1, rows, k] } else { vec![rows, k] };
            let x = Tensor::randn(x_shape.as_slice(), (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let flat = Tensor::randn([n * k + 7], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let w = flat.narrow(0, 7, n * k).view([n, k]);
            let y = linear(&x, &w);
            assert_eq!(y.size()[..y.dim() - 1], x.size()[..x.dim() - 1]);
            assert_eq!(*y.size().last().unwrap(), n);
            let g = Tensor::randn(y.size().as_slice(), (Kind::Float, Device::Cpu));
            let grads = Tensor::run_backward(&[(&y * &g).sum(Kind::Float)], &[&x, &flat], false, false);
            let (xd, wd, gd) =
                (x.detach().to_kind(Kind::Double), w.detach().to_kind(Kind::Double), g.to_kind(Kind::Double));
            let want_y = xd.matmul(&wd.tr());
            let want_dx = gd.matmul(&wd);
            let want_dw = gd.reshape([-1, n]).tr().matmul(&xd.reshape([-1, k]));
            let rel = |a: &Tensor, b: &Tensor| {
                (a.to_kind(Kind::Double) - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
            };
            let dw = grads[1].narrow(0, 7, n * k).view([n, k]);
            for (what, got, want) in [("y", &y, &want_y), ("dx", &grads[0], &want_dx), ("dw", &dw, &want_dw)] {
                let e = rel(got, want);
                assert!(e < 1e-5, "rows {rows}, 3-D {three_d}: {what} relative error {e}");
            }
            assert_eq!(grads[1].narrow(0, 0, 7).abs().sum(Kind::Float).double_value(&[]), 0.0);
        }
    }
}
