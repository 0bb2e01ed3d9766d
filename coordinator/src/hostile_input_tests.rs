//! Property tests: hostile input to the coordinator — job files, `MOXIN__*` variables and
//! `--set` overrides, pipeline files, and every RPC of the control plane with random,
//! mutated and undecodable messages. Each call must return `Ok` or an error that says
//! something (naming the file or field where it is cheap to); none may panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use moxin_proto::v1::coordinator_server::Coordinator;
use moxin_proto::v1::{
    CheckpointPart, CheckpointRequest, CollectiveId, DeviceInfo, FailureReport, HeartbeatRequest, OptimizerFile,
    RegisterRequest, ScaleRequest, StatusRequest, StepMetrics, StepReport, WatchRequest, WorkerIdentity, WrittenFile,
};
use proptest::prelude::*;
use prost::Message;
use toml::Table;
use tonic::Request;

use crate::pipeline::{is_pipeline, Pipeline};
use crate::server::CoordinatorService;
use crate::JobConfig;

/// Mutations of a TOML document: structural ones on its table, then textual ones.
mod mutate {
    use toml::{Table, Value};

    use moxin_data::json_mutations::apply_bytes;
    pub use moxin_data::json_mutations::{mutations, Mutation};

    /// Extreme and mistyped TOML values, as text.
    pub const EXTREMES: &[&str] = &[
        "0",
        "-1",
        "1",
        "4294967295",
        "4294967296",
        "9223372036854775807",
        "-9223372036854775808",
        "nan",
        "inf",
        "-inf",
        "1e308",
        "-0.0",
        "0.5",
        "true",
        "\"\"",
        "\"x\"",
        "\"../../../etc\"",
        "\"nccl\"",
        "\"fused\"",
        "\"cpu\"",
        "\"tiny\"",
        "[]",
        "{}",
        "[[1], [\"a\"]]",
        "{ a = { b = { c = 1 } } }",
        "1979-05-27T07:32:00Z",
    ];

    pub fn value(i: usize) -> Value {
        let t: Table = toml::from_str(&format!("x = {}", EXTREMES[i % EXTREMES.len()])).unwrap();
        t["x"].clone()
    }

    /// Paths (keys from the root) of every value of `t`.
    fn paths(t: &Table, at: &[String], out: &mut Vec<Vec<String>>) {
        for (k, v) in t {
            let mut p = at.to_vec();
            p.push(k.clone());
            if let Value::Table(inner) = v {
                paths(inner, &p, out);
            }
            out.push(p);
        }
    }

    fn parent<'a>(t: &'a mut Table, path: &[String]) -> Option<&'a mut Table> {
        let mut t = t;
        for k in &path[..path.len() - 1] {
            t = t.get_mut(k)?.as_table_mut()?;
        }
        Some(t)
    }

    /// `doc` with `mutations` applied, as bytes.
    pub fn apply(doc: &Table, mutations: &[Mutation]) -> Vec<u8> {
        let mut t = doc.clone();
        let mut duplicates = Vec::new();
        let mut bytes_ops = Vec::new();
        for m in mutations {
            let mut all = Vec::new();
            paths(&t, &[], &mut all);
            if all.is_empty() {
                bytes_ops.push(m.clone());
                continue;
            }
            let path = |i: usize| all[i % all.len()].clone();
            match m {
                Mutation::Replace(p, e) => {
                    let p = path(*p);
                    if let Some(parent) = parent(&mut t, &p) {
                        parent.insert(p[p.len() - 1].clone(), value(*e));
                    }
                }
                Mutation::Delete(p) => {
                    let p = path(*p);
                    if let Some(parent) = parent(&mut t, &p) {
                        parent.remove(&p[p.len() - 1]);
                    }
                }
                Mutation::Wrap(p, array) => {
                    let p = path(*p);
                    if let Some(parent) = parent(&mut t, &p) {
                        if let Some(v) = parent.remove(&p[p.len() - 1]) {
                            let wrapped = if *array {
                                Value::Array(vec![v])
                            } else {
                                Value::Table(Table::from_iter([("x".into(), v)]))
                            };
                            parent.insert(p[p.len() - 1].clone(), wrapped);
                        }
                    }
                }
                Mutation::Duplicate(p, e) => duplicates.push((path(*p), *e)),
                other => bytes_ops.push(other.clone()),
            }
        }
        let mut text = toml::to_string(&t).unwrap_or_default();
        for (p, e) in duplicates {
            // `key = value` again right under its table's header (or at the top).
            let line = format!("{} = {}\n", p[p.len() - 1], EXTREMES[e % EXTREMES.len()]);
            let header = format!("[{}]\n", p[..p.len() - 1].join("."));
            match text.find(&header) {
                Some(at) if p.len() > 1 => text.insert_str(at + header.len(), &line),
                _ => text.insert_str(0, &line),
            }
        }
        let mut bytes = text.into_bytes();
        apply_bytes(&mut bytes, &bytes_ops);
        bytes
    }
}

const JOB: &str = include_str!("../../configs/tiny-pretrain.toml");
const PIPELINE: &str = include_str!("../../configs/pipeline-tiny.toml");

/// Keys an override may name: real ones (to reach validation) and wrong ones.
const KEYS: &[&str] = &[
    "job.seed",
    "job.name",
    "model.preset",
    "model.vocab_size",
    "model.dim",
    "model.n_layers",
    "model.n_heads",
    "model.n_kv_heads",
    "model.ffn_dim",
    "model.max_seq_len",
    "model.sliding_window",
    "model.rope_theta",
    "model.norm_eps",
    "model.init_from",
    "train.steps",
    "train.epochs",
    "train.seq_len",
    "train.global_batch_size",
    "train.micro_batch_size",
    "train.log_every_steps",
    "optimizer.lr",
    "optimizer.beta2",
    "optimizer.eps",
    "schedule.warmup_ratio",
    "schedule.warmup_steps",
    "schedule.decay",
    "checkpoint.every_seconds",
    "checkpoint.keep_last",
    "runtime.device",
    "runtime.kernels",
    "runtime.peak_tflops",
    "cluster.min_workers",
    "cluster.max_workers",
    "cluster.heartbeat_interval_ms",
    "cluster.heartbeat_timeout_ms",
    "cluster.straggler_factor",
    "cluster.collective",
    "data.source",
    "grpo.group_size",
    "train",
    "train.",
    ".steps",
    "train.steps.x",
    "nope.nope",
];

const VALUES: &[&str] = &[
    "0",
    "-1",
    "1",
    "2",
    "3",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "NaN",
    "inf",
    "-inf",
    "1e308",
    "1e-320",
    "0.5",
    "",
    " ",
    "true",
    "tiny",
    "cpu",
    "nccl",
    "fused",
    "[1,2]",
    "{}",
    "=",
    "a=b",
];

fn override_pair() -> impl Strategy<Value = (String, String)> {
    (
        prop_oneof![4 => (0..KEYS.len()).prop_map(|i| KEYS[i].to_string()), 1 => "[a-z._]{0,12}"],
        prop_oneof![4 => (0..VALUES.len()).prop_map(|i| VALUES[i].to_string()), 1 => any::<String>()],
    )
}

/// Loads `file` with `env` and `sets`, then validates what loads for several world sizes
/// and resolves its TOML; errors must name the file (or the --set override or variable the
/// value came from) or a field.
fn load_and_validate(file: &Path, env: HashMap<String, String>, sets: &[String]) {
    let config = match JobConfig::load(file, env, sets) {
        Ok(c) => c,
        Err(e) => {
            let e = e.to_string();
            let named = e.contains("job.toml") || e.starts_with("--set ") || e.starts_with("MOXIN__");
            assert!(named, "an error names the file, or the override or variable it came from: {e}");
            return;
        }
    };
    for world in [0, 1, 2, 3, u32::MAX] {
        match config.validate(world) {
            Ok((shape, seq_len)) => {
                let resolved = config.resolved_toml(&shape, seq_len);
                let again: JobConfig = toml::from_str(&resolved).expect("the resolved TOML loads again");
                assert_eq!(again.validate(world).map(|v| v.1).ok(), Some(seq_len));
            }
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains(" = ") || e.contains("job.toml") || e.contains("manifest"), "{e}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn job_files_of_random_bytes_are_errors_naming_the_file(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("job.toml");
        std::fs::write(&file, &bytes).unwrap();
        load_and_validate(&file, HashMap::new(), &[]);
        prop_assert!(!is_pipeline(&file) || Pipeline::load(&file, Some(&tmp.path().join("out"))).is_err());
    }

    #[test]
    fn mutated_job_files_and_hostile_overrides_are_errors_not_panics(
        m in mutate::mutations(),
        sets in proptest::collection::vec(override_pair(), 0..3),
        env in proptest::collection::vec(override_pair(), 0..2),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("job.toml");
        let valid: Table = toml::from_str(JOB).unwrap();
        std::fs::write(&file, mutate::apply(&valid, &m)).unwrap();
        let sets: Vec<String> = sets.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        let env: HashMap<String, String> = env
            .into_iter()
            .map(|(k, v)| (format!("MOXIN__{}", k.to_uppercase().replace('.', "__")), v))
            .collect();
        load_and_validate(&file, env.clone(), &sets);
        // The overrides alone, over the valid file.
        std::fs::write(&file, JOB).unwrap();
        load_and_validate(&file, env, &sets);
    }

    #[test]
    fn mutated_pipeline_files_are_errors_not_panics(m in mutate::mutations()) {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("pipeline.toml");
        let valid: Table = toml::from_str(PIPELINE).unwrap();
        std::fs::write(&file, mutate::apply(&valid, &m)).unwrap();
        let _ = is_pipeline(&file);
        match Pipeline::load(&file, Some(&tmp.path().join("out"))) {
            Ok(p) => {
                for stage in &p.stages {
                    // Every stage's job file is a file the job loader takes (or refuses).
                    let stage_file = tmp.path().join("job.toml");
                    std::fs::copy(&stage.config, &stage_file).unwrap();
                    load_and_validate(&stage_file, HashMap::new(), &[]);
                }
            }
            Err(e) => prop_assert!(e.to_string().contains("pipeline.toml"), "{}", e),
        }
    }
}

/// Every key above set to every extreme value, as `--set` and as a variable.
#[test]
fn every_key_at_every_extreme_is_an_error_or_a_valid_job() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("job.toml");
    std::fs::write(&file, JOB).unwrap();
    for key in KEYS {
        for value in VALUES {
            load_and_validate(&file, HashMap::new(), &[format!("{key}={value}")]);
            let var = format!("MOXIN__{}", key.to_uppercase().replace('.', "__"));
            load_and_validate(&file, HashMap::from([(var, value.to_string())]), &[]);
        }
    }
}

/// A prepared copy of the built-in data every service's job trains on (made once).
fn prepared_data() -> &'static Path {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    DATA.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep().join("data");
        moxin_data::builtin::prepare_builtin(&dir, 256 + 64).unwrap();
        dir
    })
}

/// A fresh coordinator of a small CPU job in `run` (1 to 3 workers).
fn service(run: &Path) -> CoordinatorService {
    let config = run.join("job.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\npreset = \"tiny\"\n[data]\nsource = {:?}\n[train]\nsteps = 4\nseq_len = 16\n\
             global_batch_size = 6\nmicro_batch_size = 1\n[runtime]\ndevice = \"cpu\"\n\
             [cluster]\nheartbeat_interval_ms = 5\nheartbeat_timeout_ms = 1000\n",
            prepared_data().display().to_string()
        ),
    )
    .unwrap();
    let cfg = JobConfig::load(&config, HashMap::new(), &[]).unwrap();
    let job = crate::job::resolve_config(cfg, "hostile".into(), &run.join("run"), 1).unwrap();
    CoordinatorService::new(job, 1, 3).unwrap()
}

fn worker_id() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0..5u32).prop_map(|i| format!("w{i}")),
        1 => Just(String::new()),
        1 => Just("w18446744073709551615".to_string()),
        1 => any::<String>(),
    ]
}

fn big_u64() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0..4u64, 1 => Just(u64::MAX), 1 => Just(i64::MAX as u64 + 1), 1 => any::<u64>()]
}

fn big_u32() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0..4u32, 1 => Just(u32::MAX), 1 => Just(1 << 16), 1 => any::<u32>()]
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        Just(1.0),
        Just(-1.0),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(f64::MAX),
        Just(f64::MIN_POSITIVE),
        any::<f64>(),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("127.0.0.1:1".to_string()),
        Just("[::1]:65535".to_string()),
        Just("../../etc/passwd".to_string()),
        Just("x".repeat(10_000)),
        any::<String>(),
    ]
}

/// Random bytes merged into a message (valid protobuf fields override, the rest is dropped).
fn merged<M: Message + Default>(mut msg: M, bytes: &[u8]) -> M {
    let before = msg.encode_to_vec();
    if msg.merge(bytes).is_err() {
        msg = M::decode(before.as_slice()).unwrap();
    }
    msg
}

#[derive(Debug, Clone)]
enum Call {
    Register(RegisterRequest),
    Heartbeat(HeartbeatRequest),
    Watch(WatchRequest, bool),
    ReportStep(StepReport),
    ReportFailure(FailureReport),
    ShareCollectiveId(CollectiveId),
    Scale(ScaleRequest),
    CommitCheckpoint(CheckpointPart),
    RequestCheckpoint(CheckpointRequest),
    GetStatus,
    /// Bytes off the wire for RPC `n`, decoded as its request (decode errors are fine).
    Raw(u8, Vec<u8>),
}

fn call() -> impl Strategy<Value = Call> {
    let bytes = || proptest::collection::vec(any::<u8>(), 0..64);
    let register = (
        (text(), big_u32(), text()),
        prop_oneof![3 => Just(moxin_proto::SOFTWARE_VERSION.to_string()), 1 => text()],
        proptest::collection::vec((text(), text(), big_u64()), 0..3),
        (text(), text(), bytes()),
    )
        .prop_map(|((host, pid, instance), version, devices, (address, nccl, raw))| {
            let devices = devices
                .into_iter()
                .map(|(kind, uuid, memory_bytes)| DeviceInfo { kind, uuid, memory_bytes, ..Default::default() })
                .collect();
            let msg = RegisterRequest {
                identity: Some(WorkerIdentity { host, pid, instance }),
                software_version: version,
                cpu_cores: pid,
                devices,
                collective_address: if address.is_empty() { "127.0.0.1:9".into() } else { address },
                nccl_version: nccl,
                rank_hint: (pid % 3 == 0).then_some(pid),
            };
            Call::Register(merged(msg, &raw))
        });
    let metrics = (big_u64(), float(), float(), big_u64(), big_u32(), bytes()).prop_map(
        |(step, loss, time, tokens, world_size, raw)| {
            merged(
                StepMetrics { step, loss, step_time_s: time, mfu: time, tokens, world_size, ..Default::default() },
                &raw,
            )
        },
    );
    let part = (
        (worker_id(), big_u64(), big_u64(), big_u32(), big_u32()),
        proptest::collection::vec((text(), text(), big_u64(), big_u64(), big_u64()), 0..3),
        proptest::collection::vec((text(), any::<i64>(), any::<i64>()), 0..3),
        (text(), big_u32()),
    )
        .prop_map(
            |((worker_id, generation, step, rank, world_size), files, optimizer_files, (manifest_json, keep_last))| {
                CheckpointPart {
                    worker_id,
                    generation,
                    step,
                    rank,
                    world_size,
                    files: files
                        .into_iter()
                        .map(|(name, sha256, bytes, file_bytes, offset)| WrittenFile {
                            name,
                            sha256,
                            bytes,
                            file_bytes,
                            offset,
                        })
                        .collect(),
                    optimizer_files: optimizer_files
                        .into_iter()
                        .map(|(file, start, end)| OptimizerFile { file, start, end })
                        .collect(),
                    manifest_json,
                    keep_last,
                }
            },
        );
    prop_oneof![
        3 => register,
        3 => (worker_id(), big_u64(), big_u64(), float()).prop_map(|(worker_id, step, sent, compute_s)| {
            Call::Heartbeat(HeartbeatRequest { worker_id, step, sent_unix_nanos: sent, compute_s })
        }),
        3 => (worker_id(), any::<bool>()).prop_map(|(worker_id, keep)| Call::Watch(WatchRequest { worker_id }, keep)),
        3 => (worker_id(), big_u64(), proptest::option::of(metrics), any::<bool>(), any::<bool>()).prop_map(
            |(worker_id, generation, metrics, finished, backfill)| {
                Call::ReportStep(StepReport { worker_id, generation, metrics, finished, backfill })
            }
        ),
        2 => (worker_id(), text(), any::<bool>(), big_u64(), any::<bool>()).prop_map(
            |(worker_id, message, group_broke, generation, left)| {
                Call::ReportFailure(FailureReport { worker_id, message, group_broke, generation, left })
            }
        ),
        1 => (worker_id(), big_u64(), proptest::collection::vec(any::<u8>(), 0..200)).prop_map(
            |(worker_id, generation, id)| Call::ShareCollectiveId(CollectiveId { worker_id, generation, id })
        ),
        1 => big_u32().prop_map(|workers| Call::Scale(ScaleRequest { workers })),
        2 => part.prop_map(Call::CommitCheckpoint),
        1 => text().prop_map(|reason| Call::RequestCheckpoint(CheckpointRequest { reason })),
        1 => Just(Call::GetStatus),
        3 => (0..10u8, proptest::collection::vec(any::<u8>(), 0..128)).prop_map(|(n, b)| Call::Raw(n, b)),
    ]
}

/// Runs `call`; an error must say something.
async fn run(service: &CoordinatorService, call: Call) -> Option<Call> {
    let result: Result<(), tonic::Status> = match call {
        Call::Register(m) => service.register(Request::new(m)).await.map(drop),
        Call::Heartbeat(m) => service.heartbeat(Request::new(m)).await.map(drop),
        Call::Watch(m, _) => service.watch(Request::new(m)).await.map(drop),
        Call::ReportStep(m) => service.report_step(Request::new(m)).await.map(drop),
        Call::ReportFailure(m) => service.report_failure(Request::new(m)).await.map(drop),
        Call::ShareCollectiveId(m) => service.share_collective_id(Request::new(m)).await.map(drop),
        Call::Scale(m) => Coordinator::scale(service, Request::new(m)).await.map(drop),
        Call::CommitCheckpoint(m) => service.commit_checkpoint(Request::new(m)).await.map(drop),
        Call::RequestCheckpoint(m) => service.request_checkpoint(Request::new(m)).await.map(drop),
        Call::GetStatus => service.get_status(Request::new(StatusRequest {})).await.map(drop),
        Call::Raw(n, bytes) => return decoded(n, &bytes),
    };
    if let Err(status) = result {
        assert!(!status.message().is_empty(), "{status:?}");
    }
    None
}

/// The message `bytes` decode to as the request of RPC `n`, if they do.
fn decoded(n: u8, bytes: &[u8]) -> Option<Call> {
    fn d<M: Message + Default>(bytes: &[u8]) -> Option<M> {
        M::decode(bytes).map_err(|e| assert!(!e.to_string().is_empty())).ok()
    }
    Some(match n {
        0 => Call::Register(d(bytes)?),
        1 => Call::Heartbeat(d(bytes)?),
        2 => Call::Watch(d(bytes)?, false),
        3 => Call::ReportStep(d(bytes)?),
        4 => Call::ReportFailure(d(bytes)?),
        5 => Call::ShareCollectiveId(d(bytes)?),
        6 => Call::Scale(d(bytes)?),
        7 => Call::CommitCheckpoint(d(bytes)?),
        8 => Call::RequestCheckpoint(d(bytes)?),
        _ => {
            d::<StatusRequest>(bytes)?;
            Call::GetStatus
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_rpc_with_hostile_messages_errs_never_panics(calls in proptest::collection::vec(call(), 1..16)) {
        let tmp = tempfile::tempdir().unwrap();
        let service = service(tmp.path());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            // Two well-behaved workers first, so that ids w1 and w2 exist and a group forms.
            let mut streams = Vec::new();
            for pid in [1, 2] {
                let request = RegisterRequest {
                    identity: Some(WorkerIdentity { host: "h".into(), pid, instance: "i".into() }),
                    software_version: moxin_proto::SOFTWARE_VERSION.into(),
                    collective_address: "127.0.0.1:9".into(),
                    ..Default::default()
                };
                let id = service.register(Request::new(request)).await.unwrap().into_inner().worker_id;
                let watch = service.watch(Request::new(WatchRequest { worker_id: id })).await.unwrap();
                streams.push(watch.into_inner());
            }
            for c in calls {
                let keep = matches!(c, Call::Watch(_, true));
                if let Call::Watch(m, _) = &c {
                    if keep {
                        if let Ok(w) = service.watch(Request::new(m.clone())).await {
                            streams.push(w.into_inner());
                        }
                        continue;
                    }
                }
                if let Some(inner) = run(&service, c).await {
                    run(&service, inner).await;
                }
            }
            // Let tasks the calls spawned (a broken group's regrouping) run.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            service.get_status(Request::new(StatusRequest {})).await.unwrap();
            let _ = service.progress();
            service.stop("test over", false);
            drop(streams);
        });
    }
}
