//! Hugging Face interop against transformers itself (installed into `.venv` by
//! scripts/setup.sh; tests/hf/check.py is its side): exported checkpoints load as
//! `MistralForCausalLM` with the same logits, models transformers made import with the
//! same logits, and export → import → export reproduces every byte.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{fails, ok, tiny_job};

fn python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let has = Command::new(&python).args(["-c", "import transformers, safetensors"]).output();
    assert!(
        has.is_ok_and(|o| o.status.success()),
        "{} cannot import transformers; run `bash scripts/setup.sh` (it installs it)",
        python.display()
    );
    python
}

/// Runs tests/hf/check.py; returns stdout.
fn check(cwd: &Path, args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hf/check.py");
    let out = Command::new(python())
        .arg(script)
        .args(args)
        .current_dir(cwd)
        .env("OMP_NUM_THREADS", "1")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check.py {args:?}:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    files.sort();
    files
}

#[test]
fn hugging_face_export_and_import_agree_with_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    // Two rows, 16 tokens: longer than the imported model's sliding window of 8.
    let tokens = t.join("tokens.json");
    std::fs::write(
        &tokens,
        "[[1,5,9,13,17,21,25,29,33,37,41,45,49,53,57,61],[1,7,3,200,12,99,5,3,8,1,250,33,2,17,120,4]]",
    )
    .unwrap();

    // A moxin-train checkpoint, exported, loads in transformers with the same logits.
    let job = tiny_job(t, 3, "");
    let run = t.join("run");
    ok(t, &["train", &s(&job), "--out", &s(&run)]);
    let exported = t.join("exported");
    let said = ok(t, &["export-hf", &s(&run), &s(&exported)]);
    assert!(said.contains("\"step\": 3") && said.contains("\"tokenizer\": true"), "{said}");
    ok(t, &["logits", &s(&run), "--tokens", &s(&tokens), "--out", &s(&t.join("ours.safetensors"))]);
    // An existing --out (here: the checkpoint's own weights) is refused unless asked for.
    let weights = moxin_layout::checkpoint::list(&run).unwrap().last().unwrap().1.join("model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    let err = crate::common::fails(t, &["logits", &s(&run), "--tokens", &s(&tokens), "--out", &s(&weights)]);
    assert!(err.contains("exists") && err.contains("--overwrite"), "{err}");
    assert_eq!(std::fs::read(&weights).unwrap(), before, "nothing written");
    ok(t, &["logits", &s(&run), "--tokens", &s(&tokens), "--out", &s(&t.join("ours.safetensors")), "--overwrite"]);
    check(t, &["logits", &s(&exported), &s(&tokens), "theirs.safetensors"]);
    let diff = check(t, &["compare", "ours.safetensors", "theirs.safetensors", "1e-4"]);
    assert!(diff.contains("max_abs_diff"), "{diff}");

    // The exported chat template renders conversations token for token as SFT and GRPO
    // tokenize them (BOS, prefixes, EOS after the answer; the generation prompt).
    let messages = serde_json::json!([
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "42"}
    ]);
    std::fs::write(t.join("messages.json"), messages.to_string()).unwrap();
    let theirs: serde_json::Value = serde_json::from_str(&check(t, &["chat", &s(&exported), "messages.json"])).unwrap();
    let tokenizer = moxin_data::load_tokenizer(&exported.join("tokenizer.json")).unwrap();
    let template = moxin_data::sft::ChatTemplate::moxin();
    let messages: Vec<moxin_data::sft::Message> = serde_json::from_value(messages).unwrap();
    let conversation = moxin_data::sft::render(&template, &tokenizer, &messages).unwrap().tokens;
    let prompt = moxin_data::sft::render_prompt(&template, &tokenizer, &messages[..2]).unwrap();
    assert_eq!(theirs["conversation"], serde_json::json!(conversation));
    assert_eq!(theirs["prompt"], serde_json::json!(prompt));
    assert_eq!(Some(conversation[0]), tokenizer.bos_id, "conversations start with BOS");

    // A model transformers created (random, sharded by save_pretrained, sliding window 8)
    // imports with the same logits.
    let created = t.join("created");
    check(t, &["create", &s(&created), &s(&tokens), "theirs2.safetensors"]);
    assert!(created.join("model.safetensors.index.json").exists(), "the test model should be sharded");
    let imported = t.join("imported");
    let said = ok(t, &["import-hf", &s(&created), "--out", &s(&imported)]);
    assert!(said.contains("\"sliding_window\": 8") && said.contains("\"dtype\": \"float32\""), "{said}");
    ok(t, &["logits", &s(&imported), "--tokens", &s(&tokens), "--out", &s(&t.join("ours2.safetensors"))]);
    check(t, &["compare", "ours2.safetensors", "theirs2.safetensors", "1e-4"]);

    // A run starts from the imported weights (model.init_from; the shape comes from the
    // checkpoint): after one step at a negligible learning rate the logits are the same.
    let init_job = t.join("init.toml");
    std::fs::write(
        &init_job,
        format!(
            "[model]\ninit_from = {:?}\n[train]\nsteps = 1\nseq_len = 16\nglobal_batch_size = 4\n\
             micro_batch_size = 2\n[optimizer]\nlr = 1e-12\n[runtime]\ndevice = \"cpu\"\nthreads = 1\n",
            s(&imported)
        ),
    )
    .unwrap();
    let from_imported = t.join("from-imported");
    ok(t, &["train", &s(&init_job), "--out", &s(&from_imported)]);
    ok(t, &["logits", &s(&from_imported), "--tokens", &s(&tokens), "--out", &s(&t.join("ours3.safetensors"))]);
    check(t, &["compare", "ours3.safetensors", "theirs2.safetensors", "1e-4"]);
    let config = std::fs::read_to_string(from_imported.join("config.toml")).unwrap();
    assert!(config.contains("init_from") && config.contains("sliding_window = 8"), "{config}");
    // Overriding what the weights fix, or naming a preset as well, is refused by name.
    let e = fails(t, &["train", &s(&init_job), "--out", &s(&t.join("z")), "--set", "model.dim=128"]);
    assert!(e.contains("model.dim") && e.contains("init_from"), "{e}");
    let e = fails(t, &["train", &s(&init_job), "--out", &s(&t.join("z")), "--set", "model.preset=tiny"]);
    assert!(e.contains("give one"), "{e}");
    let e = fails(
        t,
        &["train", &s(&init_job), "--out", &s(&t.join("z")), "--set", &format!("model.init_from={}", s(&created))],
    );
    assert!(e.contains("import-hf"), "{e}");

    // Export → import → export: the same bytes, sharded or not.
    for shard_gb in ["5", "0.0001"] {
        let (a, b, back) =
            (t.join(format!("a-{shard_gb}")), t.join(format!("b-{shard_gb}")), t.join(format!("back-{shard_gb}")));
        ok(t, &["export-hf", &s(&imported), &s(&a), "--max-shard-gb", shard_gb]);
        ok(t, &["import-hf", &s(&a), "--out", &s(&back)]);
        ok(t, &["export-hf", &s(&back), &s(&b), "--max-shard-gb", shard_gb]);
        let (fa, fb) = (files_of(&a), files_of(&b));
        assert_eq!(fa.iter().map(|f| &f.0).collect::<Vec<_>>(), fb.iter().map(|f| &f.0).collect::<Vec<_>>());
        for ((name, x), (_, y)) in fa.iter().zip(&fb) {
            assert!(x == y, "{name} differs after export → import → export");
        }
        assert_eq!(fa.iter().any(|f| f.0 == "model.safetensors.index.json"), shard_gb != "5");
    }

    // Bad input: clear errors, nothing overwritten.
    let e = fails(t, &["export-hf", &s(&run), &s(&exported)]);
    assert!(e.contains("not empty") && e.contains("nothing was overwritten"), "{e}");
    let e = fails(t, &["import-hf", &s(&run), "--out", &s(&t.join("x"))]);
    assert!(e.contains("config.json") && e.contains("Hugging Face model folder"), "{e}");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(created.join("config.json")).unwrap()).unwrap();
    config["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    std::fs::write(created.join("config.json"), config.to_string()).unwrap();
    let e = fails(t, &["import-hf", &s(&created), "--out", &s(&t.join("y"))]);
    assert!(e.contains("rope_scaling") && e.contains("yarn"), "{e}");
    assert!(!t.join("y").exists(), "a refused import leaves nothing behind");
}
