//! Faults and bad input a user runs into: a second run on the same run directory,
//! preemption (SIGTERM), broken checkpoints, a dying coordinator, relaunching a finished
//! run, and arguments that make no sense. Each ends in a clear message and loses nothing.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{fails, metrics, ok, s, tiny_job, BIN};

fn spawn(args: &[&str], log: &str) -> Child {
    Command::new(BIN)
        .args(args)
        .env("MOXIN_LOG", log)
        .env_remove("LD_LIBRARY_PATH")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn signal(child: &Child, sig: &str) {
    Command::new("kill").args([&format!("-{sig}"), &child.id().to_string()]).status().unwrap();
}

/// Waits (at most `secs`) for `child` to exit; returns its output.
fn finish(mut child: Child, secs: u64) -> Output {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let id = child.id();
            let out = child.wait_with_output().unwrap();
            panic!("process {id} did not exit within {secs} s; stderr:\n{}", stderr_of(&out));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Waits until `run`'s metrics.jsonl has at least `steps` lines.
fn wait_for_steps(run: &Path, steps: usize, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lines = std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.lines().count());
        if lines >= steps {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            panic!("exited early ({status}): {err}");
        }
        assert!(Instant::now() < deadline, "training never reached step {steps}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn checkpoint_steps(run: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(run.join("checkpoints"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-").and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    steps.sort();
    steps
}

/// A second `train` on a run directory in use is refused with the holder named, touching
/// nothing; SIGTERM (preemption), even delivered twice, then stops the first run with a
/// checkpoint at the step it reached and exit code 130, and the same command resumes from
/// there.
#[test]
fn a_second_run_is_refused_and_sigterm_checkpoints_then_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), 100_000, "");
    let run = tmp.path().join("run");
    let mut first = spawn(&["train", s(&job), "--out", s(&run)], "warn");
    wait_for_steps(&run, 2, &mut first);
    let data_before = std::fs::metadata(run.join("data/manifest.json")).unwrap().modified().unwrap();

    let err = fails(tmp.path(), &["train", s(&job), "--out", s(&run)]);
    assert!(err.contains("is in use by") && err.contains(&format!("pid {}", first.id())), "{err}");
    let err = fails(tmp.path(), &["launch", s(&job), "--workers", "1", "--out", s(&run)]);
    assert!(err.contains("is in use by"), "{err}");
    assert_eq!(std::fs::metadata(run.join("data/manifest.json")).unwrap().modified().unwrap(), data_before);

    // Twice, as `timeout` delivers it (to the child, then to its process group): the
    // same request, not a second one that would exit without the checkpoint.
    signal(&first, "TERM");
    signal(&first, "TERM");
    let out = finish(first, 60);
    assert_eq!(out.status.code(), Some(130), "{}", stderr_of(&out));
    let stopped_at = metrics(&run).last().unwrap()["step"].as_u64().unwrap();
    assert_eq!(checkpoint_steps(&run).last(), Some(&stopped_at), "no checkpoint at the stop step");

    ok(tmp.path(), &["train", s(&job), "--out", s(&run), "--stop-after", &(stopped_at + 2).to_string()]);
    let steps: Vec<u64> = metrics(&run).iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=stopped_at + 2).collect::<Vec<_>>(), "every step once, in order");
}

/// When every checkpoint is broken (one truncated, one with a flipped bit), resuming is
/// refused (not a silent restart from step 0 that would overwrite them), and the message
/// says how to start over.
#[test]
fn all_checkpoints_invalid_is_refused_and_nothing_is_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), 6, "");
    let run = tmp.path().join("run");
    ok(tmp.path(), &["train", s(&job), "--out", s(&run), "--stop-after", "4", "--set", "checkpoint.every_steps=2"]);
    assert_eq!(checkpoint_steps(&run), [2, 4]);
    let mut damaged = Vec::new();
    for step in [2, 4] {
        let file = run.join(format!("checkpoints/step-{step:08}/model.safetensors"));
        let mut bytes = std::fs::read(&file).unwrap();
        let n = bytes.len();
        if step == 2 {
            bytes.truncate(n / 2); // a write cut short
        } else {
            bytes[n - 3] ^= 0x55; // a flipped bit
        }
        std::fs::write(&file, &bytes).unwrap();
        damaged.push((file, bytes));
    }
    let err = fails(tmp.path(), &["train", s(&job), "--out", s(&run), "--set", "checkpoint.every_steps=2"]);
    assert!(err.contains("none of its 2 checkpoint(s) is valid") && err.contains("move"), "{err}");
    // A command that only reads the run says what is wrong without the resume advice.
    let err = fails(tmp.path(), &["export-hf", s(&run), s(&tmp.path().join("hf"))]);
    assert!(err.contains("none of its 2 checkpoint(s) is valid") && !err.contains("--out"), "{err}");
    for (file, bytes) in damaged {
        assert_eq!(std::fs::read(&file).unwrap(), bytes, "{} was rewritten", file.display());
    }
    assert_eq!(metrics(&run).len(), 4, "metrics.jsonl untouched");
}

/// Relaunching a finished run reports "already finished" and exits 0, for `train` and for
/// `launch` (whose coordinator remembers the finished job in state.json).
#[test]
fn relaunching_a_finished_run_says_already_finished() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), 3, "");
    for (cmd, extra) in [("train", vec![]), ("launch", vec!["--workers", "2"])] {
        let run = tmp.path().join(format!("run-{cmd}"));
        let mut args = vec![cmd, s(&job), "--out", s(&run)];
        args.extend(&extra);
        ok(tmp.path(), &args);
        let out = finish(spawn(&args, "info"), 60);
        let err = stderr_of(&out);
        assert!(out.status.success(), "{cmd}: {err}");
        assert!(err.contains("already finished"), "{cmd}: {err}");
        assert!(!err.contains("waiting for workers") && !err.contains("training 3 steps"), "{cmd} started work: {err}");
        assert_eq!(metrics(&run).len(), 3, "{cmd}: no step logged again");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A coordinator and two workers as separate processes, the job at `run`.
fn cluster(tmp: &Path, steps: u64, connect_timeout: &str, log: &str) -> (PathBuf, Vec<String>, Child, Vec<Child>) {
    let port = free_port();
    let job = tiny_job(tmp, steps, &format!("[cluster]\nlisten = \"127.0.0.1:{port}\"\nmin_workers = 2"));
    let run = tmp.join("run");
    let coordinator_args: Vec<String> = ["coordinator", s(&job), "--out", s(&run), "--set", "checkpoint.every_steps=5"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    let coordinator = spawn(&coordinator_args.iter().map(String::as_str).collect::<Vec<_>>(), "warn");
    let url = format!("http://127.0.0.1:{port}");
    let workers =
        (0..2).map(|_| spawn(&["worker", "--coordinator", &url, "--connect-timeout", connect_timeout], log)).collect();
    (run, coordinator_args, coordinator, workers)
}

/// A successful job: the coordinator waits for its workers to hear the end, so every
/// process exits 0 (workers used to lose the reply to their last report).
#[test]
fn a_finished_cluster_job_exits_0_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, _, coordinator, workers) = cluster(tmp.path(), 6, "60", "info");
    for (i, w) in workers.into_iter().enumerate() {
        let out = finish(w, 120);
        assert!(out.status.success(), "worker {i}: {}", stderr_of(&out));
    }
    let out = finish(coordinator, 30);
    assert!(out.status.success(), "coordinator: {}", stderr_of(&out));
    assert_eq!(metrics(&run).len(), 6);
}

/// SIGKILL of the coordinator: the workers notice, stop together at the next step with a
/// checkpoint, try to reconnect, and exit with an error naming the coordinator when it
/// stays away, never a panic or a hang; the next coordinator publishes their checkpoint.
#[test]
fn killing_the_coordinator_stops_the_workers_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, args, mut coordinator, workers) = cluster(tmp.path(), 100_000, "2", "warn");
    wait_for_steps(&run, 2, &mut coordinator);
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
    let mut stopped_at = Vec::new();
    for (i, w) in workers.into_iter().enumerate() {
        let out = finish(w, 90);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "worker {i}: {err}");
        assert!(!err.contains("panicked"), "worker {i} panicked: {err}");
        assert!(err.contains("did not come back"), "worker {i}: {err}");
        let step = err.split("training stopped at step ").nth(1).and_then(|t| t.split(' ').next());
        stopped_at.push(step.and_then(|s| s.parse::<u64>().ok()).unwrap_or_else(|| panic!("worker {i}: {err}")));
    }
    assert_eq!(stopped_at[0], stopped_at[1], "the ranks stop at one step");
    // Every rank wrote its part of that checkpoint, but nobody was left to commit it: the
    // next coordinator of the run directory publishes it, so nothing trained is lost.
    let mut again = spawn(&args.iter().map(String::as_str).collect::<Vec<_>>(), "warn");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !checkpoint_steps(&run).contains(&stopped_at[0]) {
        assert!(Instant::now() < deadline, "step {} never published: {:?}", stopped_at[0], checkpoint_steps(&run));
        std::thread::sleep(Duration::from_millis(50));
    }
    again.kill().unwrap();
    again.wait().unwrap();
    moxin_layout::checkpoint::latest_valid(&run).unwrap().expect("a valid checkpoint");
}

/// A coordinator that hangs (SIGSTOP: it keeps its connections but never answers) is
/// found by the workers' unanswered heartbeats; they stop with a checkpoint and give up
/// after `--connect-timeout`, never hanging with it.
#[test]
fn a_hung_coordinator_is_detected_by_heartbeats() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, _, mut coordinator, workers) = cluster(tmp.path(), 100_000, "2", "warn");
    wait_for_steps(&run, 2, &mut coordinator);
    Command::new("kill").args(["-STOP", &coordinator.id().to_string()]).status().unwrap();
    let outcomes: Vec<Output> = workers.into_iter().map(|w| finish(w, 120)).collect();
    Command::new("kill").args(["-CONT", &coordinator.id().to_string()]).status().unwrap();
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
    for (i, out) in outcomes.iter().enumerate() {
        let err = stderr_of(out);
        assert_eq!(out.status.code(), Some(1), "worker {i}: {err}");
        assert!(err.contains("stopped answering heartbeats") && err.contains("did not come back"), "worker {i}: {err}");
    }
}

/// The coordinator SIGKILLed and started again: it reloads state.json (generations keep
/// counting), the workers register again, and the job continues from the checkpoint to
/// the end with every step logged once.
#[test]
fn a_restarted_coordinator_continues_the_job() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, args, mut coordinator, workers) = cluster(tmp.path(), 40, "60", "warn");
    wait_for_steps(&run, 12, &mut coordinator);
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
    let generation_before = state(&run)["generation"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let coordinator = spawn(&args.iter().map(String::as_str).collect::<Vec<_>>(), "warn");
    for (i, w) in workers.into_iter().enumerate() {
        let out = finish(w, 120);
        assert!(out.status.success(), "worker {i}: {}", stderr_of(&out));
    }
    let out = finish(coordinator, 30);
    assert!(out.status.success(), "coordinator: {}", stderr_of(&out));
    let steps: Vec<u64> = metrics(&run).iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=40).collect::<Vec<_>>());
    let s = state(&run);
    assert_eq!(s["phase"]["phase"], "finished");
    assert!(s["generation"].as_u64().unwrap() > generation_before, "{s}");
}

fn state(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("coordinator/state.json")).unwrap()).unwrap()
}

/// Arguments that cannot mean anything are refused up front, naming the value.
#[test]
fn nonsense_arguments_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), 2, "");
    let run = tmp.path().join("run");
    ok(tmp.path(), &["train", s(&job), "--out", s(&run)]);
    let ckpt = run.join("checkpoints/step-00000002");

    for t in ["nan", "inf", "-1"] {
        let temperature = format!("--temperature={t}");
        let err = fails(tmp.path(), &["generate", s(&ckpt), "--prompt", "Once", &temperature]);
        assert!(err.contains("--temperature"), "{t}: {err}");
    }
    let err = fails(tmp.path(), &["eval", s(&ckpt), "--data", s(&run.join("data")), "--batches", "0"]);
    assert!(err.contains("--batches 0") && !err.contains("job spec"), "{err}");
    let prompts = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tasks/arithmetic/test.jsonl");
    let err = fails(tmp.path(), &["eval", s(&ckpt), "--prompts", s(&prompts), "--max-new-tokens", "0"]);
    assert!(err.contains("--max-new-tokens 0"), "{err}");
    let long = "once upon a time ".repeat(400);
    let err = fails(tmp.path(), &["generate", s(&ckpt), "--prompt", &long, "--max-new-tokens", "5"]);
    assert!(err.contains("shorten the prompt") && !err.contains("+ 0 new tokens"), "{err}");
    let err = fails(tmp.path(), &["train", s(&job), "--out", s(&tmp.path().join("x")), "--set", "job.name=../esc"]);
    assert!(err.contains("job.name") && err.contains("plain directory name"), "{err}");

    // Data made with another tokenizer: token ids mean other things.
    let corpus = tmp.path().join("corpus.txt");
    std::fs::write(&corpus, moxin_data::builtin::corpus(5, 200).join("\n\n")).unwrap();
    let other = tmp.path().join("other-data");
    let err = fails(
        tmp.path(),
        &[
            "data",
            "prepare",
            "--input",
            s(&corpus),
            "--out",
            s(&other),
            "--train-tokenizer",
            "300",
            "--shard-tokens",
            "0",
        ],
    );
    assert!(err.contains("--shard-tokens 0"), "{err}");
    ok(tmp.path(), &["data", "prepare", "--input", s(&corpus), "--out", s(&other), "--train-tokenizer", "300"]);
    let err = fails(tmp.path(), &["eval", s(&ckpt), "--data", s(&other)]);
    assert!(err.contains("another tokenizer"), "{err}");

    let err = fails(tmp.path(), &["worker", "--coordinator", "localhost:50051"]);
    assert!(err.contains("expected a URL like http://"), "{err}");
    assert!(!err.contains("cannot reach"), "a malformed URL was tried as an address: {err}");
}

/// Pruning counts only whole checkpoints: it never removes the checkpoint just published in
/// favour of a newer, broken one (which the resume skipped), nor the last whole fallback in
/// favour of an older, broken one.
#[test]
fn pruning_keeps_the_newest_valid_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), 10, "");
    let run = tmp.path().join("run");
    let every = ["--set", "checkpoint.every_steps=2", "--set", "checkpoint.keep_last=1"];
    let mut args = vec!["train", s(&job), "--out", s(&run), "--stop-after", "4"];
    args.extend(every);
    ok(tmp.path(), &args);
    assert_eq!(checkpoint_steps(&run), [4]);
    let newest = run.join("checkpoints/step-00000004/model.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    // Step 4 broken, and a valid step 2 beside it (from a second run of the same job).
    let run2 = tmp.path().join("run2");
    let mut first = vec!["train", s(&job), "--out", s(&run2), "--stop-after", "2"];
    first.extend(every);
    ok(tmp.path(), &first);
    std::fs::rename(run2.join("checkpoints/step-00000002"), run.join("checkpoints/step-00000002")).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x55;
    std::fs::write(&newest, &bytes).unwrap();
    // Resumes from 2 (skipping 4), stops at 3 and publishes it with keep_last = 1.
    let mut resume = vec!["train", s(&job), "--out", s(&run), "--stop-after", "3"];
    resume.extend(every);
    ok(tmp.path(), &resume);
    assert_eq!(checkpoint_steps(&run), [3, 4], "step 3 kept, the broken step 4 left to be overwritten");
    let mut again = vec!["train", s(&job), "--out", s(&run), "--stop-after", "6"];
    again.extend(every);
    ok(tmp.path(), &again);
    assert_eq!(checkpoint_steps(&run), [6]);

    // A broken *older* checkpoint does not count toward keep_last either: with keep_last
    // = 2 the whole step 2 stays beside the broken step 4 when step 5 is published, so
    // with step 5 broken as well the run still resumes (from step 2).
    let run3 = tmp.path().join("run3");
    // Checkpoints only where the runs stop (--stop-after), so none overwrites a broken one.
    let keep_two = ["--set", "checkpoint.every_steps=100", "--set", "checkpoint.keep_last=2"];
    let until = |step: &'static str| {
        let mut args = vec!["train", s(&job), "--out", s(&run3), "--stop-after", step];
        args.extend(keep_two);
        ok(tmp.path(), &args);
    };
    // Cut short, as a crash or a full disk leaves a file (pruning checks sizes, not hashes).
    let cut = |step: u64| {
        let file = run3.join(format!("checkpoints/step-{step:08}/model.safetensors"));
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    };
    until("2");
    until("4");
    assert_eq!(checkpoint_steps(&run3), [2, 4]);
    cut(4);
    until("5");
    assert_eq!(checkpoint_steps(&run3), [2, 4, 5], "the whole step 2 kept, the broken step 4 not counted");
    cut(5);
    until("6");
    assert_eq!(checkpoint_steps(&run3), [2, 4, 5, 6], "resumed from step 2");
    until("7");
    assert_eq!(checkpoint_steps(&run3), [6, 7], "broken ones go once enough whole ones are newer");
}
