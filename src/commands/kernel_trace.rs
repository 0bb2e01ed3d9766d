//! `train --trace-kernels N`: records what the GPU runs during a run's last N steps (the
//! earlier ones warm up the allocator, cuBLAS's heuristics and the kernels' compilation)
//! and writes the per-step summary to `<run dir>/kernel_trace.json`.
//!
//! Whether tracing can work is found out before training starts (CUPTI is loaded and a
//! recording started and stopped once); a trace that fails later is a warning, never the
//! end of the training run.

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

/// Where the run's last step comes from, for the error message.
#[derive(Debug, Clone, Copy)]
pub enum LastStep {
    /// `train.steps`.
    Steps(u64),
    /// `--stop-after`.
    StopAfter(u64),
}

impl LastStep {
    fn step(self) -> u64 {
        match self {
            LastStep::Steps(s) | LastStep::StopAfter(s) => s,
        }
    }
}

impl Window {
    /// The last `steps` of a run on `placement` that is at step `current` and ends at
    /// `last`; nothing when `steps` is `None`.
    pub fn new(
        steps: Option<u64>,
        placement: &Placement,
        current: u64,
        last: LastStep,
        run_dir: &Path,
    ) -> Result<Self> {
        let Some(steps) = steps else { return Ok(Window { plan: None, recording: None }) };
        if steps == 0 {
            bail!("--trace-kernels 0 traces nothing; give the number of final steps to trace, e.g. 3");
        }
        let end = last.step();
        if end.saturating_sub(current) <= steps {
            let raise = match last {
                LastStep::Steps(_) => format!("raise train.steps to at least {}", current + steps + 1),
                LastStep::StopAfter(_) => format!("raise --stop-after to at least {}", current + steps + 1),
            };
            bail!(
                "--trace-kernels {steps}: this run trains steps {} to {end}, and the traced steps need at least \
                 one step before them to warm up; trace fewer steps or {raise}",
                current + 1
            );
        }
        let Some(cuda) = placement.cuda_ordinal() else {
            bail!(
                "--trace-kernels records GPU kernels, and this run trains on {:?}; run it on a GPU \
                 (runtime.device = \"cuda\") or leave the flag out",
                placement.device
            );
        };
        KernelTrace::load().context("--trace-kernels")?;
        // Fail now, not after the warm-up steps, if recording cannot start here.
        KernelTrace::start(cuda).and_then(KernelTrace::stop).context("--trace-kernels: trying CUPTI")?;
        let plan = Plan { steps, start_after: end - steps, last: end, cuda, path: run_dir.join("kernel_trace.json") };
        Ok(Window { plan: Some(plan), recording: None })
    }

    /// Called after each step: starts or ends the recording at the window's edges. A
    /// failure is logged and ends tracing; training goes on.
    pub fn after_step(&mut self, step: u64) {
        if let Err(e) = self.edge(step) {
            tracing::warn!("kernel trace abandoned: {e:#}");
            self.plan = None;
            self.recording = None;
        }
    }

    fn edge(&mut self, step: u64) -> Result<()> {
        let Some(plan) = &self.plan else { return Ok(()) };
        if step == plan.start_after {
            self.recording = Some(KernelTrace::start(plan.cuda)?);
        } else if step == plan.last {
            if let Some(recording) = self.recording.take() {
                let recorded = recording.stop()?;
                let mut summary = summarise(&recorded.records, plan.steps);
                summary["device"] = moxin_worker::cuda::gpu_info(plan.cuda).map(|g| g.name).unwrap_or_default().into();
                summary["first_step"] = (plan.start_after + 1).into();
                summary["malformed_records"] = recorded.malformed.into();
                summary["lost_buffers"] = recorded.lost_buffers.into();
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

impl Drop for Window {
    fn drop(&mut self) {
        if let (Some(plan), Some(_)) = (&self.plan, &self.recording) {
            tracing::warn!(
                "the run ended before step {}, so the kernel trace was not written to {}",
                plan.last,
                plan.path.display()
            );
        }
    }
}
