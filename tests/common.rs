//! Helpers: run the binary, write small job configs, read run directories.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_moxin-train");

/// Runs the binary with `args` in `cwd`; returns the output.
pub fn run(cwd: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .env("MOXIN_LOG", "warn")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("spawn moxin-train")
}

/// Runs and asserts success, returning stdout.
pub fn ok(cwd: &Path, args: &[&str]) -> String {
    let out = run(cwd, args);
    assert!(
        out.status.success(),
        "moxin-train {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs, asserts a clean failure (exit 1, no panic) and returns stderr.
pub fn fails(cwd: &Path, args: &[&str]) -> String {
    let out = run(cwd, args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "moxin-train {args:?} should fail with exit 1; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic instead of an error: {stderr}");
    stderr
}

/// A small, fast tiny-preset job on the built-in corpus.
pub fn tiny_job(dir: &Path, steps: u64, extra: &str) -> PathBuf {
    let text = format!(
        r#"
[model]
preset = "tiny"
[train]
steps = {steps}
seq_len = 32
global_batch_size = 8
micro_batch_size = 4
[optimizer]
lr = 3e-3
[schedule]
warmup_steps = 5
[checkpoint]
every_steps = 1000
keep_last = 2
[runtime]
device = "cpu"
threads = 1
{extra}
"#
    );
    let path = dir.join("job.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `metrics.jsonl` of a run as JSON values.
pub fn metrics(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Path string.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
