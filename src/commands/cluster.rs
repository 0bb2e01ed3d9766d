//! `launch`, `coordinator` and `worker`: the distributed commands.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use moxin_coordinator::rundir;
use moxin_coordinator::server::{CoordinatorService, Phase};
use moxin_worker::agent::AgentEnd;
use moxin_worker::driver::{StopSignals, STOPPED_EXIT_CODE};
use tokio::net::TcpListener;

/// How long workers get, after the job ends, to hear it and exit (a clean stop checkpoints
/// first); after that `launch` kills what is left and `coordinator` stops waiting.
const STOP_GRACE: Duration = Duration::from_secs(120);
/// The same after a failure: nothing is left to save, only the reason to deliver.
const FAILURE_GRACE: Duration = Duration::from_secs(5);

/// `launch`: a coordinator in this process and `workers` worker processes on this machine.
/// Returns the exit code (0, or the stopped code after a requested stop).
pub fn launch(config: &Path, workers: u32, out: Option<&Path>, overrides: &[String]) -> Result<i32> {
    if workers == 0 {
        bail!("--workers must be at least 1");
    }
    let signals = StopSignals::install()?;
    let mut overrides = overrides.to_vec();
    overrides.push(format!("cluster.min_workers={workers}"));
    overrides.push(format!("cluster.max_workers={workers}"));
    let job = resolve(config, out, &overrides)?;
    let runtime = runtime()?;
    runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the coordinator")?;
        let url = format!("http://{}", listener.local_addr()?);
        let Some(service) = start(job, listener).await? else { return Ok(0) };
        let exe = std::env::current_exe().context("locating the moxin-train binary")?;
        // With a GPU per worker, worker i trains on GPU i (LOCAL_RANK, as torchrun sets it);
        // with fewer GPUs than workers they share, and the group uses the ring.
        let gpus = if moxin_worker::device::cuda_available() { moxin_worker::device::cuda_device_count() } else { 0 };
        let own_gpus = gpus >= workers as usize;
        let mut children = Vec::new();
        for i in 0..workers {
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.args(["worker", "--coordinator", &url]).kill_on_drop(true);
            if own_gpus {
                cmd.env("LOCAL_RANK", i.to_string());
            } else {
                cmd.env_remove("LOCAL_RANK");
            }
            if std::env::var_os("MOXIN_LOG").is_none() {
                cmd.env("MOXIN_LOG", "warn");
            }
            let child = cmd.spawn().with_context(|| format!("starting worker {i}"))?;
            children.push(child);
        }
        let mut exits = tokio::task::JoinSet::new();
        for (i, mut child) in children.into_iter().enumerate() {
            let service = service.clone();
            exits.spawn(async move {
                if let Ok(status) = child.wait().await {
                    // A worker stopped by the same Ctrl-C exits with the stopped code: not a failure.
                    if !status.success() && status.code() != Some(STOPPED_EXIT_CODE) {
                        service.stop(&format!("worker process {i} exited with {status}"), true);
                    }
                }
            });
        }
        let end = follow(&service, &signals).await;
        // The workers' exits are their acknowledgements: each has heard the stop (and, on a
        // clean stop, checkpointed). Whatever is left after the grace period is killed when
        // the tasks drop.
        let grace = if matches!(end, Phase::Failed(_)) { FAILURE_GRACE } else { STOP_GRACE };
        let _ = tokio::time::timeout(grace, async { while exits.join_next().await.is_some() {} }).await;
        exits.abort_all();
        outcome(end, true)
    })
}

/// `coordinator`: serve a job until it finishes, fails or is stopped.
pub fn coordinator(config: &Path, listen: Option<&str>, out: Option<&Path>, overrides: &[String]) -> Result<i32> {
    let signals = StopSignals::install()?;
    let job = resolve(config, out, overrides)?;
    let runtime = runtime()?;
    runtime.block_on(async {
        let addr = listen.map(str::to_string).unwrap_or(job.config.cluster.listen.clone());
        let listener = TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
        tracing::info!("coordinator listening on {}", listener.local_addr()?);
        let Some(service) = start(job, listener).await? else { return Ok(0) };
        let end = follow(&service, &signals).await;
        let grace = if matches!(end, Phase::Failed(_)) { FAILURE_GRACE } else { STOP_GRACE };
        let left = service.drain(grace).await;
        if left > 0 {
            tracing::warn!("{left} worker(s) still connected {} s after the end; not waiting longer", grace.as_secs());
        }
        outcome(end, false)
    })
}

/// The exit code for how the job ended (an error for a failure).
fn outcome(end: Phase, launched: bool) -> Result<i32> {
    match end {
        Phase::Finished => Ok(0),
        Phase::Stopped(reason) => {
            let resume = if launched { "; run the same command again to resume" } else { "" };
            tracing::warn!("job stopped: {reason}{resume}");
            Ok(STOPPED_EXIT_CODE)
        }
        Phase::Failed(reason) => Err(anyhow!("job failed: {reason}")),
        Phase::Waiting | Phase::Running => Err(anyhow!("the coordinator stopped following a job that had not ended")),
    }
}

/// `worker`. Returns the exit code.
pub fn worker(
    coordinator: String,
    collective_listen: String,
    metrics_listen: Option<std::net::SocketAddr>,
    device: Option<&str>,
) -> Result<i32> {
    let signals = StopSignals::install()?;
    let device = device.map(moxin_worker::device::parse_device).transpose().map_err(anyhow::Error::msg)?;
    let end = moxin_worker::agent::run(moxin_worker::agent::AgentOptions {
        coordinator,
        collective_listen,
        metrics_listen,
        connect_timeout: Duration::from_secs(60),
        device,
        signals,
    })?;
    match end {
        AgentEnd::Done => Ok(0),
        AgentEnd::Stopped(reason) => {
            tracing::warn!("{reason}");
            Ok(STOPPED_EXIT_CODE)
        }
        AgentEnd::JobFailed(reason) => Err(anyhow!("the job failed: {reason}")),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// Loads the configuration once, validates it for every allowed worker count, and resolves
/// it; nothing is bound or written before this succeeds.
fn resolve(config: &Path, out: Option<&Path>, overrides: &[String]) -> Result<moxin_coordinator::ResolvedJob> {
    let cfg = moxin_coordinator::JobConfig::load_with_process_env(config, overrides)
        .with_context(|| format!("invalid job {}", config.display()))?;
    let (min, max) = (cfg.cluster.min_workers, cfg.cluster.max());
    for world in min..=max {
        cfg.validate(world).with_context(|| format!("invalid job {} for {world} workers", config.display()))?;
    }
    moxin_coordinator::job::resolve_loaded(config, cfg, out, min)
        .with_context(|| format!("invalid job {}", config.display()))
}

/// Writes the resolved config, starts the gRPC server, metrics endpoint and failure
/// detector. `None` when an earlier run already finished the job (nothing is started).
async fn start(job: moxin_coordinator::ResolvedJob, listener: TcpListener) -> Result<Option<CoordinatorService>> {
    let (min, max) = (job.config.cluster.min_workers, job.config.cluster.max());
    let timeout = Duration::from_millis(job.config.cluster.heartbeat_timeout_ms as u64);
    let (run_dir, name, metrics_listen) = (job.run_dir.clone(), job.spec.name.clone(), job.config.cluster.metrics_listen.clone());
    let resolved_toml = job.spec.resolved_config_toml.clone();
    let service = CoordinatorService::new(job, min, max)
        .with_context(|| format!("opening the coordinator state in {}", run_dir.display()))?;
    if let Some(step) = service.already_finished() {
        tracing::info!(
            run_dir = %run_dir.display(),
            "already finished at step {step}; nothing to do (raise train.steps to train further, or pass a new --out)"
        );
        return Ok(None);
    }
    rundir::write_resolved_config(&run_dir, &resolved_toml)?;
    if let Some(addr) = &metrics_listen {
        let addr: std::net::SocketAddr = addr.parse().with_context(|| format!("cluster.metrics_listen = {addr}"))?;
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("serving metrics on {addr}"))?;
    }
    tracing::info!(job = %name, run_dir = %run_dir.display(), min, max, "waiting for workers");
    let server = service.clone().into_server();
    tokio::spawn(async move {
        let incoming = tokio_stream_listener(listener);
        if let Err(e) = tonic::transport::Server::builder().add_service(server).serve_with_incoming(incoming).await {
            tracing::error!("gRPC server stopped: {e}");
        }
    });
    tokio::spawn(service.clone().watch_heartbeats(timeout));
    Ok(Some(service))
}

fn tokio_stream_listener(listener: TcpListener) -> tokio_stream::wrappers::TcpListenerStream {
    tokio_stream::wrappers::TcpListenerStream::new(listener)
}

/// Shows progress until the job ends and returns how it ended; SIGINT (Ctrl-C) or SIGTERM
/// stops it cleanly (the workers checkpoint at the next step).
async fn follow(service: &CoordinatorService, signals: &StopSignals) -> Phase {
    let mut phase = service.phase();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut shown = 0;
    let mut last_shown = std::time::Instant::now();
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let p = service.progress();
                if let Some(m) = p.last.filter(|m| m.step != shown && last_shown.elapsed() >= Duration::from_secs(1)) {
                    shown = m.step;
                    last_shown = std::time::Instant::now();
                    tracing::info!(
                        "step {:>6}  loss {:.4}  {:.0} tok/s  workers {}  generation {}",
                        m.step, m.loss, m.tokens_per_s, p.workers, p.generation
                    );
                }
                if let (false, Some(signal)) = (stopping, signals.received()) {
                    stopping = true;
                    tracing::warn!("{signal}: stopping the workers (they checkpoint at the next step)");
                    service.stop(&format!("stopped by {signal}"), false);
                }
            }
            changed = phase.changed() => {
                if changed.is_err() {
                    return Phase::Failed("the coordinator's state channel closed".into());
                }
            }
        }
        let now = phase.borrow().clone();
        match now {
            Phase::Finished => {
                tracing::info!("job finished");
                return now;
            }
            Phase::Failed(_) | Phase::Stopped(_) => return now,
            Phase::Waiting | Phase::Running => {}
        }
    }
}
