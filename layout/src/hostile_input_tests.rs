//! Property tests: hostile input to everything in this crate that reads what another
//! process or a disk wrote (checkpoint manifests, checkpoint reports from the network or
//! recorded on disk, safetensors headers, Hugging Face `config.json`). Each call must
//! return `Ok` or an error that says something; none may panic.

use std::path::Path;

use moxin_data::json_mutations;
use moxin_proto::v1::{CheckpointPart, OptimizerFile, WrittenFile};
use proptest::prelude::*;
use prost::Message;
use serde_json::Value;

use crate::checkpoint::write::{safetensors_header, split_safetensors, write_safetensors, TensorBytes, TensorMeta};
use crate::checkpoint::{
    latest_valid, partition_file, staging_dir, test_part, BuildInfo, Checkpoint, CheckpointManifest, Commits, FilePart,
    PartitionFile, RngState, FORMAT, MANIFEST, MODEL_FILE,
};
use crate::hf::{mistral_config_json, parse_config, TokenIds};
use crate::ModelShape;

fn tiny_shape() -> ModelShape {
    ModelShape {
        vocab_size: 32,
        dim: 8,
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: 1,
        ffn_dim: 16,
        max_seq_len: 16,
        sliding_window: 16,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        init_std: 0.02,
    }
}

/// A valid published checkpoint of step 2 in `run`: a model written in two parts, one
/// optimizer partition, a tokenizer; returns its manifest as JSON.
fn valid_checkpoint(run: &Path) -> Value {
    let dir = run.join("checkpoints/step-00000002");
    std::fs::create_dir_all(&dir).unwrap();
    let data = [7u8; 64];
    let model = write_safetensors(
        &dir.join(MODEL_FILE),
        &[TensorBytes { name: "w", dtype: "F32", shape: &[4, 4], data: &data }],
    )
    .unwrap()
    .remove(0);
    let bytes = std::fs::read(dir.join(MODEL_FILE)).unwrap();
    let half = bytes.len() as u64 / 2;
    let sha = |b: &[u8]| crate::checkpoint::write::write_segments(&run.join("scratch"), &[b]).unwrap().remove(0).sha256;
    let opt = write_safetensors(
        &dir.join(partition_file(0)),
        &[TensorBytes { name: "m", dtype: "F32", shape: &[2], data: &[1u8; 8] }],
    )
    .unwrap()
    .remove(0);
    let tok = crate::checkpoint::write::write_segments(&dir.join("tokenizer.json"), &[b"{}"]).unwrap().remove(0);
    let manifest = CheckpointManifest {
        format: FORMAT.into(),
        step: 2,
        data_cursor: 8,
        tokens: 128,
        elapsed_s: 1.5,
        rng: RngState { seed: 1, data_order: "x".into() },
        world_size: 1,
        seq_len: 8,
        model: tiny_shape(),
        data_manifest_sha256: "0".repeat(64),
        resolved_config_toml: "[model]\npreset = \"tiny\"\n".into(),
        optimizer: vec![PartitionFile { file: partition_file(0), start: 0, end: 2 }],
        files: [(partition_file(0), opt.sha256), ("tokenizer.json".to_string(), tok.sha256)].into(),
        file_parts: [(
            MODEL_FILE.to_string(),
            vec![
                FilePart { offset: 0, bytes: half, sha256: sha(&bytes[..half as usize]) },
                FilePart { offset: half, bytes: model.bytes - half, sha256: sha(&bytes[half as usize..]) },
            ],
        )]
        .into(),
        file_bytes: [(MODEL_FILE.to_string(), model.bytes), ("tokenizer.json".to_string(), 2)].into(),
        build: BuildInfo::default(),
        token_ids: Some(TokenIds::default()),
    };
    let json = serde_json::to_value(&manifest).unwrap();
    std::fs::write(dir.join(MANIFEST), serde_json::to_string_pretty(&json).unwrap()).unwrap();
    Checkpoint::open(&dir).expect("the unmutated checkpoint verifies");
    json
}

/// Opens the checkpoint of `run` every way a reader does; none may panic, and errors
/// say something.
fn open_every_way(run: &Path) {
    let dir = run.join("checkpoints/step-00000002");
    if let Err(e) = CheckpointManifest::read(&dir) {
        assert!(e.to_string().contains(MANIFEST), "{e}");
    }
    if let Err(e) = Checkpoint::open(&dir) {
        assert!(!e.to_string().is_empty());
    }
    match latest_valid(run) {
        Ok(c) => assert!(c.is_some()),
        Err(e) => assert!(e.to_string().contains("step-00000002"), "{e}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn checkpoint_manifest_of_random_bytes_is_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let run = tempfile::tempdir().unwrap();
        let dir = run.path().join("checkpoints/step-00000002");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(MANIFEST), &bytes).unwrap();
        let e = Checkpoint::open(&dir).unwrap_err().to_string();
        prop_assert!(e.contains(MANIFEST), "{}", e);
        open_every_way(run.path());
    }

    #[test]
    fn mutated_checkpoint_manifests_are_errors_not_panics(m in json_mutations::mutations()) {
        let run = tempfile::tempdir().unwrap();
        let valid = valid_checkpoint(run.path());
        let dir = run.path().join("checkpoints/step-00000002");
        std::fs::write(dir.join(MANIFEST), json_mutations::apply_pretty(&valid, &m)).unwrap();
        open_every_way(run.path());
    }

    #[test]
    fn corrupt_checkpoint_files_are_named(file in 0..3usize, at in any::<usize>(), flip in 1..=255u8, cut in any::<bool>()) {
        let run = tempfile::tempdir().unwrap();
        valid_checkpoint(run.path());
        let dir = run.path().join("checkpoints/step-00000002");
        let name = [MODEL_FILE.to_string(), partition_file(0), "tokenizer.json".to_string()][file].clone();
        let mut bytes = std::fs::read(dir.join(&name)).unwrap();
        let i = at % bytes.len();
        if cut { bytes.truncate(i) } else { bytes[i] ^= flip }
        std::fs::write(dir.join(&name), &bytes).unwrap();
        let e = Checkpoint::open(&dir).unwrap_err().to_string();
        prop_assert!(e.contains(&name), "{}", e);
        open_every_way(run.path());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn manifests_naming_files_outside_the_checkpoint_are_refused(
        name in json_mutations::escaping_file_name(),
        field in 0..3usize,
    ) {
        let run = tempfile::tempdir().unwrap();
        let mut valid = valid_checkpoint(run.path());
        match field {
            0 => {
                let sha = valid["files"].as_object_mut().unwrap().remove("tokenizer.json").unwrap();
                valid["files"][name.as_str()] = sha;
            }
            1 => {
                let parts = valid["file_parts"].as_object_mut().unwrap().remove(MODEL_FILE).unwrap();
                valid["file_parts"][name.as_str()] = parts;
            }
            _ => valid["optimizer"][0]["file"] = name.clone().into(),
        }
        let dir = run.path().join("checkpoints/step-00000002");
        std::fs::write(dir.join(MANIFEST), serde_json::to_string(&valid).unwrap()).unwrap();
        for e in [CheckpointManifest::read(&dir).unwrap_err(), Checkpoint::open(&dir).unwrap_err()] {
            let e = e.to_string();
            prop_assert!(e.contains(&dir.join(MANIFEST).display().to_string()) && e.contains(&format!("{name:?}")), "{}", e);
        }
        open_every_way(run.path());
    }
}

#[test]
fn a_manifest_of_an_oversized_model_is_refused_naming_the_field() {
    let run = tempfile::tempdir().unwrap();
    let mut valid = valid_checkpoint(run.path());
    valid["model"]["n_layers"] = u32::MAX.into();
    valid["model"]["ffn_dim"] = u32::MAX.into();
    let dir = run.path().join("checkpoints/step-00000002");
    std::fs::write(dir.join(MANIFEST), serde_json::to_string(&valid).unwrap()).unwrap();
    let e = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(e.contains(MANIFEST) && e.contains("model.n_layers = 4294967295") && e.contains("2^64"), "{e}");
}

#[test]
fn a_checkpoint_of_many_files_verifies_with_bounded_threads() {
    let run = tempfile::tempdir().unwrap();
    let mut valid = valid_checkpoint(run.path());
    let dir = run.path().join("checkpoints/step-00000002");
    for i in 0..300 {
        let name = format!("extra-{i:03}.bin");
        let written = crate::checkpoint::write::write_segments(&dir.join(&name), &[name.as_bytes()]).unwrap().remove(0);
        valid["files"][name.as_str()] = written.sha256.into();
    }
    std::fs::write(dir.join(MANIFEST), serde_json::to_string(&valid).unwrap()).unwrap();
    assert_eq!(Checkpoint::open(&dir).unwrap().manifest.files.len(), 302);
    std::fs::write(dir.join("extra-299.bin"), b"changed").unwrap();
    let e = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(e.contains("extra-299.bin") && e.contains("sha256"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn hostile_file_part_ranges_in_a_manifest_are_errors(ranges in proptest::collection::vec((hostile_u64(), hostile_u64()), 0..3)) {
        let run = tempfile::tempdir().unwrap();
        let mut valid = valid_checkpoint(run.path());
        let parts = valid["file_parts"][MODEL_FILE].as_array_mut().unwrap();
        for (i, (offset, bytes)) in ranges.into_iter().enumerate() {
            if let Some(p) = parts.get_mut(i) {
                p["offset"] = offset.into();
                p["bytes"] = bytes.into();
            } else {
                parts.push(serde_json::json!({ "offset": offset, "bytes": bytes, "sha256": "0".repeat(64) }));
            }
        }
        let dir = run.path().join("checkpoints/step-00000002");
        std::fs::write(dir.join(MANIFEST), serde_json::to_string(&valid).unwrap()).unwrap();
        open_every_way(run.path());
    }
}

/// A manifest whose optimizer files do not tile the parameters from 0 in order is refused
/// by name, before any file is read.
#[test]
fn optimizer_ranges_that_do_not_tile_the_parameters_are_refused() {
    for (start, end) in [(1, 2), (0, 1), (-3, 2)] {
        let run = tempfile::tempdir().unwrap();
        let mut valid = valid_checkpoint(run.path());
        let dir = run.path().join("checkpoints/step-00000002");
        assert!(Checkpoint::open(&dir).is_ok());
        let mut second = valid["optimizer"][0].clone();
        second["file"] = "optimizer.part-00001.safetensors".into();
        second["start"] = start.into();
        second["end"] = end.into();
        if (start, end) == (0, 1) {
            valid["optimizer"].as_array_mut().unwrap().insert(0, second);
        } else {
            valid["optimizer"][0] = second;
        }
        std::fs::write(dir.join(MANIFEST), serde_json::to_string(&valid).unwrap()).unwrap();
        let e = CheckpointManifest::read(&dir).unwrap_err().to_string();
        assert!(e.contains("must tile the parameters"), "[{start}, {end}): {e}");
    }
}

/// Strings a hostile report might carry.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        json_mutations::escaping_file_name(),
        Just(MODEL_FILE.to_string()),
        Just(partition_file(0)),
        Just("0".repeat(64)),
        Just("f".repeat(64)),
        Just("x".repeat(5000)),
        "[a-z.\\-/]{0,12}",
        any::<String>(),
    ]
}

fn hostile_u64() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), Just(1), Just(2), Just(u64::MAX), Just(u64::MAX - 1), Just(1 << 63), any::<u64>()]
}

fn hostile_u32() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), Just(1), Just(2), Just(u32::MAX), Just(1 << 16), Just((1 << 16) + 1), any::<u32>()]
}

fn hostile_i64() -> impl Strategy<Value = i64> {
    prop_oneof![Just(0i64), Just(-1), Just(10), Just(i64::MAX), Just(i64::MIN), any::<i64>()]
}

fn written_file() -> impl Strategy<Value = WrittenFile> {
    (hostile_string(), hostile_string(), hostile_u64(), hostile_u64(), hostile_u64())
        .prop_map(|(name, sha256, bytes, file_bytes, offset)| WrittenFile { name, sha256, bytes, file_bytes, offset })
}

fn checkpoint_part() -> impl Strategy<Value = CheckpointPart> {
    (
        (hostile_string(), prop_oneof![Just(1u64), hostile_u64()], prop_oneof![Just(2u64), hostile_u64()]),
        (prop_oneof![Just(0u32), hostile_u32()], prop_oneof![Just(1u32), hostile_u32()]),
        proptest::collection::vec(written_file(), 0..4),
        proptest::collection::vec(
            (hostile_string(), hostile_i64(), hostile_i64()).prop_map(|(file, start, end)| OptimizerFile {
                file,
                start,
                end,
            }),
            0..3,
        ),
        (prop_oneof![Just(String::new()), Just("{".to_string()), any::<String>()], hostile_u32()),
    )
        .prop_map(
            |(
                (worker_id, generation, step),
                (rank, world_size),
                files,
                optimizer_files,
                (manifest_json, keep_last),
            )| CheckpointPart {
                worker_id,
                generation,
                step,
                rank,
                world_size,
                files,
                optimizer_files,
                manifest_json,
                keep_last,
            },
        )
}

/// A valid report of rank `rank` of `world` for step 2, generation 1, with its files
/// written, rank 0's carrying a valid manifest.
fn valid_part(run: &Path, rank: u32, world: u32) -> CheckpointPart {
    let mut part = test_part(run, 1, 2, rank, world);
    if rank == 0 {
        let mut manifest =
            serde_json::from_value::<CheckpointManifest>(valid_checkpoint(&run.join("template"))).unwrap();
        manifest.world_size = world;
        part.manifest_json = serde_json::to_string(&manifest).unwrap();
    }
    part
}

/// Commits `part`: `Ok`, or an error that names the staging directory.
fn commit(commits: &mut Commits, part: CheckpointPart) {
    if let Err(e) = commits.add(part) {
        assert!(e.to_string().contains(".tmp-step-") || e.to_string().contains("step-"), "{e}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn random_checkpoint_reports_are_refused_not_panics(parts in proptest::collection::vec(checkpoint_part(), 1..4)) {
        let run = tempfile::tempdir().unwrap();
        let mut commits = Commits::new(run.path());
        for p in parts {
            std::fs::create_dir_all(staging_dir(run.path(), p.step, p.generation)).unwrap();
            commit(&mut commits, p);
        }
        commits.recover();
        commits.abandon_before(2);
    }

    #[test]
    fn mutated_valid_reports_are_refused_not_panics(
        rank1_first in any::<bool>(),
        field in 0..12usize,
        which in 0..2usize,
        value in hostile_u64(),
        text in hostile_string(),
    ) {
        let run = tempfile::tempdir().unwrap();
        let mut parts = [valid_part(run.path(), 0, 2), valid_part(run.path(), 1, 2)];
        let p = &mut parts[which];
        match field {
            0 => p.generation = value,
            1 => p.step = value,
            2 => p.rank = value as u32,
            3 => p.world_size = value as u32,
            4 => p.files[0].bytes = value,
            5 => p.files[0].file_bytes = value,
            6 => p.files[0].offset = value,
            7 => p.files[0].name = text,
            8 => p.optimizer_files[0].start = value as i64,
            9 => p.optimizer_files[0].end = value as i64,
            10 => p.manifest_json = text,
            _ => p.keep_last = value as u32,
        }
        let mut commits = Commits::new(run.path());
        let order = if rank1_first { [1, 0] } else { [0, 1] };
        for i in order {
            commit(&mut commits, parts[i].clone());
        }
        match latest_valid(run.path()) {
            Ok(_) => {}
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn recorded_reports_of_random_bytes_are_not_recovered(
        records in proptest::collection::vec((0..3u32, proptest::collection::vec(any::<u8>(), 0..256)), 1..4),
    ) {
        let run = tempfile::tempdir().unwrap();
        let staging = staging_dir(run.path(), 2, 1);
        std::fs::create_dir_all(&staging).unwrap();
        for (rank, bytes) in &records {
            // Random bytes, and what they decode to re-encoded (so some records parse).
            let bytes = match CheckpointPart::decode(bytes.as_slice()) {
                Ok(p) => p.encode_to_vec(),
                Err(e) => {
                    prop_assert!(!e.to_string().is_empty());
                    bytes.clone()
                }
            };
            std::fs::write(staging.join(format!(".part-{rank:05}.pb")), bytes).unwrap();
        }
        let mut commits = Commits::new(run.path());
        prop_assert!(commits.recover().is_empty());
    }
}

const DTYPES: &[&str] = &["F32", "BF16", "F16", "I64", "U8", "BOOL", "F8_E4M3", "", "f32", "Q4", "F32\"", "\u{0}"];

fn tensor_dims() -> impl Strategy<Value = Vec<i64>> {
    proptest::collection::vec(
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(-1),
            Just(i64::MAX),
            Just(i64::MIN),
            Just(1 << 32),
            0..100i64,
            any::<i64>()
        ],
        0..5,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn safetensors_headers_of_hostile_tensors_are_errors_not_panics(
        tensors in proptest::collection::vec((hostile_string(), 0..DTYPES.len(), tensor_dims()), 0..5),
        writers in 0..5usize,
    ) {
        let metas: Vec<TensorMeta<'_>> =
            tensors.iter().map(|(name, d, shape)| TensorMeta { name, dtype: DTYPES[*d], shape }).collect();
        match safetensors_header(&metas) {
            Ok(header) => {
                // What is written is a well-formed safetensors prefix: length, then JSON.
                prop_assert!(header.len() >= 8 && header.len() % 8 == 0);
                let len = u64::from_le_bytes(header[..8].try_into().unwrap()) as usize;
                prop_assert_eq!(len, header.len() - 8);
                let json: Value = serde_json::from_slice(&header[8..]).unwrap();
                prop_assert!(json.is_object());
            }
            Err(e) => prop_assert!(!e.is_empty()),
        }
        if let Err(e) = split_safetensors(&metas, writers) {
            prop_assert!(!e.is_empty());
        }
    }

    #[test]
    fn hf_configs_random_or_mutated_are_errors_not_panics(
        random in proptest::collection::vec(any::<u8>(), 0..256),
        m in json_mutations::mutations(),
    ) {
        if let Err(e) = parse_config(&String::from_utf8_lossy(&random)) {
            prop_assert!(!e.is_empty());
        }
        let valid: Value =
            serde_json::from_str(&mistral_config_json(&tiny_shape(), TokenIds::default(), "BF16").unwrap()).unwrap();
        let text = json_mutations::apply_pretty(&valid, &m);
        if let Err(e) = parse_config(&String::from_utf8_lossy(&text)) {
            prop_assert!(!e.is_empty());
        }
    }
}
