//! The Hugging Face side of a model: `config.json` of `MistralForCausalLM` (written by
//! `export-hf`) and of Mistral or Llama layouts (read by `import-hf`), mapped to and from
//! [`ModelShape`]. Tensor names need no mapping: [`ModelShape::param_decls`] already uses the
//! `MistralForCausalLM` names, which Llama shares.

use serde::Serialize;
use serde_json::Value;

use crate::ModelShape;

/// Token ids a model's config names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenIds {
    /// Beginning of sequence.
    pub bos: Option<u32>,
    /// End of sequence.
    pub eos: u32,
}

impl Default for TokenIds {
    /// The Llama/Mistral convention (`<s>` = 1, `</s>` = 2), also moxin-train's tokenizers'.
    fn default() -> Self {
        TokenIds { bos: Some(1), eos: 2 }
    }
}

/// `config.json` of a `MistralForCausalLM`, field for field as transformers writes it.
#[derive(Debug, Serialize)]
struct MistralConfig {
    architectures: [&'static str; 1],
    model_type: &'static str,
    vocab_size: u32,
    hidden_size: u32,
    intermediate_size: u32,
    num_hidden_layers: u32,
    num_attention_heads: u32,
    num_key_value_heads: u32,
    head_dim: u32,
    hidden_act: &'static str,
    max_position_embeddings: u32,
    initializer_range: f64,
    rms_norm_eps: f64,
    use_cache: bool,
    rope_theta: f64,
    sliding_window: u32,
    attention_dropout: f64,
    tie_word_embeddings: bool,
    bos_token_id: Option<u32>,
    eos_token_id: u32,
    torch_dtype: &'static str,
}

/// transformers' name of a safetensors dtype tag (`torch_dtype` in `config.json`).
pub fn torch_dtype_name(safetensors_dtype: &str) -> Option<&'static str> {
    Some(match safetensors_dtype {
        "F32" => "float32",
        "BF16" => "bfloat16",
        "F16" => "float16",
        _ => return None,
    })
}

/// `config.json` for `shape` as a `MistralForCausalLM` whose weights are stored as
/// `dtype` (a safetensors tag). Deterministic: the same inputs give the same bytes.
pub fn mistral_config_json(shape: &ModelShape, ids: TokenIds, dtype: &str) -> Result<String, String> {
    let torch_dtype = torch_dtype_name(dtype).ok_or_else(|| format!("weights of dtype {dtype} cannot be exported"))?;
    let config = MistralConfig {
        architectures: ["MistralForCausalLM"],
        model_type: "mistral",
        vocab_size: shape.vocab_size,
        hidden_size: shape.dim,
        intermediate_size: shape.ffn_dim,
        num_hidden_layers: shape.n_layers,
        num_attention_heads: shape.n_heads,
        num_key_value_heads: shape.n_kv_heads,
        head_dim: shape.dim / shape.n_heads.max(1),
        hidden_act: "silu",
        max_position_embeddings: shape.max_seq_len,
        initializer_range: shape.init_std,
        rms_norm_eps: shape.norm_eps,
        use_cache: true,
        rope_theta: shape.rope_theta,
        sliding_window: shape.sliding_window,
        attention_dropout: 0.0,
        tie_word_embeddings: false,
        bos_token_id: ids.bos,
        eos_token_id: ids.eos,
        torch_dtype,
    };
    serde_json::to_string_pretty(&config).map(|s| s + "\n").map_err(|e| e.to_string())
}

/// What `import-hf` takes from a `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedConfig {
    /// The model's shape.
    pub shape: ModelShape,
    /// Its special token ids.
    pub ids: TokenIds,
    /// The input and output embeddings are one tensor (the LM head is imported as a copy).
    pub tied_embeddings: bool,
}

/// Reads a Mistral or Llama `config.json` (its text). Refuses, naming the field, whatever
/// moxin-train's model cannot reproduce exactly (other architectures, biases, scaled RoPE,
/// other activations, a head size that is not `hidden_size / num_attention_heads`).
pub fn parse_config(text: &str) -> Result<ImportedConfig, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let model_type = v["model_type"].as_str().unwrap_or("");
    if !matches!(model_type, "mistral" | "llama") {
        return Err(format!(
            "model_type {:?} (architectures {}) is not supported; moxin-train imports Mistral and Llama layouts \
             (MistralForCausalLM, LlamaForCausalLM)",
            model_type, v["architectures"]
        ));
    }
    let uint = |key: &str| -> Result<u32, String> {
        v[key].as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| format!("{key}: missing or not a count"))
    };
    let float = |key: &str, default: f64| -> Result<f64, String> {
        match &v[key] {
            Value::Null => Ok(default),
            x => x.as_f64().ok_or_else(|| format!("{key}: {x} is not a number")),
        }
    };
    let hidden = uint("hidden_size")?;
    let heads = uint("num_attention_heads")?;
    let kv_heads = if v["num_key_value_heads"].is_null() { heads } else { uint("num_key_value_heads")? };
    let layers = uint("num_hidden_layers")?;
    let max_pos = uint("max_position_embeddings")?;
    let act = v["hidden_act"].as_str().unwrap_or("silu");
    if act != "silu" {
        return Err(format!("hidden_act {act:?}: only \"silu\" (SwiGLU) is supported"));
    }
    for key in ["attention_bias", "mlp_bias"] {
        if v[key].as_bool() == Some(true) {
            return Err(format!("{key} = true: moxin-train's layers have no biases"));
        }
    }
    // RoPE: `rope_theta` (transformers 4) or `rope_parameters` (5); no scaling.
    let mut rope_theta = float("rope_theta", 10_000.0)?;
    for key in ["rope_scaling", "rope_parameters"] {
        match &v[key] {
            Value::Null => {}
            Value::Object(p) => {
                let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
                if kind != "default" {
                    return Err(format!(
                        "{key}: RoPE type {kind:?} is not supported (plain RoPE only; remove the scaling or keep \
                         the model in transformers)"
                    ));
                }
                if let Some(theta) = p.get("rope_theta").and_then(Value::as_f64) {
                    rope_theta = theta;
                }
            }
            other => return Err(format!("{key}: {other} is not an object")),
        }
    }
    let sliding_window = match &v["sliding_window"] {
        Value::Null => max_pos,
        x => x
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("sliding_window: {x} is not a positive count"))?,
    };
    let id = |key: &str| -> Result<Option<u32>, String> {
        match &v[key] {
            Value::Null => Ok(None),
            // Some configs list several end tokens; the first is the one generation stops at.
            Value::Array(a) => match a.first() {
                None => Ok(None),
                Some(x) => token_id(key, x).map(Some),
            },
            x => token_id(key, x).map(Some),
        }
    };
    let ids = TokenIds { bos: id("bos_token_id")?, eos: id("eos_token_id")?.unwrap_or(TokenIds::default().eos) };
    let shape = ModelShape {
        vocab_size: uint("vocab_size")?,
        dim: hidden,
        n_layers: layers,
        n_heads: heads,
        n_kv_heads: kv_heads,
        ffn_dim: uint("intermediate_size")?,
        max_seq_len: max_pos,
        sliding_window,
        rope_theta,
        norm_eps: float("rms_norm_eps", 1e-6)?,
        init_std: float("initializer_range", 0.02)?,
    };
    // What the config loader checks of a preset, named by config.json's keys.
    shape.check(&|field| hf_key(field).to_string()).map_err(|e| e.to_string())?;
    if let Some(head_dim) = v["head_dim"].as_u64().filter(|&d| d != shape.head_dim() as u64) {
        return Err(format!(
            "head_dim {head_dim} differs from hidden_size / num_attention_heads = {}; moxin-train's attention \
             uses the latter",
            shape.head_dim()
        ));
    }
    Ok(ImportedConfig { shape, ids, tied_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false) })
}

/// The `config.json` key of a [`ModelShape`] field.
fn hf_key(field: &str) -> &str {
    match field {
        "dim" => "hidden_size",
        "n_layers" => "num_hidden_layers",
        "n_heads" => "num_attention_heads",
        "n_kv_heads" => "num_key_value_heads",
        "ffn_dim" => "intermediate_size",
        "max_seq_len" => "max_position_embeddings",
        "norm_eps" => "rms_norm_eps",
        "init_std" => "initializer_range",
        other => other,
    }
}

/// `x`, the value of `key`, as a token id (a count below 2^32).
fn token_id(key: &str, x: &Value) -> Result<u32, String> {
    x.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("{key}: {x} is not a token id (0 to 4294967295)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_config_reads_back_to_the_same_shape() {
        let shape = crate::shape::tests::moxin_7b();
        let ids = TokenIds { bos: Some(1), eos: 2 };
        let text = mistral_config_json(&shape, ids, "BF16").unwrap();
        assert!(text.contains("\"torch_dtype\": \"bfloat16\"") && text.contains("\"head_dim\": 128"), "{text}");
        let back = parse_config(&text).unwrap();
        assert_eq!(back, ImportedConfig { shape, ids, tied_embeddings: false });
    }

    #[test]
    fn llama_and_transformers_5_configs_are_read() {
        let llama = r#"{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "max_position_embeddings": 128, "vocab_size": 300,
            "intermediate_size": 160, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
            "eos_token_id": [7, 9], "tie_word_embeddings": true, "attention_bias": false}"#;
        let c = parse_config(llama).unwrap();
        assert_eq!((c.shape.n_kv_heads, c.shape.sliding_window, c.shape.rope_theta), (4, 128, 500000.0));
        assert_eq!(c.ids, TokenIds { bos: None, eos: 7 });
        assert!(c.tied_embeddings);
    }

    #[test]
    fn what_cannot_be_reproduced_is_refused_by_name() {
        let base = r#"{"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "max_position_embeddings": 128, "vocab_size": 300, "intermediate_size": 160"#;
        for (extra, expected) in [
            (r#", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#, "rope_scaling: RoPE type \"yarn\""),
            (r#", "attention_bias": true"#, "attention_bias = true"),
            (r#", "hidden_act": "gelu""#, "hidden_act \"gelu\""),
            (r#", "head_dim": 32"#, "head_dim 32"),
            (r#", "num_key_value_heads": 3"#, "num_key_value_heads = 3: does not divide num_attention_heads = 4"),
            (r#", "rope_theta": -1"#, "rope_theta = -1: must be a positive number"),
            (r#", "rope_parameters": {"rope_type": "default", "rope_theta": 0.0}"#, "rope_theta = 0: must be"),
            (r#", "rms_norm_eps": 0"#, "rms_norm_eps = 0: must be a positive number"),
        ] {
            let e = parse_config(&format!("{base}{extra}}}")).unwrap_err();
            assert!(e.contains(expected), "{extra}: {e}");
        }
        let zero_positions = base.replace(r#""max_position_embeddings": 128"#, r#""max_position_embeddings": 0"#);
        let e = parse_config(&format!("{zero_positions}}}")).unwrap_err();
        assert!(e.contains("max_position_embeddings = 0: must be at least 1"), "{e}");
        let odd_heads = base.replace(r#""num_attention_heads": 4"#, r#""num_attention_heads": 64"#);
        let e = parse_config(&format!("{odd_heads}, \"num_key_value_heads\": 64}}")).unwrap_err();
        assert!(e.contains("RoPE needs an even one"), "{e}");
        let e = parse_config(r#"{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}"#).unwrap_err();
        assert!(e.contains("\"gpt2\"") && e.contains("GPT2LMHeadModel"), "{e}");
    }

    #[test]
    fn token_ids_beyond_32_bits_and_oversized_shapes_are_refused_by_name() {
        let base = r#"{"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "max_position_embeddings": 128, "vocab_size": 300, "intermediate_size": 160"#;
        for (extra, expected) in [
            (r#", "eos_token_id": 4294967296"#, "eos_token_id: 4294967296 is not a token id"),
            (r#", "bos_token_id": 18446744073709551615"#, "bos_token_id: 18446744073709551615 is not a token id"),
            (r#", "eos_token_id": [4294967298, 2]"#, "eos_token_id: 4294967298 is not a token id"),
            (r#", "eos_token_id": -1"#, "eos_token_id: -1 is not a token id"),
            (r#", "eos_token_id": ["x"]"#, "eos_token_id: \"x\" is not a token id"),
        ] {
            let e = parse_config(&format!("{base}{extra}}}")).unwrap_err();
            assert!(e.contains(expected), "{extra}: {e}");
        }
        let c = parse_config(&format!("{base}, \"bos_token_id\": 4294967295, \"eos_token_id\": []}}")).unwrap();
        assert_eq!(c.ids, TokenIds { bos: Some(4294967295), eos: TokenIds::default().eos });
        let huge = r#"{"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 4294967295, "max_position_embeddings": 128, "vocab_size": 300, "intermediate_size": 160}"#;
        let e = parse_config(huge).unwrap_err();
        assert!(e.contains("num_hidden_layers = 4294967295") && e.contains("10000000000000"), "{e}");
    }
}
