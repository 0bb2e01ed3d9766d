//! Tests of SFT data: preparation, packing into rows, prompts files.
use super::*;

fn tokenizer() -> TextTokenizer {
    let docs = crate::builtin::corpus(1, 200);
    crate::train_bpe(docs.iter(), 400, false).unwrap()
}

fn msg(role: &str, content: &str) -> Message {
    Message { role: role.into(), content: content.into() }
}

#[test]
fn the_jinja_template_spells_out_the_pieces() {
    let j = ChatTemplate::moxin().jinja();
    assert!(j.starts_with("{% if bos_token %}{{ bos_token }}{% endif %}{% for message in messages %}"), "{j}");
    assert!(j.contains(r#"{% if message['role'] == 'system' %}{{ "<|system|>\n" }}"#), "{j}");
    assert!(
        j.ends_with(
            r#"{% if add_generation_prompt %}{% if messages %}{{ "\n" }}{% endif %}{{ "<|assistant|>\n" }}{% endif %}"#
        ),
        "{j}"
    );
    let odd = ChatTemplate { user: "{{ \"user\" }}".into(), ..ChatTemplate::moxin() };
    assert!(odd.jinja().contains(r#"{{ "{{ \"user\" }}" }}"#), "{}", odd.jinja());
}

#[test]
fn only_the_assistants_words_and_eos_are_trained() {
    let tok = tokenizer();
    let t = ChatTemplate::moxin();
    let conv = [
        msg("system", "Be brief."),
        msg("user", "What is 2+3?"),
        msg("assistant", "5"),
        msg("user", "And 4+4?"),
        msg("assistant", "8"),
    ];
    let r = render(&t, &tok, &conv).unwrap();
    assert_eq!(r.tokens.len(), r.mask.len());
    // The trained tokens decode to exactly the assistant turns, each ending in EOS.
    let trained: Vec<u32> = r.tokens.iter().zip(&r.mask).filter(|(_, &m)| m == 1).map(|(&t, _)| t).collect();
    let mut expected = tok.encode("5").unwrap();
    expected.push(tok.eos_id);
    expected.extend(tok.encode("8").unwrap());
    expected.push(tok.eos_id);
    assert_eq!(trained, expected);
    // The whole text is the template's.
    let text = tok.inner.decode(&r.tokens, false).unwrap();
    assert_eq!(text, "<s><|system|>\nBe brief.\n<|user|>\nWhat is 2+3?\n<|assistant|>\n5</s>\n<|user|>\nAnd 4+4?\n<|assistant|>\n8</s>");
    // A prompt is token for token the start of the conversation it begins.
    let prompt = render_prompt(&t, &tok, &conv[..2]).unwrap();
    assert_eq!(&r.tokens[..prompt.len()], &prompt[..]);
    assert_eq!(
        tok.inner.decode(&prompt, false).unwrap(),
        "<s><|system|>\nBe brief.\n<|user|>\nWhat is 2+3?\n<|assistant|>\n"
    );
    let e = render(&t, &tok, &[msg("tool", "x")]).unwrap_err();
    assert!(e.contains("role \"tool\""), "{e}");
}

#[test]
fn prepare_counts_what_it_skips_and_packing_tiles_rows() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let tok_path = dir.path().join("tok.json");
    tok.inner.save(&tok_path, false).unwrap();
    let input = dir.path().join("chats.jsonl");
    let mut lines = Vec::new();
    for i in 0..40 {
        let answer = "the answer is ".repeat(1 + i % 5) + &i.to_string();
        lines.push(
            serde_json::json!({"messages": [msg("user", &format!("question {i}?")), msg("assistant", &answer)]})
                .to_string(),
        );
    }
    lines.push(serde_json::json!({"messages": [msg("user", "nobody answers")]}).to_string());
    lines.push(
        serde_json::json!({"messages": [msg("user", "long"), msg("assistant", &"word ".repeat(200))]}).to_string(),
    );
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out = dir.path().join("sft");
    let opts = SftPrepareOptions {
        inputs: vec![input.clone()],
        out_dir: out.clone(),
        tokenizer: tok_path,
        template: ChatTemplate::moxin(),
        max_tokens: 120,
        overlong: Overlong::Drop,
        overwrite: false,
    };
    let m = prepare_sft(&opts).unwrap();
    assert_eq!((m.conversations, m.skipped_no_assistant, m.dropped_overlong, m.truncated), (40, 1, 1, 0));
    let data = SftData::open(&out, 256, 400, 7, true).unwrap();
    assert!(data.num_rows() < 40, "conversations share rows");
    let mut trained = 0u64;
    let mut seen = 0usize;
    for r in 0..data.num_rows() {
        let mut row = PackedRow::default();
        data.read_row(r, 0, &mut row);
        assert_eq!(row.inputs.len(), 256);
        trained += row.weights.iter().filter(|&&w| w == 1.0).count() as u64;
        assert_eq!(row.weights.iter().filter(|&&w| w == 1.0).count() as u32, data.trained_in_row(r));
        // Positions restart at 0 with each segment.
        for i in 1..256 {
            if row.segments[i] != row.segments[i - 1] && row.segments[i] >= 0 {
                assert_eq!(row.positions[i], 0);
            }
        }
        seen += row.segments.iter().filter(|&&s| s >= 0).copied().collect::<std::collections::BTreeSet<_>>().len();
    }
    assert_eq!(trained, m.trained_tokens, "every trained token once per epoch");
    assert_eq!(seen, 40);
    assert_eq!(data.truncation(), Truncation::default(), "every conversation fits a row of 256");
    // Rows shorter than some conversations: those are cut, their trained ends counted; rows
    // that hold no answer at all are refused, naming the fix.
    let short = SftData::open(&out, 60, 400, 7, true).unwrap();
    let cut = short.truncation();
    let kept: u64 = (0..short.num_rows()).map(|r| short.trained_in_row(r) as u64).sum();
    assert!(cut.conversations > 0 && cut.trained_targets > 0, "{cut:?}");
    assert_eq!(kept + cut.trained_targets, m.trained_tokens, "every trained target is kept or counted as cut");
    let e = SftData::open(&out, 3, 400, 7, true).err().unwrap().to_string();
    assert!(e.contains("rows of 3 tokens") && e.contains("raise train.seq_len"), "{e}");
    // Bad input: a clear error naming the line.
    std::fs::write(&input, "{\"messages\": [{\"role\": \"user\"}]}\n").unwrap();
    let bad = SftPrepareOptions { out_dir: dir.path().join("b"), ..opts };
    let e = prepare_sft(&bad).unwrap_err().to_string();
    assert!(e.contains("line 1") && e.contains("content"), "{e}");
    // It leaves nothing behind, so the corrected rerun needs no --overwrite; a
    // published directory is still refused and stays valid.
    assert!(!bad.out_dir.exists());
    std::fs::write(&input, &lines[0]).unwrap();
    assert_eq!(prepare_sft(&bad).unwrap().conversations, 1);
    let e = prepare_sft(&bad).unwrap_err().to_string();
    assert!(e.contains("--overwrite"), "{e}");
    SftData::open(&bad.out_dir, 256, 400, 7, true).unwrap();
}

#[test]
fn prompts_with_answers_are_read_and_bad_lines_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.jsonl");
    std::fs::write(&path, "{\"prompt\": \"1+1?\", \"answer\": 2}\n\n{\"prompt\": \"x\", \"answer\": \"\\\\frac12\"}\n")
        .unwrap();
    let p = read_prompts(&path).unwrap();
    assert_eq!(p, vec![("1+1?".to_string(), "2".to_string()), ("x".to_string(), "\\frac12".to_string())]);
    std::fs::write(&path, "{\"prompt\": \"a\", \"answer\": 1}\n{\"prompt\": \"b\"}\n").unwrap();
    let e = read_prompts(&path).unwrap_err().to_string();
    assert!(e.contains("line 2") && e.contains("answer"), "{e}");
    std::fs::write(&path, "\n").unwrap();
    assert!(read_prompts(&path).unwrap_err().to_string().contains("no prompts"));
}
