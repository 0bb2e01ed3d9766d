//! Model presets: named model shapes shipped in `configs/models/*.toml` and compiled into
//! the binary, so `preset = "tiny"` works from any directory.

use std::path::Path;

pub use moxin_layout::ModelShape;

use crate::ConfigError;

/// Presets compiled into the binary: `(name, TOML)`.
pub const BUILTIN: &[(&str, &str)] = &[
    ("tiny", include_str!("../../configs/models/tiny.toml")),
    ("bench-small", include_str!("../../configs/models/bench-small.toml")),
    ("moxin-7b", include_str!("../../configs/models/moxin-7b.toml")),
    ("gpu-1b", include_str!("../../configs/models/gpu-1b.toml")),
];

/// Names of the built-in presets.
pub fn names() -> Vec<&'static str> {
    BUILTIN.iter().map(|(n, _)| *n).collect()
}

/// Loads a preset by built-in name, or from a TOML file path.
pub fn load(preset: &str) -> Result<ModelShape, ConfigError> {
    let (origin, text) = match BUILTIN.iter().find(|(n, _)| *n == preset) {
        Some((name, text)) => (format!("built-in preset {name:?}"), text.to_string()),
        None if preset.ends_with(".toml") || preset.contains('/') => {
            let text = std::fs::read_to_string(Path::new(preset)).map_err(|e| ConfigError::Invalid {
                field: "model.preset".into(),
                value: preset.into(),
                message: format!("cannot read preset file: {e}"),
            })?;
            (preset.to_string(), text)
        }
        None => {
            return Err(ConfigError::Invalid {
                field: "model.preset".into(),
                value: preset.into(),
                message: format!("unknown preset; use one of {:?} or a path to a .toml model file", names()),
            })
        }
    };
    toml::from_str(&text).map_err(|e| ConfigError::Invalid {
        field: "model.preset".into(),
        value: preset.into(),
        message: format!("{origin}: {}", e.message()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_presets_parse_and_7b_matches_table_1() {
        for name in names() {
            load(name).unwrap();
        }
        let m = load("moxin-7b").unwrap();
        assert_eq!(
            (m.n_layers, m.dim, m.n_heads, m.n_kv_heads, m.ffn_dim, m.vocab_size, m.sliding_window),
            (36, 4096, 32, 8, 14336, 32000, 4096)
        );
        assert_eq!(m.rope_theta, 10000.0);
        let b = load("bench-small").unwrap();
        assert_eq!(
            (b.vocab_size, b.dim, b.n_layers, b.n_heads, b.n_kv_heads, b.ffn_dim, b.max_seq_len),
            (8192, 384, 6, 6, 2, 1024, 256)
        );
        assert!(load("nope").unwrap_err().to_string().contains("unknown preset"));
    }
}
