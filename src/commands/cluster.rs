//! `launch`, `coordinator` and `worker`: the distributed commands.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use moxin_coordinator::rundir;
use moxin_coordinator::server::{CoordinatorService, Phase};
use tokio::net::TcpListener;

/// Exit code after a Ctrl-C stop (128 + SIGINT).
const INTERRUPTED: i32 = 130;

/// `launch`: a coordinator in this process and `workers` worker processes on this machine.
pub fn launch(config: &Path, workers: u32, out: Option<&Path>, overrides: &[String]) -> Result<()> {
    if workers == 0 {
        bail!("--workers must be at least 1");
    }
    let mut overrides = overrides.to_vec();
    overrides.push(format!("cluster.min_workers={workers}"));
    overrides.push(format!("cluster.max_workers={workers}"));
    let job = resolve(config, out, &overrides)?;
    let runtime = runtime()?;
    runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the coordinator")?;
        let url = format!("http://{}", listener.local_addr()?);
        let service = start(job, listener).await?;
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
                    if !status.success() {
                        service.stop(&format!("worker process {i} exited with {status}"), true);
                    }
                }
            });
        }
        let result = follow(&service).await;
        // Workers exit on their own after the stop event (a clean stop checkpoints first);
        // whatever is left after the grace period is killed when the tasks drop.
        let grace = if result.is_ok() || matches!(*service.phase().borrow(), Phase::Stopped(_)) { 120 } else { 5 };
        let _ = tokio::time::timeout(Duration::from_secs(grace), async { while exits.join_next().await.is_some() {} })
            .await;
        exits.abort_all();
        if let Phase::Stopped(reason) = service.phase().borrow().clone() {
            tracing::warn!("job stopped: {reason}; run the same command again to resume");
            std::process::exit(INTERRUPTED);
        }
        result
    })
}

/// `coordinator`: serve a job until it finishes or fails.
pub fn coordinator(config: &Path, listen: Option<&str>, out: Option<&Path>, overrides: &[String]) -> Result<()> {
    let job = resolve(config, out, overrides)?;
    let runtime = runtime()?;
    runtime.block_on(async {
        let addr = listen.map(str::to_string).unwrap_or(job.config.cluster.listen.clone());
        let listener = TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
        tracing::info!("coordinator listening on {}", listener.local_addr()?);
        let service = start(job, listener).await?;
        follow(&service).await?;
        if let Phase::Stopped(reason) = service.phase().borrow().clone() {
            tracing::warn!("job stopped: {reason}");
            // Let the workers receive the stop before the server goes away.
            tokio::time::sleep(Duration::from_secs(2)).await;
            std::process::exit(INTERRUPTED);
        }
        Ok(())
    })
}

/// `worker`.
pub fn worker(
    coordinator: String,
    collective_listen: String,
    metrics_listen: Option<std::net::SocketAddr>,
    device: Option<&str>,
) -> Result<()> {
    let device = device.map(moxin_worker::device::parse_device).transpose().map_err(anyhow::Error::msg)?;
    let end = moxin_worker::agent::run(moxin_worker::agent::AgentOptions {
        coordinator,
        collective_listen,
        metrics_listen,
        connect_timeout: Duration::from_secs(60),
        device,
    })?;
    match end {
        moxin_worker::agent::AgentEnd::Done => Ok(()),
        moxin_worker::agent::AgentEnd::JobFailed(reason) => Err(anyhow!("the job failed: {reason}")),
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

/// Writes the resolved config, starts the gRPC server, metrics endpoint and failure detector.
async fn start(job: moxin_coordinator::ResolvedJob, listener: TcpListener) -> Result<CoordinatorService> {
    let (min, max) = (job.config.cluster.min_workers, job.config.cluster.max());
    rundir::write_resolved_config(&job.run_dir, &job.spec.resolved_config_toml)?;
    if let Some(addr) = &job.config.cluster.metrics_listen {
        let addr: std::net::SocketAddr = addr.parse().with_context(|| format!("cluster.metrics_listen = {addr}"))?;
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("serving metrics on {addr}"))?;
    }
    let timeout = Duration::from_millis(job.config.cluster.heartbeat_timeout_ms as u64);
    tracing::info!(job = %job.spec.name, run_dir = %job.run_dir.display(), min, max, "waiting for workers");
    let service = CoordinatorService::new(job, min, max)?;
    let server = service.clone().into_server();
    tokio::spawn(async move {
        let incoming = tokio_stream_listener(listener);
        if let Err(e) = tonic::transport::Server::builder().add_service(server).serve_with_incoming(incoming).await {
            tracing::error!("gRPC server stopped: {e}");
        }
    });
    tokio::spawn(service.clone().watch_heartbeats(timeout));
    Ok(service)
}

fn tokio_stream_listener(listener: TcpListener) -> tokio_stream::wrappers::TcpListenerStream {
    tokio_stream::wrappers::TcpListenerStream::new(listener)
}

/// Shows progress until the job ends; Ctrl-C stops it cleanly.
async fn follow(service: &CoordinatorService) -> Result<()> {
    let mut phase = service.phase();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut shown = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let p = service.progress();
                if let Some(m) = p.last.filter(|m| m.step != shown) {
                    shown = m.step;
                    tracing::info!(
                        "step {:>6}  loss {:.4}  {:.0} tok/s  workers {}  generation {}",
                        m.step, m.loss, m.tokens_per_s, p.workers, p.generation
                    );
                }
            }
            _ = tokio::signal::ctrl_c() => {
                tracing::warn!("Ctrl-C: stopping the workers (they checkpoint at the next step)");
                service.stop("interrupted by Ctrl-C", false);
            }
            changed = phase.changed() => {
                if changed.is_err() {
                    bail!("coordinator state channel closed");
                }
            }
        }
        match phase.borrow().clone() {
            Phase::Finished => {
                tracing::info!("job finished");
                return Ok(());
            }
            Phase::Failed(reason) => bail!("job failed: {reason}"),
            Phase::Stopped(_) => return Ok(()),
            Phase::Waiting | Phase::Running => {}
        }
    }
}
