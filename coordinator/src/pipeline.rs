//! Pipelines: one TOML file chaining training stages (pretrain → sft → distill → grpo, or
//! any subset), each a job of its own under `<out>/<stage>/`, each starting from the
//! previous stage's final checkpoint.
//!
//! ```toml
//! [pipeline]
//! stages = ["pretrain", "sft", "grpo"]
//! eval_prompts = "test.jsonl"      # held-out {"prompt", "answer"} lines (optional)
//!
//! [runtime]                        # top-level sections: defaults for every stage
//! device = "cpu"
//!
//! [stage.pretrain.model]           # each stage: any job sections, merged over the defaults
//! preset = "tiny"
//! [stage.sft.data]
//! source = "conversations.jsonl"
//! ```
//!
//! A stage after the first gets `model.init_from = "<out>/<previous stage>"` unless it
//! names its own. Each stage's merged configuration is written to
//! `<out>/pipeline/<stage>.toml` and resolved like any job file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

use crate::ConfigError;

/// `[pipeline]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSection {
    /// Stage names, in order; each has a `[stage.<name>]` table.
    pub stages: Vec<String>,
    /// Held-out prompts with reference answers (`{"prompt", "answer"}` lines): every
    /// stage's final checkpoint is scored on them (greedy, math-answer verifier).
    #[serde(default)]
    pub eval_prompts: Option<String>,
    /// Longest completion when scoring.
    #[serde(default = "default_eval_tokens")]
    pub eval_max_new_tokens: u32,
}

fn default_eval_tokens() -> u32 {
    64
}

/// One stage, ready to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    /// Its name.
    pub name: String,
    /// Its job file (the merged configuration).
    pub config: PathBuf,
    /// Its run directory.
    pub run_dir: PathBuf,
}

/// A loaded pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    /// `[pipeline]`.
    pub section: PipelineSection,
    /// The stages, in order.
    pub stages: Vec<Stage>,
    /// The pipeline's output directory.
    pub out: PathBuf,
}

/// Whether `file` is a pipeline (has a `[pipeline]` table) rather than a job.
pub fn is_pipeline(file: &Path) -> bool {
    std::fs::read_to_string(file).ok().and_then(|t| t.parse::<Table>().ok()).is_some_and(|t| t.contains_key("pipeline"))
}

/// `over` merged into `base`: tables merge key by key, anything else replaces.
fn merge(base: &mut Table, over: &Table) {
    for (key, value) in over {
        match (base.get_mut(key), value) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

impl Pipeline {
    /// The `--set` overrides for stage `stage` out of those given to the whole pipeline:
    /// `section.key=value` applies to every stage, `stage.<name>.section.key=value` to
    /// stage `<name>` only (as `section.key=value`). A `stage.` override naming no stage
    /// is an error (checked for every stage, so before any stage runs).
    pub fn stage_overrides(&self, stage: &str, overrides: &[String]) -> Result<Vec<String>, ConfigError> {
        // The stage's own overrides after the shared ones, so they win over them.
        let mut out: Vec<String> =
            overrides.iter().filter(|o| !o.trim_start().starts_with("stage.")).cloned().collect();
        for set in overrides {
            let Some(rest) = set.trim_start().strip_prefix("stage.") else { continue };
            let named = rest.split_once('.').filter(|(name, _)| self.stages.iter().any(|s| s.name == *name));
            let Some((name, inner)) = named else {
                return Err(ConfigError::Override {
                    origin: format!("--set {set}"),
                    message: format!(
                        "expected stage.<name>.<section>.<key>=<value> with <name> one of the stages {:?}",
                        self.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>()
                    ),
                });
            };
            if name == stage {
                out.push(inner.to_string());
            }
        }
        Ok(out)
    }

    /// Reads the pipeline `file` and writes each stage's job file under
    /// `<out>/pipeline/` (`out` defaults to `runs/<file stem>`).
    pub fn load(file: &Path, out: Option<&Path>) -> Result<Self, ConfigError> {
        let load_err = |message: String| ConfigError::Load { file: file.to_path_buf(), message };
        let text = std::fs::read_to_string(file).map_err(|e| load_err(e.to_string()))?;
        let mut table: Table = text.parse().map_err(|e: toml::de::Error| load_err(e.to_string()))?;
        let section: PipelineSection = table
            .remove("pipeline")
            .ok_or_else(|| load_err("no [pipeline] table".into()))?
            .try_into()
            .map_err(|e: toml::de::Error| load_err(format!("[pipeline]: {e}")))?;
        let stage_tables = match table.remove("stage") {
            Some(Value::Table(t)) => t,
            None => Table::new(),
            Some(_) => return Err(load_err("`stage` must be a table of [stage.<name>] tables".into())),
        };
        if section.eval_max_new_tokens == 0 {
            return Err(load_err(
                "[pipeline] eval_max_new_tokens = 0: an answer needs at least one new token to be scored".into(),
            ));
        }
        if section.stages.is_empty() {
            return Err(load_err("[pipeline] stages is empty; list the stages in order".into()));
        }
        if let Some(twice) = section.stages.iter().enumerate().find(|(i, s)| section.stages[..*i].contains(s)) {
            return Err(load_err(format!(
                "[pipeline] stages names {:?} twice; each stage needs its own name (and run directory)",
                twice.1
            )));
        }
        for name in stage_tables.keys() {
            if !section.stages.contains(name) {
                return Err(load_err(format!("[stage.{name}] is not in [pipeline] stages {:?}", section.stages)));
            }
        }
        let name = file.file_stem().and_then(|s| s.to_str()).unwrap_or("pipeline").to_string();
        let out = out.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("runs").join(&name));
        let configs = out.join("pipeline");
        std::fs::create_dir_all(&configs).map_err(|e| load_err(format!("{}: {e}", configs.display())))?;
        let mut stages = Vec::new();
        for (i, stage) in section.stages.iter().enumerate() {
            if stage.is_empty() || stage.contains(['/', '\\', '.']) {
                return Err(load_err(format!("stage name {stage:?}: use letters, digits, - and _")));
            }
            let mut merged = table.clone();
            if let Some(Value::Table(own)) = stage_tables.get(stage) {
                merge(&mut merged, own);
            }
            let run_dir = out.join(stage);
            if i > 0 {
                let model = merged.entry("model").or_insert_with(|| Value::Table(Table::new()));
                if let Value::Table(model) = model {
                    if !model.contains_key("init_from") {
                        model.insert("init_from".into(), out.join(&section.stages[i - 1]).display().to_string().into());
                        model.remove("preset");
                    }
                }
            }
            let job = merged.entry("job").or_insert_with(|| Value::Table(Table::new()));
            if let Value::Table(job) = job {
                job.entry("name").or_insert_with(|| format!("{name}-{stage}").into());
            }
            let path = configs.join(format!("{stage}.toml"));
            let text = toml::to_string_pretty(&merged).map_err(|e| load_err(e.to_string()))?;
            std::fs::write(&path, text).map_err(|e| load_err(format!("{}: {e}", path.display())))?;
            stages.push(Stage { name: stage.clone(), config: path, run_dir });
        }
        Ok(Pipeline { section, stages, out })
    }

    /// Checks `stage`'s job with its `overrides` (and the process environment) for a group
    /// of `workers`: in full when it does not start from a checkpoint; else every setting
    /// that does not depend on the model's shape (which comes from a checkpoint an earlier
    /// stage has not written yet), its GRPO section, and that its data and prompts files
    /// exist. Run for every stage before any trains, so that a mistake in the last stage
    /// does not surface after the first has trained.
    pub fn check_stage(&self, stage: &Stage, overrides: &[String], workers: u32) -> Result<(), ConfigError> {
        let config = crate::JobConfig::load_with_process_env(&stage.config, overrides)?;
        if config.model.init_from.is_none() {
            config.validate(workers)?;
        } else {
            config.validate_settings(workers)?;
        }
        let missing = |field: &str, path: &str| ConfigError::Invalid {
            field: field.into(),
            value: path.into(),
            message: "does not exist".into(),
        };
        if let Some(grpo) = &config.grpo {
            grpo.validate()?;
            if !Path::new(&grpo.prompts).is_file() {
                return Err(missing("grpo.prompts", &grpo.prompts));
            }
        }
        let source = &config.data.source;
        if config.grpo.is_none() && source != "builtin" && !Path::new(source).exists() {
            return Err(missing("data.source", source));
        }
        Ok(())
    }
}

/// What `summary.json` says of one stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageSummary {
    /// The stage.
    pub stage: String,
    /// Its final step.
    pub step: u64,
    /// Training wall time, seconds (from its metrics).
    pub elapsed_s: f64,
    /// Held-out accuracy of its final checkpoint, if the pipeline has eval prompts.
    pub eval_accuracy: Option<f64>,
    /// Held-out prompts scored.
    pub eval_prompts: u64,
}

/// The last step and elapsed seconds in a run directory's `metrics.jsonl`.
pub fn last_step(run_dir: &Path) -> Option<(u64, f64)> {
    let text = std::fs::read_to_string(run_dir.join(crate::rundir::METRICS_FILE)).ok()?;
    let last: serde_json::Value = serde_json::from_str(text.lines().last()?).ok()?;
    Some((last["step"].as_u64()?, last["elapsed_s"].as_f64().unwrap_or(0.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_merge_over_the_defaults_and_chain() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(
            &file,
            "[pipeline]\nstages = [\"pre\", \"sft\"]\n[runtime]\ndevice = \"cpu\"\nthreads = 1\n\
             [train]\nsteps = 5\nglobal_batch_size = 4\nmicro_batch_size = 2\n\
             [stage.pre.model]\npreset = \"tiny\"\n[stage.sft.train]\nsteps = 7\n[stage.sft.data]\nsource = \"c.jsonl\"\n",
        )
        .unwrap();
        let p = Pipeline::load(&file, Some(&dir.path().join("out"))).unwrap();
        assert_eq!(p.stages.len(), 2);
        let sft: Table = std::fs::read_to_string(&p.stages[1].config).unwrap().parse().unwrap();
        assert_eq!(sft["train"]["steps"].as_integer(), Some(7));
        assert_eq!(sft["train"]["global_batch_size"].as_integer(), Some(4), "defaults kept");
        assert_eq!(sft["runtime"]["device"].as_str(), Some("cpu"));
        assert_eq!(sft["model"]["init_from"].as_str(), Some(dir.path().join("out/pre").to_str().unwrap()));
        assert_eq!(sft["job"]["name"].as_str(), Some("p-sft"));
        let pre: Table = std::fs::read_to_string(&p.stages[0].config).unwrap().parse().unwrap();
        assert!(pre["model"].get("init_from").is_none());
        // The stage files are job files.
        crate::JobConfig::load(&p.stages[0].config, Default::default(), &[]).unwrap().validate(1).unwrap();

        std::fs::write(&file, "[pipeline]\nstages = [\"a\"]\n[stage.b.train]\nsteps = 1\n").unwrap();
        let e = Pipeline::load(&file, Some(&dir.path().join("o2"))).unwrap_err().to_string();
        assert!(e.contains("[stage.b] is not in"), "{e}");
    }
}
