//! The model shape: the one type every crate uses for it.

use moxin_proto::v1::ModelSpec;
use serde::{Deserialize, Serialize};

use crate::params::{Init, ParamDecl, ParamGroup};

/// A complete Mistral-style decoder shape. Field names follow the preset files
/// (`configs/models/*.toml`); the wire form is [`ModelSpec`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    /// Vocabulary size (rows of the embedding and the LM head).
    pub vocab_size: u32,
    /// Model width (hidden_size).
    pub dim: u32,
    /// Decoder blocks.
    pub n_layers: u32,
    /// Query heads.
    pub n_heads: u32,
    /// Key/value heads (grouped-query attention); divides `n_heads`.
    pub n_kv_heads: u32,
    /// SwiGLU hidden size (intermediate_size).
    pub ffn_dim: u32,
    /// Longest sequence the model is built for.
    pub max_seq_len: u32,
    /// Sliding attention window: each token sees itself and the `sliding_window - 1` before it.
    pub sliding_window: u32,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
    /// Standard deviation of the normal initialisation.
    pub init_std: f64,
}

/// Most parameters a model shape may have: ten trillion, far beyond any model trained
/// today, and small enough that every count derived from it (bytes, flat offsets as `i64`)
/// is exact.
pub const MAX_PARAMS: u64 = 10_000_000_000_000;

/// A shape with more than [`MAX_PARAMS`] parameters, and the field that makes it so (its
/// largest factor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeTooLarge {
    /// The field of [`ModelShape`] to blame (`n_layers`, `dim`, `ffn_dim`, `vocab_size`).
    pub field: &'static str,
    /// Its value.
    pub value: u32,
    /// The parameter count, `None` when it does not fit in 64 bits.
    pub params: Option<u64>,
}

impl ShapeTooLarge {
    /// What is wrong, without the field (for errors that name it their own way).
    pub fn reason(&self) -> String {
        let params = self.params.map_or("more than 2^64".to_string(), |n| n.to_string());
        format!("gives a model of {params} parameters; at most {MAX_PARAMS} are supported")
    }
}

impl std::fmt::Display for ShapeTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} = {}: {}", self.field, self.value, self.reason())
    }
}

impl std::error::Error for ShapeTooLarge {}

/// A shape [`ModelShape::check`] refuses: the field (spelled as the caller's input spells
/// it), its value, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeInvalid {
    /// The field, as the caller named it.
    pub field: String,
    /// Its value.
    pub value: String,
    /// What is wrong and what to do.
    pub reason: String,
}

impl std::fmt::Display for ShapeInvalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} = {}: {}", self.field, self.value, self.reason)
    }
}

impl std::error::Error for ShapeInvalid {}

/// Parameters of one class (embedding, attention, MLP, norms, LM head).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParamClass {
    /// Class name.
    pub class: &'static str,
    /// Parameters.
    pub params: u64,
}

impl From<&ModelSpec> for ModelShape {
    fn from(s: &ModelSpec) -> Self {
        ModelShape {
            vocab_size: s.vocab_size,
            dim: s.dim,
            n_layers: s.n_layers,
            n_heads: s.n_heads,
            n_kv_heads: s.n_kv_heads,
            ffn_dim: s.ffn_dim,
            max_seq_len: s.max_seq_len,
            sliding_window: s.sliding_window,
            rope_theta: s.rope_theta,
            norm_eps: s.norm_eps,
            init_std: s.init_std,
        }
    }
}

impl ModelShape {
    /// The wire form, recording the preset it came from.
    pub fn to_spec(&self, preset: &str) -> ModelSpec {
        ModelSpec {
            preset: preset.to_string(),
            vocab_size: self.vocab_size,
            dim: self.dim,
            n_layers: self.n_layers,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            ffn_dim: self.ffn_dim,
            max_seq_len: self.max_seq_len,
            sliding_window: self.sliding_window,
            rope_theta: self.rope_theta,
            norm_eps: self.norm_eps,
            init_std: self.init_std,
            init_from: String::new(),
        }
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> u32 {
        self.dim / self.n_heads.max(1)
    }

    /// Every parameter in model order, with Hugging Face `MistralForCausalLM` names, shapes
    /// and initialisation: normal(0, init_std), output projections (o_proj, down_proj)
    /// scaled by 1/sqrt(2 n_layers) as in GPT-2, norm gains at one. q/k/v and gate/up are
    /// grouped into fused leaves so each is one GEMM.
    pub fn param_groups(&self) -> Vec<ParamGroup> {
        let (d, hd) = (self.dim as i64, self.head_dim() as i64);
        let (heads, kv, ffn, vocab) =
            (self.n_heads as i64, self.n_kv_heads as i64, self.ffn_dim as i64, self.vocab_size as i64);
        let std = self.init_std;
        let out_std = std / (2.0 * self.n_layers.max(1) as f64).sqrt();
        let mut order = 0;
        let mut decl = |name: String, shape: Vec<i64>, init| {
            order += 1;
            ParamDecl { name, shape, init, order }
        };
        let mut v =
            vec![ParamGroup::single(decl("model.embed_tokens.weight".into(), vec![vocab, d], Init::Normal { std }))];
        for i in 0..self.n_layers {
            let p = format!("model.layers.{i}");
            v.push(ParamGroup::single(decl(format!("{p}.input_layernorm.weight"), vec![d], Init::Ones)));
            v.push(ParamGroup::fused(
                format!("{p}.self_attn.qkv"),
                vec![
                    decl(format!("{p}.self_attn.q_proj.weight"), vec![heads * hd, d], Init::Normal { std }),
                    decl(format!("{p}.self_attn.k_proj.weight"), vec![kv * hd, d], Init::Normal { std }),
                    decl(format!("{p}.self_attn.v_proj.weight"), vec![kv * hd, d], Init::Normal { std }),
                ],
            ));
            v.push(ParamGroup::single(decl(
                format!("{p}.self_attn.o_proj.weight"),
                vec![d, heads * hd],
                Init::Normal { std: out_std },
            )));
            v.push(ParamGroup::single(decl(format!("{p}.post_attention_layernorm.weight"), vec![d], Init::Ones)));
            v.push(ParamGroup::fused(
                format!("{p}.mlp.gate_up"),
                vec![
                    decl(format!("{p}.mlp.gate_proj.weight"), vec![ffn, d], Init::Normal { std }),
                    decl(format!("{p}.mlp.up_proj.weight"), vec![ffn, d], Init::Normal { std }),
                ],
            ));
            v.push(ParamGroup::single(decl(
                format!("{p}.mlp.down_proj.weight"),
                vec![d, ffn],
                Init::Normal { std: out_std },
            )));
        }
        v.push(ParamGroup::single(decl("model.norm.weight".into(), vec![d], Init::Ones)));
        v.push(ParamGroup::single(decl("lm_head.weight".into(), vec![vocab, d], Init::Normal { std })));
        v
    }

    /// Every parameter declaration in model order.
    pub fn param_decls(&self) -> Vec<ParamDecl> {
        self.param_groups().into_iter().flat_map(|g| g.members).collect()
    }

    /// Parameter elements in total (the flat buffer's length before padding), saturating
    /// at `u64::MAX`; see [`checked_param_count`](Self::checked_param_count).
    pub fn param_count(&self) -> u64 {
        self.checked_param_count().unwrap_or(u64::MAX)
    }

    /// Parameter elements in total, counted from the dimensions (nothing is built, so any
    /// shape is cheap), or `None` when the count does not fit in 64 bits. Equal to the sum
    /// of [`param_decls`](Self::param_decls)' elements.
    pub fn checked_param_count(&self) -> Option<u64> {
        let (d, hd) = (u64::from(self.dim), u64::from(self.head_dim()));
        let (heads, kv, ffn, vocab) =
            (u64::from(self.n_heads), u64::from(self.n_kv_heads), u64::from(self.ffn_dim), u64::from(self.vocab_size));
        // Per layer: two norms, q and o, k and v, gate, up and down.
        let q_o = heads.checked_mul(hd)?.checked_mul(d)?.checked_mul(2)?;
        let k_v = kv.checked_mul(hd)?.checked_mul(d)?.checked_mul(2)?;
        let mlp = ffn.checked_mul(d)?.checked_mul(3)?;
        let layer = d.checked_mul(2)?.checked_add(q_o)?.checked_add(k_v)?.checked_add(mlp)?;
        // Embedding and LM head, and the final norm.
        let outer = vocab.checked_mul(d)?.checked_mul(2)?.checked_add(d)?;
        u64::from(self.n_layers).checked_mul(layer)?.checked_add(outer)
    }

    /// The parameter count when it is at most [`MAX_PARAMS`]; otherwise which field makes
    /// the model too large: the largest factor of the largest term (the layers' or the
    /// embeddings').
    pub fn check_size(&self) -> Result<u64, ShapeTooLarge> {
        let params = self.checked_param_count();
        if let Some(n) = params.filter(|&n| n <= MAX_PARAMS) {
            return Ok(n);
        }
        let (d, ffn) = (self.dim as f64, self.ffn_dim as f64);
        let layers = self.n_layers as f64 * d * (2.0 * d + 3.0 * ffn);
        let embeddings = 2.0 * self.vocab_size as f64 * d;
        let candidates: &[(&'static str, u32)] = if embeddings > layers {
            &[("vocab_size", self.vocab_size), ("dim", self.dim)]
        } else {
            &[("n_layers", self.n_layers), ("dim", self.dim), ("ffn_dim", self.ffn_dim)]
        };
        // The largest, the first of equals.
        let &(field, value) = candidates.iter().rev().max_by_key(|(_, v)| *v).unwrap_or(&("dim", self.dim));
        Err(ShapeTooLarge { field, value, params })
    }

    /// Whether the model can be built and trained: every count at least 1, the heads
    /// dividing the width and the key/value heads the heads, an even head size (RoPE),
    /// at most [`MAX_PARAMS`] parameters, and positive RoPE base, norm epsilon and init
    /// scale. `name` spells a field the way the caller's input does (`model.dim` in a job
    /// file, `hidden_size` in a Hugging Face `config.json`), in the error and its reason.
    pub fn check(&self, name: &dyn Fn(&str) -> String) -> Result<(), ShapeInvalid> {
        let invalid = |field: &str, value: &dyn std::fmt::Display, reason: String| ShapeInvalid {
            field: name(field),
            value: value.to_string(),
            reason,
        };
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("dim", self.dim),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("ffn_dim", self.ffn_dim),
            ("max_seq_len", self.max_seq_len),
            ("sliding_window", self.sliding_window),
        ] {
            if v == 0 {
                return Err(invalid(field, &v, "must be at least 1".into()));
            }
        }
        if !self.dim.is_multiple_of(self.n_heads) {
            let reason = format!(
                "does not divide {} = {}; pick {} so that the width divides into whole heads",
                name("dim"),
                self.dim,
                name("n_heads")
            );
            return Err(invalid("n_heads", &self.n_heads, reason));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            let reason = format!(
                "does not divide {} = {}; each KV head must serve a whole group of query heads",
                name("n_heads"),
                self.n_heads
            );
            return Err(invalid("n_kv_heads", &self.n_kv_heads, reason));
        }
        if !self.head_dim().is_multiple_of(2) {
            let reason = format!(
                "gives an odd head size {} ({} {}); RoPE needs an even one",
                self.head_dim(),
                name("dim"),
                self.dim
            );
            return Err(invalid("n_heads", &self.n_heads, reason));
        }
        if let Err(e) = self.check_size() {
            return Err(invalid(e.field, &e.value, e.reason()));
        }
        for (field, v) in [("rope_theta", self.rope_theta), ("norm_eps", self.norm_eps), ("init_std", self.init_std)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(invalid(field, &v, "must be a positive number".into()));
            }
        }
        Ok(())
    }

    /// Parameters per class, in the order embedding, attention, mlp, norm, lm_head.
    pub fn param_classes(&self) -> Vec<ParamClass> {
        let mut counts = [0u64; 5];
        for d in self.param_decls() {
            let class = if d.name.contains("embed_tokens") {
                0
            } else if d.name.contains("self_attn") {
                1
            } else if d.name.contains(".mlp.") {
                2
            } else if d.name.contains("norm") {
                3
            } else {
                4
            };
            counts[class] += d.numel() as u64;
        }
        ["embedding", "attention", "mlp", "norm", "lm_head"]
            .into_iter()
            .zip(counts)
            .map(|(class, params)| ParamClass { class, params })
            .collect()
    }

    /// Training FLOPs per token at sequence length `seq_len` (forward + backward):
    /// 6 per parameter plus causal attention, 6 · layers · dim · (attended keys), where a
    /// token attends on average to about `min(seq_len, sliding_window)` keys. This is the
    /// numerator of MFU as PaLM and torchtitan define it.
    pub fn train_flops_per_token(&self, seq_len: u32) -> f64 {
        let keys = seq_len.min(self.sliding_window) as f64;
        6.0 * self.param_count() as f64 + 6.0 * self.n_layers as f64 * self.dim as f64 * keys
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn moxin_7b() -> ModelShape {
        ModelShape {
            vocab_size: 32000,
            dim: 4096,
            n_layers: 36,
            n_heads: 32,
            n_kv_heads: 8,
            ffn_dim: 14336,
            max_seq_len: 32768,
            sliding_window: 4096,
            rope_theta: 10000.0,
            norm_eps: 1e-5,
            init_std: 0.02,
        }
    }

    #[test]
    fn check_names_the_field_as_the_caller_spells_it() {
        let named = |f: &str| format!("model.{f}");
        assert_eq!(moxin_7b().check(&named), Ok(()));
        let e = ModelShape { n_heads: 5, ..moxin_7b() }.check(&named).unwrap_err();
        assert_eq!((e.field.as_str(), e.value.as_str()), ("model.n_heads", "5"));
        assert!(e.reason.contains("model.dim = 4096"), "{e}");
        let e = ModelShape { norm_eps: 0.0, ..moxin_7b() }.check(&|f| f.to_uppercase()).unwrap_err();
        assert_eq!(e.to_string(), "NORM_EPS = 0: must be a positive number");
        let e = ModelShape { n_layers: u32::MAX, ..moxin_7b() }.check(&named).unwrap_err();
        assert!(e.field == "model.n_layers" && e.reason.contains("parameters"), "{e}");
    }

    #[test]
    fn moxin_7b_counts_by_hand() {
        let s = moxin_7b();
        // embed + head: 2 · 32000 · 4096; per layer: q,o 4096² each, k,v 1024·4096 each,
        // MLP 3 · 14336 · 4096, two norms; final norm.
        let per_layer = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096 + 2 * 4096;
        let want = 2 * 32000 * 4096 + 36 * per_layer + 4096;
        assert_eq!(s.param_count(), want);
        assert_eq!(s.param_count(), 8_114_180_096);
        assert_eq!(s.param_decls().iter().map(|d| d.numel() as u64).sum::<u64>(), want);
        assert_eq!(s.check_size(), Ok(want));
        assert_eq!(s.param_classes().iter().map(|c| c.params).sum::<u64>(), want);
        let spec = s.to_spec("moxin-7b");
        assert_eq!(ModelShape::from(&spec), s);
        // 6N + 6 · 36 · 4096 · 4096 at seq 4096.
        let f = s.train_flops_per_token(4096);
        assert_eq!(f, 6.0 * want as f64 + 6.0 * 36.0 * 4096.0 * 4096.0);
        // Beyond the window, attention cost stops growing.
        assert_eq!(s.train_flops_per_token(8192), f);
    }

    #[test]
    fn the_count_from_dimensions_is_the_sum_of_the_declarations() {
        for (n_layers, dim, n_heads, n_kv_heads, ffn_dim, vocab_size) in
            [(1, 8, 2, 1, 16, 32), (3, 64, 8, 2, 100, 1000), (2, 12, 3, 3, 7, 5), (0, 6, 4, 1, 0, 0)]
        {
            let s = ModelShape { n_layers, dim, n_heads, n_kv_heads, ffn_dim, vocab_size, ..moxin_7b() };
            let sum: u64 = s.param_decls().iter().map(|d| d.numel() as u64).sum();
            assert_eq!(s.checked_param_count(), Some(sum), "{s:?}");
            assert_eq!(s.param_count(), sum);
        }
    }

    #[test]
    fn shapes_too_large_are_refused_naming_the_field_and_nothing_overflows() {
        let max = u32::MAX;
        for (shape, field, value) in [
            (ModelShape { n_layers: max, ..moxin_7b() }, "n_layers", max),
            (ModelShape { n_layers: 1_000_000, ..moxin_7b() }, "n_layers", 1_000_000),
            (ModelShape { dim: 1 << 30, n_heads: 1 << 10, ..moxin_7b() }, "dim", 1 << 30),
            (ModelShape { ffn_dim: max, ..moxin_7b() }, "ffn_dim", max),
            (ModelShape { vocab_size: max, ..moxin_7b() }, "vocab_size", max),
            (
                ModelShape {
                    vocab_size: max,
                    dim: max,
                    n_layers: max,
                    n_heads: 1,
                    n_kv_heads: 1,
                    ffn_dim: max,
                    ..moxin_7b()
                },
                "n_layers",
                max,
            ),
        ] {
            let e = shape.check_size().unwrap_err();
            assert_eq!((e.field, e.value), (field, value), "{shape:?}");
            let text = e.to_string();
            assert!(text.starts_with(&format!("{field} = {value}: ")) && text.contains("10000000000000"), "{text}");
            // Counting never overflows or builds anything.
            assert!(shape.param_count() > MAX_PARAMS);
            assert_eq!(shape.param_count(), shape.checked_param_count().unwrap_or(u64::MAX));
        }
        let e = ModelShape { n_layers: max, ffn_dim: max, ..moxin_7b() }.check_size().unwrap_err();
        assert_eq!(e.params, None);
        assert!(e.reason().contains("more than 2^64"), "{}", e.reason());
        // Just under the cap is fine.
        let big = ModelShape { n_layers: 1200, ..moxin_7b() };
        assert!(big.check_size().unwrap() <= MAX_PARAMS);
    }
}
