//! From a configuration file to a [`JobSpec`]: the only path by which work reaches workers.

use std::path::{Path, PathBuf};

use moxin_data::Manifest;
use moxin_proto::v1::{
    runtime_spec, schedule_spec, CheckpointSpec, DataSpec, JobSpec, ModelSpec, OptimizerSpec, RuntimeSpec,
    ScheduleSpec, TrainSpec,
};

use crate::config::{
    BlockBackward, Decay, Device, GemmChoice, GradReduce, JobConfig, KernelChoice, Precision, Recompute,
};
use crate::presets::ModelShape;
use crate::ConfigError;

/// A validated job: the configuration, where it runs, and the spec workers receive.
#[derive(Debug, Clone)]
pub struct ResolvedJob {
    /// The configuration as loaded (with overrides).
    pub config: JobConfig,
    /// The spec sent to workers.
    pub spec: JobSpec,
    /// Run directory.
    pub run_dir: PathBuf,
    /// Samples per epoch of the training data at the job's sequence length.
    pub samples_per_epoch: u64,
    /// This process's exclusive use of the run directory, held as long as any clone lives.
    pub lock: std::sync::Arc<crate::rundir::RunLock>,
}

/// Loads, validates and resolves a job for `world_size` workers. `run_dir` defaults to
/// `runs/<job name>`; it is locked for this process before anything in it is touched
/// (a second run on it is refused). Built-in data is prepared into `<run dir>/data` on
/// first use.
pub fn resolve_job(
    config_file: &Path,
    overrides: &[String],
    run_dir: Option<&Path>,
    world_size: u32,
) -> Result<ResolvedJob, ConfigError> {
    let config = JobConfig::load_with_process_env(config_file, overrides)?;
    resolve_loaded(config_file, config, run_dir, world_size)
}

/// As [`resolve_job`] for a configuration already loaded from `config_file`.
pub fn resolve_loaded(
    config_file: &Path,
    config: JobConfig,
    run_dir: Option<&Path>,
    world_size: u32,
) -> Result<ResolvedJob, ConfigError> {
    let name = config
        .job
        .name
        .clone()
        .unwrap_or_else(|| config_file.file_stem().and_then(|s| s.to_str()).unwrap_or("job").to_string());
    let run_dir = run_dir.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("runs").join(&name));
    resolve_config(config, name, &run_dir, world_size)
}

/// Resolves an already-loaded configuration.
pub fn resolve_config(
    mut config: JobConfig,
    name: String,
    run_dir: &Path,
    world_size: u32,
) -> Result<ResolvedJob, ConfigError> {
    let (shape, seq_len) = config.validate(world_size)?;
    std::fs::create_dir_all(run_dir).map_err(|e| ConfigError::Invalid {
        field: "--out".into(),
        value: run_dir.display().to_string(),
        message: format!("cannot create the run directory: {e}"),
    })?;
    let run_dir = std::fs::canonicalize(run_dir).map_err(|e| ConfigError::Invalid {
        field: "--out".into(),
        value: run_dir.display().to_string(),
        message: e.to_string(),
    })?;
    let lock = std::sync::Arc::new(crate::rundir::RunLock::acquire(&run_dir)?);

    let init_from = config.model.init_checkpoint()?;
    // The resolved config names the checkpoint itself: a restarted coordinator (or a run
    // directory that has moved on since) must not change what this job started from.
    if let Some(dir) = &init_from {
        config.model.init_from = Some(dir.display().to_string());
    }
    // GRPO learns from rollouts on prompts: they are its data (the DataSpec names the file).
    let grpo = match &config.grpo {
        Some(section) => Some(crate::grpo::resolve(section, init_from.as_deref())?),
        None => None,
    };
    let (data_dir, tokenizer_sha256, samples_per_epoch, manifest_sha256) = match &grpo {
        Some((spec, prompts)) => {
            let sha = moxin_data::sha256_hex(Path::new(&spec.tokenizer)).map_err(|e| ConfigError::Invalid {
                field: "model.init_from".into(),
                value: spec.tokenizer.clone(),
                message: e.to_string(),
            })?;
            (PathBuf::from(&spec.prompts), sha, *prompts, spec.prompts_sha256.clone())
        }
        None => resolve_data(&config, &run_dir, (shape.vocab_size, shape.max_seq_len), seq_len, init_from.as_deref())?,
    };
    // Steps from epochs and warmup from a ratio, now that the data's size is known; the
    // resolved config records the numbers.
    if let Some(epochs) = config.train.epochs {
        let global = config.train.global_batch_size.max(1) as f64;
        config.train.steps = ((epochs * samples_per_epoch as f64 / global).ceil() as u64).max(1);
        config.train.epochs = None;
    }
    if config.schedule.warmup_ratio > 0.0 {
        config.schedule.warmup_steps = (config.schedule.warmup_ratio * config.train.steps as f64).round() as u64;
        config.schedule.warmup_ratio = 0.0;
    }
    if config.schedule.warmup_steps >= config.train.steps {
        tracing::warn!(
            "schedule.warmup_steps = {} is not below train.steps = {}: the learning rate never reaches \
             optimizer.lr = {} (lower schedule.warmup_steps, or use schedule.warmup_ratio)",
            config.schedule.warmup_steps,
            config.train.steps,
            config.optimizer.lr
        );
    }
    if let Some(dir) = &init_from {
        // Token ids only mean the same thing under the same tokenizer.
        let init = moxin_layout::checkpoint::CheckpointManifest::read(dir).map_err(|e| ConfigError::Invalid {
            field: "model.init_from".into(),
            value: dir.display().to_string(),
            message: e.to_string(),
        })?;
        if let Some(theirs) = init.files.get(moxin_layout::checkpoint::TOKENIZER_FILE) {
            if *theirs != tokenizer_sha256 {
                let sft = moxin_data::sft::SftManifest::load(&data_dir).is_ok_and(|m| m.is_some());
                let command = if sft { "data prepare-sft" } else { "data prepare" };
                return Err(ConfigError::Invalid {
                    field: "data.source".into(),
                    value: data_dir.display().to_string(),
                    message: format!(
                        "prepared with another tokenizer than the model in model.init_from was trained with; \
                         prepare the data with its tokenizer: `moxin-train {command} --tokenizer {}`",
                        dir.join(moxin_layout::checkpoint::TOKENIZER_FILE).display()
                    ),
                });
            }
        }
    }

    let resolved_config_toml = config.resolved_toml(&shape, seq_len);
    let spec = JobSpec {
        name,
        seed: config.job.seed,
        model: Some(ModelSpec {
            init_from: init_from.map(|d| d.display().to_string()).unwrap_or_default(),
            ..model_spec(&config.model.preset, &shape)
        }),
        data: Some(DataSpec {
            prepared_dir: data_dir.display().to_string(),
            manifest_sha256,
            verify_checksums: config.data.verify_checksums,
        }),
        train: Some(TrainSpec {
            steps: config.train.steps,
            seq_len,
            global_batch_size: config.train.global_batch_size,
            micro_batch_size: config.train.micro_batch_size,
            log_every_steps: config.train.log_every_steps,
        }),
        optimizer: Some(OptimizerSpec {
            lr: config.optimizer.lr,
            beta1: config.optimizer.beta1,
            beta2: config.optimizer.beta2,
            eps: config.optimizer.eps,
            weight_decay: config.optimizer.weight_decay,
            grad_clip: config.optimizer.grad_clip,
        }),
        schedule: Some(ScheduleSpec {
            warmup_steps: config.schedule.warmup_steps,
            decay: match config.schedule.decay {
                Decay::Cosine => schedule_spec::Decay::Cosine,
                Decay::Linear => schedule_spec::Decay::Linear,
                Decay::Constant => schedule_spec::Decay::Constant,
            } as i32,
            min_lr_ratio: config.schedule.min_lr_ratio,
        }),
        checkpoint: Some(CheckpointSpec {
            every_steps: config.checkpoint.every_steps,
            keep_last: config.checkpoint.keep_last,
            disabled: !config.checkpoint.enabled,
            synchronous: config.checkpoint.synchronous,
            every_seconds: config.checkpoint.every_seconds,
            optimizer_file_bytes: config.checkpoint.optimizer_file_mib << 20,
        }),
        runtime: Some(RuntimeSpec {
            device: match config.runtime.device {
                Device::Auto => runtime_spec::Device::Auto,
                Device::Cpu => runtime_spec::Device::Cpu,
                Device::Cuda => runtime_spec::Device::Cuda,
            } as i32,
            precision: match config.runtime.precision {
                Precision::Auto => runtime_spec::Precision::Auto,
                Precision::Fp32 => runtime_spec::Precision::Fp32,
                Precision::Bf16 => runtime_spec::Precision::Bf16,
            } as i32,
            threads: config.runtime.threads,
            recompute: match config.runtime.recompute {
                Recompute::Auto => runtime_spec::Recompute::Auto,
                Recompute::None => runtime_spec::Recompute::None,
                Recompute::Blocks => runtime_spec::Recompute::Blocks,
                Recompute::Elementwise => runtime_spec::Recompute::Elementwise,
            } as i32,
            grad_reduce: match config.runtime.grad_reduce {
                GradReduce::Fp32 => runtime_spec::GradReduce::Fp32,
                GradReduce::Bf16 => runtime_spec::GradReduce::Bf16,
            } as i32,
            profile: config.runtime.profile,
            peak_tflops: config.runtime.peak_tflops,
            kernels: match config.runtime.kernels {
                KernelChoice::Auto => runtime_spec::Kernels::Auto,
                KernelChoice::Aten => runtime_spec::Kernels::Aten,
                KernelChoice::Fused => runtime_spec::Kernels::Fused,
            } as i32,
            block_backward: match config.runtime.block_backward {
                BlockBackward::Auto => runtime_spec::BlockBackward::Auto,
                BlockBackward::Autograd => runtime_spec::BlockBackward::Autograd,
                BlockBackward::Explicit => runtime_spec::BlockBackward::Explicit,
            } as i32,
            optimizer_stream: config.runtime.optimizer_stream,
            split_projections: config.runtime.split_projections,
            gemm: match config.runtime.gemm {
                GemmChoice::Aten => runtime_spec::Gemm::Aten,
                GemmChoice::Tuned => runtime_spec::Gemm::Tuned,
            } as i32,
        }),
        resolved_config_toml,
        run_dir: run_dir.display().to_string(),
        grpo: grpo.map(|(spec, _)| spec),
    };
    Ok(ResolvedJob { config, spec, run_dir, samples_per_epoch, lock })
}

/// The prepared data of a job: its directory (built-in data, and a data file, are
/// prepared into the run directory on first use), the tokenizer's sha256, samples per
/// epoch (pre-training windows, or packed rows of SFT conversations) and the manifest's
/// sha256.
fn resolve_data(
    config: &JobConfig,
    run_dir: &Path,
    (vocab_size, max_seq_len): (u32, u32),
    seq_len: u32,
    init_from: Option<&Path>,
) -> Result<(PathBuf, String, u64, String), ConfigError> {
    let data_dir = if config.data.source == "builtin" {
        let dir = run_dir.join("data");
        moxin_data::builtin::prepare_builtin(&dir, vocab_size)?;
        dir
    } else if Path::new(&config.data.source).is_file() {
        prepare_file(Path::new(&config.data.source), &run_dir.join("data"), (vocab_size, max_seq_len), init_from)?
    } else {
        let dir = PathBuf::from(&config.data.source);
        std::fs::canonicalize(&dir).map_err(|e| ConfigError::Invalid {
            field: "data.source".into(),
            value: config.data.source.clone(),
            message: format!(
                "{e}; expected \"builtin\", a .txt or .jsonl file, or a directory made by `moxin-train data prepare`"
            ),
        })?
    };
    let (tokenizer_sha256, samples_per_epoch) = match moxin_data::sft::SftManifest::load(&data_dir)? {
        Some(sft) => {
            let data = moxin_data::sft::SftData::open(&data_dir, seq_len, vocab_size, config.job.seed, false)?;
            let cut = data.truncation();
            if cut.conversations > 0 {
                tracing::warn!(
                    conversations = cut.conversations,
                    of = sft.conversations,
                    trained_tokens_lost = cut.trained_targets,
                    seq_len,
                    "conversations longer than train.seq_len are cut to it and their ends are not trained; \
                     raise train.seq_len to keep them"
                );
            }
            (sft.tokenizer.sha256, data.num_rows())
        }
        None => {
            let manifest = Manifest::load(&data_dir)?;
            manifest.check_vocab(&data_dir, vocab_size)?;
            let samples = manifest.num_samples(&data_dir, seq_len)?;
            manifest.verify(&data_dir, false)?;
            (manifest.tokenizer.sha256, samples)
        }
    };
    let manifest_sha256 = Manifest::file_sha256(&data_dir)?;
    Ok((data_dir, tokenizer_sha256, samples_per_epoch, manifest_sha256))
}

/// Prepares the data file `source` into `dir` on first use, and again when the file
/// changed before anything was trained on it (a changed file under trained steps is
/// refused): JSONL conversations (`{"messages": ...}` lines) as SFT data
/// with the starting checkpoint's tokenizer and the Moxin chat template; text (`.txt`, or
/// JSONL `{"text": ...}` lines) as pre-training data, with the starting checkpoint's
/// tokenizer or else a byte-level BPE of the model's vocabulary trained on it.
fn prepare_file(
    source: &Path,
    dir: &Path,
    (vocab_size, max_seq_len): (u32, u32),
    init_from: Option<&Path>,
) -> Result<PathBuf, ConfigError> {
    let bad = |message: String| ConfigError::Invalid {
        field: "data.source".into(),
        value: source.display().to_string(),
        message,
    };
    let source = std::fs::canonicalize(source).map_err(|e| bad(e.to_string()))?;
    let sha = moxin_data::sha256_hex(&source).map_err(|e| bad(e.to_string()))?;
    let tag = format!("{}\nsha256 {sha}\n", source.display());
    let marker = dir.join(".prepared-from");
    if dir.join(moxin_data::MANIFEST_FILE).exists() {
        let before = std::fs::read_to_string(&marker).unwrap_or_default();
        if before == tag {
            return Ok(dir.to_path_buf());
        }
        // Data nothing was trained on yet (an earlier attempt failed after preparing it)
        // is prepared again; data checkpoints were trained on is not replaced under them.
        let trained = dir.parent().is_some_and(|run| {
            let published = moxin_layout::checkpoint::list(run).is_ok_and(|l| !l.is_empty());
            let staged = !moxin_layout::checkpoint::staging_dirs(run).is_empty();
            let logged = std::fs::metadata(run.join("metrics.jsonl")).is_ok_and(|m| m.len() > 0);
            published || staged || logged
        });
        if trained {
            return Err(bad(format!(
                "{} holds data prepared from another file (or this one before it changed), and this run's \
                 checkpoints were trained on it; use another --out for this job, or remove that directory to \
                 prepare it again",
                dir.display()
            )));
        }
        tracing::info!(dir = %dir.display(), "the data there came from another file and nothing was trained on it");
    }
    let first = std::fs::read_to_string(&source)
        .map_err(|e| bad(e.to_string()))?
        .lines()
        .find(|l| !l.trim().is_empty())
        .map(|l| moxin_data::without_bom(l, true).to_string())
        .unwrap_or_default();
    let conversations = serde_json::from_str::<serde_json::Value>(&first).is_ok_and(|v| v["messages"].is_array());
    let init_tokenizer = init_from.map(|d| d.join(moxin_layout::checkpoint::TOKENIZER_FILE)).filter(|t| t.exists());
    tracing::info!(source = %source.display(), dir = %dir.display(), "preparing the data file");
    // Written first: a manifest without its marker never appears (the manifest comes last).
    std::fs::create_dir_all(dir).map_err(|e| bad(format!("{}: {e}", dir.display())))?;
    std::fs::write(&marker, &tag).map_err(|e| bad(format!("{}: {e}", marker.display())))?;
    if conversations {
        let tokenizer = init_tokenizer.ok_or_else(|| {
            bad("conversations are encoded with the starting model's tokenizer: set model.init_from to a checkpoint \
                 that has one"
                .into())
        })?;
        moxin_data::sft::prepare_sft(&moxin_data::sft::SftPrepareOptions {
            inputs: vec![source.clone()],
            out_dir: dir.to_path_buf(),
            tokenizer,
            template: moxin_data::sft::ChatTemplate::moxin(),
            max_tokens: max_seq_len + 1,
            overlong: moxin_data::sft::Overlong::Truncate,
            overwrite: true,
        })?;
    } else {
        let tokenizer = match init_tokenizer {
            Some(t) => moxin_data::TokenizerSource::File(t),
            None => moxin_data::TokenizerSource::Train { vocab_size },
        };
        let mut opts = moxin_data::PrepareOptions::new(vec![source.clone()], dir.to_path_buf(), tokenizer);
        opts.overwrite = true;
        moxin_data::prepare(&opts)?;
    }
    Ok(dir.to_path_buf())
}

/// The wire form of a model shape.
pub fn model_spec(preset: &str, s: &ModelShape) -> ModelSpec {
    s.to_spec(preset)
}
