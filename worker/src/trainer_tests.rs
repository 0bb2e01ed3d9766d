//! The composed training step: ZeRO-1 over the CPU ring trains to the same parameters as
//! one process; bf16 parameters with fp32 master weights track fp32; recomputation and
//! bf16 gradient reduction change nothing that matters.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use moxin_coordinator::plan::{assignment, solo_assignment, GroupPlan};
use moxin_proto::v1::{CollectiveBackend, JobSpec};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{Committer, LocalCommits};
use crate::collective::ring::TcpRing;
use crate::collective::{GroupKey, RingCollective, Solo};
use crate::device::Placement;
use crate::trainer::{Handover, Start, Trainer};

fn job(dir: &Path, name: &str, world: u32, extra: &str) -> JobSpec {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[model]\npreset = \"tiny\"\nn_layers = 2\n[train]\nsteps = 4\nseq_len = 32\nglobal_batch_size = 12\n\
             micro_batch_size = 2\n[optimizer]\nlr = 3e-3\n[checkpoint]\nevery_steps = 0\n[runtime]\ndevice = \"cpu\"\n\
             threads = 1\n{extra}"
        ),
    )
    .unwrap();
    let cfg = moxin_coordinator::JobConfig::load(&config, Default::default(), &[]).unwrap();
    moxin_coordinator::job::resolve_config(cfg, name.into(), &dir.join(format!("run-{name}-{world}")), world)
        .unwrap()
        .spec
}

fn samples(spec: &JobSpec) -> u64 {
    let data = spec.data.as_ref().unwrap();
    let dir = Path::new(&data.prepared_dir);
    let (seq_len, vocab) = (spec.train.unwrap().seq_len, spec.model.as_ref().unwrap().vocab_size);
    if moxin_data::sft::SftManifest::load(dir).unwrap().is_some() {
        return moxin_data::sft::SftData::open(dir, seq_len, vocab, spec.seed, false).unwrap().num_rows();
    }
    let dataset = moxin_data::TokenDataset::open(
        Path::new(&data.prepared_dir),
        spec.train.unwrap().seq_len,
        spec.model.as_ref().unwrap().vocab_size,
        false,
    )
    .unwrap();
    dataset.num_samples()
}

/// The process commits its own checkpoints (one committer per run directory, shared by
/// every rank of an in-process group).
fn local_commits(spec: &JobSpec) -> Arc<dyn Committer> {
    Arc::new(LocalCommits::new(Path::new(&spec.run_dir)))
}

fn cpu(kind: Kind) -> Placement {
    Placement { device: Device::Cpu, kind }
}

/// Trains `spec` to the end in one process; returns the parameters (as fp32) and losses.
fn train_solo(spec: &JobSpec, kind: Kind) -> (Tensor, Vec<f64>) {
    let a = solo_assignment(spec, samples(spec));
    let mut t = Trainer::new(spec, &a, Box::new(Solo), cpu(kind), local_commits(spec), None).unwrap();
    let mut losses = Vec::new();
    t.run(None, &mut |m| {
        losses.push(m.loss);
        Ok(())
    })
    .unwrap();
    (t.model.params.flat().narrow(0, 0, t.model.params.numel()).to_kind(Kind::Float), losses)
}

/// Rank `rank`'s end of the ring `plan` describes, as generation `generation`.
fn join_ring(rank: usize, peers: &[SocketAddr], listener: &TcpListener, plan: &GroupPlan, generation: u64) -> TcpRing {
    let key = GroupKey::new(generation, &plan.group_key).unwrap();
    TcpRing::connect(rank, peers, listener, &key, Duration::from_secs(30)).unwrap()
}

/// Listeners, addresses and the generation-1 ring plan of a group of `world` local ranks.
fn ring_group(world: u32) -> (Vec<TcpListener>, Vec<SocketAddr>, GroupPlan) {
    let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let peers: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let plan = GroupPlan {
        generation: 1,
        peers: peers.iter().map(|p| p.to_string()).collect(),
        collective_timeout_ms: 30_000,
        backend: CollectiveBackend::Ring,
        group_key: vec![7; 32],
    };
    (listeners, peers, plan)
}

/// Trains `spec` on `world` ranks (threads) over the CPU ring; returns each rank's parameters.
fn train_group(spec: &JobSpec, world: u32) -> Vec<Tensor> {
    let (listeners, peers, plan) = ring_group(world);
    let n = samples(spec);
    let commits = local_commits(spec);
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let (spec, peers, plan, commits) = (spec.clone(), peers.clone(), plan.clone(), commits.clone());
            std::thread::spawn(move || {
                let ring = join_ring(rank, &peers, &listener, &plan, 1);
                let a = assignment(&spec, n, &plan, world, rank as u32);
                let mut t =
                    Trainer::new(&spec, &a, Box::new(RingCollective::new(ring)), cpu(Kind::Float), commits, None)
                        .unwrap();
                t.run(None, &mut |_| Ok(())).unwrap();
                t.model.params.flat().narrow(0, 0, t.model.params.numel()).copy()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).norm().double_value(&[]) / b.norm().double_value(&[])
}

#[test]
fn zero1_on_2_and_3_ranks_matches_single_process() {
    let tmp = tempfile::tempdir().unwrap();
    let (single, _) = train_solo(&job(tmp.path(), "equiv", 1, ""), Kind::Float);
    for world in [2u32, 3] {
        let ranks = train_group(&job(tmp.path(), "equiv", world, ""), world);
        for (rank, params) in ranks.iter().enumerate() {
            // Summation order differs (per-rank sums, then the ring's), so bit equality is
            // not expected; Adam's normalisation amplifies rounding on near-zero-gradient
            // elements a little, hence L2 and not max.
            let rel = rel_l2(params, &single);
            assert!(rel < 1e-5, "world {world} rank {rank}: relative L2 difference {rel}");
        }
        // Rank 0 published a checkpoint with one optimizer partition per rank.
        let m: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                tmp.path().join(format!("run-equiv-{world}/checkpoints/step-00000004/manifest.json")),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(m["world_size"], world);
        assert_eq!(m["optimizer"].as_array().unwrap().len(), world as usize);
        // Every rank wrote a share of the one model file.
        assert_eq!(m["file_parts"]["model.safetensors"].as_array().unwrap().len(), world as usize, "{m}");
    }
}

#[test]
fn bf16_parameters_with_fp32_master_track_fp32() {
    let tmp = tempfile::tempdir().unwrap();
    let (fp32, fp32_losses) = train_solo(&job(tmp.path(), "fp32", 1, ""), Kind::Float);
    let (bf16, bf16_losses) = train_solo(&job(tmp.path(), "bf16", 1, "precision = \"bf16\"\n"), Kind::BFloat16);
    // Four steps at lr 3e-3 from the same initialisation (rounded to bf16): the runs stay
    // within bf16's resolution (2^-8 relative) of each other, loss for loss.
    for (a, b) in fp32_losses.iter().zip(&bf16_losses) {
        assert!((a - b).abs() < 0.02 * a, "loss {b} (bf16) vs {a} (fp32)");
    }
    let rel = rel_l2(&bf16, &fp32);
    assert!(rel < 1e-2, "bf16 parameters differ from fp32 by {rel} (relative L2)");
    // And bf16 gradient accumulation/reduction stays close to fp32's.
    let (bf16_grads, _) = train_solo(&job(tmp.path(), "bf16g", 1, "grad_reduce = \"bf16\"\n"), Kind::Float);
    let rel = rel_l2(&bf16_grads, &fp32);
    assert!(rel < 1e-2, "bf16 gradients: relative L2 {rel}");
}

#[test]
fn recomputing_blocks_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, plain_losses) = train_solo(&job(tmp.path(), "plain", 1, ""), Kind::Float);
    let (recomputed, losses) = train_solo(&job(tmp.path(), "recompute", 1, "recompute = \"blocks\"\n"), Kind::Float);
    assert_eq!(plain_losses, losses);
    assert_eq!(rel_l2(&recomputed, &plain), 0.0, "recomputation is the same arithmetic");
}

#[test]
fn optimizer_stream_is_refused_quietly_where_it_does_not_apply() {
    // On the CPU (no fused AdamW, no CUDA stream) the switch leaves the update where it is.
    let tmp = tempfile::tempdir().unwrap();
    let (plain, plain_losses) = train_solo(&job(tmp.path(), "plain", 1, ""), Kind::Float);
    let (streamed, losses) = train_solo(&job(tmp.path(), "stream", 1, "optimizer_stream = true\n"), Kind::Float);
    assert_eq!(plain_losses, losses);
    assert_eq!(rel_l2(&streamed, &plain), 0.0);
}

#[test]
fn hand_written_block_backward_trains_like_autograd() {
    // The same arithmetic in a different order (and the residual adds folded differently),
    // so equal to fp32 rounding, then Adam's amplification over 4 steps; config plumbing
    // included (`runtime.block_backward` through the JobSpec).
    let tmp = tempfile::tempdir().unwrap();
    let (plain, plain_losses) = train_solo(&job(tmp.path(), "plain", 1, ""), Kind::Float);
    let spec = job(tmp.path(), "explicit", 1, "block_backward = \"explicit\"\n");
    let (explicit, losses) = train_solo(&spec, Kind::Float);
    for (a, b) in plain_losses.iter().zip(&losses) {
        assert!((a - b).abs() < 1e-5 * a.abs(), "loss {b} (explicit) vs {a} (autograd)");
    }
    let rel = rel_l2(&explicit, &plain);
    assert!(rel < 1e-4, "parameters differ by {rel} (relative L2)");
    // And with recomputation on top.
    let spec = job(tmp.path(), "explicit-re", 1, "block_backward = \"explicit\"\nrecompute = \"blocks\"\n");
    let (recomputed, re_losses) = train_solo(&spec, Kind::Float);
    assert_eq!(losses, re_losses);
    assert_eq!(rel_l2(&recomputed, &explicit), 0.0, "recomputation is the same arithmetic");
    let spec = job(tmp.path(), "explicit-ew", 1, "block_backward = \"explicit\"\nrecompute = \"elementwise\"\n");
    let (recomputed, ew_losses) = train_solo(&spec, Kind::Float);
    assert_eq!(losses, ew_losses);
    assert_eq!(rel_l2(&recomputed, &explicit), 0.0, "recomputing norms and SwiGLU is the same arithmetic");
    // And with one GEMM per part of the fused projections (`runtime.split_projections`
    // through the JobSpec): the same sums in another order, so within fp32 rounding.
    let spec = job(tmp.path(), "explicit-split", 1, "block_backward = \"explicit\"\nsplit_projections = true\n");
    let (split, split_losses) = train_solo(&spec, Kind::Float);
    for (a, b) in losses.iter().zip(&split_losses) {
        assert!((a - b).abs() < 1e-5 * a.abs(), "loss {b} (split) vs {a} (fused projections)");
    }
    let rel = rel_l2(&split, &explicit);
    assert!(rel > 0.0 && rel < 1e-4, "parameters differ by {rel} (relative L2)");
}

/// Why parameters may only be written by raw pointers while a forward graph exists: every
/// view of the flat buffer shares one version counter, so a tensor copy into any part of
/// it (as the ring's CUDA staging does) makes backward refuse views saved elsewhere;
/// writes through the raw pointer (NCCL, the ring on CPU memory) leave it alone.
#[test]
fn in_place_tensor_writes_to_the_flat_buffer_break_saved_views() {
    let flat = Tensor::ones([8], (Kind::Float, Device::Cpu));
    let w = flat.narrow(0, 0, 4).set_requires_grad(true);
    let other = flat.narrow(0, 4, 4);
    let x = Tensor::ones([4], (Kind::Float, Device::Cpu));
    // The graph saves `w` (the gradient of x·w with respect to x is w).
    let xr = x.set_requires_grad(true);
    let y = (&xr * &w).sum(Kind::Float);
    tch::no_grad(|| {
        let mut o = other.shallow_clone();
        o.copy_(&Tensor::zeros([4], (Kind::Float, Device::Cpu)));
    });
    let err = Tensor::f_run_backward(&[&y], &[&xr], false, false).expect_err("version check");
    assert!(err.to_string().contains("modified by an inplace operation"), "{err}");
}

/// A rank that does not see the run directory rank 0 sees (no shared filesystem) fails at
/// group formation with a message saying so; the others see a group failure (the group
/// re-forms without it) instead of breaking at the first checkpoint.
#[test]
fn a_rank_without_the_shared_run_directory_is_refused_at_formation() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = job(tmp.path(), "shared", 2, "");
    let mut elsewhere = spec.clone();
    let other = tmp.path().join("not-shared");
    std::fs::create_dir_all(&other).unwrap();
    elsewhere.run_dir = other.display().to_string();
    let (listeners, peers, plan) = ring_group(2);
    let n = samples(&spec);
    let handles: Vec<_> = listeners
        .into_iter()
        .zip([spec, elsewhere])
        .enumerate()
        .map(|(rank, (listener, spec))| {
            let (peers, plan) = (peers.clone(), plan.clone());
            std::thread::spawn(move || {
                let ring = join_ring(rank, &peers, &listener, &plan, 1);
                let a = assignment(&spec, n, &plan, 2, rank as u32);
                let commits = local_commits(&spec);
                Trainer::new(&spec, &a, Box::new(RingCollective::new(ring)), cpu(Kind::Float), commits, None)
                    .err()
                    .map(|e| e.to_string())
            })
        })
        .collect();
    let errors: Vec<String> = handles.into_iter().map(|h| h.join().unwrap().expect("formation must fail")).collect();
    assert!(errors[0].starts_with("collective:") && errors[0].contains("1 rank(s) do not see"), "{}", errors[0]);
    assert!(errors[1].contains("rank 1 does not see") && errors[1].contains("shared filesystem"), "{}", errors[1]);
}

/// What one rank of a generation ended with.
struct RankEnd {
    start: Start,
    params: Tensor,
    carried: Option<Handover>,
}

/// How a generation ends in a handover: each rank's own `leaving` flag, and the next
/// generation's size as the ranks that stay know it from their next assignment (the
/// first `n` of this generation's addresses), if they do.
struct Yield {
    leaving: Vec<bool>,
    next_size: Option<usize>,
}

/// One generation of an in-process ring group: rank `r` starts with `carried[r]`; with
/// `handover` every rank asks to stop for the next generation at once (after one step);
/// otherwise the group trains to `stop_after`.
fn run_generation(
    spec: &JobSpec,
    generation: u64,
    carried: Vec<Option<Handover>>,
    handover: Option<Yield>,
    stop_after: Option<u64>,
) -> Vec<RankEnd> {
    let world = carried.len() as u32;
    let (listeners, peers, mut plan) = ring_group(world);
    plan.generation = generation;
    let n = samples(spec);
    let commits = local_commits(spec);
    let handles: Vec<_> = listeners
        .into_iter()
        .zip(carried)
        .enumerate()
        .map(|(rank, (listener, carried))| {
            let (spec, peers, plan, commits) = (spec.clone(), peers.clone(), plan.clone(), commits.clone());
            let leaving = handover.as_ref().map(|h| h.leaving[rank]);
            let next_peers =
                handover.as_ref().and_then(|h| h.next_size).filter(|&n| rank < n).map(|n| plan.peers[..n].to_vec());
            std::thread::spawn(move || {
                let ring = join_ring(rank, &peers, &listener, &plan, generation);
                let a = assignment(&spec, n, &plan, world, rank as u32);
                let collective = Box::new(RingCollective::new(ring));
                let mut t = Trainer::new(&spec, &a, collective, cpu(Kind::Float), commits, carried).unwrap();
                if let Some(leaving) = leaving {
                    t.handover_requested.store(true, std::sync::atomic::Ordering::Relaxed);
                    t.leaving.store(leaving, std::sync::atomic::Ordering::Relaxed);
                    *t.next_peers.lock().unwrap() = next_peers;
                }
                t.run(stop_after, &mut |_| Ok(())).unwrap();
                let params = t.model.params.flat().narrow(0, 0, t.model.params.numel()).copy();
                RankEnd { start: t.start(), params, carried: t.take_handover() }
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// A graceful resize (3 → 2 with a rank released, 2 → 3 with a joiner) hands the
/// optimizer state over in memory: no checkpoint is written or read, and training continues
/// bit for bit as it does from a checkpoint written at the same step.
#[test]
fn a_graceful_resize_continues_in_memory_exactly_as_from_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    // 3 → 2 with the released rank told (Release), and with only the ranks that stay told
    // (their next assignment lacks it: a Release that came late, or none at all); 2 → 3.
    for (from, to, released_knows) in [(3usize, 2usize, true), (3, 2, false), (2, 3, true)] {
        // The reference: checkpoint after step 1, resume at the new size.
        let spec = job(tmp.path(), &format!("disk-{from}-{to}-{released_knows}"), 1, "");
        run_generation(&spec, 1, (0..from).map(|_| None).collect(), None, Some(1));
        let reference = run_generation(&spec, 2, (0..to).map(|_| None).collect(), None, None);
        assert_eq!(reference[0].start, Start::Checkpoint(1));

        let spec = job(tmp.path(), &format!("memory-{from}-{to}-{released_knows}"), 1, "");
        let leaving: Vec<bool> = (0..from).map(|r| r >= to && released_knows).collect();
        let next_size = (!released_knows).then_some(to);
        let old = run_generation(&spec, 1, (0..from).map(|_| None).collect(), Some(Yield { leaving, next_size }), None);
        let run_dir = Path::new(&spec.run_dir);
        assert!(moxin_layout::checkpoint::list(run_dir).unwrap().is_empty(), "no checkpoint at a handover");
        for (rank, end) in old.iter().enumerate() {
            assert_eq!(end.carried.is_some(), rank < to, "rank {rank} of {from} → {to}");
        }
        let mut carried: Vec<Option<Handover>> = old.into_iter().map(|e| e.carried).collect();
        carried.resize_with(to, || None);
        let resized = run_generation(&spec, 2, carried, None, None);
        for (rank, (got, want)) in resized.iter().zip(&reference).enumerate() {
            assert_eq!(got.start, Start::Handover(1), "rank {rank} of {from} → {to}");
            assert!(got.params.equal(&want.params), "rank {rank} of {from} → {to}: parameters differ");
        }
    }

    // A rank that leaves without handing its part over leaves a gap: the carried state is
    // not used, and the group restores from the newest checkpoint (here: none).
    let spec = job(tmp.path(), "gap", 1, "");
    let old = run_generation(
        &spec,
        1,
        (0..3).map(|_| None).collect(),
        Some(Yield { leaving: vec![false; 3], next_size: None }),
        None,
    );
    let carried: Vec<Option<Handover>> = old.into_iter().take(2).map(|e| e.carried).collect();
    let resized = run_generation(&spec, 2, carried, None, Some(1));
    assert!(resized.iter().all(|e| e.start == Start::Fresh));
}

/// SFT on packed conversations: the loss is the mean over the assistant tokens of the whole
/// global batch, so 1, 2 and 3 ranks (with different gradient accumulation) train to the
/// same parameters.
#[test]
fn sft_trains_alike_on_any_world_size() {
    let tmp = tempfile::tempdir().unwrap();
    let builtin = tmp.path().join("builtin");
    moxin_data::builtin::prepare_builtin(&builtin, 1024).unwrap();
    let chats = tmp.path().join("chats.jsonl");
    let lines: Vec<String> = (0..60)
        .map(|i| {
            let (a, b) = (i * 7 % 50, i * 13 % 40);
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("What is {a} plus {b}?")},
                {"role": "assistant", "content": format!("{}", a + b)},
            ]})
            .to_string()
        })
        .collect();
    std::fs::write(&chats, lines.join("\n")).unwrap();
    let sft = tmp.path().join("sft");
    moxin_data::sft::prepare_sft(&moxin_data::sft::SftPrepareOptions {
        inputs: vec![chats],
        out_dir: sft.clone(),
        tokenizer: builtin.join("tokenizer.json"),
        template: moxin_data::sft::ChatTemplate::moxin(),
        max_tokens: 64,
        overlong: moxin_data::sft::Overlong::Truncate,
        overwrite: false,
    })
    .unwrap();
    let extra = format!("[data]\nsource = {:?}\n", sft.display().to_string());
    let (single, losses) = train_solo(&job(tmp.path(), "sft", 1, &extra), Kind::Float);
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{losses:?}");
    for world in [2u32, 3] {
        for (rank, params) in train_group(&job(tmp.path(), "sft", world, &extra), world).iter().enumerate() {
            let rel = rel_l2(params, &single);
            assert!(rel < 1e-5, "world {world} rank {rank}: relative L2 difference {rel}");
        }
    }
}
