//! `export-hf`, `import-hf` and `logits`: Hugging Face interop (logic in `moxin_worker::hf`).

use std::path::Path;

use anyhow::{Context, Result};

/// `export-hf`.
pub fn export(
    checkpoint: &Path,
    out: &Path,
    dtype: Option<&str>,
    max_shard_gb: f64,
    chat_template: &str,
) -> Result<()> {
    let dtype = dtype.map(moxin_worker::hf::parse_dtype).transpose().map_err(anyhow::Error::msg)?;
    if !(max_shard_gb > 0.0 && max_shard_gb.is_finite()) {
        anyhow::bail!("--max-shard-gb {max_shard_gb}: must be a positive number of gigabytes");
    }
    use moxin_worker::hf::ChatTemplateChoice;
    let template = match chat_template {
        "none" => ChatTemplateChoice::None,
        "auto" => ChatTemplateChoice::Trained,
        name => ChatTemplateChoice::Given(moxin_data::sft::ChatTemplate::load(name).with_context(|| {
            format!("--chat-template {name}: \"auto\", \"moxin\", \"none\" or a template JSON file")
        })?),
    };
    let report = moxin_worker::hf::export(checkpoint, out, dtype, (max_shard_gb * 1e9) as u64, template)
        .with_context(|| format!("exporting {} to {}", checkpoint.display(), out.display()))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// `import-hf`.
pub fn import(dir: &Path, out: &Path) -> Result<()> {
    let report = moxin_worker::hf::import(dir, out)
        .with_context(|| format!("importing {} into {}", dir.display(), out.display()))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// `logits`: token rows from a JSON file (`[[1, 2, 3], [4, 5, 6]]`), logits to a
/// safetensors file (`logits`, fp32 `[rows, len, vocab]`); an existing `out` only with
/// `overwrite` (it could be anything, a checkpoint's weights included).
pub fn logits(checkpoint: &Path, tokens: &Path, out: &Path, overwrite: bool) -> Result<()> {
    if out.is_dir() {
        anyhow::bail!("--out {} is a directory; name the safetensors file to write", out.display());
    }
    if out.exists() && !overwrite {
        anyhow::bail!("{} exists; choose another --out, or pass --overwrite to replace it", out.display());
    }
    let text = std::fs::read_to_string(tokens).with_context(|| format!("reading {}", tokens.display()))?;
    let rows: Vec<Vec<i64>> = serde_json::from_str(&text)
        .with_context(|| format!("{}: expected a JSON list of token-id lists, e.g. [[1, 2, 3]]", tokens.display()))?;
    let logits = moxin_worker::eval::logits(checkpoint, &rows)
        .with_context(|| format!("computing logits with {}", checkpoint.display()))?;
    let shape = logits.size();
    moxin_worker::checkpoint::write_tensors(out, &[("logits".to_string(), logits)])
        .with_context(|| format!("writing {}", out.display()))?;
    println!("{}", serde_json::json!({"logits": out.display().to_string(), "shape": shape}));
    Ok(())
}
