//! Hostile safetensors: `import-hf` reads weight files with libtorch's safetensors reader
//! (an 8-byte header length, a JSON header, then raw bytes). Random files and mutated valid
//! ones (cut short, bits flipped in the length or the header, bytes inserted) must give an
//! error naming the file, never a panic.

use std::path::Path;

use moxin_data::json_mutations::{apply_bytes, mutations, Mutation};
use moxin_layout::hf::{mistral_config_json, TokenIds};
use proptest::prelude::*;
use tch::{Kind, Tensor};

/// A tiny model's `config.json` and one valid safetensors file of two of its tensors.
fn folder(dir: &Path) -> Vec<u8> {
    let shape = crate::model_tests::config(16);
    std::fs::write(dir.join("config.json"), mistral_config_json(&shape, TokenIds::default(), "F32").unwrap()).unwrap();
    let file = dir.join("valid.safetensors");
    let tensors = [
        (
            "model.embed_tokens.weight",
            Tensor::ones([shape.vocab_size as i64, shape.dim as i64], (Kind::Float, tch::Device::Cpu)),
        ),
        ("model.norm.weight", Tensor::ones([shape.dim as i64], (Kind::Float, tch::Device::Cpu))),
    ];
    Tensor::write_safetensors(&tensors, &file).unwrap();
    std::fs::read(&file).unwrap()
}

fn import_refuses(dir: &Path, bytes: &[u8]) -> Result<(), TestCaseError> {
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    let out = dir.join("out");
    let _ = std::fs::remove_dir_all(&out);
    match crate::hf::import(dir, &out) {
        // A mutation can leave a readable file; it still lacks most of the model.
        Ok(report) => prop_assert!(false, "imported a two-tensor file as a model: {report:?}"),
        Err(e) => {
            let text = e.to_string();
            prop_assert!(!text.is_empty());
            prop_assert!(
                text.contains("model.safetensors") || text.contains("missing") || text.contains("shape"),
                "{text}"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_safetensors_files_are_errors(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let dir = tempfile::tempdir().unwrap();
        folder(dir.path());
        import_refuses(dir.path(), &bytes)?;
    }

    #[test]
    fn mutated_safetensors_files_are_errors(m in mutations(), header_len in any::<u64>(), set_len in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = folder(dir.path());
        if set_len {
            // A header length that points anywhere, including far past the end.
            bytes[..8].copy_from_slice(&header_len.to_le_bytes());
        }
        // Mutations aimed at the header (its first bytes) as well as anywhere.
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()).min(bytes.len() as u64) as usize;
        let aimed: Vec<Mutation> = m
            .iter()
            .map(|x| match x {
                Mutation::Flip(i, b) => Mutation::Flip(i % header_end.max(1), *b),
                other => other.clone(),
            })
            .collect();
        apply_bytes(&mut bytes, &aimed);
        import_refuses(dir.path(), &bytes)?;
    }
}
