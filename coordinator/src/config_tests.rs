//! Tests of the configuration schema: loading, overrides, validation, shipped files.

use super::*;

fn write(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("job.toml");
    std::fs::write(&p, text).unwrap();
    p
}

const MINIMAL: &str = "[model]\npreset = \"tiny\"\n[train]\nsteps = 10\nglobal_batch_size = 8\nmicro_batch_size = 4\n";

#[test]
fn env_and_set_override_file_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let f = write(tmp.path(), MINIMAL);
    let env = HashMap::from([
        ("MOXIN__TRAIN__STEPS".to_string(), "20".to_string()),
        ("MOXIN__OPTIMIZER__LR".to_string(), "0.01".to_string()),
    ]);
    let c = JobConfig::load(&f, env.clone(), &["train.steps=30".into(), "model.n_layers=3".into()]).unwrap();
    assert_eq!(c.train.steps, 30);
    assert_eq!(c.optimizer.lr, 0.01);
    assert_eq!(c.model.shape().unwrap().n_layers, 3);
    let c = JobConfig::load(&f, env, &[]).unwrap();
    assert_eq!(c.train.steps, 20);
    let (shape, seq) = c.validate(1).unwrap();
    assert_eq!(seq, shape.max_seq_len);
    // The resolved TOML round-trips to the same job.
    let again: JobConfig = toml::from_str(&c.resolved_toml(&shape, seq)).unwrap();
    assert_eq!(again.model.shape().unwrap(), shape);
}

#[test]
fn unknown_and_mistyped_keys_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let f = write(tmp.path(), &format!("{MINIMAL}lrr = 3\n"));
    let e = JobConfig::load(&f, HashMap::new(), &[]).unwrap_err().to_string();
    assert!(e.contains("job.toml") && e.contains("lrr"), "{e}");
    let f = write(tmp.path(), MINIMAL);
    let e = JobConfig::load(&f, HashMap::new(), &["train.stepz=3".into()]).unwrap_err().to_string();
    assert!(e.contains("stepz"), "{e}");
    let e = JobConfig::load(&f, HashMap::new(), &["train.steps=many".into()]).unwrap_err().to_string();
    assert!(e.contains("steps") && e.contains("many"), "{e}");
    let e = JobConfig::load(&f, HashMap::new(), &["steps".into()]).unwrap_err().to_string();
    assert!(e.contains("section.key=value"), "{e}");
    for key in [".steps", "train..steps", "train."] {
        let e = JobConfig::load(&f, HashMap::new(), &[format!("{key}=1")]).unwrap_err().to_string();
        assert!(e.contains("must name a section and a field"), "{key}: {e}");
    }
    let e = JobConfig::load(&tmp.path().join("missing.toml"), HashMap::new(), &[]).unwrap_err().to_string();
    assert!(e.contains("missing.toml") && e.contains("cannot read"), "{e}");
    // Two mistakes: the same one is reported every time (the file's order, not a hash map's).
    let f = write(tmp.path(), "[trian]\nsteps = 5\n");
    for _ in 0..20 {
        let e = JobConfig::load(&f, HashMap::new(), &["train.steps=2".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown key `trian`"), "{e}");
    }
}

#[test]
fn invalid_values_name_field_value_and_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let f = write(tmp.path(), MINIMAL);
    let check = |sets: &[&str], world: u32, want: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let c = JobConfig::load(&f, HashMap::new(), &sets).unwrap();
        let e = c.validate(world).unwrap_err().to_string();
        for w in want {
            assert!(e.contains(w), "{e:?} lacks {w:?}");
        }
    };
    check(&["model.n_heads=5"], 1, &["model.n_heads = 5", "does not divide model.dim = 96"]);
    check(&["model.n_kv_heads=3"], 1, &["model.n_kv_heads = 3", "does not divide model.n_heads = 4"]);
    check(&["train.global_batch_size=10"], 1, &["train.global_batch_size = 10", "multiple of 4"]);
    check(&[], 3, &["train.global_batch_size = 8", "x 3 worker(s) = 12"]);
    check(&["train.seq_len=4096"], 1, &["train.seq_len = 4096", "max_seq_len = 256"]);
    check(&["optimizer.beta2=1.5"], 1, &["optimizer.beta2 = 1.5"]);
    check(&["model.preset=huge"], 1, &["model.preset = huge", "unknown preset"]);
    check(&["train.epochs=0"], 1, &["train.epochs = 0", "positive"]);
    check(&["train.epochs=2"], 1, &["train.epochs", "give one"]);
    check(&["schedule.warmup_ratio=1.5"], 1, &["schedule.warmup_ratio = 1.5"]);
    check(&["schedule.warmup_ratio=0.1", "schedule.warmup_steps=5"], 1, &["give one"]);
    check(&["checkpoint.optimizer_file_mib=0"], 1, &["checkpoint.optimizer_file_mib = 0", "default 1024"]);
    check(&["runtime.threads=2147483648"], 1, &["runtime.threads = 2147483648", "at most 4096", "0 = one per"]);
    check(&["runtime.device=cpu", "runtime.gemm=tuned"], 1, &["runtime.gemm = tuned", "gemm = \"aten\""]);
    // Shapes whose parameter count is absurd or does not fit in 64 bits.
    check(&["model.n_layers=4294967295"], 1, &["model.n_layers = 4294967295", "at most 10000000000000"]);
    check(
        &["model.vocab_size=4294967295", "model.dim=4294967040", "model.n_heads=4", "model.n_kv_heads=2"],
        1,
        &["model.dim = 4294967040", "more than 2^64 parameters"],
    );
    check(&["model.ffn_dim=4294967295", "model.n_layers=100"], 1, &["model.ffn_dim = 4294967295"]);
    check(&["model.vocab_size=4294967295", "model.dim=4096"], 1, &["model.vocab_size = 4294967295"]);
}

/// A word that is not one of a config enum's values gets the list of its values, for every
/// enum key of the sections a minimal job resolves (found by walking it: a new enum there
/// without its arm in `enum_choices` fails here, not in front of a user).
#[test]
fn every_enum_key_lists_its_values() {
    let tmp = tempfile::tempdir().unwrap();
    let f = write(tmp.path(), MINIMAL);
    let resolved = toml::Value::try_from(JobConfig::load(&f, HashMap::new(), &[]).unwrap()).unwrap();
    fn string_keys(v: &toml::Value, prefix: &str, out: &mut Vec<String>) {
        if let toml::Value::Table(t) = v {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                match v {
                    toml::Value::String(_) => out.push(key),
                    toml::Value::Table(_) => string_keys(v, &key, out),
                    _ => {}
                }
            }
        }
    }
    let mut keys = Vec::new();
    string_keys(&resolved, "", &mut keys);
    let mut enums = 0;
    for key in keys {
        let Err(e) = JobConfig::load(&f, HashMap::new(), &[format!("{key}=no-such-choice")]) else { continue };
        let e = e.to_string();
        assert!(!e.contains("not one of its values"), "{key}: {e}");
        if e.contains("unknown variant") {
            assert!(e.contains("expected one of") || e.contains("` or `"), "{key}: {e}");
            assert!(e.contains(&key) && e.contains("no-such-choice"), "{key}: {e}");
            enums += 1;
        }
    }
    assert!(enums >= 9, "{enums} enum keys found");
}

/// Every shipped job config parses; those that do not start from a checkpoint validate.
#[test]
fn shipped_configs_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        // A pipeline's stages are job files of their own.
        let tmp = tempfile::tempdir().unwrap();
        let jobs = if crate::pipeline::is_pipeline(&path) {
            let p = crate::pipeline::Pipeline::load(&path, Some(tmp.path()))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            p.stages.into_iter().map(|s| s.config).collect()
        } else {
            vec![path.clone()]
        };
        for job in jobs {
            let c = JobConfig::load(&job, HashMap::new(), &[]).unwrap_or_else(|e| panic!("{}: {e}", job.display()));
            if c.model.init_from.is_none() {
                c.validate(1).unwrap_or_else(|e| panic!("{}: {e}", job.display()));
            }
        }
        seen += 1;
    }
    assert!(seen >= 8, "{seen} configs");
}
