//! The user-facing job configuration: schema, loading and validation.
//!
//! Sources, later ones winning: the TOML file, environment variables
//! `MOXIN__<SECTION>__<KEY>` (e.g. `MOXIN__TRAIN__STEPS=50`), then `--set section.key=value`.
//! Unknown keys are errors, never silently ignored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::presets::{self, ModelShape};

/// Why a configuration was rejected. Messages name the file and the field, the offending
/// value, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed, or has unknown or mistyped keys.
    #[error("{file}: {message}")]
    Load {
        /// The configuration file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A `--set` override or `MOXIN__…` environment variable has an unknown key or a value
    /// of the wrong type.
    #[error("{origin}: {message}")]
    Override {
        /// Where the value came from, e.g. `--set train.steps=-1`.
        origin: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("{field} = {value}: {message}")]
    Invalid {
        /// Dotted key, e.g. `model.n_heads`.
        field: String,
        /// The offending value.
        value: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// The training data does not fit the job.
    #[error(transparent)]
    Data(#[from] moxin_data::DataError),
    /// Another process is using the run directory.
    #[error(transparent)]
    Locked(#[from] crate::rundir::LockError),
}

/// A whole job configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Job identity.
    #[serde(default)]
    pub job: JobSection,
    /// Model shape: a preset plus optional per-field overrides.
    pub model: ModelSection,
    /// Training data.
    #[serde(default)]
    pub data: DataSection,
    /// Batch geometry and run length.
    pub train: TrainSection,
    /// AdamW.
    #[serde(default)]
    pub optimizer: OptimizerSection,
    /// Learning-rate schedule.
    #[serde(default)]
    pub schedule: ScheduleSection,
    /// Checkpointing.
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    /// Device, precision and threads.
    #[serde(default)]
    pub runtime: RuntimeSection,
    /// Distributed runs: workers, heartbeats, addresses.
    #[serde(default)]
    pub cluster: ClusterSection,
    /// GRPO: present, the job learns from rollouts on prompts instead of from data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpo: Option<crate::grpo::GrpoSection>,
}

/// `[cluster]`: how a distributed job forms and watches its group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// The group forms once this many workers have registered.
    pub min_workers: u32,
    /// Registrations beyond this are refused; defaults to `min_workers`.
    pub max_workers: Option<u32>,
    /// Address the coordinator's gRPC server binds (`moxin-train coordinator`; `launch`
    /// uses an ephemeral loopback port).
    pub listen: String,
    /// Optional Prometheus endpoint of the coordinator, e.g. `127.0.0.1:9400`.
    pub metrics_listen: Option<String>,
    /// How often workers heartbeat.
    pub heartbeat_interval_ms: u32,
    /// A worker silent this long is lost; its group re-forms without it.
    pub heartbeat_timeout_ms: u32,
    /// How long a job that lost workers waits for replacements when fewer than
    /// `min_workers` are left, before it fails.
    pub replacement_timeout_ms: u32,
    /// A group member whose compute time per step exceeds this many times the group's
    /// median is flagged as a straggler (log line, `moxin_straggler` gauge); 0 turns the
    /// check off.
    pub straggler_factor: f64,
    /// Any collective call fails after this long without progress.
    pub collective_timeout_ms: u32,
    /// Where the coordinator persists its state; defaults to `<run dir>/coordinator`.
    pub state_dir: Option<String>,
    /// How workers exchange gradients: `auto` (NCCL when every worker has its own GPU and
    /// NCCL, else the CPU ring), `nccl` or `ring`.
    pub collective: CollectiveChoice,
}

/// `cluster.collective`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CollectiveChoice {
    /// NCCL when every worker has its own GPU and can load NCCL, else the ring.
    Auto,
    /// NCCL between GPUs (fails when a worker cannot use it).
    Nccl,
    /// The CPU ring (CUDA tensors are staged through host memory).
    Ring,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            min_workers: 1,
            max_workers: None,
            listen: "127.0.0.1:50051".into(),
            metrics_listen: None,
            heartbeat_interval_ms: 500,
            heartbeat_timeout_ms: 3000,
            replacement_timeout_ms: 300_000,
            straggler_factor: 1.5,
            collective_timeout_ms: 60_000,
            state_dir: None,
            collective: CollectiveChoice::Auto,
        }
    }
}

impl ClusterSection {
    /// `max_workers`, defaulted.
    pub fn max(&self) -> u32 {
        self.max_workers.unwrap_or(self.min_workers)
    }
}

/// `[job]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobSection {
    /// Job name; defaults to the config file's stem.
    pub name: Option<String>,
    /// Master seed (initialisation and data order).
    pub seed: u64,
}

impl Default for JobSection {
    fn default() -> Self {
        JobSection { name: None, seed: 1337 }
    }
}

/// `[model]`: `preset` names a built-in shape or a TOML file, or `init_from` a checkpoint
/// whose shape and weights the run starts from; any other key overrides the shape.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct ModelSection {
    /// Built-in preset name (`tiny`, `bench-small`, `moxin-7b`) or a path to a model TOML.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub preset: String,
    /// A checkpoint directory (or a run directory: its newest checkpoint) whose weights
    /// start a fresh run: a model imported with `import-hf`, or an earlier stage's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
    pub vocab_size: Option<u32>,
    pub dim: Option<u32>,
    pub n_layers: Option<u32>,
    pub n_heads: Option<u32>,
    pub n_kv_heads: Option<u32>,
    pub ffn_dim: Option<u32>,
    pub max_seq_len: Option<u32>,
    pub sliding_window: Option<u32>,
    pub rope_theta: Option<f64>,
    pub norm_eps: Option<f64>,
    pub init_std: Option<f64>,
}

impl ModelSection {
    /// What a command's `--model` names: a preset (name or model TOML), or a checkpoint or
    /// run directory whose model it is (as `init_from`).
    pub fn named(model: &str) -> ModelSection {
        let dir = Path::new(model).is_dir();
        ModelSection {
            preset: if dir { String::new() } else { model.to_string() },
            init_from: dir.then(|| model.to_string()),
            ..Default::default()
        }
    }

    /// The checkpoint directory `init_from` names (a run directory's newest checkpoint),
    /// made absolute; `None` without `init_from`.
    pub fn init_checkpoint(&self) -> Result<Option<std::path::PathBuf>, ConfigError> {
        let Some(path) = self.init_from.as_ref().filter(|p| !p.is_empty()) else { return Ok(None) };
        let bad =
            |message: String| ConfigError::Invalid { field: "model.init_from".into(), value: path.clone(), message };
        let dir = Path::new(path);
        let dir = if dir.join(moxin_layout::checkpoint::MANIFEST).exists() {
            dir.to_path_buf()
        } else if moxin_layout::checkpoint::checkpoints_dir(dir).is_dir() {
            let listed = moxin_layout::checkpoint::list(dir).map_err(|e| bad(e.to_string()))?;
            listed
                .into_iter()
                .next()
                .map(|(_, d)| d)
                .ok_or_else(|| bad("this run directory has no checkpoint".into()))?
        } else if dir.join("config.json").exists() {
            return Err(bad(format!(
                "a Hugging Face model folder; import it first: `moxin-train import-hf {path} --out <checkpoint dir>`, \
                 then set model.init_from to that directory"
            )));
        } else {
            return Err(bad(
                "not a checkpoint directory (no manifest.json) or a run directory (no checkpoints/)".into()
            ));
        };
        std::fs::canonicalize(&dir).map(Some).map_err(|e| bad(e.to_string()))
    }

    /// The preset (or `init_from`'s checkpoint's shape) with this section's overrides
    /// applied. Over a checkpoint only what leaves the parameters' shapes alone may be
    /// overridden (context length, window, RoPE base, norm epsilon).
    pub fn shape(&self) -> Result<ModelShape, ConfigError> {
        let base = match (self.preset.as_str(), self.init_checkpoint()?) {
            ("", None) => {
                return Err(ConfigError::Invalid {
                    field: "model.preset".into(),
                    value: String::new(),
                    message: "missing; name a preset (e.g. \"tiny\") or set model.init_from to a checkpoint".into(),
                })
            }
            (preset, None) => presets::load(preset)?,
            ("", Some(dir)) => {
                let manifest =
                    moxin_layout::checkpoint::CheckpointManifest::read(&dir).map_err(|e| ConfigError::Invalid {
                        field: "model.init_from".into(),
                        value: dir.display().to_string(),
                        message: e.to_string(),
                    })?;
                let m = manifest.model;
                for (field, ours, theirs) in [
                    ("vocab_size", self.vocab_size, m.vocab_size),
                    ("dim", self.dim, m.dim),
                    ("n_layers", self.n_layers, m.n_layers),
                    ("n_heads", self.n_heads, m.n_heads),
                    ("n_kv_heads", self.n_kv_heads, m.n_kv_heads),
                    ("ffn_dim", self.ffn_dim, m.ffn_dim),
                ] {
                    if let Some(v) = ours.filter(|&v| v != theirs) {
                        return Err(ConfigError::Invalid {
                            field: format!("model.{field}"),
                            value: v.to_string(),
                            message: format!(
                                "the checkpoint in model.init_from has {field} = {theirs}; its weights fix the \
                                 parameter shapes (remove the override)"
                            ),
                        });
                    }
                }
                m
            }
            (preset, Some(_)) => {
                return Err(ConfigError::Invalid {
                    field: "model.preset".into(),
                    value: preset.into(),
                    message: "and model.init_from both set; give one (with init_from the shape comes from the \
                              checkpoint)"
                        .into(),
                })
            }
        };
        let mut s = base;
        macro_rules! apply {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { s.$f = v; } )* };
        }
        apply!(
            vocab_size,
            dim,
            n_layers,
            n_heads,
            n_kv_heads,
            ffn_dim,
            max_seq_len,
            sliding_window,
            rope_theta,
            norm_eps,
            init_std
        );
        Ok(s)
    }

    fn resolved(&self, s: &ModelShape) -> Self {
        ModelSection {
            preset: self.preset.clone(),
            init_from: self.init_from.clone(),
            vocab_size: Some(s.vocab_size),
            dim: Some(s.dim),
            n_layers: Some(s.n_layers),
            n_heads: Some(s.n_heads),
            n_kv_heads: Some(s.n_kv_heads),
            ffn_dim: Some(s.ffn_dim),
            max_seq_len: Some(s.max_seq_len),
            sliding_window: Some(s.sliding_window),
            rope_theta: Some(s.rope_theta),
            norm_eps: Some(s.norm_eps),
            init_std: Some(s.init_std),
        }
    }
}

/// `[data]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// `"builtin"` (the synthetic corpus, prepared into `<run dir>/data` on first use) or the
    /// path of a directory made by `moxin-train data prepare` (relative to the working dir).
    pub source: String,
    /// Check every shard's sha256 when the data is opened (sizes are always checked).
    pub verify_checksums: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection { source: "builtin".into(), verify_checksums: true }
    }
}

/// `[train]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps in total (0 with `epochs`: derived from the data).
    #[serde(default)]
    pub steps: u64,
    /// Passes over the data instead of `steps`: steps = ceil(epochs × samples per epoch /
    /// global batch) (for SFT data, samples are packed rows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<f64>,
    /// Tokens per sample; defaults to `model.max_seq_len`.
    pub seq_len: Option<u32>,
    /// Samples per optimizer step, over all workers.
    pub global_batch_size: u32,
    /// Samples per forward/backward on one worker; gradient accumulation makes up the rest.
    pub micro_batch_size: u32,
    /// Write a metrics line every this many steps.
    #[serde(default = "one")]
    pub log_every_steps: u32,
}

impl TrainSection {
    /// Whether `workers` workers split the global batch: a whole number of micro-batches
    /// on each (the coordinator forms groups only at such sizes).
    pub fn splits_over(&self, workers: u32) -> bool {
        let per_pass = self.micro_batch_size as u64 * workers as u64;
        per_pass > 0 && (self.global_batch_size as u64).is_multiple_of(per_pass)
    }
}

fn one() -> u32 {
    1
}

/// `[optimizer]`: AdamW with decoupled weight decay on matrices only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[allow(missing_docs)]
pub struct OptimizerSection {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 disables.
    pub grad_clip: f64,
}

impl Default for OptimizerSection {
    fn default() -> Self {
        // Moxin's pre-training recipe (AdamW β=(0.9, 0.95), eps 1e-8, wd 0.1, clip 1.0).
        OptimizerSection { lr: 3e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, grad_clip: 1.0 }
    }
}

/// Shape of the learning-rate decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
}

/// `[schedule]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSection {
    /// Linear warmup from 0 to `optimizer.lr` over this many steps.
    pub warmup_steps: u64,
    /// Or over this fraction of `train.steps` (0 = use `warmup_steps`).
    #[serde(skip_serializing_if = "is_zero")]
    pub warmup_ratio: f64,
    /// Decay after warmup.
    pub decay: Decay,
    /// The schedule ends at `min_lr_ratio * optimizer.lr`.
    pub min_lr_ratio: f64,
}

impl Default for ScheduleSection {
    fn default() -> Self {
        ScheduleSection { warmup_steps: 0, warmup_ratio: 0.0, decay: Decay::Cosine, min_lr_ratio: 0.1 }
    }
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// `[checkpoint]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Save every this many steps (and always at the end); 0 saves only at the end.
    pub every_steps: u64,
    /// Number of most recent checkpoints kept.
    pub keep_last: u32,
    /// `false` writes no checkpoints at all (benchmarks, smoke tests); such a run cannot
    /// be resumed.
    pub enabled: bool,
    /// `true`: training waits while a checkpoint is written. By default (`false`) it only
    /// waits for the state to be copied off the training path.
    pub synchronous: bool,
    /// Also save when this many seconds passed since the last checkpoint; 0 = off.
    pub every_seconds: f64,
    /// A rank's optimizer partition is written as files of at least this many MiB: one
    /// file below twice this, else up to 4 written at once (one buffered write stream per
    /// file; disks and parallel file systems take several streams faster than one).
    pub optimizer_file_mib: u64,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection {
            every_steps: 1000,
            keep_last: 3,
            enabled: true,
            synchronous: false,
            every_seconds: 0.0,
            optimizer_file_mib: moxin_layout::checkpoint::DEFAULT_PARTITION_FILE_BYTES >> 20,
        }
    }
}

impl JobConfig {
    /// Loads `file`, then applies `MOXIN__SECTION__KEY` variables from `env` and `--set`
    /// overrides (`section.key=value`), and rejects unknown keys. Does not validate values.
    pub fn load(file: &Path, env: HashMap<String, String>, overrides: &[String]) -> Result<Self, ConfigError> {
        let load_err = |message: String| ConfigError::Load { file: file.to_path_buf(), message };
        let env_keys: Vec<String> = env.keys().cloned().collect();
        let text = std::fs::read_to_string(file).map_err(|e| load_err(format!("cannot read config: {e}")))?;
        let mut builder = ::config::Config::builder()
            .add_source(::config::File::from_str(&text, ::config::FileFormat::Toml))
            .add_source(
                ::config::Environment::with_prefix("MOXIN")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env.into_iter().collect())),
            );
        for set in overrides {
            let (key, value) = set.split_once('=').ok_or_else(|| {
                load_err(format!("--set {set:?}: expected section.key=value, e.g. --set train.steps=100"))
            })?;
            let key = key.trim();
            if !key.contains('.') || key.split('.').any(str::is_empty) {
                return Err(load_err(format!(
                    "--set {set:?}: key {key:?} must name a section and a field, e.g. train.steps"
                )));
            }
            builder = builder.set_override(key, value.trim()).map_err(|e| load_err(e.to_string()))?;
        }
        let described = |e: ::config::ConfigError| {
            let (key, message) = describe(e);
            // The override of that key, or of a key inside it (an unknown section).
            let names = |k: &str| !key.is_empty() && (k == key || k.starts_with(&format!("{key}.")));
            let set = overrides.iter().rev().find(|s| s.split_once('=').is_some_and(|(k, _)| names(k.trim())));
            let var = env_keys
                .iter()
                .find(|v| v.strip_prefix("MOXIN__").is_some_and(|k| names(&k.to_lowercase().replace("__", "."))));
            match (set, var) {
                (Some(set), _) => ConfigError::Override { origin: format!("--set {set}"), message },
                (None, Some(var)) => ConfigError::Override { origin: var.clone(), message },
                (None, None) => load_err(message),
            }
        };
        let merged = builder.build().map_err(described)?;
        merged.try_deserialize::<JobConfig>().map_err(described)
    }

    /// Loads `file` with the process environment.
    pub fn load_with_process_env(file: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let env = std::env::vars().filter(|(k, _)| k.starts_with("MOXIN__")).collect();
        Self::load(file, env, overrides)
    }

    /// Validates every value for a job of `world_size` workers and returns the resolved
    /// model shape and sequence length.
    pub fn validate(&self, world_size: u32) -> Result<(ModelShape, u32), ConfigError> {
        let m = self.model.shape()?;
        if let Err(e) = m.check(&|field| format!("model.{field}")) {
            return Err(ConfigError::Invalid { field: e.field, value: e.value, message: e.reason });
        }
        let seq_len = self.train.seq_len.unwrap_or(m.max_seq_len);
        if seq_len == 0 || seq_len > m.max_seq_len {
            return Err(ConfigError::Invalid {
                field: "train.seq_len".into(),
                value: seq_len.to_string(),
                message: format!("must be between 1 and model.max_seq_len = {}", m.max_seq_len),
            });
        }
        self.validate_settings(world_size)?;
        Ok((m, seq_len))
    }

    /// Validates every value that does not depend on the model's shape, for a job of
    /// `world_size` workers (what can be checked of a job whose shape comes from a
    /// checkpoint not written yet: a pipeline's later stages).
    pub fn validate_settings(&self, world_size: u32) -> Result<(), ConfigError> {
        let bad = |field: &str, value: &dyn std::fmt::Display, message: String| ConfigError::Invalid {
            field: field.into(),
            value: value.to_string(),
            message,
        };
        // The default run directory is runs/<job.name>: one directory inside runs/.
        if let Some(name) = &self.job.name {
            if name.is_empty() || name.starts_with('.') || name.contains(['/', '\\', '\0']) {
                return Err(bad(
                    "job.name",
                    &format!("{name:?}"),
                    "must be a plain directory name (the default run directory is runs/<job.name>): not empty, \
                     no '/', not starting with '.'"
                        .into(),
                ));
            }
        }

        let t = &self.train;
        match (t.steps, t.epochs) {
            (0, None) => return Err(bad("train.steps", &t.steps, "must be at least 1 (or set train.epochs)".into())),
            (_, Some(e)) if !(e > 0.0 && e.is_finite()) => {
                return Err(bad("train.epochs", &e, "must be a positive number of passes over the data".into()))
            }
            (s, Some(_)) if s > 0 => {
                return Err(bad(
                    "train.epochs",
                    &t.epochs.unwrap_or(0.0),
                    format!("and train.steps = {s} both set; give one (--set train.steps=0 trains by epochs)"),
                ))
            }
            _ => {}
        }
        let sched = &self.schedule;
        if !(0.0..1.0).contains(&sched.warmup_ratio) {
            return Err(bad("schedule.warmup_ratio", &sched.warmup_ratio, "must be in [0, 1)".into()));
        }
        if sched.warmup_ratio > 0.0 && sched.warmup_steps > 0 {
            return Err(bad(
                "schedule.warmup_ratio",
                &sched.warmup_ratio,
                format!(
                    "and schedule.warmup_steps = {} both set; give one (--set schedule.warmup_steps=0 warms up by the ratio)",
                    sched.warmup_steps
                ),
            ));
        }
        if t.micro_batch_size == 0 {
            return Err(bad("train.micro_batch_size", &0, "must be at least 1".into()));
        }
        if t.log_every_steps == 0 {
            return Err(bad("train.log_every_steps", &0, "must be at least 1".into()));
        }
        let c = &self.cluster;
        if c.min_workers == 0 {
            return Err(bad("cluster.min_workers", &0, "must be at least 1".into()));
        }
        if c.max() < c.min_workers {
            return Err(bad(
                "cluster.max_workers",
                &c.max(),
                format!("must be >= cluster.min_workers = {}", c.min_workers),
            ));
        }
        if c.heartbeat_interval_ms == 0 || c.heartbeat_timeout_ms <= c.heartbeat_interval_ms {
            return Err(bad(
                "cluster.heartbeat_timeout_ms",
                &c.heartbeat_timeout_ms,
                format!("must exceed cluster.heartbeat_interval_ms = {} (> 0)", c.heartbeat_interval_ms),
            ));
        }
        let every_seconds = self.checkpoint.every_seconds;
        if !(every_seconds.is_finite() && every_seconds >= 0.0) {
            return Err(bad(
                "checkpoint.every_seconds",
                &every_seconds,
                "must be a number of seconds >= 0 (0 = only every_steps)".into(),
            ));
        }
        if !(c.straggler_factor == 0.0 || c.straggler_factor.is_finite() && c.straggler_factor > 1.0) {
            return Err(bad(
                "cluster.straggler_factor",
                &c.straggler_factor,
                "must be above 1 (e.g. 1.5), or 0 to turn straggler detection off".into(),
            ));
        }
        if c.collective_timeout_ms == 0 {
            return Err(bad("cluster.collective_timeout_ms", &0, "must be at least 1".into()));
        }
        if self.cluster.collective == CollectiveChoice::Nccl && self.runtime.device == Device::Cpu {
            return Err(bad(
                "cluster.collective",
                &"nccl",
                "NCCL needs GPUs but runtime.device = \"cpu\"; use collective = \"ring\" or \"auto\"".into(),
            ));
        }
        if self.runtime.kernels == KernelChoice::Fused && self.runtime.device == Device::Cpu {
            return Err(bad(
                "runtime.kernels",
                &"fused",
                "the fused kernels are CUDA code but runtime.device = \"cpu\"; use kernels = \"aten\"".into(),
            ));
        }
        if self.runtime.gemm == GemmChoice::Tuned && self.runtime.device == Device::Cpu {
            return Err(bad(
                "runtime.gemm",
                &"tuned",
                "tuned GEMMs run through cuBLASLt on a GPU but runtime.device = \"cpu\"; use gemm = \"aten\"".into(),
            ));
        }
        if self.runtime.threads > MAX_THREADS {
            return Err(bad(
                "runtime.threads",
                &self.runtime.threads,
                format!("at most {MAX_THREADS}; 0 = one per available core (usually best)"),
            ));
        }
        if !(self.runtime.peak_tflops.is_finite() && self.runtime.peak_tflops >= 0.0) {
            return Err(bad(
                "runtime.peak_tflops",
                &self.runtime.peak_tflops,
                "must be >= 0 (0 = from the GPU's name)".into(),
            ));
        }
        let per_pass = t.micro_batch_size as u64 * world_size as u64;
        if t.global_batch_size == 0 {
            return Err(bad("train.global_batch_size", &0, "must be at least 1".into()));
        }
        if !t.splits_over(world_size) {
            let fix = if (t.global_batch_size as u64) < per_pass {
                format!("lower train.micro_batch_size, or raise train.global_batch_size to {per_pass}")
            } else {
                format!("make it a multiple of {per_pass}")
            };
            return Err(bad(
                "train.global_batch_size",
                &t.global_batch_size,
                format!(
                    "is not divisible by train.micro_batch_size = {} x {world_size} worker(s) = {per_pass}; {fix}",
                    t.micro_batch_size
                ),
            ));
        }

        let o = &self.optimizer;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return Err(bad("optimizer.lr", &o.lr, "must be a positive number".into()));
        }
        for (field, v) in [("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(bad(field, &v, "must be in [0, 1)".into()));
            }
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return Err(bad("optimizer.eps", &o.eps, "must be a positive number".into()));
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return Err(bad("optimizer.weight_decay", &o.weight_decay, "must be >= 0".into()));
        }
        if !(o.grad_clip.is_finite() && o.grad_clip >= 0.0) {
            return Err(bad("optimizer.grad_clip", &o.grad_clip, "must be >= 0 (0 disables clipping)".into()));
        }
        let s = &self.schedule;
        if !(0.0..=1.0).contains(&s.min_lr_ratio) {
            return Err(bad("schedule.min_lr_ratio", &s.min_lr_ratio, "must be in [0, 1]".into()));
        }
        if self.checkpoint.keep_last == 0 {
            return Err(bad("checkpoint.keep_last", &0, "must be at least 1".into()));
        }
        if !(1..=1 << 30).contains(&self.checkpoint.optimizer_file_mib) {
            return Err(bad(
                "checkpoint.optimizer_file_mib",
                &self.checkpoint.optimizer_file_mib,
                "must be between 1 and 2^30 MiB (default 1024)".into(),
            ));
        }
        if self.runtime.device == Device::Cpu && self.runtime.precision == Precision::Bf16 {
            tracing::warn!(
                "runtime.precision = bf16 on CPU: fast on CPUs with bf16 instructions (AVX512_BF16, AMX; \
                 1.8x fp32 on bench-small on one); without them, compare with fp32 first"
            );
        }
        Ok(())
    }

    /// This configuration with every model field and `train.seq_len` spelled out, as TOML.
    pub fn resolved_toml(&self, shape: &ModelShape, seq_len: u32) -> String {
        let mut resolved = self.clone();
        resolved.model = self.model.resolved(shape);
        resolved.train.seq_len = Some(seq_len);
        toml::to_string_pretty(&resolved).expect("config serialises to TOML")
    }
}

/// The most intra-op threads a job may ask for: more than any machine's cores, far below
/// what would exhaust a machine's threads.
const MAX_THREADS: u32 = 4096;

#[path = "config_describe.rs"]
mod describe;
use describe::describe;

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;

#[path = "config_runtime.rs"]
mod runtime_section;
pub use runtime_section::{
    BlockBackward, Device, GemmChoice, GradReduce, KernelChoice, Precision, Recompute, RuntimeSection,
};
