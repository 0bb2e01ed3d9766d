//! `status`: a job at a glance — phase, generation, step, loss, throughput, ETA, and every
//! worker (rank, host, device, step time, last heartbeat, straggler). Live from the
//! coordinator (a URL, or a running job's run directory); for a job that is not running,
//! from what its run directory recorded (`coordinator/state.json`, `metrics.jsonl`,
//! `config.toml`).

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use moxin_proto::v1::{JobStatus, StatusRequest, StepMetrics, WorkerStatus};
use serde_json::{json, Value};

use super::cluster::{coordinator_of, run_dir_of};

/// Where a status came from.
enum Source {
    Coordinator(String),
    /// The run directory's files; `why` says why not the coordinator.
    Files {
        why: String,
    },
}

/// Shows the job at `target`: once as JSON (`json`), once as a table (`once`, or when
/// stdout is not a terminal), or as a table redrawn in place every `interval_s` until the
/// job ends (Ctrl-C leaves).
pub fn status(
    target: &str,
    security: &crate::ClientSecurityArgs,
    json: bool,
    once: bool,
    interval_s: f64,
) -> Result<()> {
    if !(interval_s.is_finite() && (0.1..=3600.0).contains(&interval_s)) {
        anyhow::bail!("--interval {interval_s}: give seconds between 0.1 and 3600");
    }
    let interval = Duration::from_secs_f64(interval_s);
    let security = security.load(run_dir_of(target))?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let live = !json && !once && std::io::stdout().is_terminal();
    loop {
        let (status, source) = runtime.block_on(fetch(target, &security))?;
        if json {
            return emit(&format!("{}\n", serde_json::to_string_pretty(&to_json(&status, &source))?));
        }
        let table = render(&status, &source);
        if !live {
            return emit(&table);
        }
        // Home, clear, redraw: the table stays in place instead of scrolling.
        emit(&format!("\x1b[H\x1b[2J{table}"))?;
        if matches!(status.phase.as_str(), "finished" | "failed" | "stopped") {
            return Ok(());
        }
        std::thread::sleep(interval);
    }
}

/// Writes to stdout; a reader that went away (`status --json | head`) ends the output
/// quietly instead of failing.
fn emit(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

async fn fetch(target: &str, security: &moxin_proto::security::ClientSecurity) -> Result<(JobStatus, Source)> {
    let Some(run_dir) = run_dir_of(target) else {
        let status = ask(target, security).await?;
        return Ok((status, Source::Coordinator(target.to_string())));
    };
    // A run directory: its coordinator if the job runs, else its files.
    let why = match coordinator_of(target) {
        Ok(url) => match tokio::time::timeout(Duration::from_secs(5), ask(&url, security)).await {
            Ok(Ok(status)) => return Ok((status, Source::Coordinator(url))),
            Ok(Err(e)) => format!("the coordinator at {url} did not answer ({e:#})"),
            Err(_) => format!("the coordinator at {url} did not answer within 5 s"),
        },
        Err(e) => format!("{e:#}"),
    };
    Ok((from_files(run_dir)?, Source::Files { why }))
}

async fn ask(url: &str, security: &moxin_proto::security::ClientSecurity) -> Result<JobStatus> {
    let mut client = security.connect(url).await?;
    let reply = client
        .get_status(StatusRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("the coordinator refused: {}", s.message()))?;
    Ok(reply.into_inner())
}

/// What the run directory recorded last.
fn from_files(run_dir: &Path) -> Result<JobStatus> {
    let state_file = run_dir.join("coordinator/state.json");
    if !state_file.exists() && run_dir.join("config.toml").exists() {
        return Ok(single_process(run_dir));
    }
    let text = std::fs::read_to_string(&state_file).with_context(|| {
        format!(
            "{}: no coordinator state (coordinator/state.json) and no config.toml; is this a run directory?",
            run_dir.display()
        )
    })?;
    let state: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", state_file.display()))?;
    let u64_at = |v: &Value, key: &str| v.get(key).and_then(Value::as_u64).unwrap_or(0);
    let str_at = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).unwrap_or("").to_string();
    let stragglers: Vec<&str> =
        state.get("stragglers").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
    let workers = state
        .get("members")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|m| WorkerStatus {
            worker_id: str_at(m, "worker_id"),
            host: str_at(m, "host"),
            pid: u64_at(m, "pid") as u32,
            member: m.get("rank").is_some_and(Value::is_u64),
            rank: u64_at(m, "rank") as u32,
            device: String::new(),
            compute_s: f64::NAN,
            heartbeat_age_s: f64::NAN,
            straggler: stragglers.contains(&str_at(m, "worker_id").as_str()),
        })
        .collect();
    let phase = state.pointer("/phase/phase").and_then(Value::as_str).unwrap_or("unknown").to_string();
    let reason = state.pointer("/phase/detail").and_then(Value::as_str).unwrap_or("").to_string();
    let (total_steps, min_workers, max_workers) = recorded_config(run_dir);
    Ok(JobStatus {
        job: str_at(&state, "job"),
        phase,
        reason,
        generation: u64_at(&state, "generation"),
        step: u64_at(&state, "step"),
        total_steps,
        last: last_metrics(run_dir),
        workers,
        min_workers,
        max_workers,
        failures: u64_at(&state, "failures"),
        recoveries: u64_at(&state, "recoveries"),
    })
}

/// A `train` run (one process, no coordinator state): its progress from `metrics.jsonl`
/// and `config.toml`; running while a live process on this machine holds its lock.
fn single_process(run_dir: &Path) -> JobStatus {
    let last = last_metrics(run_dir);
    let step = last.as_ref().map_or(0, |m| m.step);
    let (total_steps, ..) = recorded_config(run_dir);
    let phase = if lock_holder_alive(run_dir) {
        "training"
    } else if total_steps > 0 && step >= total_steps {
        "finished"
    } else {
        "stopped"
    };
    let name = run_dir.file_name().map_or_else(|| run_dir.display().to_string(), |n| n.to_string_lossy().into_owned());
    JobStatus {
        job: name,
        phase: phase.into(),
        reason: "one process (`train`)".into(),
        step,
        total_steps,
        last,
        ..Default::default()
    }
}

/// Whether the run directory's lock names a process of this machine that is still alive
/// (the lock file keeps its last holder's line after it exits).
fn lock_holder_alive(run_dir: &Path) -> bool {
    let text = std::fs::read_to_string(run_dir.join(moxin_coordinator::rundir::LOCK_FILE)).unwrap_or_default();
    moxin_data::process::tag_alive(&text) == Some(true)
}

/// `train.steps`, `cluster.min_workers` and `cluster.max_workers` (= min when absent) of
/// the run's resolved `config.toml` (zeros where unreadable).
fn recorded_config(run_dir: &Path) -> (u64, u32, u32) {
    let text = std::fs::read_to_string(run_dir.join("config.toml")).unwrap_or_default();
    let doc: toml::Table = toml::from_str(&text).unwrap_or_default();
    let int = |section: &str, key: &str| {
        doc.get(section).and_then(|t| t.get(key)).and_then(toml::Value::as_integer).map(|v| v.max(0) as u64)
    };
    let min = int("cluster", "min_workers").unwrap_or(0).min(u64::from(u32::MAX)) as u32;
    let max = int("cluster", "max_workers").map_or(min, |m| m.min(u64::from(u32::MAX)) as u32);
    (int("train", "steps").unwrap_or(0), min, max)
}

/// The last line of `metrics.jsonl`.
fn last_metrics(run_dir: &Path) -> Option<StepMetrics> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).ok()?;
    let line: Value = serde_json::from_str(text.lines().rev().find(|l| !l.trim().is_empty())?).ok()?;
    let f = |key: &str| line.get(key).and_then(Value::as_f64).unwrap_or(0.0);
    Some(StepMetrics {
        step: line.get("step").and_then(Value::as_u64)?,
        loss: f("loss"),
        tokens_per_s: f("tokens_per_s"),
        step_time_s: f("step_time_s"),
        elapsed_s: f("elapsed_s"),
        world_size: line.get("world_size").and_then(Value::as_u64).unwrap_or(0) as u32,
        ..Default::default()
    })
}

/// Seconds to `total_steps` at the last step's pace.
fn eta_s(s: &JobStatus) -> Option<f64> {
    let last = s.last.as_ref().filter(|m| m.step_time_s > 0.0)?;
    (s.phase == "training" && s.total_steps > s.step).then(|| (s.total_steps - s.step) as f64 * last.step_time_s)
}

fn duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn render(s: &JobStatus, source: &Source) -> String {
    let mut out = String::new();
    let reason = if s.reason.is_empty() { String::new() } else { format!(" ({})", s.reason) };
    let bounds =
        if s.max_workers > 0 { format!(" (min {}, max {})", s.min_workers, s.max_workers) } else { String::new() };
    let members = s.workers.iter().filter(|w| w.member).count();
    // A `train` run has no coordinator, generations or workers to show.
    let single = s.workers.is_empty() && s.max_workers == 0;
    let group =
        if single { String::new() } else { format!("  generation {}  workers {members}{bounds}", s.generation) };
    out.push_str(&format!("job {}  phase {}{reason}{group}\n", s.job, s.phase));
    let progress = if s.total_steps > 0 {
        format!("step {}/{} ({:.0}%)", s.step, s.total_steps, 100.0 * s.step as f64 / s.total_steps as f64)
    } else {
        format!("step {}", s.step)
    };
    let metrics = s.last.as_ref().map_or(String::new(), |m| {
        format!("  loss {:.4}  {:.0} tok/s  {:.3} s/step", m.loss, m.tokens_per_s, m.step_time_s)
    });
    let eta = eta_s(s).map_or(String::new(), |e| format!("  ETA {}", duration(e)));
    let faults = if single { String::new() } else { format!("  lost {}  recoveries {}", s.failures, s.recoveries) };
    out.push_str(&format!("{progress}{metrics}{eta}{faults}\n"));
    match source {
        Source::Coordinator(url) => out.push_str(&format!("from the coordinator at {url}\n\n")),
        Source::Files { .. } if single => {
            out.push_str("from the run directory\n");
            return out;
        }
        Source::Files { why } => out.push_str(&format!("from the run directory ({why})\n\n")),
    }
    out.push_str(&format!(
        "{:<5} {:<8} {:<24} {:<28} {:>10} {:>10}  {}\n",
        "RANK", "WORKER", "HOST", "DEVICE", "STEP TIME", "HEARTBEAT", "STRAGGLER"
    ));
    for w in &s.workers {
        let rank = if w.member { w.rank.to_string() } else { "-".into() };
        let known = |v: f64, unit: &str| if v.is_finite() { format!("{v:.3}{unit}") } else { "-".into() };
        let device = if w.device.is_empty() { "-" } else { &w.device };
        out.push_str(&format!(
            "{:<5} {:<8} {:<24} {:<28} {:>10} {:>10}  {}\n",
            rank,
            w.worker_id,
            format!("{}:{}", w.host, w.pid),
            device,
            known(w.compute_s, " s"),
            if w.heartbeat_age_s.is_finite() { format!("{:.1} s ago", w.heartbeat_age_s) } else { "-".into() },
            if w.straggler { "yes" } else { "" }
        ));
    }
    out
}

fn to_json(s: &JobStatus, source: &Source) -> Value {
    let finite = |v: f64| if v.is_finite() { json!(v) } else { Value::Null };
    let (from, why) = match source {
        Source::Coordinator(url) => (json!({"coordinator": url}), Value::Null),
        Source::Files { why } => (json!("run_dir"), json!(why)),
    };
    json!({
        "job": s.job,
        "phase": s.phase,
        "reason": s.reason,
        "generation": s.generation,
        "step": s.step,
        "total_steps": s.total_steps,
        "loss": s.last.as_ref().map(|m| m.loss),
        "tokens_per_s": s.last.as_ref().map(|m| m.tokens_per_s),
        "step_time_s": s.last.as_ref().map(|m| m.step_time_s),
        "eta_s": eta_s(s),
        "min_workers": s.min_workers,
        "max_workers": s.max_workers,
        "failures": s.failures,
        "recoveries": s.recoveries,
        "source": from,
        "not_live_because": why,
        "workers": s.workers.iter().map(|w| json!({
            "worker_id": w.worker_id,
            "host": w.host,
            "pid": w.pid,
            "rank": if w.member { json!(w.rank) } else { Value::Null },
            "device": w.device,
            "compute_s": finite(w.compute_s),
            "heartbeat_age_s": finite(w.heartbeat_age_s),
            "straggler": w.straggler,
        })).collect::<Vec<_>>(),
    })
}
