//! `moxin-train status`: live from the coordinator of a running `launch` (through the
//! run directory or the URL, which needs the job's token), and from the run directory's
//! files once the job has stopped.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{fails, ok, s, tiny_job, BIN};

fn status_json(cwd: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["status"];
    all.extend_from_slice(args);
    all.push("--json");
    serde_json::from_str(&ok(cwd, &all)).unwrap()
}

#[test]
fn status_shows_a_running_job_and_then_what_its_run_directory_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), 100_000, "");
    let run = tmp.path().join("run");
    let mut launch = Command::new(BIN)
        .args(["launch", s(&job), "--workers", "2", "--out", s(&run)])
        .env("MOXIN_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Until rank 0 has reported a few steps.
    let deadline = Instant::now() + Duration::from_secs(120);
    let live = loop {
        assert!(Instant::now() < deadline, "the job did not reach step 3");
        assert!(launch.try_wait().unwrap().is_none(), "launch ended early");
        let out = Command::new(BIN).args(["status", s(&run), "--json"]).output().unwrap();
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            if v["phase"] == "training" && v["step"].as_u64().unwrap_or(0) >= 3 && v["loss"].is_number() {
                break v;
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(live["source"]["coordinator"].as_str().unwrap().starts_with("http://127.0.0.1:"), "{live}");
    assert_eq!(live["total_steps"], 100_000);
    assert_eq!((live["min_workers"].as_u64(), live["max_workers"].as_u64()), (Some(2), Some(2)));
    assert!(live["eta_s"].as_f64().unwrap() > 0.0, "{live}");
    let workers = live["workers"].as_array().unwrap();
    let ranks: Vec<u64> = workers.iter().map(|w| w["rank"].as_u64().unwrap()).collect();
    assert_eq!(ranks, vec![0, 1], "{live}");
    for w in workers {
        assert_eq!(w["device"], "cpu");
        assert!(w["heartbeat_age_s"].as_f64().is_some_and(|a| a >= 0.0), "{w}");
        // (A busy test machine can make either worker a straggler for a while.)
        assert!(w["straggler"].is_boolean(), "{w}");
    }

    // The table, once (stdout is not a terminal here).
    let table = ok(tmp.path(), &["status", s(&run)]);
    assert!(table.contains("phase training") && table.contains("RANK") && table.contains("ETA"), "{table}");
    assert!(table.contains("from the coordinator at http://127.0.0.1:"), "{table}");

    // The URL needs the job's token, which `launch` keeps in the run directory.
    let url = live["source"]["coordinator"].as_str().unwrap().to_string();
    let refused = fails(tmp.path(), &["status", &url, "--json"]);
    assert!(refused.contains("no join token"), "{refused}");
    let token = run.join("coordinator/token");
    let by_url = status_json(tmp.path(), &[&url, "--token-file", s(&token)]);
    assert_eq!(by_url["job"], live["job"]);

    // Stopped: the run directory's record, and the reason the coordinator is not asked.
    Command::new("kill").args(["-INT", &launch.id().to_string()]).status().unwrap();
    assert_eq!(launch.wait().unwrap().code(), Some(130));
    let after = status_json(tmp.path(), &[s(&run)]);
    assert_eq!(after["phase"], "stopped", "{after}");
    assert_eq!(after["source"], "run_dir");
    assert!(after["not_live_because"].as_str().unwrap().contains("not running"), "{after}");
    assert!(after["step"].as_u64().unwrap() >= 3 && after["loss"].is_number(), "{after}");
    assert_eq!(after["workers"].as_array().unwrap().len(), 2, "{after}");
    assert_eq!((after["min_workers"].as_u64(), after["max_workers"].as_u64()), (Some(2), Some(2)), "{after}");
    assert_eq!(after["total_steps"], 100_000);

    let missing = fails(tmp.path(), &["status", s(&tmp.path().join("absent"))]);
    assert!(missing.contains("no coordinator state"), "{missing}");
    // A `train` run (one process): its progress from metrics.jsonl and config.toml.
    let single = tmp.path().join("single");
    ok(tmp.path(), &["train", s(&job), "--out", s(&single), "--set", "train.steps=3"]);
    let solo = status_json(tmp.path(), &[s(&single)]);
    assert_eq!((solo["phase"].as_str(), solo["step"].as_u64()), (Some("finished"), Some(3)), "{solo}");
    assert_eq!(solo["total_steps"], 3);
    let bad = fails(tmp.path(), &["status", s(&run), "--interval", "NaN"]);
    assert!(bad.contains("--interval"), "{bad}");
}
