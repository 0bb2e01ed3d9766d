use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

use crate::DataError;

/// Special tokens of tokenizers we train, in id order, matching Llama/Mistral (`<unk>`=0,
/// `<s>`=1, `</s>`=2) so ids line up with the Moxin family's conventions.
pub const SPECIAL_TOKENS: [&str; 3] = ["<unk>", "<s>", "</s>"];

/// End-of-sequence token names recognised in loaded tokenizers, in order of preference.
const EOS_CANDIDATES: [&str; 5] = ["</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "<|im_end|>"];
const BOS_CANDIDATES: [&str; 3] = ["<s>", "<|begin_of_text|>", "<bos>"];

/// A Hugging Face tokenizer plus the ids moxin-train needs from it.
pub struct TextTokenizer {
    /// The tokenizer.
    pub inner: Tokenizer,
    /// Ids the tokenizer can produce (including added tokens).
    pub vocab_size: u32,
    /// Id placed after every document.
    pub eos_id: u32,
    /// Beginning-of-sequence id, if any.
    pub bos_id: Option<u32>,
}

impl TextTokenizer {
    fn from_tokenizer(inner: Tokenizer, origin: &Path) -> Result<Self, DataError> {
        let vocab_size = inner.get_vocab_size(true) as u32;
        let eos_id = EOS_CANDIDATES.iter().find_map(|t| inner.token_to_id(t)).ok_or_else(|| DataError::Tokenizer {
            path: origin.to_path_buf(),
            reason: format!("no end-of-sequence token; expected one of {EOS_CANDIDATES:?}"),
        })?;
        let bos_id = BOS_CANDIDATES.iter().find_map(|t| inner.token_to_id(t));
        Ok(TextTokenizer { inner, vocab_size, eos_id, bos_id })
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| DataError::Tokenizer { path: "<text>".into(), reason: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, DataError> {
        self.inner.decode(ids, true).map_err(|e| DataError::Tokenizer { path: "<ids>".into(), reason: e.to_string() })
    }
}

/// Loads a Hugging Face `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<TextTokenizer, DataError> {
    if !path.exists() {
        return Err(DataError::Input { path: path.to_path_buf(), reason: "tokenizer file not found".into() });
    }
    let bad = |reason: String| DataError::Tokenizer { path: path.to_path_buf(), reason };
    // The tokenizers crate panics on some malformed files (e.g. `"decoder": 0`) instead of
    // returning an error; a file is input, so that is an error here.
    let inner = std::panic::catch_unwind(|| Tokenizer::from_file(path))
        .map_err(|panic| {
            let what =
                panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
            bad(format!("not a valid tokenizer.json (the tokenizers library gave up: {})", what.unwrap_or_default()))
        })?
        .map_err(|e| bad(e.to_string()))?;
    TextTokenizer::from_tokenizer(inner, path)
}

/// Trains a byte-level BPE tokenizer (GPT-2 style pre-tokenisation, no normaliser, so
/// decoding gives back the exact input) with `vocab_size` ids including the special tokens.
pub fn train_bpe<I, S>(documents: I, vocab_size: u32, progress: bool) -> Result<TextTokenizer, DataError>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let err = |reason: String| DataError::Tokenizer { path: "<training>".into(), reason };
    let min_vocab = 256 + SPECIAL_TOKENS.len() as u32;
    if vocab_size < min_vocab {
        return Err(err(format!(
            "vocab size {vocab_size} is below {min_vocab} (256 bytes + {} special tokens)",
            SPECIAL_TOKENS.len()
        )));
    }
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(progress)
        .vocab_size(vocab_size as usize)
        .min_frequency(2)
        .special_tokens(SPECIAL_TOKENS.iter().map(|t| AddedToken::from(t.to_string(), true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let byte_level = ByteLevel::new(false, false, true);
    let mut tokenizer = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<tokenizers::NormalizerWrapper>)
        .with_pre_tokenizer(Some(byte_level))
        .with_post_processor(None::<tokenizers::PostProcessorWrapper>)
        .with_decoder(Some(ByteLevelDecoder::default()))
        .build()
        .map_err(|e| err(e.to_string()))?;
    tokenizer.train(&mut trainer, documents).map_err(|e| err(e.to_string()))?;
    let tokenizer: Tokenizer = tokenizer.into();
    TextTokenizer::from_tokenizer(tokenizer, Path::new("<trained>"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trained_bpe_round_trips_and_has_llama_special_ids() {
        let docs = crate::builtin::corpus(1, 300);
        let tok = train_bpe(docs.iter(), 400, false).unwrap();
        assert_eq!(tok.inner.token_to_id("<unk>"), Some(0));
        assert_eq!(tok.bos_id, Some(1));
        assert_eq!(tok.eos_id, 2);
        assert!(tok.vocab_size <= 400 && tok.vocab_size > 259, "vocab {}", tok.vocab_size);
        for text in [docs[0].as_str(), "  Leading spaces, tabs\tand ünïcødé ✓ 12+30=42\n\n", ""] {
            let ids = tok.encode(text).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), text);
        }
        // Learned merges compress the corpus well below one token per byte.
        let all = docs.join(" ");
        let ids = tok.encode(&all).unwrap();
        assert!(ids.len() * 2 < all.len(), "{} ids for {} bytes", ids.len(), all.len());
    }
}
