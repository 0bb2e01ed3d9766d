//! The subcommands: each wires library calls together and reports to the user.

use std::path::Path;

use anyhow::{Context, Result};
use moxin_coordinator::rundir::{self, MetricsLog};
use moxin_worker::collective::Solo;
use moxin_worker::driver::{guard, JobEnd, StopSignals};
use moxin_worker::trainer::{RunEnd, Trainer};
use moxin_worker::WorkerError;

mod kernel_trace;

/// How `train` runs, besides its config.
#[derive(Debug, Default, Clone, Copy)]
pub struct TrainOptions<'a> {
    /// Run directory (default: from the job's name).
    pub out: Option<&'a Path>,
    /// `--set KEY=VALUE` overrides.
    pub overrides: &'a [String],
    /// Stop (with a checkpoint) after this many steps in total.
    pub stop_after: Option<u64>,
    /// `cpu`, `cuda`, `cuda:N`.
    pub device: Option<&'a str>,
    /// Record the GPU kernels of the run's last this-many steps into
    /// `<run dir>/kernel_trace.json`.
    pub trace_kernels: Option<u64>,
}

/// `train`: config → coordinator (validate, resolve, JobSpec, a group of one) → worker
/// (train), with the coordinator's run-directory writer receiving every step's metrics.
/// SIGINT and SIGTERM stop at the next step with a checkpoint.
pub fn train(config: &Path, opts: TrainOptions<'_>) -> Result<JobEnd> {
    let TrainOptions { out, overrides, stop_after, device, trace_kernels } = opts;
    let signals = StopSignals::install()?;
    let device = device.map(moxin_worker::device::parse_device).transpose().map_err(anyhow::Error::msg)?;
    let job = moxin_coordinator::resolve_job(config, overrides, out, 1).map_err(|e| invalid_job(config, e))?;
    let steps = job.spec.train.as_ref().map_or(0, |t| t.steps);
    let runtime = job.spec.runtime.unwrap_or_default();
    let placement = moxin_worker::device::place(&runtime, device).context("choosing the device")?;
    let assignment = moxin_coordinator::plan::solo_assignment(&job.spec, job.samples_per_epoch);
    // This process holds the run directory's lock, so it commits its own checkpoints.
    let committer = std::sync::Arc::new(moxin_worker::checkpoint::LocalCommits::new(&job.run_dir));
    // A panic comes back as "starting the trainer ran out of memory …" (guard names it).
    let mut trainer = guard("starting the trainer", || {
        Trainer::new(&job.spec, &assignment, Box::new(Solo), placement, committer, None)
            .map_err(|e| WorkerError::Setup(format!("starting the trainer: {e}")))
    })?;
    trainer.stop_requested = signals.flag();
    // Only now: a job that cannot resume this run directory must not overwrite its config.
    rundir::write_resolved_config(&job.run_dir, &job.spec.resolved_config_toml)
        .with_context(|| format!("writing the resolved config into {}", job.run_dir.display()))?;
    if trainer.step() >= steps {
        tracing::info!(
            run_dir = %job.run_dir.display(),
            "already finished: the newest checkpoint is at step {} of {steps}; nothing to do (raise train.steps to \
             train further, or pass a new --out to start over)",
            trainer.step()
        );
        return Ok(JobEnd::AlreadyFinished { step: trainer.step() });
    }
    if let Some(stop) = stop_after.filter(|&s| s <= trainer.step()) {
        tracing::info!(
            run_dir = %job.run_dir.display(),
            "already at step {} (--stop-after {stop}): nothing to do; run without --stop-after, or with a later \
             step, to train further",
            trainer.step()
        );
        return Ok(JobEnd::StoppedAfter { step: trainer.step() });
    }
    let checkpoints = !job.spec.checkpoint.as_ref().is_some_and(|c| c.disabled);
    let placement = trainer.placement();
    let params = trainer.model.params.numel();
    let backend = trainer.backend();
    tracing::info!(
        job = %job.spec.name,
        run_dir = %job.run_dir.display(),
        params,
        device = ?placement.device,
        dtype = ?placement.kind,
        backend,
        samples_per_epoch = trainer.samples_per_epoch(),
        "training {steps} steps"
    );
    let mut log = MetricsLog::open(&job.run_dir)
        .with_context(|| format!("opening metrics.jsonl in {}", job.run_dir.display()))?;
    let last_step = match stop_after {
        Some(s) if s < steps => kernel_trace::LastStep::StopAfter(s),
        _ => kernel_trace::LastStep::Steps(steps),
    };
    let mut trace = kernel_trace::Window::new(trace_kernels, &placement, trainer.step(), last_step, &job.run_dir)?;
    let end = guard("training", || {
        trainer.run(stop_after, &mut |m| {
            trace.after_step(m.step);
            // GRPO's loss says little on its own (≈ β·KL); the reward is what it optimises.
            let rollout = if m.rollout {
                format!("  reward {:.3}  truncated {:.0}%", m.reward_mean, 100.0 * m.truncation_ratio)
            } else {
                String::new()
            };
            tracing::info!(
                "step {:>6}/{steps}  loss {:.4}  lr {:.2e}  grad_norm {:.3}  {:.0} tok/s{rollout}",
                m.step,
                m.loss,
                m.lr,
                m.grad_norm,
                m.tokens_per_s
            );
            log.append(m).map_err(|e| format!("{}: {e}", log.path().display()))
        })
    })?;
    let step = trainer.step();
    Ok(match (end, signals.received()) {
        (RunEnd::Finished, _) => {
            tracing::info!(run_dir = %job.run_dir.display(), "finished {steps} steps");
            JobEnd::Finished { step }
        }
        (RunEnd::Stopped, Some(signal)) => {
            if checkpoints {
                tracing::warn!(step, "stopped by {signal} with a checkpoint; run the same command again to resume");
            } else {
                tracing::warn!(step, "stopped by {signal}, without a checkpoint (checkpoint.enabled = false)");
            }
            JobEnd::Stopped { reason: format!("stopped by {signal}") }
        }
        (RunEnd::Stopped, None) if checkpoints => {
            tracing::info!(step, "stopped as asked (--stop-after); run the same command again to resume");
            JobEnd::StoppedAfter { step }
        }
        (RunEnd::Stopped, None) => {
            tracing::warn!(
                step,
                "stopped as asked (--stop-after) without a checkpoint (checkpoint.enabled = false): a rerun starts \
                 from the newest checkpoint there is, if any"
            );
            JobEnd::StoppedAfter { step }
        }
    })
}

/// A configuration error as the CLI reports it: "invalid job <file>: …", unless the error
/// names the file itself (or a --set / environment override) already.
pub(crate) fn invalid_job(config: &Path, e: moxin_coordinator::ConfigError) -> anyhow::Error {
    use moxin_coordinator::ConfigError;
    match e {
        ConfigError::Load { .. } | ConfigError::Override { .. } => anyhow::Error::new(e).context("invalid job"),
        other => anyhow::Error::new(other).context(format!("invalid job {}", config.display())),
    }
}

/// `eval`: prints the report as JSON on stdout.
pub fn eval(checkpoint: &Path, data: &Path, batches: u64, batch_size: u32) -> Result<()> {
    let report = moxin_worker::eval::evaluate(checkpoint, data, batches, batch_size)
        .with_context(|| format!("evaluating {}", checkpoint.display()))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// `eval --prompts`: accuracy on prompts with reference answers, as JSON.
pub fn eval_prompts(checkpoint: &Path, prompts: &Path, opts: &moxin_worker::eval::AccuracyOptions) -> Result<()> {
    let report = moxin_worker::eval::accuracy(checkpoint, prompts, opts)
        .with_context(|| format!("scoring {} on {}", checkpoint.display(), prompts.display()))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// `data prepare-sft`: the template named `template`, the options built around it.
pub fn prepare_sft(
    template: &str,
    options: impl FnOnce(moxin_data::sft::ChatTemplate) -> moxin_data::sft::SftPrepareOptions,
) -> Result<()> {
    let template = moxin_data::sft::ChatTemplate::load(template).context("loading the chat template")?;
    let opts = options(template);
    let manifest = moxin_data::sft::prepare_sft(&opts).context("preparing SFT data")?;
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "out": opts.out_dir.display().to_string(),
            "conversations": manifest.conversations,
            "tokens": manifest.tokens,
            "trained_tokens": manifest.trained_tokens,
            "skipped_no_assistant": manifest.skipped_no_assistant,
            "truncated": manifest.truncated,
            "dropped_overlong": manifest.dropped_overlong,
        }))?
    );
    Ok(())
}

/// `data prepare`.
pub fn prepare(opts: moxin_data::PrepareOptions) -> Result<()> {
    let out = opts.out_dir.clone();
    let manifest = moxin_data::prepare(&opts).context("preparing data")?;
    tracing::info!(
        out = %out.display(),
        documents = manifest.documents,
        tokens = manifest.total_tokens,
        shards = manifest.shards.len(),
        vocab = manifest.tokenizer.vocab_size,
        "prepared"
    );
    println!("{}", serde_json::to_string_pretty(&manifest)?);
    Ok(())
}

/// `model-info`.
pub fn model_info(preset: &str, json: bool) -> Result<()> {
    let shape = model_shape(preset)?;
    let classes = shape.param_classes();
    let total = shape.param_count();
    // Training state before activations, from the same memory plan as `moxin-train plan`.
    let state = |gpus| {
        let input = moxin_layout::memory::PlanInput {
            gpus,
            seq_len: 1,
            micro_batch: 1,
            recompute: moxin_layout::memory::Recompute::None,
            bf16_grads: false,
        };
        let m = moxin_layout::memory::plan(&shape, &input);
        m.params + m.grads + m.optimizer
    };
    let (unsharded, zero1_8) = (state(1), state(8));
    if json {
        let info = serde_json::json!({
            "classes": classes,
            "total_params": total,
            "train_bytes_unsharded": unsharded,
            "train_bytes_zero1_8": zero1_8,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "preset": preset, "shape": shape, "info": info }))?
        );
        return Ok(());
    }
    let size = if total >= 1_000_000_000 {
        format!("{:.2} B", total as f64 / 1e9)
    } else {
        format!("{:.1} M", total as f64 / 1e6)
    };
    println!("{preset}: {size} parameters ({})", thousands(total));
    println!(
        "  layers {}  dim {}  heads {}/{} kv  ffn {}  vocab {}  window {}  rope θ {}",
        shape.n_layers,
        shape.dim,
        shape.n_heads,
        shape.n_kv_heads,
        shape.ffn_dim,
        shape.vocab_size,
        shape.sliding_window,
        shape.rope_theta
    );
    println!("  {:<10} {:>16} {:>12} {:>12}", "class", "parameters", "bf16", "fp32");
    for c in &classes {
        println!("  {:<10} {:>16} {:>12} {:>12}", c.class, thousands(c.params), gib(c.params * 2), gib(c.params * 4));
    }
    println!(
        "  training state, before activations: {} on one GPU (bf16 params, fp32 grads, fp32 master+Adam: 18 B/param); \
         {} per GPU with ZeRO-1 over 8 (see `moxin-train plan` for a full per-GPU plan)",
        gib(unsharded),
        gib(zero1_8)
    );
    Ok(())
}

/// The model `--model` (or `model-info`'s argument) names: a preset, a model TOML, or a
/// checkpoint or run directory (an imported model, an earlier stage).
fn model_shape(model: &str) -> Result<moxin_layout::ModelShape> {
    moxin_coordinator::config::ModelSection::named(model).shape().with_context(|| format!("model {model}"))
}

/// `plan`: the per-GPU memory of a training job, and whether it fits.
pub fn plan(model: &str, input: moxin_layout::memory::PlanInput, gpu_gib: f64, json: bool) -> Result<()> {
    let shape = model_shape(model)?;
    if input.gpus == 0 || input.seq_len == 0 || input.micro_batch == 0 {
        anyhow::bail!("--gpus, --seq and --micro-batch must be at least 1");
    }
    // Past one aligned run of parameters per GPU, more GPUs only add padding (and a plan
    // that lists them would be absurd).
    let most = (shape.param_count() / moxin_layout::PARTITION_ALIGN).max(1);
    if u64::from(input.gpus) > most {
        anyhow::bail!(
            "--gpus {}: more GPUs than {model} has partitions of {} parameters to give them; at most {most}",
            input.gpus,
            moxin_layout::PARTITION_ALIGN
        );
    }
    if input.seq_len > shape.max_seq_len {
        anyhow::bail!("--seq {} exceeds {model}'s max_seq_len {}", input.seq_len, shape.max_seq_len);
    }
    if !(gpu_gib.is_finite() && gpu_gib > 0.0) {
        anyhow::bail!("--gpu-memory-gib {gpu_gib}: expected a positive number of GiB");
    }
    let m = moxin_layout::memory::plan(&shape, &input);
    let fits = m.fits(gpu_gib);
    if json {
        let v = serde_json::json!({"model": model, "gpus": input.gpus, "seq": input.seq_len,
            "micro_batch": input.micro_batch, "recompute": input.recompute, "bf16_grads": input.bf16_grads,
            "bytes": m, "gpu_memory_gib": gpu_gib, "fits": fits});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{model} on {} GPU(s), seq {}, micro-batch {}{}{}: per GPU",
        input.gpus,
        input.seq_len,
        input.micro_batch,
        match input.recompute {
            moxin_layout::memory::Recompute::None => ", keeping every activation",
            moxin_layout::memory::Recompute::Elementwise => ", recomputing norms and SwiGLU",
            moxin_layout::memory::Recompute::Blocks => ", recomputing blocks",
        },
        if input.bf16_grads { ", bf16 gradients" } else { "" }
    );
    for (what, bytes) in [
        ("parameters (bf16)", m.params),
        (if input.bf16_grads { "gradients (bf16)" } else { "gradients (fp32)" }, m.grads),
        ("optimizer partition (fp32 master + Adam)", m.optimizer),
        ("activations", m.activations),
        ("working memory + CUDA context", m.working),
        ("total", m.total),
    ] {
        println!("  {what:<42} {:>10}", gib(bytes));
    }
    if fits {
        println!("fits a {gpu_gib} GiB GPU ({} to spare)", gib((gpu_gib * (1u64 << 30) as f64) as u64 - m.total));
    } else {
        let hint = if input.recompute == moxin_layout::memory::Recompute::Blocks {
            "more GPUs or a smaller micro-batch"
        } else {
            "--recompute (whole blocks), more GPUs or a smaller micro-batch"
        };
        println!("does NOT fit a {gpu_gib} GiB GPU; try {hint}");
    }
    Ok(())
}

/// `doctor`: prints what this machine can run; never fails.
pub fn doctor(json: bool) -> Result<()> {
    let r = moxin_worker::doctor::report();
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("moxin-train {}", env!("CARGO_PKG_VERSION"));
    println!(
        "libtorch     {} ({})",
        r.torch_version.as_deref().unwrap_or("unknown version"),
        r.torch_lib_dir.as_deref().unwrap_or("location unknown")
    );
    if r.cuda_available {
        println!("CUDA         available, {} device(s)", r.devices.len());
        for d in &r.devices {
            println!(
                "  cuda:{}     {}, {} total, {} free, compute capability {}.{}",
                d.ordinal,
                d.name,
                gib(d.memory_bytes),
                gib(d.free_bytes),
                d.compute_capability.0,
                d.compute_capability.1
            );
        }
    } else {
        println!("CUDA         not available (no GPU or no CUDA driver): workers train on the CPU");
    }
    match &r.nccl {
        Some(n) => println!(
            "NCCL         {} ({}, found via {})",
            n.version.as_deref().unwrap_or("does not load"),
            n.library,
            n.source
        ),
        None => println!("NCCL         not found"),
    }
    let c = &r.cpu;
    let yes = |b: bool| if b { "yes" } else { "no" };
    println!(
        "CPU          {} ({}{}), {} cores; AVX-512 {}, AVX512_BF16 {}, AMX {}",
        c.model,
        c.vendor,
        c.family.map_or(String::new(), |f| format!(" family {f}")),
        c.cores,
        yes(c.avx512),
        yes(c.avx512_bf16),
        yes(c.amx)
    );
    println!("fp32 linear  {}", c.fp32_linear);
    println!("worker       would train on {}", r.worker_device);
    println!("collective   cluster.collective = \"auto\" picks {}", r.backend);
    for note in &r.notes {
        println!("note         {note}");
    }
    Ok(())
}

/// `generate`.
/// One prompt: the text continued. Several (decoded together in one batch): one JSON
/// object per line, `{"prompt", "completion"}`.
pub fn generate(checkpoint: &Path, prompts: &[String], opts: moxin_worker::generate::SamplingOptions) -> Result<()> {
    let texts = moxin_worker::generate::generate_texts(checkpoint, prompts, opts)
        .with_context(|| format!("generating with {}", checkpoint.display()))?;
    if let ([prompt], [text]) = (prompts, texts.as_slice()) {
        println!("{prompt}{text}");
        return Ok(());
    }
    for (prompt, text) in prompts.iter().zip(&texts) {
        println!("{}", serde_json::json!({"prompt": prompt, "completion": text}));
    }
    Ok(())
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn gib(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}
pub mod bench;
pub mod cluster;
pub mod hf;
pub mod pipeline;
pub mod status;
