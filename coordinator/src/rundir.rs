//! The run directory the coordinator owns: the resolved configuration and `metrics.jsonl`.
//! (Checkpoints under `checkpoints/` are written by the workers that hold the state.)

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use moxin_proto::v1::StepMetrics;

/// Name of the resolved configuration file in a run directory.
pub const CONFIG_FILE: &str = "config.toml";
/// Name of the per-step metrics file in a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Writes `config.toml` (the resolved configuration) atomically.
pub fn write_resolved_config(run_dir: &Path, toml: &str) -> std::io::Result<PathBuf> {
    let path = run_dir.join(CONFIG_FILE);
    let tmp = run_dir.join(format!(".{CONFIG_FILE}.tmp"));
    std::fs::write(&tmp, toml)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Appends one JSON object per optimizer step to `metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens the log for a run continuing after step `resumed_step` (0 for a fresh start):
    /// lines of later steps, left by a run that stopped before its next checkpoint, are
    /// dropped so that every step appears once.
    pub fn open(run_dir: &Path, resumed_step: u64) -> std::io::Result<Self> {
        let path = run_dir.join(METRICS_FILE);
        if path.exists() {
            let kept: Vec<String> = BufReader::new(File::open(&path)?)
                .lines()
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .filter(|line| {
                    serde_json::from_str::<serde_json::Value>(line)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                        .is_some_and(|step| step <= resumed_step)
                })
                .collect();
            let tmp = run_dir.join(format!(".{METRICS_FILE}.tmp"));
            let mut body = kept.join("\n");
            if !body.is_empty() {
                body.push('\n');
            }
            std::fs::write(&tmp, body)?;
            std::fs::rename(&tmp, &path)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(MetricsLog { path, file })
    }

    /// Where the log is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one step.
    pub fn append(&mut self, m: &StepMetrics) -> std::io::Result<()> {
        let line = serde_json::json!({
            "step": m.step,
            "loss": m.loss,
            "lr": m.lr,
            "grad_norm": m.grad_norm,
            "tokens": m.tokens,
            "tokens_per_s": m.tokens_per_s,
            "elapsed_s": m.elapsed_s,
            "step_time_s": m.step_time_s,
            "world_size": m.world_size,
            "data_cursor": m.data_cursor,
            "compute_s": m.compute_s,
            "optimizer_s": m.optimizer_s,
            "comm_s": m.comm_s,
        });
        writeln!(self.file, "{line}")?;
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_drops_steps_after_the_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(tmp.path(), 0).unwrap();
        for step in 1..=5 {
            log.append(&StepMetrics { step, loss: 1.0, ..Default::default() }).unwrap();
        }
        drop(log);
        let mut log = MetricsLog::open(tmp.path(), 3).unwrap();
        log.append(&StepMetrics { step: 4, loss: 2.0, ..Default::default() }).unwrap();
        let text = std::fs::read_to_string(tmp.path().join(METRICS_FILE)).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [1, 2, 3, 4]);
    }
}
