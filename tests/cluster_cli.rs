//! `launch`, `coordinator` and `worker` as separate processes.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{metrics, ok, s, tiny_job, BIN};

fn params(ckpt: &Path) -> tch::Tensor {
    let tensors = tch::Tensor::read_safetensors(ckpt.join("model.safetensors")).unwrap();
    let mut sorted: Vec<_> = tensors.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    tch::Tensor::cat(&sorted.iter().map(|(_, t)| t.view([-1])).collect::<Vec<_>>(), 0)
}

/// `launch --workers 2` and `--workers 3` (ZeRO-1 over the TCP ring, one process per rank)
/// train to the same parameters as single-process `train`.
#[test]
fn launch_matches_single_process_train() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), 6, "");
    let single = tmp.path().join("single");
    ok(
        tmp.path(),
        &[
            "train",
            s(&job),
            "--out",
            s(&single),
            "--set",
            "train.global_batch_size=12",
            "--set",
            "train.micro_batch_size=2",
        ],
    );
    let reference = params(&single.join("checkpoints/step-00000006"));
    for workers in ["2", "3"] {
        let run = tmp.path().join(format!("launch-{workers}"));
        ok(
            tmp.path(),
            &[
                "launch",
                s(&job),
                "--workers",
                workers,
                "--out",
                s(&run),
                "--set",
                "train.global_batch_size=12",
                "--set",
                "train.micro_batch_size=2",
            ],
        );
        let got = params(&run.join("checkpoints/step-00000006"));
        let rel = (&got - &reference).norm().double_value(&[]) / reference.norm().double_value(&[]);
        assert!(rel < 1e-5, "--workers {workers}: relative L2 difference {rel}");
        let m = metrics(&run);
        assert_eq!(m.len(), 6);
        assert_eq!(m[5]["world_size"].as_u64().unwrap().to_string(), workers);
        let manifest: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run.join("checkpoints/step-00000006/manifest.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(manifest["optimizer"].as_array().unwrap().len().to_string(), workers);
    }
}

/// Resharding: a checkpoint written by 3 ranks resumes on 2, and one written by 2 resumes
/// on 3 (optimizer partitions are ranges of the global flat buffer, so any split loads
/// them). Each run continues the single-process curve: same samples per step, parameters
/// equal to single-process `train` within float summation order.
#[test]
fn resharded_resume_3_to_2_and_2_to_3_continues_the_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), 10, "");
    let geometry = ["--set", "train.global_batch_size=12", "--set", "train.micro_batch_size=2"];
    let single = tmp.path().join("single");
    let mut args = vec!["train", s(&job), "--out", s(&single)];
    args.extend(geometry);
    ok(tmp.path(), &args);
    let reference = params(&single.join("checkpoints/step-00000010"));
    for (before, after) in [("3", "2"), ("2", "3")] {
        let run = tmp.path().join(format!("reshard-{before}-{after}"));
        // The first run splits each partition into several files (files of at least
        // 1 MiB of the tiny model's 7.2 MB of state), the second writes one per rank: the
        // loader takes whatever files overlap its own partition.
        let split = ["--set", "checkpoint.optimizer_file_mib=1"];
        for (workers, steps, files) in [(before, "train.steps=5", &split[..]), (after, "train.steps=10", &[][..])] {
            let mut args = vec!["launch", s(&job), "--workers", workers, "--out", s(&run), "--set", steps];
            args.extend(geometry);
            args.extend(files);
            ok(tmp.path(), &args);
        }
        let manifest: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run.join("checkpoints/step-00000005/manifest.json")).unwrap(),
        )
        .unwrap();
        // 3 ranks × 2 files of 2.3 MiB of state, or 2 ranks × 3 of 3.45 MiB.
        assert_eq!(manifest["optimizer"].as_array().unwrap().len(), 6, "{before} ranks' partitions split into files");
        let m = metrics(&run);
        let steps: Vec<(u64, u64, u64)> = m
            .iter()
            .map(|m| {
                (m["step"].as_u64().unwrap(), m["data_cursor"].as_u64().unwrap(), m["world_size"].as_u64().unwrap())
            })
            .collect();
        let world = |step: u64| if step <= 5 { before } else { after }.parse::<u64>().unwrap();
        let planned: Vec<(u64, u64, u64)> = (1..=10).map(|step| (step, step * 12, world(step))).collect();
        assert_eq!(steps, planned, "{before} -> {after}");
        let got = params(&run.join("checkpoints/step-00000010"));
        let rel = (&got - &reference).norm().double_value(&[]) / reference.norm().double_value(&[]);
        assert!(rel < 1e-5, "{before} -> {after} workers: relative L2 difference {rel} from single-process train");
    }
}

/// Chaos: worker processes SIGKILLed at random points (rank 0, the checkpoint writer,
/// included) while `launch` replaces them. The job finishes; metrics and checkpoint
/// manifests prove that every step consumed exactly its planned samples once in the final
/// lineage; the final loss equals an uninterrupted run's (same world size, bit-exact
/// resume on the CPU).
#[test]
fn random_worker_kills_are_survived_and_no_sample_is_lost_or_repeated() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = "[cluster]\nheartbeat_timeout_ms = 2000\ncollective_timeout_ms = 5000";
    let job = tiny_job(tmp.path(), 60, extra);
    let (gb, steps) = (8u64, 60u64);
    let clean = tmp.path().join("clean");
    ok(tmp.path(), &["launch", s(&job), "--workers", "2", "--out", s(&clean), "--set", "checkpoint.every_steps=4"]);

    let run = tmp.path().join("run");
    let launch = Command::new(BIN)
        .args(["launch", s(&job), "--workers", "2", "--max-restarts", "10", "--out", s(&run)])
        .args(["--set", "checkpoint.every_steps=4"])
        .env("MOXIN_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut rng = moxin_data::SplitMix64::new(7);
    let mut kills = 0;
    for at_step in [8, 24, 40] {
        let (pids, _) = wait_for_state_step(&run, at_step);
        let pid = pids[(rng.next_u64() % pids.len() as u64) as usize];
        Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
        kills += 1;
    }
    let out = launch.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("coordinator/state.json")).unwrap()).unwrap();
    assert_eq!(state["failures"].as_u64(), Some(kills), "{state}");
    assert_eq!(state["recoveries"].as_u64(), Some(kills), "{state}");

    let m = metrics(&run);
    let logged: Vec<(u64, u64)> =
        m.iter().map(|m| (m["step"].as_u64().unwrap(), m["data_cursor"].as_u64().unwrap())).collect();
    let planned: Vec<(u64, u64)> = (1..=steps).map(|step| (step, step * gb)).collect();
    assert_eq!(logged, planned, "every step once, each consuming its own global batch");
    for entry in std::fs::read_dir(run.join("checkpoints")).unwrap().flatten() {
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(entry.path().join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest["data_cursor"].as_u64(), manifest["step"].as_u64().map(|s| s * gb), "{manifest}");
    }
    let final_loss = |dir: &Path| metrics(dir).last().unwrap()["loss"].as_f64().unwrap();
    let (chaos, calm) = (final_loss(&run), final_loss(&clean));
    assert!((chaos - calm).abs() <= 1e-4 * calm, "final loss {chaos} after {kills} kills vs {calm} uninterrupted");
}

/// Waits until the coordinator's state shows `step` completed steps; returns the live
/// members' pids by rank and the generation.
fn wait_for_state_step(run: &Path, step: u64) -> (Vec<u64>, u64) {
    let state = run.join("coordinator/state.json");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        assert!(Instant::now() < deadline, "training never reached step {step}");
        let v: serde_json::Value =
            std::fs::read_to_string(&state).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
        let members: Vec<u64> = v["members"]
            .as_array()
            .map(|a| a.iter().filter(|m| !m["rank"].is_null()).filter_map(|m| m["pid"].as_u64()).collect())
            .unwrap_or_default();
        if v["step"].as_u64().unwrap_or(0) >= step && v["phase"]["phase"] == "training" && members.len() == 2 {
            return (members, v["generation"].as_u64().unwrap_or(0));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `launch --workers 2` in the background and waits until the coordinator's state
/// shows `step` completed steps; returns the child and the worker pids by rank.
#[allow(clippy::zombie_processes)] // the caller waits; a panic here fails the test anyway
fn launch_until_step(job: &Path, run: &Path, step: u64) -> (std::process::Child, Vec<u64>) {
    let launch = Command::new(BIN)
        .args(["launch", s(job), "--workers", "2", "--out", s(run)])
        // The coordinator's membership lines (workers joining and leaving) too.
        .env("MOXIN_LOG", "warn,moxin_coordinator::server=info")
        // A process group of its own, with its workers, as a shell gives a foreground job:
        // Ctrl-C in a terminal signals the whole group.
        .process_group(0)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let state = run.join("coordinator/state.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "training never reached step {step}");
        let v: serde_json::Value =
            std::fs::read_to_string(&state).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
        if v["step"].as_u64().unwrap_or(0) >= step {
            let pids = v["members"].as_array().unwrap().iter().map(|m| m["pid"].as_u64().unwrap()).collect();
            return (launch, pids);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn scrape(addr: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    Some(body)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The cluster commands as separate processes, and the coordinator's Prometheus endpoint.
#[test]
fn coordinator_and_worker_processes_expose_prometheus_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let (grpc, prom, worker_prom) = (free_port(), free_port(), free_port());
    let job = tiny_job(
        tmp.path(),
        100_000,
        &format!("[cluster]\nlisten = \"127.0.0.1:{grpc}\"\nmetrics_listen = \"127.0.0.1:{prom}\""),
    );
    let run = tmp.path().join("run");
    let mut coordinator =
        Command::new(BIN).args(["coordinator", s(&job), "--out", s(&run)]).env("MOXIN_LOG", "warn").spawn().unwrap();
    let mut worker = Command::new(BIN)
        .args([
            "worker",
            "--coordinator",
            &format!("http://127.0.0.1:{grpc}"),
            "--metrics-listen",
            &format!("127.0.0.1:{worker_prom}"),
        ])
        .env("MOXIN_LOG", "warn")
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut coord_text, mut worker_text) = (String::new(), String::new());
    while Instant::now() < deadline {
        coord_text = scrape(&format!("127.0.0.1:{prom}")).unwrap_or_default();
        worker_text = scrape(&format!("127.0.0.1:{worker_prom}")).unwrap_or_default();
        if coord_text.contains("moxin_heartbeat_latency_seconds")
            && coord_text.contains("moxin_step ")
            && worker_text.contains("moxin_collective")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = worker.kill();
    let _ = coordinator.kill();
    let _ = worker.wait();
    let _ = coordinator.wait();
    let samples = |text: &str| -> Vec<(String, f64)> {
        let body = text.split("\r\n\r\n").nth(1).unwrap_or(text);
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_string(), value.trim().parse::<f64>().ok()?))
            })
            .collect()
    };
    let coord = samples(&coord_text);
    for name in [
        "moxin_workers_connected",
        "moxin_membership_generation",
        "moxin_step",
        "moxin_loss",
        "moxin_tokens_total",
        "moxin_last_step_timestamp_seconds",
        "moxin_mfu",
        "moxin_peak_memory_bytes",
    ] {
        assert!(coord.iter().any(|(n, _)| n == name), "coordinator lacks {name}:\n{coord_text}");
    }
    assert!(coord.iter().any(|(n, _)| n.starts_with("moxin_step_duration_seconds")), "{coord_text}");
    assert!(coord.iter().any(|(n, _)| n.starts_with("moxin_heartbeat_latency_seconds")), "{coord_text}");
    assert!(coord.iter().any(|(n, v)| n == "moxin_workers_connected" && *v == 1.0));
    assert!(coord.iter().all(|(n, _)| n.starts_with("moxin_")), "one moxin_ prefix: {coord_text}");
    let work = samples(&worker_text);
    assert!(work.iter().any(|(n, _)| n.starts_with("moxin_step_duration_seconds")), "{worker_text}");
    assert!(work.iter().any(|(n, _)| n.starts_with("moxin_collective_exposed_seconds")), "{worker_text}");
    assert!(work.iter().any(|(n, _)| n.starts_with("moxin_collective_busy_seconds")), "{worker_text}");
    // On the CPU the peak memory is the process's peak resident set: more than nothing.
    assert!(work.iter().any(|(n, v)| n == "moxin_peak_memory_bytes" && *v > 1e6), "{worker_text}");
}

/// A configuration that fails validation is refused before anything is served or spawned.
#[test]
fn malformed_config_never_reaches_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), 5, "");
    let run = tmp.path().join("run");
    for cmd in ["launch", "coordinator"] {
        let err = crate::common::fails(tmp.path(), &[cmd, s(&job), "--out", s(&run), "--set", "model.n_heads=5"]);
        assert!(err.contains("model.n_heads = 5"), "{err}");
        assert!(!run.join("coordinator").exists(), "{cmd} started serving a bad job");
    }
    let err = crate::common::fails(tmp.path(), &["launch", s(&job), "--workers", "3", "--out", s(&run)]);
    assert!(err.contains("x 3 worker(s)"), "{err}");
}

/// Ctrl-C on `launch` (SIGINT to it and its workers, as a terminal sends it) stops every
/// worker cleanly at one step, with a checkpoint there, and exits 130; running the same
/// command again resumes and finishes.
#[test]
fn ctrl_c_is_a_clean_stop_and_the_run_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), 60, "");
    let run = tmp.path().join("run");
    let (launch, pids) = launch_until_step(&job, &run, 3);
    Command::new("kill").args(["-INT", "--", &format!("-{}", launch.id())]).status().unwrap();
    let out = launch.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    // The workers leaving is the stop itself: no group re-forms, nothing failed. (Whether a
    // worker's departure reaches the coordinator before it ends is a race; each one that
    // does is logged as the job being over.)
    let departures: Vec<&str> = stderr.lines().filter(|l| l.contains("left: ")).collect();
    assert!(departures.iter().all(|l| l.contains("the job is over")), "{stderr}");
    assert!(!stderr.contains("re-forms") && !stderr.contains("ERROR"), "{stderr}");
    for pid in pids {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "worker {pid} still running");
    }
    let steps: Vec<u64> = metrics(&run).iter().map(|m| m["step"].as_u64().unwrap()).collect();
    let stopped_at = *steps.last().unwrap();
    assert!(stopped_at < 60, "stopped at {stopped_at}");
    assert!(
        run.join(format!("checkpoints/step-{stopped_at:08}/manifest.json")).exists(),
        "no checkpoint at the stop step {stopped_at}"
    );
    ok(tmp.path(), &["launch", s(&job), "--workers", "2", "--out", s(&run)]);
    let steps: Vec<u64> = metrics(&run).iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=60).collect::<Vec<_>>());
}

/// `checkpoint` and `scale` on a running `launch`: a checkpoint on request (the schedule
/// would save only at step 1000), then 2 → 3 workers (a third process starts and joins at
/// a step boundary) → 2 (one is released and leaves after a checkpoint). No step is lost
/// or repeated, and nothing counts as a failure. Impossible sizes are refused, naming why.
#[test]
fn scale_a_running_launch_up_and_down() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), 100_000, "[cluster]\nheartbeat_timeout_ms = 2000\ncollective_timeout_ms = 5000");
    let run = tmp.path().join("run");
    let launch = Command::new(BIN)
        .args(["launch", s(&job), "--workers", "2", "--out", s(&run)])
        .args(["--set", "train.global_batch_size=12", "--set", "train.micro_batch_size=2"])
        .env("MOXIN_LOG", "warn,moxin_worker::trainer::handover=info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (_, generation) = wait_for_state_step(&run, 4);
    let said = ok(tmp.path(), &["checkpoint", s(&run)]);
    assert!(said.contains("checkpoint requested after step"), "{said}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while moxin_layout::checkpoint::latest_valid(&run).ok().flatten().is_none() {
        assert!(Instant::now() < deadline, "no checkpoint after `moxin-train checkpoint`");
        std::thread::sleep(Duration::from_millis(50));
    }
    let err = crate::common::fails(tmp.path(), &["scale", s(&run), "--workers", "5"]);
    assert!(err.contains("5 workers") && err.contains("global_batch_size"), "{err}");
    let err = crate::common::fails(tmp.path(), &["scale", s(&run), "--workers", "0"]);
    assert!(err.contains("SIGTERM"), "{err}");

    let said = ok(tmp.path(), &["scale", s(&run), "--workers", "3"]);
    assert!(said.contains("scaled to 3"), "{said}");
    let (members, grown) = wait_for_group(&run, 3, generation);
    assert_eq!(members, 3);
    let live: serde_json::Value = serde_json::from_str(&ok(tmp.path(), &["status", s(&run), "--json"])).unwrap();
    assert_eq!((live["min_workers"].as_u64(), live["max_workers"].as_u64()), (Some(3), Some(3)), "{live}");
    let at = state_step(&run);
    wait_for_state_step_with(&run, at + 3, 3);
    ok(tmp.path(), &["scale", s(&run), "--workers", "2"]);
    wait_for_group(&run, 2, grown);
    let at = state_step(&run);
    wait_for_state_step_with(&run, at + 3, 2);

    Command::new("kill").args(["-INT", &launch.id().to_string()]).status().unwrap();
    let out = launch.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    let m = metrics(&run);
    let logged: Vec<(u64, u64)> =
        m.iter().map(|m| (m["step"].as_u64().unwrap(), m["data_cursor"].as_u64().unwrap())).collect();
    let planned: Vec<(u64, u64)> = (1..=logged.len() as u64).map(|step| (step, step * 12)).collect();
    let first_difference = logged.iter().zip(&planned).position(|(a, b)| a != b);
    assert_eq!(
        first_difference,
        None,
        "every step once, each its own global batch: {:?}",
        &logged[first_difference.unwrap_or(0).saturating_sub(2)..][..5.min(logged.len())]
    );
    let worlds: Vec<u64> = m.iter().map(|m| m["world_size"].as_u64().unwrap()).collect();
    assert!(worlds.contains(&3) && worlds.last() == Some(&2), "{worlds:?}");
    let generations: Vec<u64> = m.iter().map(|m| m["generation"].as_u64().unwrap()).collect();
    assert!(
        generations.windows(2).all(|g| g[0] <= g[1]) && generations.last() > generations.first(),
        "{generations:?}"
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("coordinator/state.json")).unwrap()).unwrap();
    assert_eq!(state["failures"].as_u64(), Some(0), "scaling is not a failure: {state}");
    // Both resizes moved the optimizer state in memory (3 ranks continued from it after
    // growing, 2 after shrinking), not through a checkpoint.
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(log.matches("continuing from the group's state in memory").count(), 5, "{log}");
    assert!(!log.contains("not usable"), "{log}");
}

fn state_of(run: &Path) -> serde_json::Value {
    std::fs::read_to_string(run.join("coordinator/state.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

fn state_step(run: &Path) -> u64 {
    state_of(run)["step"].as_u64().unwrap_or(0)
}

/// Waits for a group of `size` ranked members with a generation after `after`.
fn wait_for_group(run: &Path, size: usize, after: u64) -> (usize, u64) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let v = state_of(run);
        let ranked = v["members"].as_array().map_or(0, |a| a.iter().filter(|m| !m["rank"].is_null()).count());
        let generation = v["generation"].as_u64().unwrap_or(0);
        if ranked == size && generation > after && v["phase"]["phase"] == "training" {
            return (ranked, generation);
        }
        assert!(Instant::now() < deadline, "no group of {size} after generation {after}: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the state shows `step` steps done by a group of `size`.
fn wait_for_state_step_with(run: &Path, step: u64, size: usize) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let v = state_of(run);
        let ranked = v["members"].as_array().map_or(0, |a| a.iter().filter(|m| !m["rank"].is_null()).count());
        if v["step"].as_u64().unwrap_or(0) >= step && ranked == size {
            return;
        }
        assert!(Instant::now() < deadline, "never reached step {step} with {size} workers: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
