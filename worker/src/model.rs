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
//! checkpoint's `model.safetensors` is already in HF layout.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::params::{Init, ParamDecl, ParamGroup, ParamStore};

/// Model shape, from [`moxin_proto::v1::ModelSpec`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct ModelConfig {
    pub vocab_size: i64,
    pub dim: i64,
    pub n_layers: i64,
    pub n_heads: i64,
    pub n_kv_heads: i64,
    pub ffn_dim: i64,
    pub max_seq_len: i64,
    pub sliding_window: i64,
    pub rope_theta: f64,
    pub norm_eps: f64,
    pub init_std: f64,
}

impl From<&moxin_proto::v1::ModelSpec> for ModelConfig {
    fn from(s: &moxin_proto::v1::ModelSpec) -> Self {
        ModelConfig {
            vocab_size: s.vocab_size as i64,
            dim: s.dim as i64,
            n_layers: s.n_layers as i64,
            n_heads: s.n_heads as i64,
            n_kv_heads: s.n_kv_heads as i64,
            ffn_dim: s.ffn_dim as i64,
            max_seq_len: s.max_seq_len as i64,
            sliding_window: s.sliding_window as i64,
            rope_theta: s.rope_theta,
            norm_eps: s.norm_eps,
            init_std: s.init_std,
        }
    }
}

impl ModelConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> i64 {
        self.dim / self.n_heads
    }

    /// Every parameter in model order, with HF names, shapes and initialisation:
    /// normal(0, init_std), output projections (o_proj, down_proj) scaled by
    /// 1/sqrt(2 * n_layers) as in GPT-2, norm gains at one. q/k/v and gate/up are grouped
    /// into fused leaves (see [`ParamGroup`]).
    pub fn param_groups(&self) -> Vec<ParamGroup> {
        let (d, hd) = (self.dim, self.head_dim());
        let std = self.init_std;
        let out_std = std / (2.0 * self.n_layers as f64).sqrt();
        let mut order = 0;
        let mut decl = |name: String, shape: Vec<i64>, init| {
            order += 1;
            ParamDecl { name, shape, init, order }
        };
        let mut v = vec![ParamGroup::single(decl(
            "model.embed_tokens.weight".into(),
            vec![self.vocab_size, d],
            Init::Normal { std },
        ))];
        for i in 0..self.n_layers {
            let p = format!("model.layers.{i}");
            v.push(ParamGroup::single(decl(format!("{p}.input_layernorm.weight"), vec![d], Init::Ones)));
            v.push(ParamGroup {
                name: format!("{p}.self_attn.qkv"),
                members: vec![
                    decl(format!("{p}.self_attn.q_proj.weight"), vec![self.n_heads * hd, d], Init::Normal { std }),
                    decl(format!("{p}.self_attn.k_proj.weight"), vec![self.n_kv_heads * hd, d], Init::Normal { std }),
                    decl(format!("{p}.self_attn.v_proj.weight"), vec![self.n_kv_heads * hd, d], Init::Normal { std }),
                ],
            });
            v.push(ParamGroup::single(decl(
                format!("{p}.self_attn.o_proj.weight"),
                vec![d, self.n_heads * hd],
                Init::Normal { std: out_std },
            )));
            v.push(ParamGroup::single(decl(format!("{p}.post_attention_layernorm.weight"), vec![d], Init::Ones)));
            v.push(ParamGroup {
                name: format!("{p}.mlp.gate_up"),
                members: vec![
                    decl(format!("{p}.mlp.gate_proj.weight"), vec![self.ffn_dim, d], Init::Normal { std }),
                    decl(format!("{p}.mlp.up_proj.weight"), vec![self.ffn_dim, d], Init::Normal { std }),
                ],
            });
            v.push(ParamGroup::single(decl(
                format!("{p}.mlp.down_proj.weight"),
                vec![d, self.ffn_dim],
                Init::Normal { std: out_std },
            )));
        }
        v.push(ParamGroup::single(decl("model.norm.weight".into(), vec![d], Init::Ones)));
        v.push(ParamGroup::single(decl("lm_head.weight".into(), vec![self.vocab_size, d], Init::Normal { std })));
        v
    }

    /// Parameter elements in total.
    pub fn param_count(&self) -> i64 {
        self.param_decls().iter().map(ParamDecl::numel).sum()
    }

    /// Every parameter declaration in model order.
    pub fn param_decls(&self) -> Vec<ParamDecl> {
        self.param_groups().into_iter().flat_map(|g| g.members).collect()
    }
}

/// Precomputed RoPE rotation for positions `0..max_seq_len` (fp32, `[positions, head_dim]`),
/// in Hugging Face's rotate-half layout: frequency `i` applies to dims `i` and `i + hd/2`.
#[derive(Debug)]
pub struct Rope {
    cos: Tensor,
    /// `[-sin, sin]` over the two halves: `rotate_half(x) * sin == swap_halves(x) * signed_sin`,
    /// which saves a negation pass per call.
    signed_sin: Tensor,
}

impl Rope {
    /// Tables for `positions` positions.
    pub fn new(head_dim: i64, positions: i64, theta: f64, device: Device) -> Self {
        let inv_freq = Tensor::arange_start(0, head_dim / 2, (Kind::Float, device))
            .f_mul_scalar(-2.0 * theta.ln() / head_dim as f64)
            .unwrap()
            .exp();
        let t = Tensor::arange(positions, (Kind::Float, device));
        let freqs = t.outer(&inv_freq);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let sin = freqs.sin();
        Rope { cos: emb.cos(), signed_sin: Tensor::cat(&[-&sin, sin], -1) }
    }

    /// Rotates `x` `[batch, heads, seq, head_dim]` whose first token sits at `start`.
    pub fn apply(&self, x: &Tensor, start: i64) -> Tensor {
        let seq = x.size()[2];
        let kind = x.kind();
        let cos = self.cos.narrow(0, start, seq).to_kind(kind);
        let signed_sin = self.signed_sin.narrow(0, start, seq).to_kind(kind);
        let half = x.size()[3] / 2;
        x * cos + x.roll([half], [-1]) * signed_sin
    }
}

/// RMSNorm: `x / sqrt(mean(x²) + eps) * weight`, computed in at least fp32 (as HF does).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    let dim = x.size().last().copied().unwrap();
    let compute = if matches!(kind, Kind::Half | Kind::BFloat16) { Kind::Float } else { kind };
    x.to_kind(compute).rms_norm([dim], None::<Tensor>, eps).to_kind(kind) * weight
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
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        KvCache::default()
    }

    /// Position of the next token to be fed.
    pub fn next_position(&self) -> i64 {
        self.next
    }
}

struct Layer {
    input_norm: Tensor,
    /// `[q_proj; k_proj; v_proj]` as one matrix.
    w_qkv: Tensor,
    wo: Tensor,
    post_norm: Tensor,
    /// `[gate_proj; up_proj]` as one matrix.
    w_gate_up: Tensor,
    w_down: Tensor,
}

/// The decoder. Parameters live in a [`ParamStore`]; this struct holds views of them.
pub struct Transformer {
    /// Shape.
    pub config: ModelConfig,
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
    /// [`ParamStore::initialise`] (after `tch::manual_seed`) or load weights.
    pub fn new(config: ModelConfig, kind: Kind, device: Device) -> Self {
        Self::with_flat_len(config, kind, device, 0)
    }

    /// As [`Transformer::new`] with the flat parameter buffer padded to at least `flat_len`.
    pub fn with_flat_len(config: ModelConfig, kind: Kind, device: Device, flat_len: i64) -> Self {
        let params = ParamStore::new(config.param_groups(), kind, device, flat_len);
        let t = |name: &str| params.leaf(name).shallow_clone();
        let layers = (0..config.n_layers)
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
        let rope = Rope::new(config.head_dim(), config.max_seq_len, config.rope_theta, device);
        Transformer {
            embed: t("model.embed_tokens.weight"),
            norm: t("model.norm.weight"),
            lm_head: t("lm_head.weight"),
            layers,
            rope,
            params,
            config,
        }
    }

    /// Device of the parameters.
    pub fn device(&self) -> Device {
        self.embed.device()
    }

    /// Final hidden states `[batch, seq, dim]` for `tokens` `[batch, seq]`. With a cache,
    /// the tokens continue the cached sequence and the cache is extended.
    pub fn hidden(&self, tokens: &Tensor, mut cache: Option<&mut KvCache>) -> Tensor {
        let seq = tokens.size()[1];
        let start = cache.as_ref().map_or(0, |c| c.next);
        assert!(
            start + seq <= self.config.max_seq_len,
            "positions up to {} exceed max_seq_len {}",
            start + seq,
            self.config.max_seq_len
        );
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize_with(self.layers.len(), || None);
        }
        let mut x = Tensor::embedding(&self.embed, tokens, -1, false, false);
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| (&mut c.layers[i], c.start));
            let h =
                &x + self.attention(layer, &rms_norm(&x, &layer.input_norm, self.config.norm_eps), start, layer_cache);
            x = &h + self.mlp(layer, &rms_norm(&h, &layer.post_norm, self.config.norm_eps));
        }
        if let Some(c) = cache {
            c.next = start + seq;
            c.start = (c.next - (self.config.sliding_window - 1)).max(0);
            let keep = c.next - c.start;
            for (k, v) in c.layers.iter_mut().flatten() {
                let len = k.size()[2];
                if len > keep {
                    *k = k.narrow(2, len - keep, keep);
                    *v = v.narrow(2, len - keep, keep);
                }
            }
        }
        rms_norm(&x, &self.norm, self.config.norm_eps)
    }

    /// Logits `[batch, seq, vocab]` for `tokens` `[batch, seq]`.
    pub fn forward(&self, tokens: &Tensor, cache: Option<&mut KvCache>) -> Tensor {
        self.hidden(tokens, cache).linear(&self.lm_head, None::<Tensor>)
    }

    /// Logits `[batch, vocab]` of the last position only (what decoding needs).
    pub fn forward_last(&self, tokens: &Tensor, cache: Option<&mut KvCache>) -> Tensor {
        let h = self.hidden(tokens, cache);
        let seq = h.size()[1];
        h.select(1, seq - 1).linear(&self.lm_head, None::<Tensor>)
    }

    /// Mean next-token cross-entropy (fp32) of `batch` `[b, seq + 1]`: inputs are the first
    /// `seq` tokens, targets the last `seq`.
    pub fn loss(&self, batch: &Tensor) -> Tensor {
        let len = batch.size()[1] - 1;
        let inputs = batch.narrow(1, 0, len);
        let targets = batch.narrow(1, 1, len);
        let logits = self.forward(&inputs, None).to_kind(Kind::Float);
        logits.view([-1, self.config.vocab_size]).cross_entropy_for_logits(&targets.reshape([-1]))
    }

    fn attention(
        &self,
        l: &Layer,
        x: &Tensor,
        start: i64,
        cache: Option<(&mut Option<(Tensor, Tensor)>, i64)>,
    ) -> Tensor {
        let c = &self.config;
        let (b, t, hd) = (x.size()[0], x.size()[1], c.head_dim());
        // split (not narrow): its backward assembles the fused gradient with one cat.
        let qkv = x
            .linear(&l.w_qkv, None::<Tensor>)
            .split_with_sizes([c.n_heads * hd, c.n_kv_heads * hd, c.n_kv_heads * hd], 2);
        let heads = |t_: &Tensor, n: i64| t_.view([b, t, n, hd]).transpose(1, 2);
        let q = self.rope.apply(&heads(&qkv[0], c.n_heads), start);
        let mut k = self.rope.apply(&heads(&qkv[1], c.n_kv_heads), start);
        let mut v = heads(&qkv[2], c.n_kv_heads);
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
        let out = if key_start == start && t <= c.sliding_window {
            // Plain causal attention: every earlier token is inside the window.
            Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, None, true)
        } else if t == 1 && keys <= c.sliding_window {
            // One new token that may see every cached one.
            Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, true)
        } else {
            let mask = window_mask(start, t, key_start, keys, c.sliding_window, x.device());
            Tensor::scaled_dot_product_attention(&q, &k, &v, Some(mask), 0.0, false, None, true)
        };
        out.transpose(1, 2).reshape([b, t, c.n_heads * hd]).linear(&l.wo, None::<Tensor>)
    }

    fn mlp(&self, l: &Layer, x: &Tensor) -> Tensor {
        let gate_up = x.linear(&l.w_gate_up, None::<Tensor>).split(self.config.ffn_dim, 2);
        (gate_up[0].silu() * &gate_up[1]).linear(&l.w_down, None::<Tensor>)
    }
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
