//! Supervised fine-tuning data: conversations (JSONL, `{"messages": [{"role", "content"}]}`)
//! rendered with a chat template, tokenized with a loss mask that is 1 exactly on what the
//! assistant says (every assistant turn, its end-of-sequence token included), stored with
//! an index, and packed into fixed-length rows for training.
//!
//! A prepared SFT directory holds `tokens.bin` (u32 ids, conversations back to back),
//! `mask.bin` (one byte per token: 1 = trained), `conversations.bin` (per conversation:
//! first token u64, length u32, trained targets u32, little-endian), the tokenizer, and
//! `manifest.json` (format `moxin-sft-v1`), written last.
//!
//! Packing ([`SftData`]): conversations, in an order seeded by the job's seed, fill rows of
//! `seq_len` slots greedily (a conversation never straddles rows; longer ones are cut to
//! the row). A conversation of `n` tokens takes `n - 1` slots (inputs and their next-token
//! targets); each slot carries its position inside the conversation (RoPE restarts per
//! conversation) and the conversation's segment number (attention never crosses
//! segments). Padding slots have weight 0 and a segment of their own.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::manifest::{sha256_file, MANIFEST_FILE};
use crate::output_dir::OutputDir;
use crate::{DataError, SampleOrder, TextTokenizer, TokenizerInfo};

/// `format` of SFT manifests.
pub const FORMAT: &str = "moxin-sft-v1";
const TOKENS_FILE: &str = "tokens.bin";
const MASK_FILE: &str = "mask.bin";
const INDEX_FILE: &str = "conversations.bin";
const TOKENIZER_FILE: &str = "tokenizer.json";
const INDEX_RECORD: usize = 16;

/// How a conversation becomes text: what precedes each role's turn and what ends a turn.
/// The assistant's words are followed by the tokenizer's end-of-sequence token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatTemplate {
    /// Name recorded in the manifest.
    pub name: String,
    /// Before a system message.
    pub system: String,
    /// Before a user message.
    pub user: String,
    /// Before an assistant message (not trained on: the model is prompted with it).
    pub assistant: String,
    /// After every message but the last (after the EOS of assistant turns).
    pub separator: String,
}

impl ChatTemplate {
    /// Moxin's (Tülu's) format: `<|system|>\n…\n<|user|>\n…\n<|assistant|>\n…</s>`.
    pub fn moxin() -> Self {
        ChatTemplate {
            name: "moxin".into(),
            system: "<|system|>\n".into(),
            user: "<|user|>\n".into(),
            assistant: "<|assistant|>\n".into(),
            separator: "\n".into(),
        }
    }

    /// A built-in template by name, or a JSON file with this struct's fields.
    pub fn load(name_or_file: &str) -> Result<Self, DataError> {
        if name_or_file == "moxin" {
            return Ok(Self::moxin());
        }
        let path = Path::new(name_or_file);
        let text = std::fs::read_to_string(path).map_err(|e| DataError::Input {
            path: path.to_path_buf(),
            reason: format!(
                "{e}; a chat template is \"moxin\" or a JSON file with name, system, user, assistant, separator"
            ),
        })?;
        serde_json::from_str(&text).map_err(|e| DataError::Input { path: path.to_path_buf(), reason: e.to_string() })
    }

    /// The template as a Jinja chat template (`tokenizer_config.json`'s `chat_template`),
    /// rendering what [`render`] and [`render_prompt`] tokenize: the BOS token, each
    /// message's prefix and content, EOS after assistant turns, separators between
    /// messages, and with `add_generation_prompt` the separator and the assistant prefix.
    /// Every piece of text is a string expression, not raw template text, because
    /// transformers renders with `trim_blocks` (a newline after a tag would vanish).
    pub fn jinja(&self) -> String {
        // JSON's escapes (\n, \", \\, \uXXXX) are also Jinja string literal escapes.
        let text = |s: &str| format!("{{{{ {} }}}}", serde_json::Value::from(s));
        let (system, user, assistant, separator) =
            (text(&self.system), text(&self.user), text(&self.assistant), text(&self.separator));
        format!(
            "{{% if bos_token %}}{{{{ bos_token }}}}{{% endif %}}\
             {{% for message in messages %}}\
             {{% if message['role'] == 'system' %}}{system}\
             {{% elif message['role'] == 'user' %}}{user}\
             {{% elif message['role'] == 'assistant' %}}{assistant}\
             {{% else %}}{{{{ raise_exception('a message role must be system, user or assistant') }}}}{{% endif %}}\
             {{{{ message['content'] }}}}\
             {{% if message['role'] == 'assistant' %}}{{{{ eos_token }}}}{{% endif %}}\
             {{% if not loop.last %}}{separator}{{% endif %}}\
             {{% endfor %}}\
             {{% if add_generation_prompt %}}{{% if messages %}}{separator}{{% endif %}}{assistant}{{% endif %}}"
        )
    }

    fn prefix(&self, role: &str) -> &str {
        match role {
            "system" => &self.system,
            "user" => &self.user,
            _ => &self.assistant,
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A conversation as token ids and its loss mask (1 = trained).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// One entry per token.
    pub mask: Vec<u8>,
}

/// Renders and tokenizes `messages`: the tokenizer's beginning-of-sequence token if it has
/// one, then each piece tokenized on its own, so the mask's edges fall exactly on the
/// assistant's words (and a prompt, [`render_prompt`], is token for token the start of
/// the conversation it begins).
pub fn render(template: &ChatTemplate, tokenizer: &TextTokenizer, messages: &[Message]) -> Result<Rendered, String> {
    let mut out = Rendered { tokens: Vec::new(), mask: Vec::new() };
    if let Some(bos) = tokenizer.bos_id {
        out.tokens.push(bos);
        out.mask.push(0);
    }
    let push = |text: &str, trained: bool, out: &mut Rendered| -> Result<(), String> {
        let ids = tokenizer.encode(text).map_err(|e| e.to_string())?;
        out.mask.extend(std::iter::repeat_n(u8::from(trained), ids.len()));
        out.tokens.extend(ids);
        Ok(())
    };
    for (i, m) in messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(format!("message {i}: role {:?}; expected system, user or assistant", m.role));
        }
        push(template.prefix(&m.role), false, &mut out)?;
        let assistant = m.role == "assistant";
        push(&m.content, assistant, &mut out)?;
        if assistant {
            out.tokens.push(tokenizer.eos_id);
            out.mask.push(1);
        }
        if i + 1 < messages.len() {
            push(&template.separator, false, &mut out)?;
        }
    }
    Ok(out)
}

/// The tokens a new assistant turn after `messages` starts from (generation prompts: GRPO
/// rollouts, evaluation), tokenized exactly as [`render`] tokenizes conversations.
pub fn render_prompt(
    template: &ChatTemplate,
    tokenizer: &TextTokenizer,
    messages: &[Message],
) -> Result<Vec<u32>, String> {
    let mut r = render(template, tokenizer, messages)?;
    if !messages.is_empty() {
        let separator = tokenizer.encode(&template.separator).map_err(|e| e.to_string())?;
        r.tokens.extend(separator);
    }
    r.tokens.extend(tokenizer.encode(&template.assistant).map_err(|e| e.to_string())?);
    Ok(r.tokens)
}

/// Reads prompts with reference answers, one `{"prompt": "...", "answer": ...}` per line
/// (GRPO prompts, held-out sets; a numeric answer is taken as written). Errors name the
/// line; an empty file is refused.
pub fn read_prompts(path: &Path) -> Result<Vec<(String, String)>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad =
            |reason: String| DataError::Input { path: path.to_path_buf(), reason: format!("line {}: {reason}", i + 1) };
        let v: serde_json::Value =
            serde_json::from_str(crate::without_bom(line, i == 0)).map_err(|e| bad(e.to_string()))?;
        let answer = match &v["answer"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => return Err(bad("expected {\"prompt\": \"...\", \"answer\": \"...\"}".into())),
        };
        let prompt =
            v["prompt"].as_str().ok_or_else(|| bad("expected {\"prompt\": \"...\", \"answer\": \"...\"}".into()))?;
        out.push((prompt.to_string(), answer));
    }
    if out.is_empty() {
        return Err(DataError::Input { path: path.to_path_buf(), reason: "no prompts in the file".into() });
    }
    Ok(out)
}

/// The prompts of `path` ([`read_prompts`]) as generation prompts — each one user turn of
/// `template`, encoded by [`render_prompt`] — with their answers. A prompt that leaves no
/// room for `max_new_tokens` within `max_seq_len` is refused, naming its line.
pub fn encode_prompts(
    path: &Path,
    template: &ChatTemplate,
    tokenizer: &TextTokenizer,
    (max_seq_len, max_new_tokens): (usize, usize),
) -> Result<Vec<(Vec<i64>, String)>, DataError> {
    let room = max_seq_len.saturating_sub(max_new_tokens);
    let mut out = Vec::new();
    for (i, (prompt, answer)) in read_prompts(path)?.into_iter().enumerate() {
        let bad = |reason: String| DataError::Input {
            path: path.to_path_buf(),
            reason: format!("prompt {}: {reason}", i + 1),
        };
        let user = [Message { role: "user".into(), content: prompt }];
        let tokens = render_prompt(template, tokenizer, &user).map_err(bad)?;
        if tokens.len() > room {
            return Err(bad(format!(
                "{} tokens; with {max_new_tokens} new tokens it exceeds the model's max_seq_len {max_seq_len}",
                tokens.len()
            )));
        }
        out.push((tokens.into_iter().map(i64::from).collect(), answer));
    }
    Ok(out)
}

/// What to do with a conversation longer than the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlong {
    /// Keep its first `max_tokens` tokens.
    Truncate,
    /// Leave it out.
    Drop,
}

/// Options of [`prepare_sft`].
#[derive(Debug, Clone)]
pub struct SftPrepareOptions {
    /// JSONL files of conversations.
    pub inputs: Vec<PathBuf>,
    /// Output directory (new or empty unless `overwrite`).
    pub out_dir: PathBuf,
    /// The tokenizer (`tokenizer.json`; the model's).
    pub tokenizer: PathBuf,
    /// The chat template.
    pub template: ChatTemplate,
    /// Longest conversation kept, in tokens.
    pub max_tokens: u32,
    /// What happens to longer ones.
    pub overlong: Overlong,
    /// Replace an existing prepared directory.
    pub overwrite: bool,
}

/// `manifest.json` of a prepared SFT directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftManifest {
    /// [`FORMAT`].
    pub format: String,
    /// The input files.
    pub source: String,
    /// The tokenizer.
    pub tokenizer: TokenizerInfo,
    /// The chat template.
    pub template: ChatTemplate,
    /// Conversations kept.
    pub conversations: u64,
    /// Tokens of the kept conversations.
    pub tokens: u64,
    /// Tokens trained on (assistant words and their EOS).
    pub trained_tokens: u64,
    /// Conversations left out because no assistant turn had any token.
    pub skipped_no_assistant: u64,
    /// Conversations cut to `max_tokens`.
    pub truncated: u64,
    /// Conversations left out for being longer than `max_tokens`.
    pub dropped_overlong: u64,
    /// The length limit.
    pub max_tokens: u32,
    /// sha256 of every data file.
    pub files: BTreeMap<String, String>,
}

impl SftManifest {
    /// Reads `<dir>/manifest.json` if it is an SFT manifest (`Ok(None)` for another format).
    pub fn load(dir: &Path) -> Result<Option<Self>, DataError> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(DataError::ManifestMissing { path }),
            Err(e) => return Err(DataError::io(path, e)),
        };
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| DataError::ManifestInvalid { path: path.clone(), reason: e.to_string() })?;
        if v["format"] != FORMAT {
            return Ok(None);
        }
        let manifest: Self = serde_json::from_value(v)
            .map_err(|e| DataError::ManifestInvalid { path: path.clone(), reason: e.to_string() })?;
        let names = std::iter::once(("tokenizer.file", &manifest.tokenizer.file));
        for (what, name) in names.chain(manifest.files.keys().map(|n| ("files entry", n))) {
            crate::manifest::check_file_name(what, name)
                .map_err(|reason| DataError::ManifestInvalid { path: path.clone(), reason })?;
        }
        Ok(Some(manifest))
    }
}

/// Tokenizes conversations into `opts.out_dir` (see the module docs); returns the manifest.
pub fn prepare_sft(opts: &SftPrepareOptions) -> Result<SftManifest, DataError> {
    if opts.inputs.is_empty() {
        return Err(DataError::Input { path: PathBuf::new(), reason: "no --input given".into() });
    }
    if opts.max_tokens < 2 {
        return Err(DataError::Input {
            path: opts.out_dir.clone(),
            reason: format!("--max-tokens {}: a conversation needs at least 2 tokens to train on", opts.max_tokens),
        });
    }
    let dir = &opts.out_dir;
    let out = OutputDir::claim(dir, opts.overwrite, written_by_prepare_sft)?;
    let tokenizer = crate::load_tokenizer(&opts.tokenizer)?;
    let tokenizer_path = dir.join(TOKENIZER_FILE);
    tokenizer
        .inner
        .save(&tokenizer_path, false)
        .map_err(|e| DataError::Tokenizer { path: tokenizer_path.clone(), reason: e.to_string() })?;

    let create = |name: &str| -> Result<BufWriter<File>, DataError> {
        let path = dir.join(name);
        File::create(&path).map(BufWriter::new).map_err(|e| DataError::io(path, e))
    };
    let (mut tokens_out, mut mask_out, mut index_out) = (create(TOKENS_FILE)?, create(MASK_FILE)?, create(INDEX_FILE)?);
    let mut m = SftManifest {
        format: FORMAT.into(),
        source: opts.inputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        tokenizer: TokenizerInfo {
            file: TOKENIZER_FILE.into(),
            sha256: sha256_file(&tokenizer_path)?,
            vocab_size: tokenizer.vocab_size,
            eos_id: tokenizer.eos_id,
            bos_id: tokenizer.bos_id,
        },
        template: opts.template.clone(),
        conversations: 0,
        tokens: 0,
        trained_tokens: 0,
        skipped_no_assistant: 0,
        truncated: 0,
        dropped_overlong: 0,
        max_tokens: opts.max_tokens,
        files: BTreeMap::new(),
    };
    for input in &opts.inputs {
        let file = File::open(input).map_err(|e| DataError::io(input, e))?;
        for (line_no, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| DataError::io(input, e))?;
            if line.trim().is_empty() {
                continue;
            }
            let at = |reason: String| DataError::Input {
                path: input.clone(),
                reason: format!("line {}: {reason}", line_no + 1),
            };
            #[derive(Deserialize)]
            struct Record {
                messages: Vec<Message>,
            }
            let record: Record = serde_json::from_str(crate::without_bom(&line, line_no == 0))
                .map_err(|e| at(format!("{e}; expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}]}}")))?;
            let mut r = render(&opts.template, &tokenizer, &record.messages).map_err(at)?;
            if r.tokens.len() > opts.max_tokens as usize {
                if opts.overlong == Overlong::Drop {
                    m.dropped_overlong += 1;
                    continue;
                }
                r.tokens.truncate(opts.max_tokens as usize);
                r.mask.truncate(opts.max_tokens as usize);
                m.truncated += 1;
            }
            // Targets are tokens 1.. (the first token is never predicted).
            let trained = r.mask.iter().skip(1).filter(|&&b| b == 1).count() as u32;
            if trained == 0 {
                m.skipped_no_assistant += 1;
                continue;
            }
            let io = |e| DataError::io(dir, e);
            index_out.write_all(&m.tokens.to_le_bytes()).map_err(io)?;
            index_out.write_all(&(r.tokens.len() as u32).to_le_bytes()).map_err(io)?;
            index_out.write_all(&trained.to_le_bytes()).map_err(io)?;
            for t in &r.tokens {
                tokens_out.write_all(&t.to_le_bytes()).map_err(io)?;
            }
            mask_out.write_all(&r.mask).map_err(io)?;
            m.conversations += 1;
            m.tokens += r.tokens.len() as u64;
            m.trained_tokens += trained as u64;
        }
    }
    for (name, w) in [(TOKENS_FILE, tokens_out), (MASK_FILE, mask_out), (INDEX_FILE, index_out)] {
        let file = w.into_inner().map_err(|e| DataError::io(dir.join(name), e.into_error()))?;
        file.sync_all().map_err(|e| DataError::io(dir.join(name), e))?;
        m.files.insert(name.into(), sha256_file(&dir.join(name))?);
    }
    if m.conversations == 0 {
        return Err(DataError::Input {
            path: opts.inputs[0].clone(),
            reason: format!(
                "no conversation to train on ({} without assistant tokens, {} too long)",
                m.skipped_no_assistant, m.dropped_overlong
            ),
        });
    }
    let text =
        serde_json::to_string_pretty(&m).map_err(|e| DataError::Input { path: dir.clone(), reason: e.to_string() })?;
    let tmp = dir.join(format!(".{MANIFEST_FILE}.tmp"));
    std::fs::write(&tmp, text).map_err(|e| DataError::io(&tmp, e))?;
    std::fs::rename(&tmp, dir.join(MANIFEST_FILE)).map_err(|e| DataError::io(dir.join(MANIFEST_FILE), e))?;
    out.publish();
    Ok(m)
}

/// The files an SFT preparation writes (see [`OutputDir`]).
fn written_by_prepare_sft(name: &str) -> bool {
    [TOKENIZER_FILE, TOKENS_FILE, MASK_FILE, INDEX_FILE].contains(&name) || name == format!(".{MANIFEST_FILE}.tmp")
}

/// One conversation in the store.
#[derive(Debug, Clone, Copy)]
struct Conversation {
    start: u64,
    len: u32,
}

/// A prepared SFT directory, packed into rows of `seq_len` slots.
pub struct SftData {
    dir: PathBuf,
    manifest: SftManifest,
    tokens: Mmap,
    mask: Mmap,
    conversations: Vec<Conversation>,
    /// Row `r` holds conversations `members[row_start[r]..row_start[r + 1]]`: (index, slots).
    row_start: Vec<u32>,
    members: Vec<(u32, u32)>,
    /// Trained targets per row.
    row_trained: Vec<u32>,
    seq_len: u32,
    /// Conversations longer than a row, and the trained targets cut off with their ends.
    cut: Truncation,
}

/// What packing into rows of `seq_len` cut off: conversations longer than a row keep their
/// first `seq_len + 1` tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Truncation {
    /// Conversations cut.
    pub conversations: u64,
    /// Trained (assistant) targets lost with their ends.
    pub trained_targets: u64,
}

/// One packed row, as the model takes it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PackedRow {
    /// Input ids.
    pub inputs: Vec<i64>,
    /// Next-token targets.
    pub targets: Vec<i64>,
    /// Loss weights (1 trained, 0 not).
    pub weights: Vec<f32>,
    /// Position of each slot inside its conversation.
    pub positions: Vec<i64>,
    /// Segment of each slot (conversations numbered from 0; padding is -1).
    pub segments: Vec<i64>,
}

impl SftData {
    /// Opens `dir`, checks it against the model's vocabulary (`model_vocab`) and, if
    /// `verify_checksums`, every file's sha256, and packs it into rows of `seq_len` slots
    /// in the order seeded by `seed`.
    pub fn open(
        dir: &Path,
        seq_len: u32,
        model_vocab: u32,
        seed: u64,
        verify_checksums: bool,
    ) -> Result<Self, DataError> {
        let manifest = SftManifest::load(dir)?.ok_or_else(|| DataError::ManifestInvalid {
            path: dir.join(MANIFEST_FILE),
            reason: format!(
                "not an SFT directory (format is not {FORMAT}); prepare it with `moxin-train data prepare-sft`"
            ),
        })?;
        if manifest.tokenizer.vocab_size > model_vocab {
            return Err(DataError::Input {
                path: dir.to_path_buf(),
                reason: format!(
                    "the tokenizer has {} ids, the model's vocabulary only {model_vocab}",
                    manifest.tokenizer.vocab_size
                ),
            });
        }
        let map = |name: &str| -> Result<Mmap, DataError> {
            let path = dir.join(name);
            if verify_checksums {
                let got = sha256_file(&path)?;
                if manifest.files.get(name) != Some(&got) {
                    return Err(DataError::Input {
                        path,
                        reason: "sha256 does not match the manifest; the file is corrupt, prepare the data again"
                            .into(),
                    });
                }
            }
            let file = File::open(&path).map_err(|e| DataError::io(&path, e))?;
            // SAFETY: prepared files are never rewritten in place (prepare unpublishes the
            // manifest first and recreates them).
            #[allow(unsafe_code)]
            unsafe { Mmap::map(&file) }.map_err(|e| DataError::io(&path, e))
        };
        let (tokens, mask, index) = (map(TOKENS_FILE)?, map(MASK_FILE)?, map(INDEX_FILE)?);
        let bad = |reason: String| DataError::Input { path: dir.to_path_buf(), reason };
        if Some(tokens.len() as u64) != manifest.tokens.checked_mul(4) || mask.len() as u64 != manifest.tokens {
            return Err(bad("tokens.bin or mask.bin do not match the manifest's token count".into()));
        }
        if Some(index.len() as u64) != manifest.conversations.checked_mul(INDEX_RECORD as u64) {
            return Err(bad("conversations.bin does not match the manifest's conversation count".into()));
        }
        let conversations: Vec<Conversation> = index
            .chunks_exact(INDEX_RECORD)
            .map(|r| Conversation {
                start: u64::from_le_bytes(r[0..8].try_into().expect("8 bytes")),
                len: u32::from_le_bytes(r[8..12].try_into().expect("4 bytes")),
            })
            .collect();
        if let Some(c) =
            conversations.iter().find(|c| c.start.checked_add(c.len as u64).is_none_or(|end| end > manifest.tokens))
        {
            return Err(bad(format!("a conversation at token {} runs past the end of tokens.bin", c.start)));
        }
        if seq_len == 0 {
            return Err(bad("seq_len 0".into()));
        }
        let mut data = SftData {
            dir: dir.to_path_buf(),
            manifest,
            tokens,
            mask,
            conversations,
            row_start: vec![0],
            members: Vec::new(),
            row_trained: Vec::new(),
            seq_len,
            cut: Truncation::default(),
        };
        data.pack(seed);
        if data.row_trained.is_empty() {
            return Err(bad("no conversation has two tokens to train on".into()));
        }
        if data.row_trained.iter().all(|&t| t == 0) {
            return Err(bad(format!(
                "no trained (assistant) token fits in rows of {seq_len} tokens: {} of {} conversations are \
                 longer and lose their answers; raise train.seq_len (up to the model's max_seq_len)",
                data.cut.conversations,
                data.conversations.len()
            )));
        }
        Ok(data)
    }

    fn pack(&mut self, seed: u64) {
        let n = self.conversations.len() as u64;
        let order = SampleOrder::new(n.max(1), seed);
        let (mut used, mut trained) = (0u32, 0u32);
        for i in 0..n {
            let c = order.sample_at(i) as u32;
            let conv = self.conversations[c as usize];
            let slots = (conv.len.min(self.seq_len.saturating_add(1))).saturating_sub(1);
            if slots == 0 {
                continue;
            }
            if slots + 1 < conv.len {
                let (kept_end, end) =
                    (conv.start as usize + 1 + slots as usize, (conv.start + conv.len as u64) as usize);
                self.cut.conversations += 1;
                self.cut.trained_targets += self.mask[kept_end..end].iter().filter(|&&b| b == 1).count() as u64;
            }
            if slots > self.seq_len - used {
                self.row_start.push(self.members.len() as u32);
                self.row_trained.push(trained);
                (used, trained) = (0, 0);
            }
            let first = conv.start as usize + 1;
            trained += self.mask[first..first + slots as usize].iter().filter(|&&b| b == 1).count() as u32;
            self.members.push((c, slots));
            used += slots;
        }
        if used > 0 {
            self.row_start.push(self.members.len() as u32);
            self.row_trained.push(trained);
        }
    }

    /// Packed rows (the samples of an epoch).
    pub fn num_rows(&self) -> u64 {
        self.row_trained.len() as u64
    }

    /// What packing cut off (conversations longer than a row).
    pub fn truncation(&self) -> Truncation {
        self.cut
    }

    /// Trained targets in row `row`.
    pub fn trained_in_row(&self, row: u64) -> u32 {
        self.row_trained[row as usize]
    }

    /// The manifest.
    pub fn manifest(&self) -> &SftManifest {
        &self.manifest
    }

    /// The prepared directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Slots per row.
    pub fn seq_len(&self) -> u32 {
        self.seq_len
    }

    fn token(&self, i: usize) -> i64 {
        u32::from_le_bytes(self.tokens[4 * i..4 * i + 4].try_into().expect("4 bytes")) as i64
    }

    /// Appends row `row` to `out` (each field grows by `seq_len`); padding is `pad`.
    pub fn read_row(&self, row: u64, pad: i64, out: &mut PackedRow) {
        let (a, b) = (self.row_start[row as usize] as usize, self.row_start[row as usize + 1] as usize);
        let mut used = 0;
        for (segment, &(c, slots)) in self.members[a..b].iter().enumerate() {
            let start = self.conversations[c as usize].start as usize;
            for p in 0..slots as usize {
                out.inputs.push(self.token(start + p));
                out.targets.push(self.token(start + p + 1));
                out.weights.push(f32::from(self.mask[start + p + 1]));
                out.positions.push(p as i64);
                out.segments.push(segment as i64);
            }
            used += slots as usize;
        }
        let pad_slots = self.seq_len as usize - used;
        out.inputs.extend(std::iter::repeat_n(pad, pad_slots));
        out.targets.extend(std::iter::repeat_n(pad, pad_slots));
        out.weights.extend(std::iter::repeat_n(0.0, pad_slots));
        out.positions.extend(0..pad_slots as i64);
        out.segments.extend(std::iter::repeat_n(-1, pad_slots));
    }
}

#[cfg(test)]
#[path = "sft_tests.rs"]
mod tests;
