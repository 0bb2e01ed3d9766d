//! Hugging Face interop: a checkpoint becomes a `MistralForCausalLM` folder
//! ([`export`]: `config.json`, `model.safetensors` — sharded with an index above a size
//! limit — tokenizer files, `generation_config.json`), and a Mistral or Llama folder
//! becomes a checkpoint any stage can start from ([`import`]: weights only, no optimizer
//! state, step 0). Both write deterministically, so export → import → export gives the
//! same bytes. The config mapping lives in [`moxin_layout::hf`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use moxin_layout::hf::{self, TokenIds};
use moxin_layout::ModelShape;
use serde::Serialize;
use tch::{Kind, Tensor};

use crate::checkpoint::{
    self, Checkpoint, CheckpointManifest, RngState, CHAT_TEMPLATE_FILE, MANIFEST, MODEL_FILE, TOKENIZER_FILE,
};
use crate::WorkerError;

/// Index of a sharded safetensors model (transformers' name).
const INDEX_FILE: &str = "model.safetensors.index.json";

/// What [`export`] wrote.
#[derive(Debug, Serialize)]
pub struct ExportReport {
    /// The checkpoint exported.
    pub checkpoint: String,
    /// Its step.
    pub step: u64,
    /// The folder written.
    pub dir: String,
    /// Weight files (one unless sharded).
    pub weight_files: Vec<String>,
    /// The weights' dtype (`float32`, `bfloat16`, `float16`).
    pub dtype: String,
    /// Bytes of weights.
    pub weight_bytes: u64,
    /// Whether tokenizer files were written.
    pub tokenizer: bool,
    /// The chat template written into `tokenizer_config.json`, by name.
    pub chat_template: Option<String>,
}

/// What [`import`] wrote.
#[derive(Debug, Serialize)]
pub struct ImportReport {
    /// The folder imported.
    pub source: String,
    /// The checkpoint written.
    pub checkpoint: String,
    /// The model's shape.
    pub model: ModelShape,
    /// Parameters.
    pub params: u64,
    /// The weights' dtype as stored.
    pub dtype: String,
    /// Whether the folder's `tokenizer.json` came along.
    pub tokenizer: bool,
    /// The LM head was copied from the (tied) input embedding.
    pub untied_lm_head: bool,
}

/// A checkpoint directory, or a run directory's newest valid checkpoint.
pub fn open_checkpoint(path: &Path) -> Result<Checkpoint, WorkerError> {
    if path.join(MANIFEST).exists() {
        return Ok(Checkpoint::open(path)?);
    }
    if checkpoint::checkpoints_dir(path).is_dir() {
        return match checkpoint::latest_valid(path) {
            Ok(Some(ckpt)) => Ok(ckpt),
            Ok(None) => Err(WorkerError::Input {
                path: path.to_path_buf(),
                reason: "this run directory has no checkpoint yet".into(),
            }),
            // Reading, not resuming: the resume advice (start over, --out) does not apply.
            Err(checkpoint::CheckpointError::NoneValid { problems, .. }) => Err(WorkerError::Input {
                path: path.to_path_buf(),
                reason: format!("{problems}; name a checkpoint directory of the run that verifies"),
            }),
            Err(e) => Err(e.into()),
        };
    }
    let reason = if path.exists() {
        "neither a checkpoint (no manifest.json) nor a run directory (no checkpoints/)"
    } else {
        "does not exist; name a checkpoint directory or a run directory"
    };
    Err(WorkerError::Input { path: path.to_path_buf(), reason: reason.into() })
}

fn kind_of(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "float32" | "fp32" | "F32" => Kind::Float,
        "bfloat16" | "bf16" | "BF16" => Kind::BFloat16,
        "float16" | "fp16" | "F16" => Kind::Half,
        _ => return None,
    })
}

fn tag_of(kind: Kind) -> Result<&'static str, WorkerError> {
    Ok(match kind {
        Kind::Float => "F32",
        Kind::BFloat16 => "BF16",
        Kind::Half => "F16",
        other => return Err(WorkerError::Spec(format!("weights of kind {other:?} cannot be exported"))),
    })
}

/// Parses a `--dtype` value.
pub fn parse_dtype(s: &str) -> Result<Kind, String> {
    kind_of(s).ok_or_else(|| format!("dtype {s:?}: use float32, bfloat16 or float16"))
}

/// Refuses an output directory that exists and is not empty: nothing is overwritten.
fn refuse_non_empty(dir: &Path) -> Result<(), WorkerError> {
    if dir.exists() && std::fs::read_dir(dir).map_err(|e| WorkerError::io(dir, e))?.next().is_some() {
        return Err(WorkerError::Input {
            path: dir.to_path_buf(),
            reason: "exists and is not empty; choose a new directory (nothing was overwritten)".into(),
        });
    }
    Ok(())
}

/// A new, empty output directory.
fn fresh_dir(dir: &Path) -> Result<(), WorkerError> {
    refuse_non_empty(dir)?;
    std::fs::create_dir_all(dir).map_err(|e| WorkerError::io(dir, e))
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), WorkerError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| WorkerError::Spec(e.to_string()))? + "\n";
    std::fs::write(path, text).map_err(|e| WorkerError::io(path, e))
}

/// The model's tensors in parameter order, converted to `kind`.
fn ordered(shape: &ModelShape, mut tensors: Vec<(String, Tensor)>, kind: Kind) -> Vec<(String, Tensor)> {
    shape
        .param_decls()
        .into_iter()
        .filter_map(|d| {
            let i = tensors.iter().position(|(n, _)| *n == d.name)?;
            let (name, t) = tensors.swap_remove(i);
            Some((name, if t.kind() == kind { t } else { t.to_kind(kind) }))
        })
        .collect()
}

/// Writes the checkpoint at `source` (or a run directory's newest) as a Hugging Face
/// `MistralForCausalLM` folder `out` (new or empty), weights as `dtype` (default: as
/// stored), in shards of at most `max_shard_bytes` (a tensor larger than that gets a
/// shard of its own).
pub fn export(
    source: &Path,
    out: &Path,
    dtype: Option<Kind>,
    max_shard_bytes: u64,
    chat_template: ChatTemplateChoice,
) -> Result<ExportReport, WorkerError> {
    let ckpt = open_checkpoint(source)?;
    let chat_template = match chat_template {
        ChatTemplateChoice::Trained => {
            let path = ckpt.dir.join(CHAT_TEMPLATE_FILE);
            Some(if path.is_file() {
                moxin_data::sft::ChatTemplate::load(&path.to_string_lossy())?
            } else {
                moxin_data::sft::ChatTemplate::moxin()
            })
        }
        ChatTemplateChoice::Given(t) => Some(t),
        ChatTemplateChoice::None => None,
    };
    let chat_template = chat_template.as_ref();
    let shape = ckpt.manifest.model.clone();
    let tensors = checkpoint::model_tensors(&ckpt)?;
    let stored = tensors.first().map_or(Kind::Float, |(_, t)| t.kind());
    let kind = dtype.unwrap_or(stored);
    let tensors = ordered(&shape, tensors, kind);
    if tensors.len() != shape.param_decls().len() {
        return Err(WorkerError::Checkpoint {
            path: ckpt.dir.join(MODEL_FILE),
            reason: format!("{} of the model's {} tensors found", tensors.len(), shape.param_decls().len()),
        });
    }
    let tag = tag_of(kind)?;
    let tokenizer_path = ckpt.dir.join(TOKENIZER_FILE);
    let tokenizer = tokenizer_path.exists().then(|| moxin_data::load_tokenizer(&tokenizer_path)).transpose()?;
    let ids = ckpt.manifest.token_ids.unwrap_or_else(|| match &tokenizer {
        Some(t) => TokenIds { bos: t.bos_id, eos: t.eos_id },
        None => TokenIds::default(),
    });

    fresh_dir(out)?;
    // Shards: consecutive tensors up to the limit.
    let bytes_of = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut size = 0u64;
    for (name, t) in tensors {
        let b = bytes_of(&t);
        if size > 0 && size + b > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += b;
        shards.last_mut().expect("a shard").push((name, t));
    }
    let total: u64 = shards.iter().flatten().map(|(_, t)| bytes_of(t)).sum();
    let mut weight_files = Vec::new();
    let mut weight_map = BTreeMap::new();
    let count = shards.len();
    for (i, shard) in shards.iter().enumerate() {
        let file =
            if count == 1 { MODEL_FILE.to_string() } else { format!("model-{:05}-of-{count:05}.safetensors", i + 1) };
        checkpoint::write_tensors(&out.join(&file), shard)?;
        for (name, _) in shard {
            weight_map.insert(name.clone(), file.clone());
        }
        weight_files.push(file);
    }
    if count > 1 {
        #[derive(Serialize)]
        struct Index<'a> {
            metadata: BTreeMap<&'a str, u64>,
            weight_map: &'a BTreeMap<String, String>,
        }
        let index = Index { metadata: BTreeMap::from([("total_size", total)]), weight_map: &weight_map };
        write_json(&out.join(INDEX_FILE), &index)?;
    }
    let config = hf::mistral_config_json(&shape, ids, tag).map_err(WorkerError::Spec)?;
    std::fs::write(out.join("config.json"), config).map_err(|e| WorkerError::io(out.join("config.json"), e))?;
    #[derive(Serialize)]
    struct GenerationConfig {
        bos_token_id: Option<u32>,
        eos_token_id: u32,
    }
    write_json(
        &out.join("generation_config.json"),
        &GenerationConfig { bos_token_id: ids.bos, eos_token_id: ids.eos },
    )?;
    if let Some(t) = &tokenizer {
        std::fs::copy(&tokenizer_path, out.join(TOKENIZER_FILE)).map_err(|e| WorkerError::io(&tokenizer_path, e))?;
        let token = |id: Option<u32>| id.and_then(|i| t.inner.id_to_token(i));
        #[derive(Serialize)]
        struct TokenizerConfig {
            tokenizer_class: &'static str,
            bos_token: Option<String>,
            eos_token: Option<String>,
            unk_token: Option<String>,
            model_max_length: u32,
            clean_up_tokenization_spaces: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            chat_template: Option<String>,
        }
        let config = TokenizerConfig {
            tokenizer_class: "PreTrainedTokenizerFast",
            bos_token: token(ids.bos),
            eos_token: token(Some(ids.eos)),
            unk_token: t.inner.token_to_id("<unk>").map(|_| "<unk>".to_string()),
            model_max_length: shape.max_seq_len,
            clean_up_tokenization_spaces: false,
            chat_template: chat_template.map(|t| t.jinja()),
        };
        write_json(&out.join("tokenizer_config.json"), &config)?;
    }
    Ok(ExportReport {
        checkpoint: ckpt.dir.display().to_string(),
        step: ckpt.manifest.step,
        dir: out.display().to_string(),
        weight_files,
        dtype: hf::torch_dtype_name(tag).unwrap_or(tag).to_string(),
        weight_bytes: total,
        tokenizer: tokenizer.is_some(),
        chat_template: chat_template.filter(|_| tokenizer.is_some()).map(|t| t.name.clone()),
    })
}

/// Which chat template [`export`] writes into `tokenizer_config.json`.
#[derive(Debug, Clone)]
pub enum ChatTemplateChoice {
    /// The one the checkpoint was fine-tuned with (its `chat_template.json`, which SFT and
    /// GRPO checkpoints carry), else moxin's (what SFT, distillation and GRPO use by default).
    Trained,
    /// This one.
    Given(moxin_data::sft::ChatTemplate),
    /// None.
    None,
}

/// The weight files of a Hugging Face folder: the index's shards, or `model.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, WorkerError> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| WorkerError::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| WorkerError::Input { path: index.clone(), reason: format!("not valid JSON: {e}") })?;
        let map = v["weight_map"]
            .as_object()
            .ok_or_else(|| WorkerError::Input { path: index.clone(), reason: "no \"weight_map\" object".into() })?;
        let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
        files.sort();
        files.dedup();
        for f in &files {
            if f.contains(['/', '\\']) || f.starts_with('.') {
                return Err(WorkerError::Input { path: index, reason: format!("{f:?} is not a file of this folder") });
            }
        }
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join(MODEL_FILE);
    if single.exists() {
        return Ok(vec![single]);
    }
    let reason = if dir.join("pytorch_model.bin").exists() || dir.join("pytorch_model.bin.index.json").exists() {
        "has pickled PyTorch weights only; save them as safetensors first \
         (model.save_pretrained(dir, safe_serialization=True) in transformers)"
    } else {
        "has no model.safetensors or model.safetensors.index.json"
    };
    Err(WorkerError::Input { path: dir.to_path_buf(), reason: reason.into() })
}

/// Imports the Hugging Face Mistral or Llama folder `dir` as a weights-only checkpoint
/// `out` (new or empty): `model.safetensors` in moxin-train's order and the folder's
/// dtype, its `tokenizer.json` if it has one moxin-train can use, and a manifest (step 0,
/// no optimizer state) written last. Whatever cannot be mapped exactly is refused by name.
pub fn import(dir: &Path, out: &Path) -> Result<ImportReport, WorkerError> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| WorkerError::Input {
        path: config_path.clone(),
        reason: format!("cannot read it ({e}); is this a Hugging Face model folder?"),
    })?;
    let config = hf::parse_config(&text).map_err(|reason| WorkerError::Input { path: config_path.clone(), reason })?;
    let shape = config.shape.clone();
    let mut found: BTreeMap<String, (Tensor, PathBuf)> = BTreeMap::new();
    for file in weight_files(dir)? {
        let tensors = Tensor::read_safetensors(&file).map_err(|e| WorkerError::Input {
            path: file.clone(),
            reason: format!("not a readable safetensors file: {e}"),
        })?;
        for (name, t) in tensors {
            // Older exports carry RoPE's frequency table as a buffer; it is recomputed.
            if !name.ends_with("rotary_emb.inv_freq") {
                found.insert(name, (t, file.clone()));
            }
        }
    }
    let decls = shape.param_decls();
    let mut untied = false;
    if config.tied_embeddings && !found.contains_key("lm_head.weight") {
        if let Some((embed, file)) = found.get("model.embed_tokens.weight") {
            found.insert("lm_head.weight".into(), (embed.shallow_clone(), file.clone()));
            untied = true;
        }
    }
    let missing: Vec<&str> = decls.iter().filter(|d| !found.contains_key(&d.name)).map(|d| d.name.as_str()).collect();
    if !missing.is_empty() {
        return Err(WorkerError::Input {
            path: dir.to_path_buf(),
            reason: format!(
                "{} of the model's tensors are missing ({}{}); config.json and the weights disagree",
                missing.len(),
                missing.iter().take(4).copied().collect::<Vec<_>>().join(", "),
                if missing.len() > 4 { ", ..." } else { "" }
            ),
        });
    }
    let extra: Vec<&String> = found.keys().filter(|n| !decls.iter().any(|d| &d.name == *n)).collect();
    if !extra.is_empty() {
        return Err(WorkerError::Input {
            path: dir.to_path_buf(),
            reason: format!(
                "tensors moxin-train's model has no place for: {}{} (biases, adapters or another architecture?)",
                extra.iter().take(4).map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                if extra.len() > 4 { ", ..." } else { "" }
            ),
        });
    }
    let kind = found["model.embed_tokens.weight"].0.kind();
    tag_of(kind).map_err(|_| WorkerError::Input {
        path: dir.to_path_buf(),
        reason: format!("weights of kind {kind:?}; float32, bfloat16 and float16 are supported"),
    })?;
    for d in &decls {
        let (t, file) = &found[&d.name];
        if t.size() != d.shape {
            return Err(WorkerError::Input {
                path: file.clone(),
                reason: format!("{}: shape {:?}, config.json implies {:?}", d.name, t.size(), d.shape),
            });
        }
    }
    let tensors: Vec<(String, Tensor)> =
        decls.iter().map(|d| (d.name.clone(), found[&d.name].0.to_kind(kind).contiguous())).collect();
    let dtype = hf::torch_dtype_name(tag_of(kind)?).unwrap_or("?").to_string();
    let params: u64 = decls.iter().map(|d| d.numel() as u64).sum();

    // Written into a hidden staging directory, renamed into place when complete.
    refuse_non_empty(out)?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "import".into());
    let staging = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| WorkerError::io(&staging, e))?;
    let result = (|| -> Result<bool, WorkerError> {
        let mut files = BTreeMap::new();
        let written = checkpoint::write_tensors(&staging.join(MODEL_FILE), &tensors)?;
        let tokenizer = dir.join(TOKENIZER_FILE);
        let with_tokenizer = match tokenizer.exists().then(|| moxin_data::load_tokenizer(&tokenizer)) {
            Some(Ok(t)) => {
                // Saved as `data prepare` saves it, so data prepared with this checkpoint's
                // tokenizer is recognised as such (same bytes, same sha256).
                let dest = staging.join(TOKENIZER_FILE);
                t.inner
                    .save(&dest, false)
                    .map_err(|e| WorkerError::Input { path: tokenizer.clone(), reason: e.to_string() })?;
                files.insert(
                    TOKENIZER_FILE.into(),
                    moxin_data::sha256_hex(&dest).map_err(|e| WorkerError::io(&dest, e))?,
                );
                true
            }
            Some(Err(e)) => {
                tracing::warn!("{e}; the checkpoint is imported without a tokenizer");
                false
            }
            None => false,
        };
        let mut manifest = CheckpointManifest {
            format: checkpoint::FORMAT.into(),
            step: 0,
            data_cursor: 0,
            tokens: 0,
            elapsed_s: 0.0,
            rng: RngState { seed: 0, data_order: String::new() },
            world_size: 0,
            seq_len: 0,
            model: shape.clone(),
            data_manifest_sha256: String::new(),
            resolved_config_toml: String::new(),
            optimizer: Vec::new(),
            files,
            file_parts: Default::default(),
            file_bytes: Default::default(),
            build: checkpoint::build_info(),
            token_ids: Some(config.ids),
        };
        for w in &written {
            manifest.record_written(w);
        }
        for name in manifest.files.keys().chain(manifest.file_parts.keys()).cloned().collect::<Vec<_>>() {
            let path = staging.join(&name);
            let size = std::fs::metadata(&path).map_err(|e| WorkerError::io(&path, e))?.len();
            manifest.file_bytes.insert(name, size);
        }
        write_json(&staging.join(MANIFEST), &manifest)?;
        Ok(with_tokenizer)
    })();
    let with_tokenizer = match result {
        Ok(t) => t,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    if out.exists() {
        std::fs::remove_dir(out).map_err(|e| WorkerError::io(out, e))?;
    }
    std::fs::rename(&staging, out).map_err(|e| WorkerError::io(out, e))?;
    Ok(ImportReport {
        source: dir.display().to_string(),
        checkpoint: out.display().to_string(),
        model: shape,
        params,
        dtype,
        tokenizer: with_tokenizer,
        untied_lm_head: untied,
    })
}
