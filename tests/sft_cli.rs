//! Supervised fine-tuning from the command line: conversations prepared with the chat
//! template, a run started from a pre-training checkpoint, trained for whole epochs.

use std::path::Path;

use crate::common::{fails, metrics, ok, s, tiny_job};

fn write_chats(path: &Path, n: usize) {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let (a, b) = (i * 7 % 50, i * 13 % 40);
            serde_json::json!({"messages": [
                {"role": "system", "content": "Answer with the sum."},
                {"role": "user", "content": format!("What is {a} plus {b}?")},
                {"role": "assistant", "content": format!("{a} plus {b} is {}.", a + b)},
            ]})
            .to_string()
        })
        .chain(std::iter::once(r#"{"messages": [{"role": "user", "content": "no answer"}]}"#.to_string()))
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

#[test]
fn sft_from_a_pretraining_run_for_whole_epochs() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let pretrain = t.join("pretrain");
    ok(t, &["train", s(&tiny_job(t, 20, "")), "--out", s(&pretrain)]);
    let chats = t.join("chats.jsonl");
    write_chats(&chats, 120);
    let tokenizer = pretrain.join("checkpoints/step-00000020/tokenizer.json");
    let sft = t.join("sft");
    // A template of the user's own, which the exported model must carry.
    let template = moxin_data::sft::ChatTemplate {
        name: "plain".into(),
        system: "System: ".into(),
        user: "Question: ".into(),
        assistant: "Answer: ".into(),
        separator: "\n\n".into(),
    };
    let template_file = t.join("plain.json");
    std::fs::write(&template_file, serde_json::to_string(&template).unwrap()).unwrap();
    let said = ok(
        t,
        &[
            "data",
            "prepare-sft",
            "--input",
            s(&chats),
            "--tokenizer",
            s(&tokenizer),
            "--template",
            s(&template_file),
            "--out",
            s(&sft),
        ],
    );
    assert!(said.contains("\"conversations\": 120") && said.contains("\"skipped_no_assistant\": 1"), "{said}");

    let job = t.join("sft.toml");
    std::fs::write(
        &job,
        format!(
            "[model]\ninit_from = {:?}\n[data]\nsource = {:?}\n[train]\nepochs = 2.0\nseq_len = 128\n\
             global_batch_size = 4\nmicro_batch_size = 2\n[optimizer]\nlr = 2e-3\nweight_decay = 0.0\n\
             [schedule]\nwarmup_ratio = 0.1\ndecay = \"linear\"\n[runtime]\ndevice = \"cpu\"\nthreads = 1\n",
            s(&pretrain),
            s(&sft)
        ),
    )
    .unwrap();
    let run = t.join("run");
    ok(t, &["train", s(&job), "--out", s(&run)]);
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    let steps: u64 = config
        .lines()
        .find_map(|l| l.strip_prefix("steps = "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{config}"));
    let m = metrics(&run);
    assert_eq!(m.len() as u64, steps, "two epochs of packed rows");
    assert!(config.contains(&format!("warmup_steps = {}", (steps as f64 * 0.1).round() as u64)), "{config}");
    let loss = |i: usize| m[i]["loss"].as_f64().unwrap();
    assert!(
        loss(m.len() - 1) < 0.7 * loss(0),
        "the assistant's answers are learned: {} → {}",
        loss(0),
        loss(m.len() - 1)
    );
    // It continues from the pre-trained weights: the first loss is far below a random model's.
    assert!(loss(0) < (1024f64).ln(), "first loss {}", loss(0));

    // The checkpoint carries the template, and export-hf writes it for transformers'
    // apply_chat_template (the pre-training run exports moxin's).
    for (source, expected) in [(&run, &template), (&pretrain, &moxin_data::sft::ChatTemplate::moxin())] {
        let exported = t.join(format!("hf-{}", source.file_name().unwrap().to_str().unwrap()));
        let said = ok(t, &["export-hf", s(source), s(&exported)]);
        assert!(said.contains(&format!("\"chat_template\": \"{}\"", expected.name)), "{said}");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(exported.join("tokenizer_config.json")).unwrap()).unwrap();
        assert_eq!(config["chat_template"], serde_json::json!(expected.jinja()));
    }

    // Bad input: the line and the field are named; steps and epochs together are refused.
    std::fs::write(&chats, "{\"messages\": [{\"role\": \"user\", \"text\": \"hi\"}]}\n").unwrap();
    let e = fails(
        t,
        &["data", "prepare-sft", "--input", s(&chats), "--tokenizer", s(&tokenizer), "--out", s(&t.join("x"))],
    );
    assert!(e.contains("line 1") && e.contains("content"), "{e}");
    let e = fails(t, &["train", s(&job), "--out", s(&t.join("y")), "--set", "train.steps=5"]);
    assert!(e.contains("train.epochs") && e.contains("give one"), "{e}");
}
