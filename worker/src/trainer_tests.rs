//! ZeRO-1 over the CPU ring trains to the same parameters as one process.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use moxin_proto::v1::JobSpec;
use tch::Tensor;

use crate::collective::ring::TcpRing;
use crate::trainer::{Group, Trainer};

fn job(dir: &Path, world: u32) -> JobSpec {
    let config = dir.join("job.toml");
    std::fs::write(
        &config,
        "[model]\npreset = \"tiny\"\nn_layers = 2\n[train]\nsteps = 4\nseq_len = 32\nglobal_batch_size = 12\nmicro_batch_size = 2\n\
         [optimizer]\nlr = 3e-3\n[checkpoint]\nevery_steps = 0\n[runtime]\ndevice = \"cpu\"\nthreads = 1\n",
    )
    .unwrap();
    let cfg = moxin_coordinator::JobConfig::load(&config, Default::default(), &[]).unwrap();
    moxin_coordinator::job::resolve_config(cfg, "equiv".into(), &dir.join(format!("run-{world}")), world).unwrap().spec
}

fn train(spec: &JobSpec, world: u32) -> Vec<Tensor> {
    if world == 1 {
        let mut t = Trainer::new(spec).unwrap();
        t.run(None, &mut |_| Ok(())).unwrap();
        return vec![t.model.params.flat().narrow(0, 0, t.model.params.numel()).copy()];
    }
    let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let peers: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let numel = crate::model::ModelConfig::from(spec.model.as_ref().unwrap()).param_count() as u64;
    let partitions: Vec<std::ops::Range<usize>> = moxin_coordinator::plan::zero1_partitions(numel, world)
        .into_iter()
        .map(|r| r.start as usize..r.end as usize)
        .collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let (spec, peers, partitions) = (spec.clone(), peers.clone(), partitions.clone());
            std::thread::spawn(move || {
                let ring = TcpRing::connect(rank, &peers, &listener, 1, Duration::from_secs(30)).unwrap();
                let global = spec.train.as_ref().unwrap().global_batch_size;
                let samples = moxin_coordinator::plan::rank_samples(global, world, rank as u32);
                let group = Group { collective: Box::new(ring), partitions, samples };
                let mut t = Trainer::with_group(&spec, Some(group)).unwrap();
                t.run(None, &mut |_| Ok(())).unwrap();
                t.model.params.flat().narrow(0, 0, t.model.params.numel()).copy()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn zero1_on_2_and_3_ranks_matches_single_process() {
    let tmp = tempfile::tempdir().unwrap();
    let single = train(&job(tmp.path(), 1), 1).remove(0);
    for world in [2u32, 3] {
        let ranks = train(&job(tmp.path(), world), world);
        for (rank, params) in ranks.iter().enumerate() {
            // Relative L2 error: summation order differs (per-rank means, then the ring's
            // average), so bit equality is not expected; Adam's normalisation amplifies
            // rounding on near-zero-gradient elements a little, hence L2 and not max.
            let rel = (params - &single).norm().double_value(&[]) / single.norm().double_value(&[]);
            assert!(rel < 1e-5, "world {world} rank {rank}: relative L2 difference {rel}");
        }
        // Rank 0 published a checkpoint with one optimizer partition per rank.
        let m: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join(format!("run-{world}/checkpoints/step-00000004/manifest.json")))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(m["world_size"], world);
        assert_eq!(m["optimizer"].as_array().unwrap().len(), world as usize);
    }
    // The coordinator's arithmetic parameter count matches the model's declarations.
    let shape = moxin_coordinator::presets::load("moxin-7b").unwrap();
    let spec = moxin_coordinator::job::model_spec("moxin-7b", &shape);
    assert_eq!(
        moxin_coordinator::plan::flat_param_count(&shape) as i64,
        crate::model::ModelConfig::from(&spec).param_count()
    );
}
