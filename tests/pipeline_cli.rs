//! Pipelines: one file, stages in order, each from the previous one's checkpoint, a
//! summary with held-out accuracy, and finished stages skipped on a rerun.

use crate::common::{metrics, ok, s};

#[test]
fn a_pipeline_runs_its_stages_in_order_and_skips_finished_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let task = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tasks/arithmetic");
    let file = t.join("p.toml");
    std::fs::write(
        &file,
        format!(
            "[pipeline]\nstages = [\"pretrain\", \"sft\", \"grpo\"]\neval_prompts = {test:?}\neval_max_new_tokens = 16\n\
             [runtime]\ndevice = \"cpu\"\nthreads = 1\n[checkpoint]\nevery_steps = 0\nkeep_last = 1\n\
             [stage.pretrain.model]\npreset = \"tiny\"\n[stage.pretrain.data]\nsource = {pre:?}\n\
             [stage.pretrain.train]\nsteps = 20\nseq_len = 64\nglobal_batch_size = 8\nmicro_batch_size = 8\n\
             [stage.sft.data]\nsource = {sft:?}\n[stage.sft.train]\nsteps = 10\nseq_len = 64\nglobal_batch_size = 8\nmicro_batch_size = 8\n\
             [stage.grpo.train]\nsteps = 2\nglobal_batch_size = 4\nmicro_batch_size = 4\n\
             [stage.grpo.grpo]\nprompts = {prompts:?}\ngroup_size = 4\nmax_new_tokens = 8\n",
            test = task.join("test.jsonl").display().to_string(),
            pre = task.join("pretrain.jsonl").display().to_string(),
            sft = task.join("sft.jsonl").display().to_string(),
            prompts = task.join("prompts.jsonl").display().to_string(),
        ),
    )
    .unwrap();
    let out = t.join("out");
    // A --set for one stage (GRPO's 2 steps become 3); one naming no stage is refused
    // before anything runs.
    let err = crate::common::fails(t, &["train", s(&file), "--out", s(&out), "--set", "stage.rl.train.steps=3"]);
    assert!(err.contains("--set stage.rl.train.steps=3") && err.contains("\"grpo\""), "{err}");
    assert!(!out.join("pretrain").exists(), "nothing ran");
    // A bad value in the last stage, or held-out prompts that are not there, are refused
    // before the first stage trains (naming the stage's table), as are two stages of one name.
    let err = crate::common::fails(t, &["train", s(&file), "--out", s(&out), "--set", "stage.grpo.optimizer.lr=fast"]);
    assert!(err.contains("invalid stage grpo") && err.contains("[stage.grpo]") && err.contains("fast"), "{err}");
    assert!(!out.join("pretrain").exists(), "nothing ran");
    // Not only what fails to parse: a later stage's batch geometry too (its shape comes
    // from a checkpoint not written yet, everything else is checked).
    let err =
        crate::common::fails(t, &["train", s(&file), "--out", s(&out), "--set", "stage.grpo.train.micro_batch_size=3"]);
    assert!(err.contains("invalid stage grpo") && err.contains("train.global_batch_size = 4"), "{err}");
    assert!(!out.join("pretrain").exists(), "nothing ran");
    let text = std::fs::read_to_string(&file).unwrap();
    let moved = t.join("moved.toml");
    std::fs::write(&moved, text.replace("test.jsonl", "no-such-test.jsonl")).unwrap();
    let err = crate::common::fails(t, &["train", s(&moved), "--out", s(&t.join("moved"))]);
    assert!(err.contains("eval_prompts") && err.contains("no-such-test.jsonl"), "{err}");
    assert!(!t.join("moved/pretrain").exists(), "nothing ran");
    let twice = t.join("twice.toml");
    std::fs::write(&twice, text.replace("\"pretrain\", \"sft\", \"grpo\"", "\"pretrain\", \"sft\", \"sft\"")).unwrap();
    let err = crate::common::fails(t, &["train", s(&twice), "--out", s(&t.join("twice"))]);
    assert!(err.contains("\"sft\" twice"), "{err}");
    let said = ok(t, &["train", s(&file), "--out", s(&out), "--set", "stage.grpo.train.steps=3"]);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let stages = summary["stages"].as_array().unwrap();
    assert_eq!(
        stages.iter().map(|s| s["stage"].as_str().unwrap()).collect::<Vec<_>>(),
        ["pretrain", "sft", "grpo"],
        "{said}"
    );
    for (stage, steps) in [("pretrain", 20), ("sft", 10), ("grpo", 3)] {
        assert_eq!(metrics(&out.join(stage)).len(), steps, "{stage} has its own metrics");
        let s = stages.iter().find(|s| s["stage"] == stage).unwrap();
        assert_eq!(s["step"], steps);
        assert_eq!(s["eval_prompts"], 100);
        assert!((0.0..=1.0).contains(&s["eval_accuracy"].as_f64().unwrap()), "{s}");
    }
    // Each stage started from the previous one, and prepared its data file with its tokenizer.
    let sft_config = std::fs::read_to_string(out.join("sft/config.toml")).unwrap();
    assert!(sft_config.contains("init_from") && sft_config.contains("pretrain"), "{sft_config}");
    assert!(out.join("sft/data/conversations.bin").exists());
    assert_eq!(
        metrics(&out.join("grpo"))[0]["rollout"],
        serde_json::Value::Null,
        "rollout flag is implied by its fields"
    );
    assert!(metrics(&out.join("grpo"))[0]["reward_mean"].is_number());

    // `eval --prompts` scores a stage as the summary does (greedy), and samples on request.
    let (test, sft_run) = (task.join("test.jsonl"), out.join("sft"));
    let greedy: serde_json::Value =
        serde_json::from_str(&ok(t, &["eval", s(&sft_run), "--prompts", s(&test), "--max-new-tokens", "16"])).unwrap();
    let sft = stages.iter().find(|s| s["stage"] == "sft").unwrap();
    assert_eq!(greedy["accuracy"], sft["eval_accuracy"], "{greedy}");
    assert_eq!((greedy["prompts"].as_u64(), greedy["samples"].as_u64()), (Some(100), Some(1)));
    let sampled_args =
        ["eval", s(&sft_run), "--prompts", s(&test), "--samples", "3", "--temperature", "1.0", "--show", "2"];
    let sampled: serde_json::Value = serde_json::from_str(&ok(t, &sampled_args)).unwrap();
    assert_eq!(sampled["samples"], 3);
    assert_eq!(sampled["examples"].as_array().unwrap().len(), 2, "{sampled}");
    assert!(sampled["examples"][0]["completion"].is_string() && sampled["examples"][0]["correct"].is_boolean());
    // Fraction of prompts with an accepted completion ≥ fraction of completions accepted.
    assert!(sampled["pass_at_samples"].as_f64() >= sampled["accuracy"].as_f64(), "{sampled}");
    assert_eq!(ok(t, &sampled_args), ok(t, &sampled_args), "the seed fixes the samples");
    let err = crate::common::fails(t, &["eval", s(&sft_run), "--prompts", s(&test), "--samples", "2"]);
    assert!(err.contains("--samples 2") && err.contains("temperature"), "{err}");

    // A rerun skips the finished stages (their metrics are untouched) and repeats the summary.
    let before = std::fs::read_to_string(out.join("pretrain/metrics.jsonl")).unwrap();
    let again = ok(t, &["train", s(&file), "--out", s(&out)]);
    assert!(again.contains("\"stages\""), "{again}");
    assert_eq!(std::fs::read_to_string(out.join("pretrain/metrics.jsonl")).unwrap(), before);
}
