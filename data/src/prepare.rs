use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::manifest::{sha256_file, MANIFEST_FILE};
use crate::output_dir::OutputDir;
use crate::{train_bpe, DataError, Manifest, ShardInfo, TextTokenizer, TokenDtype, TokenizerInfo};

/// Where the tokenizer of a prepared directory comes from.
#[derive(Debug, Clone)]
pub enum TokenizerSource {
    /// Load an existing Hugging Face `tokenizer.json`.
    File(PathBuf),
    /// Train a byte-level BPE with this many ids on the inputs.
    Train {
        /// Target vocabulary size, special tokens included.
        vocab_size: u32,
    },
}

/// Options of [`prepare`].
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// `.txt` / `.jsonl` files, or directories searched recursively for them.
    pub inputs: Vec<PathBuf>,
    /// Output directory; must be empty or absent unless `overwrite`.
    pub out_dir: PathBuf,
    /// The tokenizer to use.
    pub tokenizer: TokenizerSource,
    /// Field holding the text in `.jsonl` records.
    pub jsonl_text_field: String,
    /// Tokens per shard file.
    pub shard_tokens: u64,
    /// Replace an existing prepared directory.
    pub overwrite: bool,
    /// Draw progress bars on stderr.
    pub progress: bool,
}

impl PrepareOptions {
    /// Defaults for the given inputs, output and tokenizer.
    pub fn new(inputs: Vec<PathBuf>, out_dir: PathBuf, tokenizer: TokenizerSource) -> Self {
        PrepareOptions {
            inputs,
            out_dir,
            tokenizer,
            jsonl_text_field: "text".into(),
            shard_tokens: 100_000_000,
            overwrite: false,
            progress: false,
        }
    }
}

const TOKENIZER_FILE: &str = "tokenizer.json";
const ENCODE_BATCH_BYTES: usize = 8 << 20;

/// Tokenizes the inputs into `out_dir`: `tokenizer.json`, `shard-NNNNN.bin` files and,
/// written last and atomically, `manifest.json`. A crash midway never leaves a directory
/// that looks prepared.
pub fn prepare(opts: &PrepareOptions) -> Result<Manifest, DataError> {
    if opts.shard_tokens == 0 {
        return Err(DataError::Input {
            path: opts.out_dir.clone(),
            reason: "--shard-tokens 0: a shard holds at least one token; give a positive count (default 100000000)"
                .into(),
        });
    }
    let files = collect_inputs(&opts.inputs)?;
    let total_bytes: u64 = files.iter().map(|f| f.1).sum();
    let files: Vec<PathBuf> = files.into_iter().map(|f| f.0).collect();
    let source = files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
    let docs = || Documents::new(&files, &opts.jsonl_text_field);
    run(docs, total_bytes, source, opts)
}

/// Prepares in-memory documents (the built-in corpus) into `out_dir`, replacing what is there.
pub(crate) fn prepare_documents(
    documents: &[String],
    source: String,
    out_dir: &Path,
    tokenizer: &TokenizerSource,
) -> Result<Manifest, DataError> {
    let mut opts = PrepareOptions::new(Vec::new(), out_dir.to_path_buf(), tokenizer.clone());
    opts.overwrite = true;
    let total_bytes = documents.iter().map(|d| d.len() as u64).sum();
    run(|| documents.iter().map(|d| Ok(d.clone())), total_bytes, source, &opts)
}

fn run<F, I>(documents: F, total_bytes: u64, source: String, opts: &PrepareOptions) -> Result<Manifest, DataError>
where
    F: Fn() -> I,
    I: Iterator<Item = Result<String, DataError>> + Send,
{
    let out = OutputDir::claim(&opts.out_dir, opts.overwrite, written_by_prepare)?;
    let tokenizer = match &opts.tokenizer {
        TokenizerSource::File(path) => crate::load_tokenizer(path)?,
        TokenizerSource::Train { vocab_size } => {
            let failure = Mutex::new(None);
            let docs = documents().map_while(|doc| doc.map_err(|e| *failure.lock().unwrap() = Some(e)).ok());
            let tokenizer = train_bpe(docs, *vocab_size, opts.progress)?;
            if let Some(e) = failure.into_inner().unwrap() {
                return Err(e);
            }
            if tokenizer.vocab_size < *vocab_size {
                tracing::warn!(
                    "the tokenizer has {} tokens, not the {vocab_size} asked for: the text ran out of pairs to \
                     merge (more text gives a larger vocabulary; a model's vocab_size may exceed the tokenizer's)",
                    tokenizer.vocab_size
                );
            }
            tokenizer
        }
    };
    let tokenizer_path = opts.out_dir.join(TOKENIZER_FILE);
    tokenizer
        .inner
        .save(&tokenizer_path, false)
        .map_err(|e| DataError::Tokenizer { path: tokenizer_path.clone(), reason: e.to_string() })?;

    let dtype = TokenDtype::for_vocab(tokenizer.vocab_size);
    let mut shards = ShardWriter::new(&opts.out_dir, dtype, opts.shard_tokens);
    let bar = progress_bar(opts.progress, total_bytes);
    let (mut count, mut text_tokens) = (0u64, 0u64);
    let mut batch: Vec<String> = Vec::new();
    let mut batch_bytes = 0usize;
    for doc in documents() {
        let doc = doc?;
        batch_bytes += doc.len();
        batch.push(doc);
        if batch_bytes >= ENCODE_BATCH_BYTES {
            let (docs, tokens) = encode_batch(&tokenizer, &mut batch, &mut shards)?;
            (count, text_tokens) = (count + docs, text_tokens + tokens);
            bar.inc(batch_bytes as u64);
            batch_bytes = 0;
        }
    }
    let (docs, tokens) = encode_batch(&tokenizer, &mut batch, &mut shards)?;
    (count, text_tokens) = (count + docs, text_tokens + tokens);
    bar.inc(batch_bytes as u64);
    bar.finish_and_clear();
    if text_tokens == 0 {
        return Err(DataError::Input {
            path: PathBuf::from(&source),
            reason: "holds no text to train on; give files with text in them".into(),
        });
    }

    let shards = shards.finish()?;
    let info = TokenizerInfo {
        file: TOKENIZER_FILE.into(),
        sha256: sha256_file(&tokenizer_path)?,
        vocab_size: tokenizer.vocab_size,
        eos_id: tokenizer.eos_id,
        bos_id: tokenizer.bos_id,
    };
    let manifest = Manifest::new(source, info, dtype, count, shards);
    manifest.write(&opts.out_dir)?;
    out.publish();
    Ok(manifest)
}

/// The files a preparation writes (see [`OutputDir`]).
fn written_by_prepare(name: &str) -> bool {
    name == TOKENIZER_FILE
        || name == format!(".{MANIFEST_FILE}.tmp")
        || (name.starts_with("shard-") && name.ends_with(".bin"))
}

fn progress_bar(show: bool, total_bytes: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total_bytes);
    bar.set_style(
        ProgressStyle::with_template("tokenizing {bar:40} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})")
            .expect("valid template"),
    );
    bar
}

/// Encodes and writes `batch`; returns the documents and their tokens (end-of-document
/// markers not counted).
fn encode_batch(
    tokenizer: &TextTokenizer,
    batch: &mut Vec<String>,
    shards: &mut ShardWriter,
) -> Result<(u64, u64), DataError> {
    if batch.is_empty() {
        return Ok((0, 0));
    }
    let docs = std::mem::take(batch);
    let encodings = tokenizer
        .inner
        .encode_batch(docs, false)
        .map_err(|e| DataError::Tokenizer { path: "<inputs>".into(), reason: e.to_string() })?;
    let (n, mut tokens) = (encodings.len() as u64, 0u64);
    for enc in encodings {
        tokens += enc.get_ids().len() as u64;
        shards.push(enc.get_ids())?;
        shards.push(&[tokenizer.eos_id])?;
    }
    Ok((n, tokens))
}

/// Expands files and directories into `(file, size)` of `.txt`/`.jsonl`, sorted for determinism.
fn collect_inputs(inputs: &[PathBuf]) -> Result<Vec<(PathBuf, u64)>, DataError> {
    if inputs.is_empty() {
        return Err(DataError::Input { path: PathBuf::new(), reason: "no --input given".into() });
    }
    let mut out = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DataError::Input { path: input.clone(), reason: "input not found".into() },
            _ => DataError::io(input, e),
        })?;
        if meta.is_dir() {
            let before = out.len();
            walk(input, &mut out)?;
            if out.len() == before {
                return Err(DataError::Input {
                    path: input.clone(),
                    reason: "directory has no .txt or .jsonl files".into(),
                });
            }
        } else if is_text_input(input) {
            out.push((input.clone(), meta.len()));
        } else {
            return Err(DataError::Input {
                path: input.clone(),
                reason: "unsupported input; expected a .txt or .jsonl file or a directory of them".into(),
            });
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64)>) -> Result<(), DataError> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| DataError::io(dir, e)))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for path in entries {
        let meta = std::fs::metadata(&path).map_err(|e| DataError::io(&path, e))?;
        if meta.is_dir() {
            walk(&path, out)?;
        } else if is_text_input(&path) {
            out.push((path, meta.len()));
        }
    }
    Ok(())
}

fn is_text_input(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("txt" | "jsonl"))
}

/// Streams documents: a `.txt` file is one document; each line of a `.jsonl` file is a JSON
/// object whose text field is one document (blank lines are skipped).
struct Documents<'a> {
    files: std::slice::Iter<'a, PathBuf>,
    field: &'a str,
    jsonl: Option<(PathBuf, std::io::Lines<BufReader<File>>, usize)>,
}

impl<'a> Documents<'a> {
    fn new(files: &'a [PathBuf], field: &'a str) -> Self {
        Documents { files: files.iter(), field, jsonl: None }
    }

    fn next_jsonl(&mut self) -> Option<Result<String, DataError>> {
        let (path, lines, line_no) = self.jsonl.as_mut()?;
        loop {
            *line_no += 1;
            let line = match lines.next()? {
                Ok(line) => line,
                Err(e) => return Some(Err(DataError::io(path.clone(), e))),
            };
            if line.trim().is_empty() {
                continue;
            }
            let bad = |reason: String| DataError::Input {
                path: PathBuf::from(format!("{}:{}", path.display(), line_no)),
                reason,
            };
            let value: serde_json::Value = match serde_json::from_str(crate::without_bom(&line, *line_no == 1)) {
                Ok(v) => v,
                Err(e) => return Some(Err(bad(format!("not valid JSON: {e}")))),
            };
            return Some(match value.get(self.field).and_then(|t| t.as_str()) {
                Some(text) => Ok(text.to_string()),
                None => Err(bad(format!(
                    "no string field {:?}; pass --text-field to name the field holding the text",
                    self.field
                ))),
            });
        }
    }
}

impl Iterator for Documents<'_> {
    type Item = Result<String, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(doc) = self.next_jsonl() {
                return Some(doc);
            }
            self.jsonl = None;
            let path = self.files.next()?;
            if path.extension().and_then(|e| e.to_str()) == Some("jsonl") {
                match File::open(path) {
                    Ok(f) => self.jsonl = Some((path.clone(), BufReader::new(f).lines(), 0)),
                    Err(e) => return Some(Err(DataError::io(path, e))),
                }
                continue;
            }
            return Some(std::fs::read(path).map_err(|e| DataError::io(path, e)).and_then(|bytes| {
                String::from_utf8(bytes)
                    .map(|mut text| {
                        // In place: a whole file is not copied for three bytes.
                        let bom = text.len() - crate::without_bom(&text, true).len();
                        text.drain(..bom);
                        text
                    })
                    .map_err(|e| DataError::Input {
                        path: path.clone(),
                        reason: format!("not valid UTF-8 (byte {})", e.utf8_error().valid_up_to()),
                    })
            }));
        }
    }
}

/// Appends token ids to numbered shard files, hashing as it writes.
struct ShardWriter {
    dir: PathBuf,
    dtype: TokenDtype,
    shard_tokens: u64,
    current: Option<(String, BufWriter<File>, Sha256, u64)>,
    done: Vec<ShardInfo>,
}

impl ShardWriter {
    fn new(dir: &Path, dtype: TokenDtype, shard_tokens: u64) -> Self {
        ShardWriter { dir: dir.to_path_buf(), dtype, shard_tokens, current: None, done: Vec::new() }
    }

    fn push(&mut self, ids: &[u32]) -> Result<(), DataError> {
        let mut rest = ids;
        while !rest.is_empty() {
            if self.current.is_none() {
                let name = format!("shard-{:05}.bin", self.done.len());
                let path = self.dir.join(&name);
                let file = File::create(&path).map_err(|e| DataError::io(&path, e))?;
                self.current = Some((name, BufWriter::with_capacity(1 << 20, file), Sha256::new(), 0));
            }
            let (name, writer, hasher, count) = self.current.as_mut().expect("just opened");
            let room = (self.shard_tokens - *count) as usize;
            let (now, later) = rest.split_at(rest.len().min(room));
            let mut bytes = Vec::with_capacity(now.len() * self.dtype.bytes() as usize);
            for &id in now {
                match self.dtype {
                    TokenDtype::U16 => bytes.extend_from_slice(&(id as u16).to_le_bytes()),
                    TokenDtype::U32 => bytes.extend_from_slice(&id.to_le_bytes()),
                }
            }
            hasher.update(&bytes);
            writer.write_all(&bytes).map_err(|e| DataError::io(self.dir.join(&*name), e))?;
            *count += now.len() as u64;
            rest = later;
            if *count == self.shard_tokens {
                self.close()?;
            }
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), DataError> {
        if let Some((name, writer, hasher, tokens)) = self.current.take() {
            let path = self.dir.join(&name);
            let file = writer.into_inner().map_err(|e| DataError::io(&path, e.into_error()))?;
            file.sync_all().map_err(|e| DataError::io(&path, e))?;
            self.done.push(ShardInfo { file: name, tokens, sha256: hex::encode(hasher.finalize()) });
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<ShardInfo>, DataError> {
        self.close()?;
        Ok(self.done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepares_txt_and_jsonl_into_small_shards() {
        let tmp = tempfile::tempdir().unwrap();
        let input = tmp.path().join("in");
        std::fs::create_dir_all(input.join("sub")).unwrap();
        std::fs::write(input.join("a.txt"), "hello world, hello moxin").unwrap();
        std::fs::write(input.join("sub/b.jsonl"), "{\"text\": \"second doc\"}\n\n{\"text\": \"third\"}\n").unwrap();
        std::fs::write(input.join("ignored.bin"), [0u8, 1, 2]).unwrap();
        let mut opts = PrepareOptions::new(
            vec![input.clone()],
            tmp.path().join("out"),
            TokenizerSource::Train { vocab_size: 300 },
        );
        opts.shard_tokens = 7;
        let manifest = prepare(&opts).unwrap();
        assert_eq!(manifest.documents, 3);
        assert_eq!(manifest.dtype, TokenDtype::U16);
        assert!(manifest.shards.len() > 1);
        assert!(manifest.shards.iter().all(|s| s.tokens <= 7));
        let loaded = Manifest::load(&opts.out_dir).unwrap();
        assert_eq!(loaded, manifest);
        loaded.verify(&opts.out_dir, true).unwrap();

        // A second prepare into the same directory is refused, and the data stays valid.
        let err = prepare(&opts).unwrap_err().to_string();
        assert!(err.contains("not empty") && err.contains("--overwrite"), "{err}");
        Manifest::load(&opts.out_dir).unwrap().verify(&opts.out_dir, true).unwrap();
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_first_line() {
        let tmp = tempfile::tempdir().unwrap();
        let (jsonl, txt) = (tmp.path().join("a.jsonl"), tmp.path().join("b.txt"));
        std::fs::write(&jsonl, "\u{feff}{\"text\": \"one\"}\n{\"text\": \"two\"}\n").unwrap();
        std::fs::write(&txt, "\u{feff}three").unwrap();
        let files = [jsonl.clone(), txt.clone()];
        let docs: Vec<String> = Documents::new(&files, "text").collect::<Result<_, _>>().unwrap();
        assert_eq!(docs, ["one", "two", "three"]);
        let prompts = tmp.path().join("p.jsonl");
        std::fs::write(&prompts, "\u{feff}{\"prompt\": \"1 + 1?\", \"answer\": 2}\n").unwrap();
        assert_eq!(crate::sft::read_prompts(&prompts).unwrap(), [("1 + 1?".to_string(), "2".to_string())]);
    }

    #[test]
    fn bad_jsonl_names_file_and_line() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("x.jsonl");
        std::fs::write(&f, "{\"text\": \"ok\"}\n{\"body\": \"no text\"}\n").unwrap();
        let opts =
            PrepareOptions::new(vec![f.clone()], tmp.path().join("out"), TokenizerSource::Train { vocab_size: 300 });
        let err = prepare(&opts).unwrap_err().to_string();
        assert!(err.contains("x.jsonl:2") && err.contains("--text-field"), "{err}");
        // Nothing is left behind (the tokenizer was trained and saved before the bad line).
        assert!(!tmp.path().join("out").exists());
        // Inputs without text are refused, and leave nothing behind either.
        let blank = tmp.path().join("blank.txt");
        std::fs::write(&blank, "").unwrap();
        let empty =
            PrepareOptions::new(vec![blank], tmp.path().join("out"), TokenizerSource::Train { vocab_size: 300 });
        let err = prepare(&empty).unwrap_err().to_string();
        assert!(err.contains("no text"), "{err}");
        assert!(!tmp.path().join("out").exists());

        // A killed run's files (its marker names a process that is gone) are no obstacle;
        // a live run's are, and so are files of others.
        let out = tmp.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("tokenizer.json"), "partial").unwrap();
        std::fs::write(out.join("shard-00000.bin"), "partial").unwrap();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let dead = gone.id();
        gone.wait().unwrap();
        std::fs::write(out.join(".preparing"), format!("pid {} on {}\n", 1, host.trim())).unwrap();
        std::fs::write(&f, "{\"text\": \"ok\"}\n").unwrap();
        let err = prepare(&opts).unwrap_err().to_string();
        assert!(err.contains("another preparation is writing here (pid 1 on"), "{err}");
        std::fs::write(out.join(".preparing"), format!("pid {dead} on {}\n", host.trim())).unwrap();
        prepare(&opts).unwrap().verify(&out, true).unwrap();
        assert!(!out.join(".preparing").exists());
        std::fs::remove_dir_all(&out).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        std::fs::write(out.join("tokenizer.json"), "mine too").unwrap();
        let err = prepare(&opts).unwrap_err().to_string();
        assert!(err.contains("not empty"), "{err}");
        assert_eq!(std::fs::read_to_string(out.join("tokenizer.json")).unwrap(), "mine too");
    }

    #[test]
    fn overwriting_with_the_directorys_own_tokenizer_keeps_it_when_the_run_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("x.jsonl");
        std::fs::write(&f, "{\"text\": \"a first document\"}\n").unwrap();
        let out = tmp.path().join("out");
        prepare(&PrepareOptions::new(vec![f.clone()], out.clone(), TokenizerSource::Train { vocab_size: 300 }))
            .unwrap();
        let tokenizer = std::fs::read(out.join("tokenizer.json")).unwrap();
        std::fs::write(&f, "{\"text\": \"more\"}\n{\"body\": \"no text\"}\n").unwrap();
        let mut again = PrepareOptions::new(vec![f], out.clone(), TokenizerSource::File(out.join("tokenizer.json")));
        again.overwrite = true;
        let err = prepare(&again).unwrap_err().to_string();
        assert!(err.contains("x.jsonl:2"), "{err}");
        assert_eq!(std::fs::read(out.join("tokenizer.json")).unwrap(), tokenizer, "the tokenizer survives");
        assert!(!out.join("manifest.json").exists() && !out.join(".preparing").exists());
    }
}
