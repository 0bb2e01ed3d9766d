//! GRPO from the command line, end to end on a small task: pre-train, SFT on answers
//! given in two styles, then GRPO over two workers rewarding the style that states an
//! answer — the mean reward rises, and the metrics carry the rollout statistics.

use std::path::Path;

use crate::common::{fails, metrics, ok, s};

/// Conversations "What is a plus b?" answered "The answer is c." or "It is c.", and the
/// same questions as GRPO prompts with their answers.
fn write_task(dir: &Path) {
    let (mut chats, mut prompts) = (Vec::new(), Vec::new());
    for i in 0..400u64 {
        let (a, b) = (1 + i * 7 % 20, 1 + i * 13 % 20);
        let answer = if i % 2 == 0 { format!("The answer is {}.", a + b) } else { format!("It is {}.", a + b) };
        chats.push(
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("What is {a} plus {b}?")},
                {"role": "assistant", "content": answer},
            ]})
            .to_string(),
        );
        if i < 200 {
            prompts.push(
                serde_json::json!({"prompt": format!("What is {a} plus {b}?"), "answer": (a + b).to_string()})
                    .to_string(),
            );
        }
    }
    std::fs::write(dir.join("chats.jsonl"), chats.join("\n")).unwrap();
    std::fs::write(dir.join("prompts.jsonl"), prompts.join("\n")).unwrap();
}

const RUNTIME: &str = "[runtime]\ndevice = \"cpu\"\nthreads = 1\n";

#[test]
fn grpo_raises_the_reward_over_two_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    write_task(t);
    let write = |name: &str, text: String| {
        let path = t.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let pre = write(
        "pre.toml",
        format!("[model]\npreset = \"tiny\"\n[train]\nsteps = 40\nseq_len = 64\nglobal_batch_size = 8\nmicro_batch_size = 8\n[optimizer]\nlr = 3e-3\n{RUNTIME}"),
    );
    ok(t, &["train", s(&pre), "--out", s(&t.join("pre"))]);
    let tokenizer = t.join("pre/checkpoints/step-00000040/tokenizer.json");
    ok(
        t,
        &[
            "data",
            "prepare-sft",
            "--input",
            s(&t.join("chats.jsonl")),
            "--tokenizer",
            s(&tokenizer),
            "--out",
            s(&t.join("sft")),
        ],
    );
    let sft = write(
        "sft.toml",
        format!(
            "[model]\ninit_from = \"pre\"\n[data]\nsource = \"sft\"\n[train]\nsteps = 60\nseq_len = 128\nglobal_batch_size = 8\n\
             micro_batch_size = 8\n[optimizer]\nlr = 2e-3\nweight_decay = 0.0\n{RUNTIME}"
        ),
    );
    ok(t, &["train", s(&sft), "--out", s(&t.join("sft-run"))]);

    let grpo = write(
        "grpo.toml",
        format!(
            "[model]\ninit_from = \"sft-run\"\n[train]\nsteps = 30\nseq_len = 64\nglobal_batch_size = 8\nmicro_batch_size = 4\n\
             [optimizer]\nlr = 5e-4\nweight_decay = 0.0\n[grpo]\nprompts = \"prompts.jsonl\"\ngroup_size = 8\n\
             max_new_tokens = 16\ntemperature = 1.0\nmath_weight = 0.0\nformat_weight = 1.0\nbeta = 0.01\n{RUNTIME}"
        ),
    );
    let run = t.join("grpo-run");
    ok(t, &["launch", s(&grpo), "--workers", "2", "--out", s(&run)]);
    let m = metrics(&run);
    assert_eq!(m.len(), 30);
    assert!(m.iter().all(|m| m["world_size"] == 2 && m["completion_len_max"].as_u64().unwrap() <= 16));
    let reward = |r: std::ops::Range<usize>| {
        m[r.clone()].iter().map(|m| m["reward_mean"].as_f64().unwrap()).sum::<f64>() / r.len() as f64
    };
    let (first, last) = (reward(0..5), reward(25..30));
    assert!(
        last > first + 0.2,
        "the mean reward should rise: {first:.2} over the first 5 steps, {last:.2} over the last 5"
    );
    for key in [
        "reward_std",
        "zero_std_fraction",
        "completion_len_mean",
        "truncation_ratio",
        "kl",
        "clip_fraction",
        "entropy",
        "rollout_s",
        "update_s",
    ] {
        assert!(m[29][key].as_f64().is_some_and(f64::is_finite), "{key}: {}", m[29]);
    }
    // One policy update per rollout batch: the ratio is exactly 1, nothing is clipped.
    assert!(
        m.iter().all(|m| m["clip_fraction"] == 0.0),
        "{:?}",
        m.iter().map(|m| &m["clip_fraction"]).collect::<Vec<_>>()
    );
    assert!(m[29]["kl"].as_f64().unwrap() > 0.0, "the policy moved away from the reference");
    // The checkpoints carry the chat template the prompts were rendered with (export-hf's
    // default writes it for transformers).
    let last = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("step-"))
        .max()
        .unwrap();
    let carried: moxin_data::sft::ChatTemplate =
        serde_json::from_str(&std::fs::read_to_string(last.join("chat_template.json")).unwrap()).unwrap();
    assert_eq!(carried, moxin_data::sft::ChatTemplate::moxin());

    // Two updates per rollout batch: the second reuses the rollouts (no generation) and
    // the prompts advance only after it.
    let twice = t.join("twice");
    ok(t, &["train", s(&grpo), "--out", s(&twice), "--set", "train.steps=4", "--set", "grpo.updates_per_batch=2"]);
    let m = metrics(&twice);
    let cursors: Vec<u64> = m.iter().map(|m| m["data_cursor"].as_u64().unwrap()).collect();
    assert_eq!(cursors, [0, 8, 8, 16]);
    let generated: Vec<bool> = m.iter().map(|m| m["rollout_s"].as_f64().unwrap() > 0.0).collect();
    assert_eq!(generated, [true, false, true, false]);

    // Dynamic sampling replaces prompts whose completions all scored alike: no more of them
    // than without it (the same first rollouts, then refills).
    let zero_std = |m: &[serde_json::Value]| m.iter().map(|m| m["zero_std_fraction"].as_f64().unwrap()).sum::<f64>();
    let refilled = t.join("refilled");
    ok(
        t,
        &[
            "train",
            s(&grpo),
            "--out",
            s(&refilled),
            "--set",
            "train.steps=3",
            "--set",
            "grpo.dynamic_sampling_rounds=3",
        ],
    );
    let plain = t.join("plain");
    ok(t, &["train", s(&grpo), "--out", s(&plain), "--set", "train.steps=3"]);
    assert!(zero_std(&metrics(&refilled)) <= zero_std(&metrics(&plain)));

    // Bad input: named field, named line.
    std::fs::write(t.join("bad.jsonl"), "{\"prompt\": \"hi\"}\n").unwrap();
    let e = fails(t, &["train", s(&grpo), "--out", s(&t.join("x")), "--set", "grpo.prompts=bad.jsonl"]);
    assert!(e.contains("grpo.prompts") && e.contains("line 1"), "{e}");
    let e = fails(t, &["train", s(&grpo), "--out", s(&t.join("x")), "--set", "grpo.group_size=1"]);
    assert!(e.contains("grpo.group_size = 1"), "{e}");
    let e = fails(t, &["train", s(&grpo), "--out", s(&t.join("x")), "--set", "grpo.temperature=0"]);
    assert!(e.contains("grpo.temperature = 0") && e.contains("greedy"), "{e}");
    let e = fails(
        t,
        &["train", s(&grpo), "--out", s(&t.join("x")), "--set", "model.init_from=", "--set", "model.preset=tiny"],
    );
    assert!(e.contains("model.init_from") && e.contains("GRPO"), "{e}");
}
