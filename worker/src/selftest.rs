//! Measurements behind `moxin-train bench`: checks that need a GPU (run by
//! `scripts/gpu-check.sh`: each fused kernel against its ATen equivalent on the same
//! inputs, with timings; every NCCL collective on a world of one), and checkpoint writing
//! against the usual way, in the same run.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::collective::nccl::{self, NcclCollective};
use crate::collective::{Collective, ReduceOp};
use crate::cuda::kernels::Kernels;
use crate::model::Transformer;
use crate::optim::{AdamW, AdamWConfig};
use crate::trainer::block::{self, Pieces};
use crate::trainer::grads::{gemm_into, FlatGrads};
use crate::trainer::objective::{head_forward_backward, CrossEntropy};
use crate::trainer::step::Stages;
use crate::trainer::Batch;
use crate::WorkerError;

pub mod gemms;

fn gpu(ordinal: usize) -> Result<Device, WorkerError> {
    if !tch::Cuda::is_available() || ordinal >= tch::Cuda::device_count().max(0) as usize {
        return Err(WorkerError::Device(format!("this check needs CUDA device {ordinal}; see `moxin-train doctor`")));
    }
    Ok(Device::Cuda(ordinal))
}

/// A head weight-gradient receiver that adds the products into `acc`.
fn adds_to(acc: &Tensor) -> impl FnMut(&Tensor, &Tensor) -> Result<(), WorkerError> + '_ {
    move |a, b| {
        gemm_into(acc, a, b, false);
        Ok(())
    }
}

/// Median milliseconds of `iters` runs of `f` (after one warm-up), device-synchronised.
fn time_ms(ordinal: usize, iters: usize, mut f: impl FnMut() -> Result<(), WorkerError>) -> Result<f64, WorkerError> {
    f()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        tch::Cuda::synchronize(ordinal as i64);
        let t = Instant::now();
        f()?;
        tch::Cuda::synchronize(ordinal as i64);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    (&a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-30)
}

/// Fused kernels vs ATen on device `ordinal`: errors and timings.
pub fn fused_kernels(ordinal: usize) -> Result<Value, WorkerError> {
    let device = gpu(ordinal)?;
    let k = Kernels::for_device(ordinal)?;
    let _guard = tch::no_grad_guard();

    // AdamW over a bf16 model's partition (fp32 master, bf16 copy written back).
    let n: i64 = (1 << 24) + 123;
    tch::manual_seed(1);
    let params = Tensor::randn([n], (Kind::BFloat16, device));
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let (pa, pb) = (params.copy(), params.copy());
    let mut aten = AdamW::new(cfg, &pa, 0, n, n / 2);
    let mut fused = AdamW::new(cfg, &pb, 0, n, n / 2);
    fused.use_fused_kernel(k.clone());
    for step in 0..5 {
        let g = Tensor::randn([n], (Kind::Float, device)) * (1.0 + step as f64);
        aten.update(&g.copy(), 0.7, 1e-3, &pa)?;
        fused.update(&g.copy(), 0.7, 1e-3, &pb)?;
    }
    let adamw_err = json!({
        "master": rel_err(&fused.master, &aten.master),
        "exp_avg": rel_err(&fused.exp_avg, &aten.exp_avg),
        "exp_avg_sq": rel_err(&fused.exp_avg_sq, &aten.exp_avg_sq),
        "bf16_params": rel_err(&pb, &pa),
    });
    let g = Tensor::randn([n], (Kind::Float, device));
    let aten_ms = time_ms(ordinal, 10, || aten.update(&g, 1.0, 1e-3, &pa))?;
    let fused_ms = time_ms(ordinal, 10, || fused.update(&g, 1.0, 1e-3, &pb))?;

    // Cross-entropy head: 8192 tokens, dim 2048, vocab 32000, bf16.
    let (rows, dim, vocab) = (8192i64, 2048i64, 32000i64);
    let hidden = Tensor::randn([1, rows, dim], (Kind::BFloat16, device));
    let weight = Tensor::randn([vocab, dim], (Kind::BFloat16, device)) * 0.02;
    let targets = Tensor::randint(vocab, [1, rows], (Kind::Int64, device));
    let batch = Batch { inputs: targets.zeros_like(), targets, weights: None, packing: None, rl: None };
    let objective = CrossEntropy::mean_over(rows as f64);
    let gw_aten = Tensor::zeros([vocab, dim], (Kind::Float, device));
    let gw_fused = Tensor::zeros([vocab, dim], (Kind::Float, device));
    let a = head_forward_backward(&hidden, &weight, &batch, &objective, &mut adds_to(&gw_aten), None)?;
    let f = head_forward_backward(&hidden, &weight, &batch, &objective, &mut adds_to(&gw_fused), Some(&k))?;
    let ce_err = json!({
        "loss": (f.loss.double_value(&[]) - a.loss.double_value(&[])).abs() / a.loss.double_value(&[]).abs(),
        "d_hidden": rel_err(&f.d_hidden, &a.d_hidden),
        "d_weight": rel_err(&gw_fused, &gw_aten),
    });
    let ce_aten_ms = time_ms(ordinal, 10, || {
        head_forward_backward(&hidden, &weight, &batch, &objective, &mut adds_to(&gw_aten), None).map(|_| ())
    })?;
    let ce_fused_ms = time_ms(ordinal, 10, || {
        head_forward_backward(&hidden, &weight, &batch, &objective, &mut adds_to(&gw_fused), Some(&k)).map(|_| ())
    })?;
    let block = explicit_block(ordinal, &k)?;
    // The benchmark shapes' projections, fused (moxin-train's way) and split.
    let mut gemm_ms = |f: &mut dyn FnMut() -> Result<(), WorkerError>| time_ms(ordinal, 10, f);
    let dims = |tokens, dim, heads, ffn| gemms::BlockDims { tokens, dim, heads, kv_heads: 8, head_dim: 128, ffn };
    let mut both_shapes = || -> Result<Value, WorkerError> {
        Ok(json!({
            "gpu-1b": gemms::projection_gemms(device, Kind::BFloat16, dims(8 * 2048, 2048, 16, 5632), &mut gemm_ms)?,
            "moxin-7b": gemms::projection_gemms(device, Kind::BFloat16, dims(2 * 4096, 4096, 32, 14336), &mut gemm_ms)?,
        }))
    };
    let projection_gemms = both_shapes()?;
    // The same projections with the tuned engine (`runtime.gemm = "tuned"`), last: it
    // switches this process's GEMMs for good. Each problem is tuned on its first call
    // (`time_ms`'s warm-up), so the timings are the chosen algorithms'.
    // (The bf16 weight-gradient role is libtorch's either way: training never runs it.)
    let tuned_gemms = match crate::cuda::gemm::install(ordinal, crate::cuda::gemm::CANDIDATES) {
        Ok(()) => {
            let mut tuned = both_shapes()?;
            tuned["problems"] = json!(crate::cuda::gemm::report());
            tuned
        }
        Err(e) => json!({ "error": e.to_string() }),
    };
    Ok(json!({
        "device": crate::cuda::gpu_info(ordinal).map(|g| g.name).unwrap_or_default(),
        "block": block,
        "projection_gemms": projection_gemms,
        "tuned_gemms": tuned_gemms,
        "adamw": {"elements": n, "relative_error": adamw_err, "aten_ms": aten_ms, "fused_ms": fused_ms, "speedup": aten_ms / fused_ms},
        "cross_entropy_head": {"tokens": rows, "dim": dim, "vocab": vocab, "relative_error": ce_err,
            "aten_ms": ce_aten_ms, "fused_ms": ce_fused_ms, "speedup": ce_aten_ms / ce_fused_ms},
    }))
}

/// Every collective through NCCL on a world of one (the most a one-GPU machine allows:
/// NCCL refuses two ranks on one device), in fp32 and bf16, whole buffers and bucket
/// views, several in flight at once. At world size one each is the identity.
pub fn nccl_world_of_one(ordinal: usize) -> Result<Value, WorkerError> {
    let device = gpu(ordinal)?;
    let comm = |e: crate::collective::CollectiveError| WorkerError::Collective(e.to_string());
    let version = nccl::version().map_err(comm)?;
    let id = nccl::new_id().map_err(comm)?;
    let mut c = NcclCollective::connect(0, 1, &id, ordinal, Duration::from_secs(60)).map_err(comm)?;
    let mut results = Vec::new();
    for kind in [Kind::Float, Kind::BFloat16] {
        let x = Tensor::randn([100_003], (Kind::Float, device)).to_kind(kind);
        let want = x.copy();
        let len = x.numel();
        let mut check = |op: &str, t: &Tensor| {
            let diff = (t.to_kind(Kind::Float) - want.to_kind(Kind::Float)).abs().max().double_value(&[]);
            results.push(json!({"op": op, "dtype": format!("{kind:?}"), "max_diff": diff, "ok": diff == 0.0}));
        };
        c.all_reduce(&x, ReduceOp::Sum).map_err(comm)?.wait().map_err(comm)?;
        check("all_reduce_sum", &x);
        c.all_reduce(&x, ReduceOp::Avg).map_err(comm)?.wait().map_err(comm)?;
        check("all_reduce_avg", &x);
        // Bucket views in flight together, waited in reverse.
        let works = [0..1000usize, 1000..50_000, 50_000..len]
            .into_iter()
            .map(|r| {
                c.reduce_scatter(
                    &x.narrow(0, r.start as i64, r.len() as i64),
                    &crate::collective::even_ranges(r.len(), 1),
                    ReduceOp::Sum,
                )
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(comm)?;
        for w in works.into_iter().rev() {
            w.wait().map_err(comm)?;
        }
        check("reduce_scatter_buckets", &x);
        c.all_gather(&x, &crate::collective::even_ranges(len, 1)).map_err(comm)?.wait().map_err(comm)?;
        check("all_gather", &x);
        c.broadcast(&x, 0).map_err(comm)?.wait().map_err(comm)?;
        check("broadcast", &x);
        c.barrier().map_err(comm)?;
    }
    let all_ok = results.iter().all(|r| r["ok"] == true);
    Ok(json!({"nccl_version": version, "world_size": 1, "all_ok": all_ok, "results": results}))
}

/// `bench checkpoint-write`: rank 0's share of a checkpoint (`mib` MiB: one third bf16
/// model, in 64 MiB tensors of random values, two thirds fp32 optimizer partition — master
/// weights and both moments — as AdamW holds it) written into `dir` the way checkpoints are
/// written ([`crate::checkpoint::write_rank_files`]: files in parallel, hashed while
/// written; the partition split into files of at least `optimizer_file_mib` MiB), the same
/// with the partition as one file, and the usual way (tch's `write_safetensors` — the
/// safetensors crate's serialiser — fsync, then sha256 read back from the file).
/// Alternates the three `repeats` times; reports the best of each, GB/s and the ratios.
pub fn checkpoint_write(
    dir: &std::path::Path,
    mib: usize,
    repeats: usize,
    optimizer_file_mib: u64,
) -> Result<Value, WorkerError> {
    use crate::checkpoint::{self, sha256_file_for_bench as sha256, write_rank_files, ModelPart, MODEL_FILE};
    if mib == 0 || repeats == 0 || optimizer_file_mib == 0 {
        return Err(WorkerError::Spec("--mib, --repeats and --optimizer-file-mib must be at least 1".into()));
    }
    std::fs::create_dir_all(dir).map_err(|e| WorkerError::io(dir, e))?;
    let bytes = mib << 20;
    let model: Vec<(String, Tensor)> = {
        let per = 32usize << 20;
        let mut left = bytes / 3 / 2;
        let mut out = Vec::new();
        while left > 0 {
            let n = left.min(per);
            out.push((format!("model.{}", out.len()), Tensor::randn([n as i64], (Kind::BFloat16, Device::Cpu))));
            left -= n;
        }
        out
    };
    let elements = ((bytes - bytes / 3) as u64 / checkpoint::OPTIMIZER_BYTES_PER_ELEMENT) as i64;
    let mut state: Vec<(String, Tensor)> = ["master", "exp_avg", "exp_avg_sq"]
        .iter()
        .map(|name| (name.to_string(), Tensor::randn([elements], (Kind::Float, Device::Cpu))))
        .collect();
    state.push(("step".into(), Tensor::from_slice(&[1i64])));
    let split = checkpoint::partition_files(0, 0, elements, optimizer_file_mib.saturating_mul(1 << 20));
    let one_file = checkpoint::partition_files(0, 0, elements, u64::MAX);
    let total: usize = model.iter().chain(&state).map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes()).sum();
    let model_part = ModelPart::of(&model, 0, 1)?;
    let ours = |partition: &[checkpoint::PartitionFile], staging: &std::path::Path| -> Result<f64, WorkerError> {
        std::fs::create_dir_all(staging).map_err(|e| WorkerError::io(staging, e))?;
        let t = Instant::now();
        let model_copy: Vec<(String, Tensor)> = model.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        write_rank_files(staging, partition, &state, (&model_part, model_copy), &[])?;
        let secs = t.elapsed().as_secs_f64();
        let _ = std::fs::remove_dir_all(staging);
        Ok(secs)
    };
    let (mut best_split, mut best_one_file, mut reference) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    for i in 0..repeats {
        best_split = best_split.min(ours(&split, &dir.join(format!("bench-ours-{i}")))?);
        best_one_file = best_one_file.min(ours(&one_file, &dir.join(format!("bench-one-file-{i}")))?);

        let staging = dir.join(format!("bench-reference-{i}"));
        std::fs::create_dir_all(&staging).map_err(|e| WorkerError::io(&staging, e))?;
        let t = Instant::now();
        for (file, tensors) in [(checkpoint::partition_file(0), &state), (MODEL_FILE.to_string(), &model)] {
            let path = staging.join(file);
            let named: Vec<(&str, Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t.shallow_clone())).collect();
            Tensor::write_safetensors(&named, &path)?;
            std::fs::File::open(&path).and_then(|f| f.sync_all()).map_err(|e| WorkerError::io(&path, e))?;
        }
        for file in [checkpoint::partition_file(0), MODEL_FILE.to_string()] {
            sha256(&staging.join(file))?;
        }
        reference = reference.min(t.elapsed().as_secs_f64());
        let _ = std::fs::remove_dir_all(&staging);
    }
    let gbps = |s: f64| total as f64 / 1e9 / s;
    Ok(json!({
        "dir": dir.display().to_string(),
        "bytes": total,
        "repeats": repeats,
        "optimizer_files": split.len(),
        "ours_s": best_split,
        "ours_gb_per_s": gbps(best_split),
        "ours_one_file_s": best_one_file,
        "ours_one_file_gb_per_s": gbps(best_one_file),
        "reference_s": reference,
        "reference_gb_per_s": gbps(reference),
        "speedup": reference / best_split,
        "speedup_over_one_file": best_one_file / best_split,
    }))
}

/// Batched sampling (temperature 1, no stop token, so every row makes `max_new_tokens`) of
/// `prompts` with the model at `checkpoint`, on the CPU with `threads` threads (0 =
/// libtorch's default), best of `repeats`: what `bench/rollout_vs_transformers.sh`
/// compares with transformers' `generate`.
pub fn rollout(
    checkpoint: &std::path::Path,
    prompts: &[Vec<i64>],
    max_new_tokens: usize,
    repeats: usize,
    threads: i32,
    device: &str,
    dtype: &str,
) -> Result<Value, WorkerError> {
    let device = crate::device::parse_device(device).map_err(WorkerError::Device)?;
    let kind = crate::hf::parse_dtype(dtype).map_err(|e| WorkerError::Setup(format!("--{e}")))?;
    if threads > 0 {
        tch::set_num_threads(threads);
    }
    if let Device::Cuda(ordinal) = device {
        if ordinal >= crate::device::cuda_device_count() {
            return Err(WorkerError::Device(format!(
                "--device cuda:{ordinal}: this machine has {} CUDA device(s)",
                crate::device::cuda_device_count()
            )));
        }
    }
    let ckpt = crate::hf::open_checkpoint(checkpoint)?;
    let model = crate::checkpoint::load_model(&ckpt, kind, device)?;
    let opts =
        crate::generate::SamplingOptions { temperature: 1.0, top_p: 1.0, max_new_tokens, stop_token: None, seed: 1 };
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        let out = crate::generate::generate(&model, prompts, &opts).map_err(WorkerError::Spec)?;
        // generate returns host token lists, so the device work is finished here.
        best = best.min(t.elapsed().as_secs_f64());
        debug_assert!(out.iter().all(|o| o.len() == max_new_tokens));
    }
    let tokens = prompts.len() * max_new_tokens;
    Ok(json!({
        "rows": prompts.len(),
        "max_new_tokens": max_new_tokens,
        "threads": tch::get_num_threads(),
        "device": format!("{device:?}"),
        "dtype": format!("{kind:?}"),
        "seconds": best,
        "tokens_per_s": tokens as f64 / best,
    }))
}

/// `‖a − b‖ / ‖b‖`, in fp64.
fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    (&a - &b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-30)
}

/// The hand-written block (`trainer::block`) on one of gpu-1b's blocks (dim 2048, 16/8
/// heads, FFN 5632) at 8 × 2048 tokens in bf16: each fused piece against the same piece
/// composed from ATen ops, and the whole block's forward + backward against autograd's.
/// Errors are relative L2 distances to an fp32 computation on the same bf16 values, so the
/// fused and ATen versions, both bf16, are judged by the same reference.
fn explicit_block(ordinal: usize, k: &Kernels) -> Result<Value, WorkerError> {
    let device = Device::Cuda(ordinal);
    let shape = moxin_layout::ModelShape {
        vocab_size: 32000,
        dim: 2048,
        n_layers: 1,
        n_heads: 16,
        n_kv_heads: 8,
        ffn_dim: 5632,
        max_seq_len: 4096,
        sliding_window: 4096,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        init_std: 0.02,
    };
    let (b, t, dim, ffn) = (8i64, 2048i64, shape.dim as i64, shape.ffn_dim as i64);
    let (heads, kv, hd) = (shape.n_heads as i64, shape.n_kv_heads as i64, shape.head_dim() as i64);
    let mut model = Transformer::new(shape.clone(), Kind::BFloat16, device);
    model.params.initialise(7);
    let mut model32 = Transformer::new(shape, Kind::Float, device);
    tch::no_grad(|| model32.params.flat().shallow_clone().copy_(&model.params.flat().to_kind(Kind::Float)));
    // Norm gains away from 1 so a misplaced gain would show.
    tch::no_grad(|| {
        for m in [&mut model, &mut model32] {
            for p in m.params.params() {
                if p.decl.name.contains("norm") {
                    let mut t = p.tensor.shallow_clone();
                    let wiggle = (Tensor::arange(t.numel() as i64, (Kind::Float, device)) * 0.7).sin() * 0.1 + 1.0;
                    t.copy_(&wiggle.to_kind(t.kind()));
                }
            }
        }
    });
    let (fused, aten) = (Pieces::Fused(k), Pieces::Aten);
    let _guard = tch::no_grad_guard();
    tch::manual_seed(2);
    let bf = |t: Tensor| t.to_kind(Kind::BFloat16);
    let x = bf(Tensor::randn([b, t, dim], (Kind::Float, device)));
    let dy = bf(Tensor::randn([b, t, dim], (Kind::Float, device)) * 0.01);
    let mut pieces = serde_json::Map::new();
    let mut record = |name: &str, errs: Value, aten_ms: f64, fused_ms: f64| {
        pieces.insert(
            name.into(),
            json!({"relative_l2": errs, "aten_ms": aten_ms, "fused_ms": fused_ms, "speedup": aten_ms / fused_ms}),
        );
    };
    let f32_ = |t: &Tensor| t.to_kind(Kind::Float);

    // RMSNorm forward and backward (with the residual gradient).
    let l = model.layer(0);
    let w = &l.input_norm;
    let (y_f, r_f) = fused.rms_norm(&x, w, 1e-5)?;
    let (y_a, _) = aten.rms_norm(&x, w, 1e-5)?;
    let (y_ref, r_ref) = aten.rms_norm(&f32_(&x), &f32_(w), 1e-5)?;
    let res = bf(Tensor::randn([b, t, dim], (Kind::Float, device)) * 0.01);
    let (dx_f, dw_f) = fused.rms_norm_backward(&x, w, &r_f, &dy, Some(&res))?;
    let (dx_a, dw_a) = aten.rms_norm_backward(&x, w, &r_f, &dy, Some(&res))?;
    let (dx_ref, dw_ref) = aten.rms_norm_backward(&f32_(&x), &f32_(w), &r_ref, &f32_(&dy), Some(&f32_(&res)))?;
    record(
        "rmsnorm",
        json!({"fused": {"y": rel_l2(&y_f, &y_ref), "rstd": rel_l2(&r_f, &r_ref), "dx": rel_l2(&dx_f, &dx_ref),
                         "dweight": rel_l2(&dw_f, &dw_ref)},
               "aten": {"y": rel_l2(&y_a, &y_ref), "dx": rel_l2(&dx_a, &dx_ref), "dweight": rel_l2(&dw_a, &dw_ref)}}),
        time_ms(ordinal, 10, || {
            let (_, r) = aten.rms_norm(&x, w, 1e-5)?;
            aten.rms_norm_backward(&x, w, &r, &dy, Some(&res)).map(|_| ())
        })?,
        time_ms(ordinal, 10, || {
            let (_, r) = fused.rms_norm(&x, w, 1e-5)?;
            fused.rms_norm_backward(&x, w, &r, &dy, Some(&res)).map(|_| ())
        })?,
    );

    // RoPE in place on q and k of a qkv projection, and its backward packing dq, dk, dv.
    let qkv = bf(Tensor::randn([b, t, (heads + 2 * kv) * hd], (Kind::Float, device)));
    let (qkv_f, qkv_a, qkv_ref) = (qkv.copy(), qkv.copy(), f32_(&qkv));
    fused.rope(&model, &qkv_f, None, heads, kv)?;
    aten.rope(&model, &qkv_a, None, heads, kv)?;
    aten.rope(&model, &qkv_ref, None, heads, kv)?;
    let grad = |n: i64| bf(Tensor::randn([b, t, n, hd], (Kind::Float, device))).transpose(1, 2);
    let (dq, dk, dv) = (grad(heads), grad(kv), grad(kv));
    let back_f = fused.rope_backward_pack(&model, [&dq, &dk, &dv], None)?;
    let back_a = aten.rope_backward_pack(&model, [&dq, &dk, &dv], None)?;
    let back_ref = aten.rope_backward_pack(&model, [&f32_(&dq), &f32_(&dk), &f32_(&dv)], None)?;
    record(
        "rope",
        json!({"fused": {"forward": rel_l2(&qkv_f, &qkv_ref), "backward": rel_l2(&back_f, &back_ref)},
               "aten": {"forward": rel_l2(&qkv_a, &qkv_ref), "backward": rel_l2(&back_a, &back_ref)}}),
        time_ms(ordinal, 10, || {
            aten.rope(&model, &qkv_a, None, heads, kv)?;
            aten.rope_backward_pack(&model, [&dq, &dk, &dv], None).map(|_| ())
        })?,
        time_ms(ordinal, 10, || {
            fused.rope(&model, &qkv_f, None, heads, kv)?;
            fused.rope_backward_pack(&model, [&dq, &dk, &dv], None).map(|_| ())
        })?,
    );

    // The same with packed rows (positions restarting every 300 tokens), straight through the
    // kernels (which hand-written blocks use for packed rows since an H200 showed them equal).
    let positions = (Tensor::arange(t, (Kind::Int64, device)).remainder(300)).repeat([b, 1]);
    let (qkv_f, qkv_ref) = (qkv.copy(), f32_(&qkv));
    k.rope_forward(&qkv_f, model.rope().tables(), Some(&positions), heads + kv, hd)?;
    aten.rope(&model, &qkv_ref, Some(&positions), heads, kv)?;
    let back_f = k.rope_backward_pack([&dq, &dk, &dv], model.rope().tables(), Some(&positions))?;
    let back_ref = aten.rope_backward_pack(&model, [&f32_(&dq), &f32_(&dk), &f32_(&dv)], Some(&positions))?;
    let rope_packed = json!({"forward": rel_l2(&qkv_f, &qkv_ref), "backward": rel_l2(&back_f, &back_ref)});

    // SwiGLU forward and backward.
    let gu = bf(Tensor::randn([b, t, 2 * ffn], (Kind::Float, device)) * 2.0);
    let da = bf(Tensor::randn([b, t, ffn], (Kind::Float, device)));
    let (a_f, a_a, a_ref) = (fused.swiglu(&gu)?, aten.swiglu(&gu)?, aten.swiglu(&f32_(&gu))?);
    let (g_f, g_a) = (fused.swiglu_backward(&gu, &da)?, aten.swiglu_backward(&gu, &da)?);
    let g_ref = aten.swiglu_backward(&f32_(&gu), &f32_(&da))?;
    record(
        "swiglu",
        json!({"fused": {"forward": rel_l2(&a_f, &a_ref), "backward": rel_l2(&g_f, &g_ref)},
               "aten": {"forward": rel_l2(&a_a, &a_ref), "backward": rel_l2(&g_a, &g_ref)}}),
        time_ms(ordinal, 10, || {
            let _ = aten.swiglu(&gu)?;
            aten.swiglu_backward(&gu, &da).map(|_| ())
        })?,
        time_ms(ordinal, 10, || {
            let _ = fused.swiglu(&gu)?;
            fused.swiglu_backward(&gu, &da).map(|_| ())
        })?,
    );

    // The whole block, forward and backward: autograd (bf16, the default engine), hand-written
    // with ATen pieces and with fused pieces, against autograd in fp32 on the same weights.
    let leaves = Stages::of(model.params.layout()).block_leaves(0);
    let autograd = |m: &Transformer, x: &Tensor, dy: &Tensor| -> Result<Vec<Tensor>, WorkerError> {
        let x = x.detach().set_requires_grad(true);
        let y = tch::with_grad(|| m.block(0, &x));
        let mut wrt = vec![&x];
        wrt.extend(leaves.iter().map(|&i| m.params.leaf_at(i)));
        let surrogate = tch::with_grad(|| y.reshape([-1]).dot(&dy.reshape([-1])));
        Ok(Tensor::f_run_backward(&[surrogate], &wrt, false, false)?)
    };
    // Into an fp32 gradient buffer, as training does. The gradients returned are views of
    // that one buffer: each call's errors are taken before the next call overwrites them.
    let layout = model.params.layout();
    let mut grads = FlatGrads::new(layout, layout.numel, Kind::Float, device);
    let mut explicit = |pieces: Pieces<'_>| -> Result<Vec<Tensor>, WorkerError> {
        grads.begin_step();
        let (_, tape) = block::forward(&model, 0, &x, None, pieces, true, false)?;
        let dx = block::backward(&model, 0, tape, &dy, None, pieces, &mut grads, leaves, false)?;
        Ok(std::iter::once(dx).chain(leaves.iter().map(|&l| grads.leaf(l))).collect())
    };
    let want = autograd(&model32, &f32_(&x), &f32_(&dy))?;
    let names = ["dx", "input_norm", "qkv", "o", "post_norm", "gate_up", "down"];
    let errs = |got: &[Tensor]| -> Value {
        names.iter().zip(got.iter().zip(&want)).map(|(n, (g, w))| ((*n).to_string(), json!(rel_l2(g, w)))).collect()
    };
    let block_errs = json!({
        "autograd_bf16": errs(&autograd(&model, &x, &dy)?),
        "explicit_aten": errs(&explicit(aten)?),
        "explicit_fused": errs(&explicit(fused)?),
    });
    let autograd_ms = time_ms(ordinal, 10, || autograd(&model, &x, &dy).map(|_| ()))?;
    let aten_ms = time_ms(ordinal, 10, || explicit(aten).map(|_| ()))?;
    let fused_ms = time_ms(ordinal, 10, || explicit(fused).map(|_| ()))?;
    // The attention kernels SDPA picks for these shapes (causal, grouped KV heads), as the
    // blocks call it: torch's SDPBackend numbering.
    let q = bf(Tensor::randn([b, t, heads, hd], (Kind::Float, device))).transpose(1, 2);
    let kv_part = bf(Tensor::randn([b, t, kv, hd], (Kind::Float, device))).transpose(1, 2);
    let backend = Tensor::f_internal_fused_sdp_choice(&q, &kv_part, &kv_part, None::<Tensor>, 0.0, true, None, true)
        .map(|c| match c {
            0 => "math".to_string(),
            1 => "flash".to_string(),
            2 => "efficient".to_string(),
            3 => "cudnn".to_string(),
            other => format!("backend {other}"),
        })
        .unwrap_or_else(|e| format!("unknown ({e})"));
    // Whether this libtorch writes bf16 products as fp32 (the weight gradients' path).
    let (pa, pb) =
        (bf(Tensor::randn([64, 32], (Kind::Float, device))), bf(Tensor::randn([32, 48], (Kind::Float, device))));
    let out = Tensor::zeros([64, 48], (Kind::Float, device));
    let fp32_out = |r: Result<Tensor, tch::TchError>| match r {
        Ok(_) => "ok".to_string(),
        Err(e) => e.to_string().lines().next().unwrap_or_default().to_string(),
    };
    let gemm_fp32_out = json!({
        "mm": fp32_out(pa.f_mm_dtype_out(&out, &pb, Kind::Float)),
        "addmm": fp32_out(out.f_addmm_dtype_out(&out, &pa, &pb, Kind::Float)),
    });
    Ok(json!({
        "shape": {"batch": b, "seq": t, "dim": dim, "heads": heads, "kv_heads": kv, "ffn": ffn},
        "attention_backend": backend,
        "gemm_fp32_out": gemm_fp32_out,
        "pieces": pieces,
        "rope_packed_relative_l2": rope_packed,
        "relative_l2_vs_fp32_autograd": block_errs,
        "forward_backward_ms": {"autograd": autograd_ms, "explicit_aten": aten_ms, "explicit_fused": fused_ms},
        "speedup_explicit_fused_vs_autograd": autograd_ms / fused_ms,
    }))
}
