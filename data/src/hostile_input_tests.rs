//! Property tests: hostile input to everything in this crate that reads files another
//! process wrote (prepared-data manifests and shards, SFT manifests, indexes and token
//! files, prompt files, chat templates, conversation inputs, tokenizers). Each call must
//! return `Ok` or an error that names the file; none may panic.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;
use serde_json::Value;

use crate::json_mutations;
use crate::sft::{
    prepare_sft, read_prompts, ChatTemplate, Overlong, PackedRow, SftData, SftManifest, SftPrepareOptions,
};
use crate::{load_tokenizer, prepare, Manifest, PrepareOptions, TokenDataset, TokenizerSource, MANIFEST_FILE};

/// Prepared directories made once: `(root, tokenizer, token data, SFT data)`.
struct Fixture {
    _root: tempfile::TempDir,
    tokenizer: PathBuf,
    tokens: PathBuf,
    sft: PathBuf,
}

fn conversation(i: usize) -> String {
    serde_json::json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": format!("question {i}?")},
        {"role": "assistant", "content": format!("the answer is {i}")},
    ]})
    .to_string()
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = tempfile::tempdir().unwrap();
        let tok = crate::train_bpe(crate::builtin::corpus(1, 60).iter(), 320, false).unwrap();
        let tokenizer = root.path().join("tokenizer.json");
        tok.inner.save(&tokenizer, false).unwrap();
        let input = root.path().join("in.jsonl");
        let docs: Vec<String> =
            crate::builtin::corpus(3, 20).into_iter().map(|t| serde_json::json!({ "text": t }).to_string()).collect();
        std::fs::write(&input, docs.join("\n")).unwrap();
        let tokens = root.path().join("tokens");
        let mut opts = PrepareOptions::new(vec![input], tokens.clone(), TokenizerSource::File(tokenizer.clone()));
        opts.shard_tokens = 300;
        prepare(&opts).unwrap();
        let chats = root.path().join("chats.jsonl");
        std::fs::write(&chats, (0..12).map(conversation).collect::<Vec<_>>().join("\n")).unwrap();
        let sft = root.path().join("sft");
        prepare_sft(&sft_options(chats, sft.clone(), tokenizer.clone())).unwrap();
        Fixture { _root: root, tokenizer, tokens, sft }
    })
}

fn sft_options(input: PathBuf, out_dir: PathBuf, tokenizer: PathBuf) -> SftPrepareOptions {
    SftPrepareOptions {
        inputs: vec![input],
        out_dir,
        tokenizer,
        template: ChatTemplate::moxin(),
        max_tokens: 64,
        overlong: Overlong::Truncate,
        overwrite: true,
    }
}

/// A private copy of the prepared directory `from`.
fn copy_of(from: &Path) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    (tmp, dir)
}

fn names(e: &crate::DataError, dir: &Path) -> bool {
    e.to_string().contains(&dir.display().to_string())
}

const SEQ_LENS: &[u32] = &[0, 1, 16, 300, u32::MAX];

/// Opens the token data in `dir` every way a reader does and reads every sample of what
/// opens; errors must name the directory.
fn open_tokens_every_way(dir: &Path, seq_len: u32, model_vocab: u32) {
    match Manifest::load(dir) {
        Ok(m) => {
            for checksums in [false, true] {
                if let Err(e) = m.verify(dir, checksums) {
                    assert!(names(&e, dir), "{e}");
                }
            }
            if let Err(e) = m.num_samples(dir, seq_len) {
                assert!(names(&e, dir), "{e}");
            }
        }
        Err(e) => assert!(e.to_string().contains(MANIFEST_FILE), "{e}"),
    }
    for checksums in [false, true] {
        match TokenDataset::open(dir, seq_len, model_vocab, checksums) {
            Ok(d) if seq_len <= 4096 => {
                let mut out = vec![0i64; seq_len as usize + 1];
                for i in [0, d.num_samples() / 2, d.num_samples() - 1] {
                    d.read_sample(i, &mut out);
                }
            }
            Ok(_) => {}
            Err(e) => assert!(names(&e, dir), "{e}"),
        }
    }
}

/// Opens the SFT data in `dir` every way a reader does and reads every row of what opens.
fn open_sft_every_way(dir: &Path, seq_len: u32) {
    if let Err(e) = SftManifest::load(dir) {
        assert!(e.to_string().contains(MANIFEST_FILE), "{e}");
    }
    for checksums in [false, true] {
        match SftData::open(dir, seq_len, 320, 7, checksums) {
            Ok(d) => {
                for r in 0..d.num_rows() {
                    let mut row = PackedRow::default();
                    d.read_row(r, 0, &mut row);
                    assert_eq!(row.inputs.len(), seq_len as usize);
                }
            }
            Err(e) => assert!(names(&e, dir), "{e}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn manifests_of_random_bytes_are_errors(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(MANIFEST_FILE), &bytes).unwrap();
        let e = Manifest::load(tmp.path()).unwrap_err();
        prop_assert!(e.to_string().contains(MANIFEST_FILE), "{}", e);
        open_tokens_every_way(tmp.path(), 16, 320);
        open_sft_every_way(tmp.path(), 16);
    }

    #[test]
    fn mutated_token_manifests_are_errors_not_panics(m in json_mutations::mutations(), seq in 0..SEQ_LENS.len()) {
        let (_tmp, dir) = copy_of(&fixture().tokens);
        let valid: Value = serde_json::from_slice(&std::fs::read(dir.join(MANIFEST_FILE)).unwrap()).unwrap();
        std::fs::write(dir.join(MANIFEST_FILE), json_mutations::apply(&valid, &m)).unwrap();
        open_tokens_every_way(&dir, SEQ_LENS[seq].min(64), 320);
        open_tokens_every_way(&dir, SEQ_LENS[seq], u32::MAX);
    }

    #[test]
    fn manifests_naming_files_outside_the_directory_are_refused(
        name in json_mutations::escaping_file_name(),
        field in 0..4usize,
    ) {
        let (_tmp, dir) = copy_of(if field < 2 { &fixture().tokens } else { &fixture().sft });
        let path = dir.join(MANIFEST_FILE);
        let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        match field {
            0 => v["tokenizer"]["file"] = name.clone().into(),
            1 => v["shards"][0]["file"] = name.clone().into(),
            2 => v["tokenizer"]["file"] = name.clone().into(),
            _ => {
                let files = v["files"].as_object_mut().unwrap();
                let first = files.keys().next().unwrap().clone();
                let sha = files.remove(&first).unwrap();
                files.insert(name.clone(), sha);
            }
        }
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        let e = if field < 2 { Manifest::load(&dir).unwrap_err() } else { SftManifest::load(&dir).unwrap_err() };
        let e = e.to_string();
        prop_assert!(e.contains(&path.display().to_string()) && e.contains(&format!("{name:?}")), "{}", e);
        open_tokens_every_way(&dir, 16, 320);
        open_sft_every_way(&dir, 16);
    }

    #[test]
    fn corrupt_shards_are_named(shard in 0..8usize, at in any::<usize>(), op in 0..4u8, seq in 0..SEQ_LENS.len()) {
        let (_tmp, dir) = copy_of(&fixture().tokens);
        let manifest = Manifest::load(&dir).unwrap();
        let file = dir.join(&manifest.shards[shard % manifest.shards.len()].file);
        let mut bytes = std::fs::read(&file).unwrap();
        let i = at % bytes.len().max(1);
        match op {
            0 => bytes.truncate(i),
            1 => bytes.extend_from_slice(&[0xff; 3]),
            2 => bytes[i] ^= 0x80,
            _ => bytes = vec![0xff; bytes.len()],
        }
        std::fs::write(&file, &bytes).unwrap();
        open_tokens_every_way(&dir, SEQ_LENS[seq].min(64), 320);
        if op < 2 {
            let e = TokenDataset::open(&dir, 16, 320, false).err().unwrap();
            prop_assert!(e.to_string().contains(&file.display().to_string()), "{}", e);
        }
    }

    #[test]
    fn mutated_sft_manifests_are_errors_not_panics(m in json_mutations::mutations(), seq in 0..SEQ_LENS.len()) {
        let (_tmp, dir) = copy_of(&fixture().sft);
        let valid: Value = serde_json::from_slice(&std::fs::read(dir.join(MANIFEST_FILE)).unwrap()).unwrap();
        std::fs::write(dir.join(MANIFEST_FILE), json_mutations::apply(&valid, &m)).unwrap();
        open_sft_every_way(&dir, SEQ_LENS[seq].min(64));
    }

    #[test]
    fn corrupt_sft_files_are_errors_not_panics(
        file in 0..3usize,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in proptest::option::of(any::<usize>()),
        seq in 0..SEQ_LENS.len(),
    ) {
        let (_tmp, dir) = copy_of(&fixture().sft);
        let path = dir.join(["conversations.bin", "tokens.bin", "mask.bin"][file]);
        let mut bytes = std::fs::read(&path).unwrap();
        for (at, b) in edits {
            let n = bytes.len();
            // Index records are 16 bytes: the start (u64) and length (u32) are the
            // interesting ones, so extreme bytes land there often.
            let i = if file == 0 { (at % (n / 16)) * 16 + at % 12 } else { at % n };
            bytes[i] = if at % 3 == 0 { 0xff } else { b };
        }
        if let Some(c) = cut {
            bytes.truncate(c % bytes.len());
        }
        std::fs::write(&path, &bytes).unwrap();
        open_sft_every_way(&dir, SEQ_LENS[seq].min(64));
    }

    #[test]
    fn hostile_sft_index_records_are_errors(
        record in any::<usize>(),
        start in prop_oneof![Just(0u64), Just(u64::MAX), Just(u64::MAX - 1), Just(1 << 40), any::<u64>()],
        len in prop_oneof![Just(0u32), Just(1), Just(u32::MAX), any::<u32>()],
        verify in any::<bool>(),
    ) {
        let (_tmp, dir) = copy_of(&fixture().sft);
        let path = dir.join("conversations.bin");
        let mut bytes = std::fs::read(&path).unwrap();
        let at = (record % (bytes.len() / 16)) * 16;
        bytes[at..at + 8].copy_from_slice(&start.to_le_bytes());
        bytes[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        if let Err(e) = SftData::open(&dir, 32, 320, 7, verify) {
            prop_assert!(names(&e, &dir), "{}", e);
        }
        open_sft_every_way(&dir, 32);
    }

    #[test]
    fn prompt_files_random_or_mutated_are_errors_naming_the_line(
        random in proptest::collection::vec(any::<u8>(), 0..256),
        m in json_mutations::mutations(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("prompts.jsonl");
        let valid = serde_json::json!({"prompt": "1+1?", "answer": "2"});
        let mut text = random.clone();
        text.push(b'\n');
        text.extend(json_mutations::apply(&valid, &m));
        for bytes in [random, text] {
            std::fs::write(&path, &bytes).unwrap();
            if let Err(e) = read_prompts(&path) {
                prop_assert!(e.to_string().contains("prompts.jsonl"), "{}", e);
            }
        }
    }

    #[test]
    fn chat_templates_random_or_mutated_are_errors(
        random in proptest::collection::vec(any::<u8>(), 0..128),
        m in json_mutations::mutations(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("template.json");
        let valid = serde_json::to_value(ChatTemplate::moxin()).unwrap();
        for bytes in [random, json_mutations::apply(&valid, &m)] {
            std::fs::write(&path, &bytes).unwrap();
            if let Err(e) = ChatTemplate::load(path.to_str().unwrap()) {
                prop_assert!(e.to_string().contains("template.json"), "{}", e);
            }
        }
    }

    #[test]
    fn conversations_random_or_mutated_are_errors_naming_the_file(
        random in proptest::collection::vec(any::<u8>(), 0..128),
        m in json_mutations::mutations(),
        max_tokens in prop_oneof![Just(0u32), Just(2), Just(64), Just(u32::MAX)],
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let input = tmp.path().join("chats.jsonl");
        let valid: Value = serde_json::from_str(&conversation(1)).unwrap();
        let mut text = conversation(0).into_bytes();
        text.push(b'\n');
        text.extend(json_mutations::apply(&valid, &m));
        for bytes in [random, text] {
            std::fs::write(&input, &bytes).unwrap();
            let mut opts = sft_options(input.clone(), tmp.path().join("out"), fixture().tokenizer.clone());
            opts.max_tokens = max_tokens;
            match prepare_sft(&opts) {
                Ok(_) => open_sft_every_way(&opts.out_dir, 32),
                Err(e) => prop_assert!(
                    e.to_string().contains("chats.jsonl") || e.to_string().contains(&opts.out_dir.display().to_string()),
                    "{}",
                    e
                ),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn tokenizer_files_random_or_mutated_are_errors(
        random in proptest::collection::vec(any::<u8>(), 0..256),
        m in json_mutations::mutations(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("tokenizer.json");
        let valid: Value = serde_json::from_slice(&std::fs::read(&fixture().tokenizer).unwrap()).unwrap();
        for bytes in [random, json_mutations::apply(&valid, &m)] {
            std::fs::write(&path, &bytes).unwrap();
            match load_tokenizer(&path) {
                Ok(t) => {
                    let _ = t.encode("hostile ünïcødé 1+1=2");
                }
                Err(e) => prop_assert!(e.to_string().contains("tokenizer.json"), "{}", e),
            }
        }
    }
}

/// Found by the property above: tokenizers 0.22 panics (`expect("Helper")`) on a file
/// cut inside its `decoder` (a truncated copy, a full disk).
#[test]
fn a_tokenizer_file_cut_short_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tokenizer.json");
    let v: Value = serde_json::from_slice(&std::fs::read(&fixture().tokenizer).unwrap()).unwrap();
    let text = v.to_string();
    let cut = text.find("\"decoder\":{\"").unwrap() + "\"decoder\":{\"".len();
    std::fs::write(&path, &text[..cut]).unwrap();
    let e = load_tokenizer(&path).err().unwrap().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("not a valid tokenizer.json"), "{e}");
}
