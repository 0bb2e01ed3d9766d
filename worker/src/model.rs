//! The Moxin / Mistral decoder, as in the paper's architecture table:
//!
//! | block     | what                                                                 |
//! |-----------|----------------------------------------------------------------------|
//! | embedding | `model.embed_tokens` `[vocab, dim]`                                  |
//! | × layers  | x + Attention(RMSNorm(x)); then h + SwiGLU(RMSNorm(h))               |
//! | attention | GQA: `n_heads` query heads share `n_kv_heads` K/V heads; RoPE (rotate-half); causal, sliding window |
//! | MLP       | `down(silu(gate(x)) * up(x))`                                        |
//! | head      | final RMSNorm, untied `lm_head` `[vocab, dim]`                       |
//!
//! No biases anywhere. Parameter names are Hugging Face `MistralForCausalLM`'s, so a
//! checkpoint's `model.safetensors` is already in HF layout. The model exposes its pieces
//! (embedding, each block, final norm, head weight) so the training step can run and
//! differentiate them one block at a time; the loss lives with the objective, not here.

use moxin_layout::{FlatLayout, ModelShape};
use tch::{Device, Kind, Tensor};

use crate::params::ParamStore;

/// Precomputed RoPE rotation for positions `0..max_seq_len` (`[positions, head_dim]`, in
/// the model's dtype, computed in fp32 as Hugging Face does), in rotate-half layout:
/// frequency `i` applies to dims `i` and `i + hd/2`.
#[derive(Debug)]
pub struct Rope {
    cos: Tensor,
    /// `[-sin, sin]` over the two halves: `rotate_half(x) * sin == swap_halves(x) * signed_sin`,
    /// which saves a negation pass per call.
    signed_sin: Tensor,
}

impl Rope {
    /// Tables for `positions` positions, stored as `kind`.
    pub fn new(head_dim: i64, positions: i64, theta: f64, kind: Kind, device: Device) -> Self {
        let inv_freq = Tensor::arange_start(0, head_dim / 2, (Kind::Float, device))
            .f_mul_scalar(-2.0 * theta.ln() / head_dim as f64)
            .unwrap()
            .exp();
        let t = Tensor::arange(positions, (Kind::Float, device));
        let freqs = t.outer(&inv_freq);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let sin = freqs.sin();
        Rope { cos: emb.cos().to_kind(kind), signed_sin: Tensor::cat(&[-&sin, sin], -1).to_kind(kind) }
    }

    /// Rotates `x` `[batch, heads, seq, head_dim]` whose first token sits at `start`.
    pub fn apply(&self, x: &Tensor, start: i64) -> Tensor {
        let seq = x.size()[2];
        let cos = self.cos.narrow(0, start, seq);
        let signed_sin = self.signed_sin.narrow(0, start, seq);
        let half = x.size()[3] / 2;
        x * cos + x.roll([half], [-1]) * signed_sin
    }

    /// Rotates `x` `[batch, heads, seq, head_dim]` whose tokens sit at `positions`
    /// `[batch, seq]` (packed sequences: positions restart with each conversation).
    pub fn apply_at(&self, x: &Tensor, positions: &Tensor) -> Tensor {
        let (cos, signed_sin) = self.tables_at(x, positions);
        x * cos + x.roll([x.size()[3] / 2], [-1]) * signed_sin
    }

    /// The transpose of the rotation (its backward): `dy · cos + swap_halves(dy · signed_sin)`
    /// for `dy` `[batch, heads, seq, head_dim]` at `positions` `[batch, seq]`, or `0..seq`.
    pub fn apply_transpose(&self, dy: &Tensor, positions: Option<&Tensor>) -> Tensor {
        let (cos, signed_sin) = match positions {
            Some(p) => self.tables_at(dy, p),
            None => (self.cos.narrow(0, 0, dy.size()[2]), self.signed_sin.narrow(0, 0, dy.size()[2])),
        };
        dy * cos + (dy * signed_sin).roll([dy.size()[3] / 2], [-1])
    }

    /// The `cos` and `signed_sin` tables `[positions, head_dim]` (for fused kernels).
    pub fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.signed_sin)
    }

    fn tables_at(&self, x: &Tensor, positions: &Tensor) -> (Tensor, Tensor) {
        let (b, t, hd) = (x.size()[0], x.size()[2], x.size()[3]);
        let flat = positions.reshape([-1]);
        let at = |table: &Tensor| table.index_select(0, &flat).view([b, 1, t, hd]);
        (at(&self.cos), at(&self.signed_sin))
    }
}

/// Several sequences packed into each row of a batch: every token's position inside its
/// own sequence, and the attention mask that keeps sequences apart.
#[derive(Debug)]
pub struct Packing {
    /// `[batch, seq]` positions (restarting at 0 with each packed sequence).
    pub positions: Tensor,
    /// `[batch, 1, seq, seq]` boolean: causal, inside the sliding window, same sequence.
    pub mask: Tensor,
}

impl Packing {
    /// The packing of rows whose tokens have `positions` and belong to `segments` (both
    /// `[batch, seq]` i64), for a model with a sliding window of `window` tokens.
    pub fn new(positions: Tensor, segments: &Tensor, window: i64) -> Self {
        let t = positions.size()[1];
        let device = positions.device();
        let same = segments.unsqueeze(2).eq_tensor(&segments.unsqueeze(1));
        let behind = positions.unsqueeze(2) - positions.unsqueeze(1);
        let idx = Tensor::arange(t, (Kind::Int64, device));
        let causal = idx.unsqueeze(1).ge_tensor(&idx.unsqueeze(0));
        let mask = same.logical_and(&causal).logical_and(&behind.lt(window)).unsqueeze(1);
        Packing { positions, mask }
    }
}

/// RMSNorm: `x / sqrt(mean(x²) + eps) * weight`. libtorch's fused op computes in fp32 for
/// bf16 inputs and keeps only the input and the inverse RMS for backward.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let dim = *x.size().last().expect("rms_norm of a scalar");
    x.rms_norm([dim], Some(weight), eps)
}

/// Keys and values of past tokens, per layer, for incremental decoding. It holds at most
/// `sliding_window - 1` positions (older ones can never be attended to again), so memory
/// is bounded however long generation runs.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Position of the first cached token.
    start: i64,
    /// Position the next token will have.
    next: i64,
    /// For batched decoding with explicit masks ([`Transformer::hidden_masked`]): key
    /// slots preallocated per layer (0: grow by concatenation), and how many are filled.
    capacity: i64,
    filled: i64,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        KvCache::default()
    }

    /// An empty cache for [`Transformer::hidden_masked`] that holds `keys` keys per row
    /// without reallocating (new keys are written in place, not concatenated).
    pub fn with_capacity(keys: i64) -> Self {
        KvCache { capacity: keys, ..KvCache::default() }
    }

    /// Position of the next token to be fed.
    pub fn next_position(&self) -> i64 {
        self.next
    }
}

/// One layer's KV slot during masked decoding, the keys already in it, and its
/// preallocated capacity (0: grow by concatenation).
type LayerCache<'a> = (&'a mut Option<(Tensor, Tensor)>, i64, i64);

/// One decoder block's weights (views of the flat parameters).
pub struct Layer {
    /// RMSNorm gain before attention `[dim]`.
    pub input_norm: Tensor,
    /// `[q_proj; k_proj; v_proj]` as one matrix.
    pub w_qkv: Tensor,
    /// `o_proj` `[dim, heads · head_dim]`.
    pub wo: Tensor,
    /// RMSNorm gain before the MLP `[dim]`.
    pub post_norm: Tensor,
    /// `[gate_proj; up_proj]` as one matrix.
    pub w_gate_up: Tensor,
    /// `down_proj` `[dim, ffn_dim]`.
    pub w_down: Tensor,
}

/// The decoder. Parameters live in a [`ParamStore`]; this struct holds views of them.
pub struct Transformer {
    /// Shape.
    pub shape: ModelShape,
    /// Parameters (flat buffer + views).
    pub params: ParamStore,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    rope: Rope,
}

impl Transformer {
    /// A model with zeroed parameters of `kind` on `device`; call
    /// [`ParamStore::initialise`] or load weights.
    pub fn new(shape: ModelShape, kind: Kind, device: Device) -> Self {
        Self::with_flat_len(shape, kind, device, 0)
    }

    /// As [`Transformer::new`] with the flat parameter buffer padded to at least `flat_len`.
    pub fn with_flat_len(shape: ModelShape, kind: Kind, device: Device, flat_len: i64) -> Self {
        let params = ParamStore::new(FlatLayout::of(&shape), kind, device, flat_len);
        let t = |name: &str| params.leaf(name).shallow_clone();
        let layers = (0..shape.n_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Layer {
                    input_norm: t(&format!("{p}.input_layernorm.weight")),
                    w_qkv: t(&format!("{p}.self_attn.qkv")),
                    wo: t(&format!("{p}.self_attn.o_proj.weight")),
                    post_norm: t(&format!("{p}.post_attention_layernorm.weight")),
                    w_gate_up: t(&format!("{p}.mlp.gate_up")),
                    w_down: t(&format!("{p}.mlp.down_proj.weight")),
                }
            })
            .collect();
        let rope = Rope::new(shape.head_dim() as i64, shape.max_seq_len as i64, shape.rope_theta, kind, device);
        Transformer {
            embed: t("model.embed_tokens.weight"),
            norm: t("model.norm.weight"),
            lm_head: t("lm_head.weight"),
            layers,
            rope,
            params,
            shape,
        }
    }

    /// Device of the parameters.
    pub fn device(&self) -> Device {
        self.embed.device()
    }

    /// Block `i`'s weights.
    pub fn layer(&self, i: usize) -> &Layer {
        &self.layers[i]
    }

    /// The RoPE tables.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// Token embeddings `[batch, seq, dim]`.
    pub fn embed(&self, tokens: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed, tokens, -1, false, false)
    }

    /// Decoder block `i` on `x` `[batch, seq, dim]` whose first token is at position 0.
    pub fn block(&self, i: usize, x: &Tensor) -> Tensor {
        self.block_at(i, x, 0, None)
    }

    /// Decoder block `i` on `x`, whose rows are packed as `packing` says (if at all).
    pub fn block_packed(&self, i: usize, x: &Tensor, packing: Option<&Packing>) -> Tensor {
        let Some(p) = packing else { return self.block(i, x) };
        self.block_masked(i, x, &p.positions, &p.mask, None)
    }

    fn block_masked(
        &self,
        i: usize,
        x: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        cache: Option<LayerCache<'_>>,
    ) -> Tensor {
        let (l, eps) = (&self.layers[i], self.shape.norm_eps);
        let h = x + self.masked_attention(l, &rms_norm(x, &l.input_norm, eps), positions, mask, cache);
        &h + self.mlp(l, &rms_norm(&h, &l.post_norm, eps))
    }

    /// Final hidden states of `tokens` `[batch, t]` at `positions` `[batch, t]`, attending
    /// to the keys in `cache` and themselves as `mask` `[batch, 1, t, cached + t]` allows;
    /// the cache is extended with the new keys. (Batched decoding of rows of different
    /// lengths: each row has its own positions, and padding is masked out.)
    pub fn hidden_masked(&self, tokens: &Tensor, positions: &Tensor, mask: &Tensor, cache: &mut KvCache) -> Tensor {
        cache.layers.resize_with(self.layers.len(), || None);
        let mut x = self.embed(tokens);
        let (filled, capacity) = (cache.filled, cache.capacity);
        for i in 0..self.layers.len() {
            x = self.block_masked(i, &x, positions, mask, Some((&mut cache.layers[i], filled, capacity)));
        }
        cache.filled += tokens.size()[1];
        self.final_norm(&x)
    }

    /// Final hidden states for `tokens` packed as `packing` says.
    pub fn hidden_packed(&self, tokens: &Tensor, packing: &Packing) -> Tensor {
        let mut x = self.embed(tokens);
        for i in 0..self.layers.len() {
            x = self.block_packed(i, &x, Some(packing));
        }
        self.final_norm(&x)
    }

    /// The final RMSNorm.
    pub fn final_norm(&self, x: &Tensor) -> Tensor {
        rms_norm(x, &self.norm, self.shape.norm_eps)
    }

    /// The LM head's weight `[vocab, dim]`.
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    fn block_at(
        &self,
        i: usize,
        x: &Tensor,
        start: i64,
        cache: Option<(&mut Option<(Tensor, Tensor)>, i64)>,
    ) -> Tensor {
        let (l, eps) = (&self.layers[i], self.shape.norm_eps);
        let h = x + self.attention(l, &rms_norm(x, &l.input_norm, eps), start, cache);
        &h + self.mlp(l, &rms_norm(&h, &l.post_norm, eps))
    }

    /// Final hidden states `[batch, seq, dim]` for `tokens` `[batch, seq]`. With a cache,
    /// the tokens continue the cached sequence and the cache is extended.
    pub fn hidden(&self, tokens: &Tensor, mut cache: Option<&mut KvCache>) -> Tensor {
        let seq = tokens.size()[1];
        let start = cache.as_ref().map_or(0, |c| c.next);
        let max = self.shape.max_seq_len as i64;
        assert!(start + seq <= max, "positions up to {} exceed max_seq_len {max}", start + seq);
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize_with(self.layers.len(), || None);
        }
        let mut x = self.embed(tokens);
        for i in 0..self.layers.len() {
            let layer_cache = cache.as_deref_mut().map(|c| (&mut c.layers[i], c.start));
            x = self.block_at(i, &x, start, layer_cache);
        }
        if let Some(c) = cache {
            c.next = start + seq;
            c.start = (c.next - (self.shape.sliding_window as i64 - 1)).max(0);
            let keep = c.next - c.start;
            for (k, v) in c.layers.iter_mut().flatten() {
                let len = k.size()[2];
                if len > keep {
                    *k = k.narrow(2, len - keep, keep);
                    *v = v.narrow(2, len - keep, keep);
                }
            }
        }
        self.final_norm(&x)
    }

    /// Logits `[batch, seq, vocab]` for `tokens` `[batch, seq]`.
    pub fn forward(&self, tokens: &Tensor, cache: Option<&mut KvCache>) -> Tensor {
        linear(&self.hidden(tokens, cache), &self.lm_head)
    }

    /// Logits `[batch, vocab]` of the last position only (what decoding needs).
    pub fn forward_last(&self, tokens: &Tensor, cache: Option<&mut KvCache>) -> Tensor {
        let h = self.hidden(tokens, cache);
        let seq = h.size()[1];
        linear(&h.select(1, seq - 1), &self.lm_head)
    }

    fn attention(
        &self,
        l: &Layer,
        x: &Tensor,
        start: i64,
        cache: Option<(&mut Option<(Tensor, Tensor)>, i64)>,
    ) -> Tensor {
        let s = &self.shape;
        let (b, t) = (x.size()[0], x.size()[1]);
        let (heads, kv_heads, hd) = (s.n_heads as i64, s.n_kv_heads as i64, s.head_dim() as i64);
        let window = s.sliding_window as i64;
        // split (not narrow): its backward assembles the fused gradient with one cat.
        let qkv = linear(x, &l.w_qkv).split_with_sizes([heads * hd, kv_heads * hd, kv_heads * hd], 2);
        let split_heads = |t_: &Tensor, n: i64| t_.view([b, t, n, hd]).transpose(1, 2);
        let q = self.rope.apply(&split_heads(&qkv[0], heads), start);
        let mut k = self.rope.apply(&split_heads(&qkv[1], kv_heads), start);
        let mut v = split_heads(&qkv[2], kv_heads);
        let mut key_start = start;
        if let Some((slot, cache_start)) = cache {
            if let Some((past_k, past_v)) = slot.as_ref() {
                k = Tensor::cat(&[past_k, &k], 2);
                v = Tensor::cat(&[past_v, &v], 2);
                key_start = cache_start;
            }
            *slot = Some((k.shallow_clone(), v.shallow_clone()));
        }
        let keys = k.size()[2];
        let out = if key_start == start {
            self.self_attention(&q, &k, &v, None)
        } else if t == 1 && keys <= window {
            // One new token that may see every cached one.
            Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, true)
        } else {
            let mask = window_mask(start, t, key_start, keys, window, x.device());
            Tensor::scaled_dot_product_attention(&q, &k, &v, Some(mask), 0.0, false, None, true)
        };
        linear(&out.transpose(1, 2).reshape([b, t, heads * hd]), &l.wo)
    }

    /// Attention with per-token positions and an explicit mask over (cached and new) keys.
    /// `cache`: the layer's slot, the keys already in it, and its preallocated capacity.
    fn masked_attention(
        &self,
        l: &Layer,
        x: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        cache: Option<LayerCache<'_>>,
    ) -> Tensor {
        let s = &self.shape;
        let (b, t) = (x.size()[0], x.size()[1]);
        let (heads, kv_heads, hd) = (s.n_heads as i64, s.n_kv_heads as i64, s.head_dim() as i64);
        let qkv = linear(x, &l.w_qkv).split_with_sizes([heads * hd, kv_heads * hd, kv_heads * hd], 2);
        let split_heads = |t_: &Tensor, n: i64| t_.view([b, t, n, hd]).transpose(1, 2);
        let q = self.rope.apply_at(&split_heads(&qkv[0], heads), positions);
        let mut k = self.rope.apply_at(&split_heads(&qkv[1], kv_heads), positions);
        let mut v = split_heads(&qkv[2], kv_heads);
        match cache {
            Some((slot, filled, capacity)) if capacity > 0 => {
                assert!(filled + t <= capacity, "KV cache of {capacity} keys overflows (generate sizes it)");
                let (kb, vb) = slot.get_or_insert_with(|| {
                    let empty = || Tensor::zeros([b, kv_heads, capacity, hd], (k.kind(), k.device()));
                    (empty(), empty())
                });
                kb.narrow(2, filled, t).copy_(&k);
                vb.narrow(2, filled, t).copy_(&v);
                k = kb.narrow(2, 0, filled + t);
                v = vb.narrow(2, 0, filled + t);
            }
            Some((slot, _, _)) => {
                if let Some((past_k, past_v)) = slot.as_ref() {
                    k = Tensor::cat(&[past_k, &k], 2);
                    v = Tensor::cat(&[past_v, &v], 2);
                }
                *slot = Some((k.shallow_clone(), v.shallow_clone()));
            }
            None => {}
        }
        let out = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(mask), 0.0, false, None, true);
        linear(&out.transpose(1, 2).reshape([b, t, heads * hd]), &l.wo)
    }

    /// Attention of a sequence's queries `q` `[b, heads, t, hd]` to its own keys and values
    /// `[b, kv_heads, t, hd]` (no cache): causal inside the sliding window, and, with
    /// `packing`, only within each packed sequence.
    pub fn self_attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, packing: Option<&Packing>) -> Tensor {
        let (t, window) = (q.size()[2], self.shape.sliding_window as i64);
        if let Some(p) = packing {
            Tensor::scaled_dot_product_attention(q, k, v, Some(&p.mask), 0.0, false, None, true)
        } else if t <= window && prefers_grouped_products(q) {
            grouped_causal_attention(q, k, v)
        } else if t <= window {
            // Plain causal attention: every earlier token is inside the window.
            Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, true, None, true)
        } else {
            windowed_attention(q, k, v, window)
        }
    }

    fn mlp(&self, l: &Layer, x: &Tensor) -> Tensor {
        let gate_up = linear(x, &l.w_gate_up).split(self.shape.ffn_dim as i64, 2);
        linear(&(gate_up[0].silu() * &gate_up[1]), &l.w_down)
    }
}

/// `x · wᵀ` (`x` `[.., in]`, `w` `[out, in]`), differentiable.
///
/// fp32 on the CPU, from [`ONEDNN_MIN_ROWS`] rows, goes through oneDNN (`mkldnn_linear`,
/// whose backward autograd runs in oneDNN too) instead of ATen's `linear`, which calls MKL's
/// sgemm: on AMD CPUs MKL takes its AVX2 path, and on the CI machine's Zen 5 oneDNN's
/// AVX-512 kernels do bench-small's projections forward and backward 1.3–2.0× faster,
/// conversions to and from oneDNN's tensors included (BENCHMARKS.md). Its results differ
/// from MKL's by summation order only (relative 1e-6). `MOXIN_CPU_LINEAR=aten` keeps ATen's.
pub fn linear(x: &Tensor, w: &Tensor) -> Tensor {
    let size = x.size();
    let in_features = *size.last().expect("linear of a scalar");
    let rows = x.numel() as i64 / in_features.max(1);
    if x.device() == Device::Cpu
        && x.kind() == Kind::Float
        && w.kind() == Kind::Float
        && rows >= ONEDNN_MIN_ROWS
        && cpu_linear_uses_onednn()
    {
        let through_onednn = x
            .reshape([rows, in_features])
            .f_to_mkldnn(None::<Kind>)
            .and_then(|onednn| onednn.f_mkldnn_linear(w, None::<Tensor>))
            .and_then(|y| y.f_to_dense(None::<Kind>, false));
        match through_onednn {
            Ok(y) => {
                let mut out_size = size.clone();
                *out_size.last_mut().expect("non-empty") = w.size()[0];
                return y.reshape(out_size);
            }
            Err(e) => {
                tracing::warn!("oneDNN's linear failed ({e}); using ATen's from now on");
                ONEDNN_FAILED.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
    x.linear(w, None::<Tensor>)
}

/// Below this many rows (decoding a few sequences) MKL's small-row GEMMs were as fast or
/// faster than oneDNN with its conversions (measured at 16, 64 and 256 rows).
pub const ONEDNN_MIN_ROWS: i64 = 64;

/// What [`linear`] runs fp32 CPU projections on, in words (for `doctor`).
pub fn cpu_linear_route() -> String {
    if cpu_linear_uses_onednn() {
        format!("oneDNN from {ONEDNN_MIN_ROWS} rows (MKL below); MOXIN_CPU_LINEAR=aten for ATen/MKL only")
    } else {
        "ATen/MKL (MOXIN_CPU_LINEAR=aten, or oneDNN failed)".into()
    }
}

/// Set when oneDNN's linear failed once (a libtorch built without it): ATen's from then on.
static ONEDNN_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether [`linear`] may use oneDNN: unless `MOXIN_CPU_LINEAR=aten` (read once) or it failed.
fn cpu_linear_uses_onednn() -> bool {
    static CHOICE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| std::env::var("MOXIN_CPU_LINEAR").map_or(true, |v| v != "aten"))
        && !ONEDNN_FAILED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether causal attention over `q` `[b, heads, t, hd]` is faster as two bf16 matrix
/// products around a softmax than through libtorch's CPU flash kernel: bf16 on the CPU, up
/// to 256 tokens. That kernel does its block products in MKL, which on CPUs it does not
/// recognise (AMD's) runs them at fp32 speed, while `matmul` reaches oneDNN's bf16 kernels
/// (bench-small's shapes, forward and backward: 9.7 ms against 19.1 per layer on the CI
/// machine's AMD EPYC). The scores are materialised (`[b, heads, t, t]`), so longer
/// sequences stay on the flash kernel, which is faster there from 1024 tokens on.
fn prefers_grouped_products(q: &Tensor) -> bool {
    q.device() == Device::Cpu && q.kind() == Kind::BFloat16 && q.size()[2] <= 256 && q.size()[2] > 1
}

/// Causal attention (`is_causal` SDPA with grouped query heads, no window) as
/// `softmax(q·kᵀ/√hd + causal) · v`, each KV head's query heads stacked into one product
/// (query head `i` reads KV head `i / (heads / kv_heads)`, as SDPA's `enable_gqa`).
/// `q` `[b, heads, t, hd]`, `k`/`v` `[b, kv_heads, t, hd]`.
pub fn grouped_causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let (b, heads, t, hd) = (q.size()[0], q.size()[1], q.size()[2], q.size()[3]);
    let kv_heads = k.size()[1];
    let group = heads / kv_heads;
    let stacked = (q * (hd as f64).powf(-0.5)).reshape([b, kv_heads, group * t, hd]);
    // 0 where a query may see a key, −∞ after it; one [t, t] block per stacked head.
    let causal = Tensor::full([t, t], f64::NEG_INFINITY, (q.kind(), q.device())).triu(1).repeat([group, 1]);
    let probs = (stacked.matmul(&k.transpose(-1, -2)) + causal).softmax(-1, q.kind());
    probs.matmul(v).view([b, heads, t, hd])
}

/// Sliding-window causal attention over a sequence longer than the window, in query blocks
/// of `window` tokens: block `j` attends to keys `[j·w − w + 1, (j+1)·w)` through a
/// `[w, 2w − 1]` band mask, so memory grows with `seq · window`, never `seq²`.
/// `q` `[b, heads, t, hd]`, `k`/`v` `[b, kv_heads, t, hd]`, positions from 0.
pub fn windowed_attention(q: &Tensor, k: &Tensor, v: &Tensor, window: i64) -> Tensor {
    let t = q.size()[2];
    let device = q.device();
    let mut outs = Vec::new();
    let mut q_start = 0;
    while q_start < t {
        let n = window.min(t - q_start);
        let k_start = (q_start - window + 1).max(0);
        let keys = q_start + n - k_start;
        let (qb, kb, vb) = (q.narrow(2, q_start, n), k.narrow(2, k_start, keys), v.narrow(2, k_start, keys));
        let out = if k_start == q_start {
            Tensor::scaled_dot_product_attention(&qb, &kb, &vb, None::<Tensor>, 0.0, true, None, true)
        } else {
            let mask = window_mask(q_start, n, k_start, keys, window, device);
            Tensor::scaled_dot_product_attention(&qb, &kb, &vb, Some(mask), 0.0, false, None, true)
        };
        outs.push(out);
        q_start += n;
    }
    Tensor::cat(&outs, 2)
}

/// Boolean `[queries, keys]` mask (true = may attend) for queries at positions
/// `q_start..q_start + queries` over keys at `k_start..k_start + keys`: causal, and each
/// query sees itself and the `window - 1` tokens before it.
pub fn window_mask(q_start: i64, queries: i64, k_start: i64, keys: i64, window: i64, device: Device) -> Tensor {
    let q = Tensor::arange_start(q_start, q_start + queries, (Kind::Int64, device)).unsqueeze(1);
    let k = Tensor::arange_start(k_start, k_start + keys, (Kind::Int64, device)).unsqueeze(0);
    let behind = &q - &k;
    behind.ge(0).logical_and(&behind.lt(window))
}
