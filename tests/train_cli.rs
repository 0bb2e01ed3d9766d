//! `train`, `eval`, `generate` and `model-info` end to end.

use std::path::Path;

use crate::common::{fails, metrics, ok, s, tiny_job};

#[test]
fn tiny_preset_loss_falls_and_the_run_dir_is_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), 60, "");
    let run = tmp.path().join("run");
    ok(tmp.path(), &["train", s(&job), "--out", s(&run)]);
    let m = metrics(&run);
    assert_eq!(m.len(), 60);
    for key in ["step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s", "world_size"] {
        assert!(m[0].get(key).is_some(), "metrics.jsonl lacks {key}: {}", m[0]);
    }
    let first = m[0]["loss"].as_f64().unwrap();
    let last: f64 = m[55..].iter().map(|v| v["loss"].as_f64().unwrap()).sum::<f64>() / 5.0;
    assert!(first > 6.0, "initial loss {first} should be near ln(vocab)");
    assert!(last < first - 2.5, "loss did not fall: {first} -> {last}");
    assert_eq!(m[59]["tokens"].as_u64(), Some(60 * 8 * 32));

    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(config.contains("n_kv_heads = 2") && config.contains("seq_len = 32"), "{config}");
    let ckpt = run.join("checkpoints/step-00000060");
    for f in ["model.safetensors", "optimizer.part-00000.safetensors", "manifest.json", "tokenizer.json"] {
        assert!(ckpt.join(f).exists(), "checkpoint lacks {f}");
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["step"], 60);
    assert_eq!(manifest["data_cursor"], 60 * 8);
    assert!(manifest["files"]["model.safetensors"].as_str().unwrap().len() == 64);

    let report: serde_json::Value =
        serde_json::from_str(&ok(tmp.path(), &["eval", s(&ckpt), "--data", s(&run.join("data")), "--batches", "3"]))
            .unwrap();
    assert_eq!(report["tokens"], 3 * 8 * 32);
    assert!(report["loss"].as_f64().unwrap() < first - 2.0, "{report}");

    let text = ok(
        tmp.path(),
        &["generate", s(&ckpt), "--prompt", "Once upon a time", "--max-new-tokens", "8", "--temperature", "0"],
    );
    assert!(text.starts_with("Once upon a time") && text.len() > "Once upon a time".len(), "{text}");
    // Several prompts of different lengths, decoded in one batch: each as it is alone.
    let args = ["--max-new-tokens", "8", "--temperature", "0"];
    let batched = ok(
        tmp.path(),
        &[&["generate", s(&ckpt), "--prompt", "Once", "--prompt", "Once upon a time"][..], &args].concat(),
    );
    let lines: Vec<serde_json::Value> = batched.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{batched}");
    assert_eq!(format!("Once upon a time{}", lines[1]["completion"].as_str().unwrap()), text.trim_end_matches('\n'));
    let alone = ok(tmp.path(), &[&["generate", s(&ckpt), "--prompt", "Once"][..], &args].concat());
    assert_eq!(format!("Once{}", lines[0]["completion"].as_str().unwrap()), alone.trim_end_matches('\n'));
}

#[test]
fn profile_mode_reports_the_phases_of_each_step() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), 3, "profile = true");
    let run = tmp.path().join("run");
    ok(tmp.path(), &["train", s(&job), "--out", s(&run)]);
    for m in metrics(&run) {
        let phases = m["phase_s"].as_object().unwrap_or_else(|| panic!("no phase_s: {m}"));
        let mut names: Vec<&str> = phases.keys().map(String::as_str).collect();
        names.sort();
        let want = ["backward", "data", "embedding_backward", "forward", "grad_norm", "head", "optimizer"];
        assert_eq!(names, want, "{m}");
        // Phases are consecutive pieces of the step (two micro-batches add into theirs).
        let total: f64 = phases.values().map(|v| v.as_f64().unwrap()).sum();
        assert!(phases.values().all(|v| v.as_f64().unwrap() >= 0.0), "{m}");
        assert!(total <= m["step_time_s"].as_f64().unwrap() + 1e-6, "{m}");
    }
    // Without profile mode the lines carry no phases.
    let plain = tmp.path().join("plain");
    ok(tmp.path(), &["train", s(&tiny_job(tmp.path(), 1, "")), "--out", s(&plain)]);
    assert!(metrics(&plain)[0].get("phase_s").is_none());
}

/// 2N steps in one run give the same bytes as N steps, stop, and resume to 2N; with the
/// optimizer partition split into several files (as large partitions are).
#[test]
fn resume_is_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), 12, "[data]\nverify_checksums = true");
    let straight = tmp.path().join("straight");
    let resumed = tmp.path().join("resumed");
    // The tiny model's 7.2 MB of optimizer state in files of at least 1 MiB: 4 files.
    let split = ["--set", "checkpoint.optimizer_file_mib=1"];
    let train = |out: &Path, more: &[&str]| {
        let mut args = vec!["train", s(&job), "--out", s(out)];
        args.extend(split);
        args.extend(more);
        ok(tmp.path(), &args);
    };
    train(&straight, &[]);
    train(&resumed, &["--stop-after", "6"]);
    assert!(resumed.join("checkpoints/step-00000006").exists());
    assert!(!resumed.join("checkpoints/step-00000012").exists());
    train(&resumed, &[]);

    let end = "checkpoints/step-00000012";
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(straight.join(end).join("manifest.json")).unwrap()).unwrap();
    let optimizer_files: Vec<String> =
        manifest["optimizer"].as_array().unwrap().iter().map(|o| o["file"].as_str().unwrap().to_string()).collect();
    assert_eq!(optimizer_files.len(), 4, "{optimizer_files:?}");
    for file in std::iter::once("model.safetensors".to_string()).chain(optimizer_files) {
        let a = std::fs::read(straight.join(end).join(&file)).unwrap();
        let b = std::fs::read(resumed.join(end).join(&file)).unwrap();
        assert!(a == b, "{file} differs after resume");
    }
    let losses = |dir| {
        metrics(dir).iter().map(|m| (m["step"].as_u64().unwrap(), m["loss"].as_f64().unwrap())).collect::<Vec<_>>()
    };
    assert_eq!(losses(&straight), losses(&resumed));

    // An incompatible job on the same run directory is refused and changes nothing there.
    let config = std::fs::read(resumed.join("config.toml")).unwrap();
    let err = crate::common::fails(tmp.path(), &["train", s(&job), "--out", s(&resumed), "--set", "model.n_layers=2"]);
    assert!(err.contains("model.n_layers = 4 in the checkpoint, 2 in this job") && err.contains("--out"), "{err}");
    assert_eq!(std::fs::read(resumed.join("config.toml")).unwrap(), config);
    assert_eq!(losses(&straight), losses(&resumed));
}

#[test]
fn resume_skips_a_corrupt_newest_checkpoint_and_sweeps_temporaries() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), 8, "");
    let run = tmp.path().join("run");
    ok(tmp.path(), &["train", s(&job), "--out", s(&run), "--stop-after", "4", "--set", "checkpoint.every_steps=2"]);
    // Damage the newest checkpoint and leave a half-written one behind, as a crash would.
    let newest = run.join("checkpoints/step-00000004/model.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0xff;
    std::fs::write(&newest, bytes).unwrap();
    std::fs::create_dir_all(run.join("checkpoints/.tmp-step-00000006-1")).unwrap();

    let out =
        crate::common::run(tmp.path(), &["train", s(&job), "--out", s(&run), "--set", "checkpoint.every_steps=2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("step-00000004") && stderr.contains("sha256"),
        "no warning about the bad checkpoint: {stderr}"
    );
    let steps: Vec<u64> = metrics(&run).iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>(), "steps 3-4 are redone exactly once");
    assert!(!run.join("checkpoints/.tmp-step-00000006-1").exists());
}

#[test]
fn bad_configs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), 5, "");
    let job = s(&job);
    // A value out of range is the job's, named with its file; one that cannot be read at
    // all comes from --set (or the environment) and is named as such, not as the file's,
    // with the values its key takes. (set value, what the error says, names the file)
    let cases: &[(&str, &[&str], bool)] = &[
        ("model.n_heads=5", &["model.n_heads = 5", "model.dim = 96"], true),
        ("model.n_kv_heads=3", &["model.n_kv_heads = 3", "model.n_heads = 4"], true),
        ("train.global_batch_size=6", &["train.global_batch_size = 6", "multiple of 4"], true),
        ("data.source=no/such/dir", &["data.source = no/such/dir"], true),
        ("train.lrr=1", &["--set train.lrr=1: unknown key `train.lrr`", "`steps`"], false),
        ("trian.steps=1", &["--set trian.steps=1: unknown key `trian`", "`train`"], false),
        ("train.steps=-1", &["--set train.steps=-1: train.steps = -1: expected a whole number"], false),
        ("schedule.decay=exp", &["schedule.decay = exp", "expected one of `cosine`, `linear`"], false),
        ("checkpoint.enabled=maybe", &["checkpoint.enabled = maybe: expected true or false"], false),
    ];
    for (set, want, names_file) in cases {
        let err = fails(tmp.path(), &["train", job, "--set", set]);
        for w in *want {
            assert!(err.contains(w), "{set}: {err:?} lacks {w:?}");
        }
        assert_eq!(err.contains("job.toml"), *names_file, "{set}: {err}");
    }
    let out = std::process::Command::new(crate::common::BIN)
        .args(["train", job])
        .env("MOXIN__TRAIN__STEPS", "-1")
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("MOXIN__TRAIN__STEPS: train.steps = -1: expected a whole number"), "{err}");
    let err = fails(tmp.path(), &["train", "missing.toml"]);
    assert!(err.contains("missing.toml") && err.contains("cannot read"), "{err}");
    // A kernel trace needs a GPU, and warm-up steps before the traced ones.
    let err = fails(tmp.path(), &["train", job, "--trace-kernels", "2"]);
    assert!(err.contains("--trace-kernels records GPU kernels") && err.contains("Cpu"), "{err}");
    let err = fails(tmp.path(), &["train", job, "--trace-kernels", "0"]);
    assert!(err.contains("traces nothing"), "{err}");
    let err = fails(tmp.path(), &["train", job, "--trace-kernels", "5"]);
    assert!(err.contains("steps 1 to 5") && err.contains("raise train.steps to at least 6"), "{err}");
    let err = fails(tmp.path(), &["train", job, "--trace-kernels", "3", "--stop-after", "3"]);
    assert!(err.contains("raise --stop-after to at least 4"), "{err}");
}

#[test]
fn model_info_counts_moxin_7b_without_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let json: serde_json::Value = serde_json::from_str(&ok(tmp.path(), &["model-info", "moxin-7b", "--json"])).unwrap();
    assert_eq!(json["info"]["total_params"], 8_114_180_096u64);
    assert_eq!(json["shape"]["n_layers"], 36);
    let table = ok(tmp.path(), &["model-info", "moxin-7b"]);
    assert!(table.contains("8.11 B parameters"), "{table}");
    let err = fails(tmp.path(), &["model-info", "moxin-70b"]);
    assert!(err.contains("unknown preset") && err.contains("moxin-7b"), "{err}");
}

/// Asynchronous checkpoints (the default) hold training up only to copy the state; they
/// contain exactly what synchronous ones do, and the metrics say how long each took.
#[test]
fn asynchronous_checkpoints_equal_synchronous_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), 6, "");
    let mut files = Vec::new();
    for mode in ["false", "true"] {
        let run = tmp.path().join(format!("sync-{mode}"));
        ok(
            tmp.path(),
            &[
                "train",
                s(&job),
                "--out",
                s(&run),
                "--set",
                "checkpoint.every_steps=2",
                "--set",
                &format!("checkpoint.synchronous={mode}"),
            ],
        );
        let m = metrics(&run);
        let blocked: Vec<f64> = m.iter().map(|r| r["checkpoint_blocking_s"].as_f64().unwrap()).collect();
        assert!(blocked[2] > 0.0 && blocked[4] > 0.0, "saves after steps 2 and 4 show as blocking: {blocked:?}");
        assert!(m.iter().any(|r| r["checkpoint_write_s"].as_f64().unwrap() > 0.0), "no write time reported");
        let dir = run.join("checkpoints/step-00000006");
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
        let build = &manifest["build"];
        assert!(build["torch"].as_str().unwrap().starts_with("2.11"), "{build}");
        assert!(!build["git_commit"].as_str().unwrap().is_empty() && build["git_dirty"].is_string(), "{build}");
        files.push((std::fs::read(dir.join("model.safetensors")).unwrap(), manifest["files"].clone()));
    }
    assert!(files[0] == files[1], "asynchronous and synchronous checkpoints differ");
}

/// `checkpoint.every_seconds`: a checkpoint is due once that long has passed; with a
/// vanishing interval one is due after every step (every_steps alone would save none).
#[test]
fn checkpoints_on_a_time_interval() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), 5, "");
    let run = tmp.path().join("run");
    let args = ["--set", "checkpoint.every_steps=0", "--set", "checkpoint.every_seconds=1e-9"];
    let mut all = vec!["train", s(&job), "--out", s(&run)];
    all.extend(args);
    ok(tmp.path(), &all);
    let blocked: Vec<bool> = metrics(&run).iter().map(|r| r["checkpoint_blocking_s"].as_f64().unwrap() > 0.0).collect();
    assert_eq!(blocked, [false, true, true, true, true], "a save after each of steps 1-4 shows at the next step");
    let err = fails(
        tmp.path(),
        &["train", s(&job), "--out", s(&tmp.path().join("x")), "--set", "checkpoint.every_seconds=-1"],
    );
    assert!(err.contains("checkpoint.every_seconds"), "{err}");
}
