//! Batch sources: what one rank trains on in each micro-batch of a step.
//!
//! A [`BatchSource`] turns the data cursor (the first sample of the step's global batch)
//! into this rank's micro-batches: pre-training windows ([`PretrainWindows`]) and packed
//! SFT conversations with loss masks ([`SftPacks`]); GRPO rollouts will be another
//! implementation of the same trait, so the step, the objective and the gradient sync do
//! not change with the data.

use std::ops::Range;

use moxin_data::sft::{PackedRow, SftData};
use moxin_data::{SampleOrder, TokenDataset};
use tch::{Device, Tensor};

use crate::checkpoint::CarriedFile;
use crate::WorkerError;

/// A rank's `slice` of a global batch of `global_batch` samples must be whole
/// micro-batches of `micro` (the coordinator's plan guarantees it; a bad plan is refused).
pub fn check_slice(slice: &Range<u32>, micro: u32, global_batch: u32) -> Result<(), WorkerError> {
    if micro == 0 || slice.is_empty() || slice.end > global_batch || !(slice.len() as u32).is_multiple_of(micro) {
        return Err(WorkerError::Spec(format!(
            "samples {slice:?} of a global batch of {global_batch} are not whole micro-batches of {micro}"
        )));
    }
    Ok(())
}

/// One micro-batch on the compute device.
#[derive(Debug)]
pub struct Batch {
    /// Input tokens `[b, t]` (i64).
    pub inputs: Tensor,
    /// The token each position predicts `[b, t]` (i64).
    pub targets: Tensor,
    /// Per-token loss weight `[b, t]` (fp32; 0 leaves a token out of the loss), or `None`
    /// when every token counts the same.
    pub weights: Option<Tensor>,
    /// How several sequences share each row (positions, attention mask), or `None` for
    /// one sequence per row.
    pub packing: Option<crate::model::Packing>,
    /// Rollout terms (advantages, old and reference log-probs) for the GRPO objective.
    pub rl: Option<crate::rl::grpo::RlTerms>,
}

/// Where a rank's micro-batches come from.
pub trait BatchSource {
    /// Micro-batches this rank runs per optimizer step.
    fn micro_batches(&self) -> usize;
    /// Micro-batch `index` of the step whose global batch starts at sample `cursor`.
    fn micro_batch(&mut self, cursor: u64, index: usize, device: Device) -> Result<Batch, WorkerError>;
    /// Samples the data cursor advances per step (the global batch, over all ranks).
    fn samples_per_step(&self) -> u64;
    /// Tokens trained on per step over all ranks.
    fn tokens_per_step(&self) -> u64;
    /// The number of tokens the loss of the step starting at `cursor` is the mean over
    /// (all ranks together, so the mean is the same whatever the world size).
    fn loss_tokens(&self, cursor: u64) -> f64;
    /// Samples in one pass over the data.
    fn samples_per_epoch(&self) -> u64;
    /// Files a checkpoint carries so it is self-contained, by name (the tokenizer; the chat
    /// template of conversation data).
    fn checkpoint_files(&self) -> Vec<(String, CarriedFile)>;
    /// Called before the micro-batches of the step starting at `cursor`, with the model's
    /// whole parameters and the group: sources that generate their data (GRPO rollouts) do
    /// it here and say what they made.
    fn begin_step(
        &mut self,
        _cursor: u64,
        _model: &crate::model::Transformer,
        _collective: &mut dyn crate::collective::Collective,
    ) -> Result<Option<crate::rl::rollouts::RolloutStats>, WorkerError> {
        Ok(None)
    }
}

/// Pre-training: fixed-length windows of the token stream in a seeded order; each sample
/// is `seq_len + 1` tokens (inputs, and targets shifted by one). Rank `r` takes the samples
/// `cursor + slice` of each global batch, `micro` at a time.
pub struct PretrainWindows {
    data: TokenDataset,
    order: SampleOrder,
    slice: Range<u32>,
    micro: usize,
    global_batch: u32,
    vocab: i64,
    buf: Vec<i64>,
}

impl PretrainWindows {
    /// Windows of `data` in the order seeded by `seed`; this rank trains on `slice` of each
    /// global batch of `global_batch` samples in micro-batches of `micro`. Token ids must be
    /// below `vocab` (the model's vocabulary).
    pub fn new(
        data: TokenDataset,
        seed: u64,
        slice: Range<u32>,
        micro: u32,
        global_batch: u32,
        vocab: u32,
    ) -> Result<Self, WorkerError> {
        check_slice(&slice, micro, global_batch)?;
        let order = SampleOrder::new(data.num_samples(), seed);
        Ok(PretrainWindows {
            data,
            order,
            slice,
            micro: micro as usize,
            global_batch,
            vocab: vocab as i64,
            buf: Vec::new(),
        })
    }
}

impl BatchSource for PretrainWindows {
    fn micro_batches(&self) -> usize {
        self.slice.len() / self.micro
    }

    fn micro_batch(&mut self, cursor: u64, index: usize, device: Device) -> Result<Batch, WorkerError> {
        let first = cursor + self.slice.start as u64 + (index * self.micro) as u64;
        self.buf.clear();
        self.data.read_batch(&self.order, first, self.micro, &mut self.buf);
        let row = self.data.seq_len() as i64 + 1;
        let rows = Tensor::from_slice(&self.buf).view([self.micro as i64, row]).to_device(device);
        // A token id outside the vocabulary would index past the embedding (a crash deep in
        // libtorch); the manifest's checksums normally rule it out, but they are optional.
        if let Some(&bad) = self.buf.iter().find(|&&t| t < 0 || t >= self.vocab) {
            return Err(WorkerError::Data(moxin_data::DataError::Input {
                path: self.data.dir().to_path_buf(),
                reason: format!(
                    "token id {bad} is outside the model's vocabulary of {}; the shards are corrupt, \
                     re-run `moxin-train data prepare` (or set data.verify_checksums = true to find the file)",
                    self.vocab
                ),
            }));
        }
        Ok(Batch {
            inputs: rows.narrow(1, 0, row - 1),
            targets: rows.narrow(1, 1, row - 1),
            weights: None,
            packing: None,
            rl: None,
        })
    }

    fn samples_per_step(&self) -> u64 {
        self.global_batch as u64
    }

    fn tokens_per_step(&self) -> u64 {
        self.global_batch as u64 * self.data.seq_len() as u64
    }

    fn loss_tokens(&self, _cursor: u64) -> f64 {
        self.tokens_per_step() as f64
    }

    fn samples_per_epoch(&self) -> u64 {
        self.data.num_samples()
    }

    fn checkpoint_files(&self) -> Vec<(String, CarriedFile)> {
        let tokenizer = self.data.dir().join(&self.data.manifest().tokenizer.file);
        vec![(crate::checkpoint::TOKENIZER_FILE.into(), CarriedFile::Copy(tokenizer))]
    }
}

/// Supervised fine-tuning: conversations packed into rows of `seq_len` slots
/// ([`SftData`]), rows served in a seeded order per epoch; the loss covers the assistant's
/// tokens only and is their mean over the whole global batch (every rank can count them:
/// the packing is the same everywhere). Rank `r` takes rows `cursor + slice` of each
/// global batch, `micro` at a time.
pub struct SftPacks {
    data: SftData,
    order: SampleOrder,
    slice: Range<u32>,
    micro: usize,
    global_batch: u32,
    vocab: i64,
    window: i64,
    pad: i64,
}

impl SftPacks {
    /// Packed rows of `data` in the order seeded by `seed`; the rest as for
    /// [`PretrainWindows::new`]. `window` is the model's sliding window.
    pub fn new(
        data: SftData,
        seed: u64,
        slice: Range<u32>,
        micro: u32,
        global_batch: u32,
        (vocab, window): (u32, u32),
    ) -> Result<Self, WorkerError> {
        check_slice(&slice, micro, global_batch)?;
        let order = SampleOrder::new(data.num_rows(), seed);
        let pad = data.manifest().tokenizer.eos_id as i64;
        Ok(SftPacks {
            data,
            order,
            slice,
            micro: micro as usize,
            global_batch,
            vocab: vocab as i64,
            window: window as i64,
            pad,
        })
    }
}

impl BatchSource for SftPacks {
    fn micro_batches(&self) -> usize {
        self.slice.len() / self.micro
    }

    fn micro_batch(&mut self, cursor: u64, index: usize, device: Device) -> Result<Batch, WorkerError> {
        let first = cursor + self.slice.start as u64 + (index * self.micro) as u64;
        let mut rows = PackedRow::default();
        for i in 0..self.micro as u64 {
            self.data.read_row(self.order.sample_at(first + i), self.pad, &mut rows);
        }
        if let Some(&bad) = rows.inputs.iter().chain(&rows.targets).find(|&&t| t < 0 || t >= self.vocab) {
            return Err(WorkerError::Data(moxin_data::DataError::Input {
                path: self.data.dir().to_path_buf(),
                reason: format!(
                    "token id {bad} is outside the model's vocabulary of {}; prepare the data again",
                    self.vocab
                ),
            }));
        }
        let shape = [self.micro as i64, self.data.seq_len() as i64];
        let t = |v: &[i64]| Tensor::from_slice(v).view(shape).to_device(device);
        let packing = crate::model::Packing::new(t(&rows.positions), &t(&rows.segments), self.window);
        Ok(Batch {
            inputs: t(&rows.inputs),
            targets: t(&rows.targets),
            weights: Some(Tensor::from_slice(&rows.weights).view(shape).to_device(device)),
            packing: Some(packing),
            rl: None,
        })
    }

    fn samples_per_step(&self) -> u64 {
        self.global_batch as u64
    }

    fn tokens_per_step(&self) -> u64 {
        self.global_batch as u64 * self.data.seq_len() as u64
    }

    fn loss_tokens(&self, cursor: u64) -> f64 {
        (0..self.global_batch as u64).map(|i| self.data.trained_in_row(self.order.sample_at(cursor + i)) as f64).sum()
    }

    fn samples_per_epoch(&self) -> u64 {
        self.data.num_rows()
    }

    fn checkpoint_files(&self) -> Vec<(String, CarriedFile)> {
        let manifest = self.data.manifest();
        let tokenizer = self.data.dir().join(&manifest.tokenizer.file);
        // The template the conversations were rendered with: `export-hf` writes it into
        // tokenizer_config.json.
        vec![
            (crate::checkpoint::TOKENIZER_FILE.into(), CarriedFile::Copy(tokenizer)),
            (crate::checkpoint::CHAT_TEMPLATE_FILE.into(), CarriedFile::Contents(template_file(&manifest.template))),
        ]
    }
}

/// A chat template as a checkpoint carries it (the JSON `data prepare-sft --template` takes).
pub fn template_file(template: &moxin_data::sft::ChatTemplate) -> Vec<u8> {
    let mut json = serde_json::to_vec_pretty(template).expect("a chat template serialises");
    json.push(b'\n');
    json
}
