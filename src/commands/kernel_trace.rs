//! `train --trace-kernels N`: records what the GPU runs during a run's last N steps (the
//! earlier ones warm up the allocator, cuBLAS's heuristics and the kernels' compilation)
//! and writes the per-step summary to `<run dir>/kernel_trace.json`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use moxin_worker::cuda::trace::{summarise, KernelTrace};
use moxin_worker::device::Placement;

/// The steps to trace and the recording, if one is running.
pub struct Window {
    plan: Option<Plan>,
    recording: Option<KernelTrace>,
}

struct Plan {
    steps: u64,
    /// Recording starts once this step is done.
    start_after: u64,
    last: u64,
    cuda: usize,
    path: PathBuf,
}

impl Window {
    /// The last `steps` of a run on `placement` that is at step `current` and ends at step
    /// `last`; nothing when `steps` is `None`.
    pub fn new(steps: Option<u64>, placement: &Placement, current: u64, last: u64, run_dir: &Path) -> Result<Self> {
        let Some(steps) = steps else { return Ok(Window { plan: None, recording: None }) };
        let Some(cuda) = placement.cuda_ordinal() else {
            bail!(
                "--trace-kernels records GPU kernels, and this run trains on {:?}; run it on a GPU \
                 (runtime.device = \"cuda\") or leave the flag out",
                placement.device
            );
        };
        if steps == 0 || last.saturating_sub(current) <= steps {
            bail!(
                "--trace-kernels {steps}: this run trains steps {} to {last}, and tracing needs at least one \
                 step before the traced ones to warm up; trace fewer steps or raise train.steps (e.g. to {})",
                current + 1,
                current + steps.max(1) + 3
            );
        }
        KernelTrace::load().context("--trace-kernels")?;
        let plan = Plan { steps, start_after: last - steps, last, cuda, path: run_dir.join("kernel_trace.json") };
        Ok(Window { plan: Some(plan), recording: None })
    }

    /// Called after each step: starts or ends the recording at the window's edges.
    pub fn after_step(&mut self, step: u64) -> Result<()> {
        let Some(plan) = &self.plan else { return Ok(()) };
        if step == plan.start_after {
            self.recording = Some(KernelTrace::start(plan.cuda)?);
        } else if step == plan.last {
            if let Some(recording) = self.recording.take() {
                let (records, malformed) = recording.stop()?;
                let mut summary = summarise(&records, plan.steps, malformed);
                summary["device"] = moxin_worker::cuda::gpu_info(plan.cuda).map(|g| g.name).unwrap_or_default().into();
                summary["first_step"] = (plan.start_after + 1).into();
                std::fs::write(&plan.path, serde_json::to_string_pretty(&summary)?)
                    .with_context(|| format!("writing {}", plan.path.display()))?;
                tracing::info!(
                    path = %plan.path.display(),
                    busy_ms = summary["busy_ms_per_step"].as_f64().unwrap_or(0.0),
                    idle_ms = summary["idle_ms_per_step"].as_f64().unwrap_or(0.0),
                    "kernel trace of the last {} steps written",
                    plan.steps
                );
            }
        }
        Ok(())
    }
}
