//! `data prepare` and training on prepared data.

use crate::common::{fails, ok, s, tiny_job};

fn write_corpus(dir: &std::path::Path) -> std::path::PathBuf {
    let input = dir.join("corpus");
    std::fs::create_dir_all(&input).unwrap();
    let docs = moxin_data::builtin::corpus(11, 600);
    let jsonl: Vec<String> = docs[..500].iter().map(|d| serde_json::json!({ "text": d }).to_string()).collect();
    std::fs::write(input.join("part1.jsonl"), jsonl.join("\n")).unwrap();
    std::fs::write(input.join("part2.txt"), docs[500..].join("\n\n")).unwrap();
    input
}

/// `data prepare` with a trained 512-id BPE and small shards; returns the printed manifest.
fn prepare_with_bpe(cwd: &std::path::Path, input: &std::path::Path, out: &std::path::Path) -> String {
    ok(
        cwd,
        &[
            "data",
            "prepare",
            "--input",
            s(input),
            "--out",
            s(out),
            "--train-tokenizer",
            "512",
            "--shard-tokens",
            "20000",
        ],
    )
}

#[test]
fn prepare_then_train_on_it_and_reuse_its_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_corpus(tmp.path());
    let prepared = tmp.path().join("prepared");
    let out = prepare_with_bpe(tmp.path(), &input, &prepared);
    let manifest: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(manifest["documents"], 501);
    assert_eq!(manifest["dtype"], "u16");
    assert!(manifest["shards"].as_array().unwrap().len() > 1);

    // A second preparation with the first one's tokenizer gives the same tokens.
    let again = tmp.path().join("again");
    let tok = prepared.join("tokenizer.json");
    let out2 = ok(
        tmp.path(),
        &[
            "data",
            "prepare",
            "--input",
            s(&input),
            "--out",
            s(&again),
            "--tokenizer",
            s(&tok),
            "--shard-tokens",
            "20000",
        ],
    );
    let manifest2: serde_json::Value = serde_json::from_str(&out2).unwrap();
    assert_eq!(manifest["shards"], manifest2["shards"]);

    let job = tiny_job(tmp.path(), 3, &format!("[data]\nsource = {:?}", s(&prepared)));
    ok(tmp.path(), &["train", s(&job), "--out", s(&tmp.path().join("run"))]);
    assert!(!tmp.path().join("run/data").exists(), "prepared data must not be copied");

    // Preparing over existing data is refused and leaves it intact.
    let err = fails(
        tmp.path(),
        &["data", "prepare", "--input", s(&input), "--out", s(&prepared), "--train-tokenizer", "512"],
    );
    assert!(err.contains("--overwrite"), "{err}");
    ok(tmp.path(), &["train", s(&job), "--out", s(&tmp.path().join("run2"))]);

    // A text file as data.source: too short, it is refused; with more text the same
    // command prepares it again (nothing was trained on the first preparation).
    let text = tmp.path().join("story.txt");
    std::fs::write(&text, "a short story").unwrap();
    let file_job = tiny_job(tmp.path(), 2, &format!("[data]\nsource = {:?}", s(&text)));
    let run3 = tmp.path().join("run3");
    let err = fails(tmp.path(), &["train", s(&file_job), "--out", s(&run3)]);
    assert!(err.contains("add more text"), "{err}");
    std::fs::write(&text, moxin_data::builtin::corpus(7, 300).join("\n\n")).unwrap();
    ok(tmp.path(), &["train", s(&file_job), "--out", s(&run3)]);
    // Once checkpoints were trained on it, a changed file is refused rather than swapped in.
    std::fs::write(&text, moxin_data::builtin::corpus(8, 300).join("\n\n")).unwrap();
    let err = fails(tmp.path(), &["train", s(&file_job), "--out", s(&run3)]);
    assert!(err.contains("checkpoints were trained on it"), "{err}");
}

#[test]
fn corrupt_shard_and_vocab_mismatch_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_corpus(tmp.path());
    let prepared = tmp.path().join("prepared");
    prepare_with_bpe(tmp.path(), &input, &prepared);
    let job = tiny_job(tmp.path(), 2, &format!("[data]\nsource = {:?}", s(&prepared)));

    let err =
        fails(tmp.path(), &["train", s(&job), "--set", "model.vocab_size=300", "--out", s(&tmp.path().join("r0"))]);
    assert!(err.contains("manifest.json") && err.contains("vocab_size is 300"), "{err}");

    let shard = prepared.join("shard-00001.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&shard, &bytes).unwrap();
    let err = fails(tmp.path(), &["train", s(&job), "--out", s(&tmp.path().join("r1"))]);
    assert!(err.contains("shard-00001.bin") && err.contains("sha256"), "{err}");

    bytes.truncate(bytes.len() - 2);
    std::fs::write(&shard, &bytes).unwrap();
    let err = fails(tmp.path(), &["train", s(&job), "--out", s(&tmp.path().join("r2"))]);
    assert!(err.contains("shard-00001.bin") && err.contains("bytes but the manifest says"), "{err}");

    let err = fails(
        tmp.path(),
        &[
            "data",
            "prepare",
            "--input",
            s(&tmp.path().join("nope.txt")),
            "--out",
            s(&tmp.path().join("x")),
            "--train-tokenizer",
            "512",
        ],
    );
    assert!(err.contains("nope.txt") && err.contains("not found"), "{err}");
}
