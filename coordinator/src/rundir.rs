//! The run directory the coordinator owns: its lock, the resolved configuration and
//! `metrics.jsonl`. (Checkpoints under `checkpoints/` are written by the workers that hold
//! the state.)

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use moxin_proto::v1::StepMetrics;

/// Name of the resolved configuration file in a run directory.
pub const CONFIG_FILE: &str = "config.toml";
/// Name of the per-step metrics file in a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Name of the lock file in a run directory.
pub const LOCK_FILE: &str = ".lock";

/// A second process wanted a run directory that one already uses.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Held by another process.
    #[error(
        "run directory {run_dir} is in use by {holder}; wait for that run to end (or stop it), or pass another --out"
    )]
    Held {
        /// The run directory.
        run_dir: PathBuf,
        /// Who holds it, as the holder wrote it (pid, host, command, since when).
        holder: String,
    },
    /// The lock file could not be opened or locked.
    #[error("{path}: cannot lock the run directory: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Exclusive use of a run directory by this process (`train`, `launch` or `coordinator`):
/// an advisory lock on `<run dir>/.lock`, released when dropped or when the process dies,
/// however it dies. Nothing in a run directory is touched before it is held, so a second
/// run on the same `--out` never re-prepares data or deletes checkpoint staging under the
/// first one.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    path: PathBuf,
}

impl RunLock {
    /// Takes the lock on `run_dir` (which must exist), or says who holds it.
    pub fn acquire(run_dir: &Path) -> Result<RunLock, LockError> {
        let path = run_dir.join(LOCK_FILE);
        let io = |source| LockError::Io { path: path.clone(), source };
        let mut file =
            OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() { "another process".to_string() } else { holder.to_string() };
                return Err(LockError::Held { run_dir: run_dir.to_path_buf(), holder });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let since = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let command: Vec<String> = std::env::args().collect();
        let holder = format!("{} (`{}`, locked at unix time {since})\n", moxin_data::process::tag(), command.join(" "));
        file.set_len(0).and_then(|_| file.rewind()).and_then(|_| file.write_all(holder.as_bytes())).map_err(io)?;
        Ok(RunLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Writes `config.toml` (the resolved configuration) atomically.
pub fn write_resolved_config(run_dir: &Path, toml: &str) -> std::io::Result<PathBuf> {
    let path = run_dir.join(CONFIG_FILE);
    let tmp = run_dir.join(format!(".{CONFIG_FILE}.tmp"));
    std::fs::write(&tmp, toml)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Appends one JSON object per optimizer step to `metrics.jsonl`. Every step appears once:
/// a step reported again (a run resumed from a checkpoint older than its last logged step)
/// first drops the lines from that step on.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
    last_step: u64,
}

fn line_step(line: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(line).ok()?.get("step")?.as_u64()
}

impl MetricsLog {
    /// Opens (or creates) the log of a run directory. A last line without its newline (the
    /// process was killed while writing it) is dropped, so the next line does not run on
    /// from it.
    pub fn open(run_dir: &Path) -> std::io::Result<Self> {
        let path = run_dir.join(METRICS_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if whole < bytes.len() {
            tracing::warn!(
                "{}: dropping an unfinished last line ({} bytes; the writer was interrupted)",
                path.display(),
                bytes.len() - whole
            );
            OpenOptions::new().write(true).open(&path)?.set_len(whole as u64)?;
        }
        let last_step = String::from_utf8_lossy(&bytes[..whole]).lines().filter_map(line_step).max().unwrap_or(0);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(MetricsLog { path, file, last_step })
    }

    /// The last step logged.
    pub fn last_step(&self) -> u64 {
        self.last_step
    }

    /// Where the log is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn truncate_from(&mut self, step: u64) -> std::io::Result<()> {
        let kept: Vec<String> = BufReader::new(File::open(&self.path)?)
            .lines()
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|line| line_step(line).is_some_and(|s| s < step))
            .collect();
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(format!(".{METRICS_FILE}.tmp"));
        let mut body = kept.join("\n");
        if !body.is_empty() {
            body.push('\n');
        }
        std::fs::write(&tmp, body)?;
        std::fs::rename(&tmp, &self.path)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        Ok(())
    }

    /// Appends one step.
    pub fn append(&mut self, m: &StepMetrics) -> std::io::Result<()> {
        if m.step <= self.last_step {
            self.truncate_from(m.step)?;
        }
        self.last_step = m.step;
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
            "generation": m.generation,
            "data_cursor": m.data_cursor,
            "compute_s": m.compute_s,
            "optimizer_s": m.optimizer_s,
            "comm_s": m.comm_s,
            "comm_exposed_s": m.comm_exposed_s,
            "mfu": m.mfu,
            "peak_memory_bytes": m.peak_memory_bytes,
            "checkpoint_blocking_s": m.checkpoint_blocking_s,
            "checkpoint_write_s": m.checkpoint_write_s,
        });
        let mut line = line;
        if !m.phase_s.is_empty() {
            // Sorted, so the file reads the same from run to run.
            let phases: std::collections::BTreeMap<&str, f64> =
                m.phase_s.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            line["phase_s"] = serde_json::json!(phases);
        }
        if m.rollout {
            let rl = serde_json::json!({
                "reward_mean": m.reward_mean,
                "reward_std": m.reward_std,
                "zero_std_fraction": m.zero_std_fraction,
                "completion_len_mean": m.completion_len_mean,
                "completion_len_max": m.completion_len_max,
                "truncation_ratio": m.truncation_ratio,
                "kl": m.kl,
                "clip_fraction": m.clip_fraction,
                "entropy": m.entropy,
                "rollout_s": m.rollout_s,
                "update_s": m.update_s,
            });
            if let (Some(line), Some(rl)) = (line.as_object_mut(), rl.as_object()) {
                line.extend(rl.clone());
            }
        }
        writeln!(self.file, "{line}")?;
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder_and_the_first_release_frees_it() {
        let tmp = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(tmp.path()).unwrap();
        let err = RunLock::acquire(tmp.path()).unwrap_err().to_string();
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        assert!(err.contains("another --out"), "{err}");
        drop(first);
        RunLock::acquire(tmp.path()).unwrap();
    }

    #[test]
    fn resume_drops_steps_after_the_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(tmp.path()).unwrap();
        for step in 1..=5 {
            log.append(&StepMetrics { step, loss: 1.0, ..Default::default() }).unwrap();
        }
        drop(log);
        let mut log = MetricsLog::open(tmp.path()).unwrap();
        log.append(&StepMetrics { step: 4, loss: 2.0, ..Default::default() }).unwrap();
        let text = std::fs::read_to_string(tmp.path().join(METRICS_FILE)).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [1, 2, 3, 4]);
    }

    #[test]
    fn an_unfinished_last_line_is_dropped_on_open() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(tmp.path()).unwrap();
        log.append(&StepMetrics { step: 1, loss: 1.0, ..Default::default() }).unwrap();
        drop(log);
        let path = tmp.path().join(METRICS_FILE);
        let mut torn = std::fs::read_to_string(&path).unwrap();
        torn.push_str("{\"step\": 2, \"lo");
        std::fs::write(&path, torn).unwrap();
        let mut log = MetricsLog::open(tmp.path()).unwrap();
        assert_eq!(log.last_step(), 1);
        log.append(&StepMetrics { step: 2, loss: 2.0, ..Default::default() }).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [1, 2]);
    }
}
