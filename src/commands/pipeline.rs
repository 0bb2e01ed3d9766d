//! A pipeline file given to `train` or `launch`: its stages run in order, each as that
//! command runs a job (logic in `moxin_coordinator::pipeline`); `summary.json` records
//! every stage's final step, wall time and held-out accuracy.

use std::path::Path;

use anyhow::{Context, Result};
use moxin_coordinator::pipeline::{last_step, Pipeline, Stage, StageSummary};

/// How each stage runs: in this process (`train`) or as a local group (`launch`).
pub enum Mode {
    /// `train`.
    Train,
    /// `launch`, with its options.
    Launch(super::cluster::LaunchOptions),
}

/// Marks a stage that ran to its end, so a restarted pipeline skips it.
const FINISHED: &str = ".pipeline-stage-finished";
const SUMMARY: &str = "summary.json";

/// Runs the pipeline `file` (stages already finished are skipped); returns the exit code
/// of the first stage that did not finish, or 0.
pub fn run(file: &Path, out: Option<&Path>, overrides: &[String], mode: Mode) -> Result<i32> {
    let pipeline = Pipeline::load(file, out).with_context(|| format!("invalid pipeline {}", file.display()))?;
    let summary_path = pipeline.out.join(SUMMARY);
    let previous: Vec<StageSummary> = std::fs::read_to_string(&summary_path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| serde_json::from_value(v["stages"].clone()).ok())
        .unwrap_or_default();
    let mut summary: Vec<StageSummary> = Vec::new();
    // Every stage's overrides before any stage runs: a bad `stage.` one stops nothing midway.
    let per_stage: Vec<Vec<String>> = pipeline
        .stages
        .iter()
        .map(|stage| pipeline.stage_overrides(&stage.name, overrides))
        .collect::<Result<_, _>>()
        .map_err(|e| super::invalid_job(file, e))?;
    let finished = |stage: &Stage| {
        previous.iter().find(|s| s.stage == stage.name).filter(|_| stage.run_dir.join(FINISHED).exists())
    };
    // Every stage that will run, and the held-out prompts, before the first trains.
    let workers = match &mode {
        Mode::Train => 1,
        Mode::Launch(options) => options.workers,
    };
    for (stage, stage_overrides) in pipeline.stages.iter().zip(&per_stage) {
        if finished(stage).is_none() {
            pipeline.check_stage(stage, stage_overrides, workers).map_err(|e| {
                anyhow::Error::new(e).context(format!(
                    "invalid stage {name} of {file} ([stage.{name}] over the shared sections, written as {config})",
                    name = stage.name,
                    file = file.display(),
                    config = stage.config.display()
                ))
            })?;
        }
    }
    let to_run = pipeline.stages.iter().any(|s| finished(s).is_none());
    if let Some(prompts) = pipeline.section.eval_prompts.as_ref().filter(|_| to_run) {
        moxin_data::sft::read_prompts(Path::new(prompts)).with_context(|| {
            format!(
                "invalid pipeline {}: [pipeline] eval_prompts = {prompts:?}: give a JSONL file of \
                 {{\"prompt\", \"answer\"}} lines, or leave eval_prompts out",
                file.display()
            )
        })?;
    }
    for (stage, stage_overrides) in pipeline.stages.iter().zip(&per_stage) {
        let marker = stage.run_dir.join(FINISHED);
        if let Some(done) = finished(stage) {
            tracing::info!(stage = %stage.name, step = done.step, "stage finished before; skipping it");
            let prefix = format!("stage.{}.", stage.name);
            if overrides.iter().any(|o| o.trim_start().starts_with(&prefix)) {
                tracing::warn!(
                    stage = %stage.name,
                    "--set {prefix}… does not apply: the stage finished before (use a new --out to run it again)"
                );
            }
            summary.push(done.clone());
            continue;
        }
        tracing::info!(stage = %stage.name, run_dir = %stage.run_dir.display(), "starting stage");
        let code = match mode {
            Mode::Train => super::train(
                &stage.config,
                super::TrainOptions { out: Some(&stage.run_dir), overrides: stage_overrides, ..Default::default() },
            )?
            .exit_code(),
            Mode::Launch(options) => {
                super::cluster::launch(&stage.config, options, Some(&stage.run_dir), stage_overrides)?
            }
        };
        if code != 0 {
            tracing::warn!(stage = %stage.name, code, "the stage did not finish; rerun the same command to continue");
            return Ok(code);
        }
        std::fs::write(&marker, "").with_context(|| format!("writing {}", marker.display()))?;
        let (step, elapsed_s) = last_step(&stage.run_dir).unwrap_or((0, 0.0));
        let (eval_accuracy, eval_prompts) = match &pipeline.section.eval_prompts {
            Some(prompts) => {
                let greedy = moxin_worker::eval::AccuracyOptions::greedy(pipeline.section.eval_max_new_tokens as usize);
                let report = moxin_worker::eval::accuracy(&stage.run_dir, Path::new(prompts), &greedy)
                    .with_context(|| format!("scoring stage {} on {prompts}", stage.name))?;
                let (accuracy, n) = (report.accuracy, report.prompts);
                tracing::info!(stage = %stage.name, accuracy, prompts = n, "held-out accuracy");
                (Some(accuracy), n)
            }
            None => (None, 0),
        };
        summary.push(StageSummary { stage: stage.name.clone(), step, elapsed_s, eval_accuracy, eval_prompts });
        let text = serde_json::to_string_pretty(&serde_json::json!({ "stages": summary }))?;
        std::fs::write(&summary_path, text).with_context(|| format!("writing {}", summary_path.display()))?;
    }
    println!("{}", std::fs::read_to_string(&summary_path).unwrap_or_default());
    Ok(0)
}
