//! `launch`, `coordinator` and `worker`: the distributed commands.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use moxin_coordinator::server::{CoordinatorService, Phase};
use moxin_proto::security::{ClientSecurity, JoinToken, ServerSecurity};
use moxin_worker::agent::AgentEnd;
use moxin_worker::driver::{StopSignals, STOPPED_EXIT_CODE};
use tokio::net::TcpListener;

/// How long workers get, after the job ends, to hear it and exit (a clean stop checkpoints
/// first); after that `launch` kills what is left and `coordinator` stops waiting.
const STOP_GRACE: Duration = Duration::from_secs(120);
/// The same after a failure: nothing is left to save, only the reason to deliver.
const FAILURE_GRACE: Duration = Duration::from_secs(5);

/// How `launch` runs its workers.
#[derive(Debug, Clone, Copy)]
pub struct LaunchOptions {
    /// Worker processes.
    pub workers: u32,
    /// Replacements of dead worker processes allowed in all.
    pub max_restarts: u32,
    /// Worker slot i serves Prometheus metrics on 127.0.0.1:(port + i).
    pub worker_metrics_port: Option<u16>,
}

/// `launch`: a coordinator in this process and `workers` worker processes on this machine.
/// A worker process that dies is replaced (at most `max_restarts` times in all); the
/// group re-forms with the replacement and continues from the newest checkpoint. Returns
/// the exit code (0, or the stopped code after a requested stop).
pub fn launch(config: &Path, options: LaunchOptions, out: Option<&Path>, overrides: &[String]) -> Result<i32> {
    let LaunchOptions { workers, max_restarts, worker_metrics_port } = options;
    if let Some(port) = worker_metrics_port {
        if u32::from(port) + workers > 65536 || port == 0 {
            bail!("--worker-metrics-port {port}: ports {port}..{} do not all exist", u32::from(port) + workers);
        }
    }
    if workers == 0 {
        bail!("--workers must be at least 1");
    }
    let signals = StopSignals::install()?;
    // `launch` decides these itself: say so rather than drop a user's setting silently.
    for key in ["cluster.min_workers", "cluster.max_workers", "cluster.listen"] {
        let var = format!("MOXIN__{}", key.to_uppercase().replace('.', "__"));
        let set = overrides.iter().any(|o| o.split_once('=').is_some_and(|(k, _)| k.trim() == key));
        if set || std::env::var_os(&var).is_some() {
            tracing::warn!(
                "{key} (--set or {var}) does not apply to `launch`: it starts --workers {workers} on this machine, \
                 with a coordinator on a loopback port (run `coordinator` and `worker` to choose them)"
            );
        }
    }
    let mut overrides = overrides.to_vec();
    overrides.push(format!("cluster.min_workers={workers}"));
    overrides.push(format!("cluster.max_workers={workers}"));
    let job = resolve(config, out, &overrides)?;
    // Even on loopback, other users of this machine could reach the port: the job gets a
    // fresh token, its workers get it in their environment, and `scale` / `checkpoint` /
    // `status` on the run directory read it from a file only this user can read.
    let token = JoinToken::generate()?;
    let token_file = job.run_dir.join("coordinator").join(TOKEN_FILE);
    std::fs::create_dir_all(job.run_dir.join("coordinator"))
        .and_then(|()| token.write_private(&token_file))
        .with_context(|| format!("writing the job's token to {}", token_file.display()))?;
    let security = ServerSecurity::load(Some(token.clone()), None, None, None)?;
    let runtime = runtime()?;
    runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the coordinator")?;
        let url = format!("http://{}", listener.local_addr()?);
        let Some(service) = start(job, listener, &security).await? else { return Ok(0) };
        let exe = std::env::current_exe().context("locating the moxin-train binary")?;
        let supervisor =
            Supervisor { exe, url, token, workers, max_restarts, worker_metrics_port, service: service.clone() };
        let supervising = tokio::spawn(supervisor.run());
        let end = follow(&service, &signals).await;
        // The workers' exits are their acknowledgements: each has heard the end (and, on a
        // clean stop, checkpointed). Whatever is left after the grace period is killed when
        // the supervisor drops its children.
        let grace = if matches!(end, Phase::Failed(_)) { FAILURE_GRACE } else { STOP_GRACE };
        if tokio::time::timeout(grace, supervising).await.is_err() {
            tracing::warn!("workers still running {} s after the end; killing them", grace.as_secs());
        }
        outcome(end, true)
    })
}

/// `launch`'s worker processes: starts them, replaces those that die while the job runs,
/// and returns once all have exited after the job ended.
struct Supervisor {
    exe: std::path::PathBuf,
    url: String,
    token: JoinToken,
    workers: u32,
    max_restarts: u32,
    worker_metrics_port: Option<u16>,
    service: CoordinatorService,
}

impl Supervisor {
    /// Starts worker `slot`; with `gpus` visible GPUs, slots below that count get their own.
    fn spawn(&self, slot: u32, gpus: usize) -> Result<tokio::process::Child> {
        let own_gpus = (slot as usize) < gpus && gpus >= self.workers as usize;
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.args(["worker", "--coordinator", &self.url]).kill_on_drop(true);
        if let Some(port) = self.worker_metrics_port {
            // A replacement takes its slot's port again, so the scrape target stays the same.
            cmd.args(["--metrics-listen", &format!("127.0.0.1:{}", u32::from(port) + slot)]);
        }
        // The environment, not the command line, where `ps` would show it.
        cmd.env(moxin_proto::security::TOKEN_ENV, self.token.reveal()).env_remove("MOXIN_TOKEN_FILE");
        // Ranks follow arrival here: a scheduler's rank of `launch` itself is not theirs.
        for var in ["MOXIN_RANK_HINT", "JOB_COMPLETION_INDEX", "SLURM_PROCID"] {
            cmd.env_remove(var);
        }
        // With a GPU per worker, worker i trains on GPU i (LOCAL_RANK, as torchrun sets it);
        // with fewer GPUs than workers they share, and the group uses the ring.
        if own_gpus {
            cmd.env("LOCAL_RANK", slot.to_string());
        } else {
            cmd.env_remove("LOCAL_RANK");
        }
        if std::env::var_os("MOXIN_LOG").is_none() {
            cmd.env("MOXIN_LOG", "warn");
        }
        cmd.spawn().with_context(|| format!("starting worker {slot}"))
    }

    async fn run(self) {
        let gpus = if moxin_worker::device::cuda_available() { moxin_worker::device::cuda_device_count() } else { 0 };
        let mut desired = self.service.desired_workers();
        let mut running = tokio::task::JoinSet::new();
        let mut slots: std::collections::BTreeSet<u32> = Default::default();
        let mut restarts = 0;
        loop {
            // Start workers until the wanted count runs (at first, and after `scale` up).
            let wanted = *desired.borrow_and_update();
            if !self.service.phase().borrow().is_over() {
                while (slots.len() as u32) < wanted {
                    let slot = (0..).find(|s| !slots.contains(s)).unwrap_or(0);
                    match self.spawn(slot, gpus) {
                        Ok(mut child) => {
                            slots.insert(slot);
                            running.spawn(async move { (slot, child.wait().await) });
                        }
                        Err(e) => return self.service.stop(&format!("{e:#}"), true),
                    }
                }
            }
            let joined = tokio::select! {
                joined = running.join_next() => joined,
                changed = desired.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let Some(joined) = joined else { return };
            let Ok((slot, status)) = joined else { continue };
            slots.remove(&slot);
            let over = self.service.phase().borrow().is_over();
            // Exit 0 or the stopped code: the worker finished, or left on purpose (a signal,
            // released by `scale`). Anything else is a failure.
            let failed = match &status {
                Ok(s) => !s.success() && s.code() != Some(STOPPED_EXIT_CODE),
                Err(_) => true,
            };
            if over || !failed {
                if running.is_empty() && over {
                    return;
                }
                continue;
            }
            let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
            if restarts >= self.max_restarts {
                let mut reason = format!(
                    "worker process {slot} exited with {status}, and the {} restart(s) allowed (--max-restarts) are used up",
                    self.max_restarts
                );
                if let Some(failure) = self.service.last_failure() {
                    reason.push_str(&format!("; the last failure: {failure}"));
                }
                self.service.stop(&reason, true);
                continue;
            }
            restarts += 1;
            tracing::warn!(
                "worker process {slot} exited with {status}; starting a replacement ({restarts} of {})",
                self.max_restarts
            );
        }
    }
}

/// `coordinator`: serve a job until it finishes, fails or is stopped.
pub fn coordinator(
    config: &Path,
    listen: Option<&str>,
    out: Option<&Path>,
    overrides: &[String],
    security: &ServerSecurity,
) -> Result<i32> {
    let signals = StopSignals::install()?;
    let job = resolve(config, out, overrides)?;
    let runtime = runtime()?;
    runtime.block_on(async {
        let addr = listen.map(str::to_string).unwrap_or(job.config.cluster.listen.clone());
        let listener = TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
        tracing::info!("coordinator listening on {}", listener.local_addr()?);
        let Some(service) = start(job, listener, security).await? else { return Ok(0) };
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
        Phase::Admitting | Phase::Training => {
            Err(anyhow!("the coordinator stopped following a job that had not ended"))
        }
    }
}

/// `worker`. Returns the exit code.
pub fn worker(
    coordinator: String,
    security: ClientSecurity,
    rank_hint: Option<u32>,
    collective_listen: String,
    metrics_listen: Option<std::net::SocketAddr>,
    device: Option<&str>,
    connect_timeout: Duration,
) -> Result<i32> {
    let signals = StopSignals::install()?;
    let device = device.map(moxin_worker::device::parse_device).transpose().map_err(anyhow::Error::msg)?;
    let rank_hint = match rank_hint {
        Some(hint) => Some(hint),
        None => rank_hint_from_environment()?,
    };
    let end = moxin_worker::agent::run(moxin_worker::agent::AgentOptions {
        coordinator,
        security,
        rank_hint,
        collective_listen,
        metrics_listen,
        connect_timeout,
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

/// The rank a scheduler gave this process: a Kubernetes Indexed Job's completion index,
/// else Slurm's task rank.
fn rank_hint_from_environment() -> Result<Option<u32>> {
    for var in ["JOB_COMPLETION_INDEX", "SLURM_PROCID"] {
        if let Ok(value) = std::env::var(var) {
            let hint = value
                .trim()
                .parse()
                .with_context(|| format!("{var}={value:?} is not a rank; unset it or give --rank-hint"))?;
            return Ok(Some(hint));
        }
    }
    Ok(None)
}

/// `scale`: asks the job's coordinator to train with `workers` workers.
pub fn scale(target: &str, workers: u32, security: &crate::ClientSecurityArgs) -> Result<()> {
    let url = coordinator_of(target)?;
    let security = security.load(run_dir_of(target))?;
    runtime()?.block_on(async {
        let reply = connect_to(&url, &security)
            .await?
            .scale(moxin_proto::v1::ScaleRequest { workers })
            .await
            .map_err(|s| anyhow!("the coordinator refused: {}", s.message()))?
            .into_inner();
        println!("scaled to {} worker(s); the group re-forms at its next step boundary", reply.max_workers);
        Ok(())
    })
}

/// `checkpoint`: asks the job's training group to checkpoint at its next step boundary.
pub fn checkpoint(target: &str, security: &crate::ClientSecurityArgs) -> Result<()> {
    let url = coordinator_of(target)?;
    let security = security.load(run_dir_of(target))?;
    runtime()?.block_on(async {
        let reason =
            format!("`moxin-train checkpoint` from {}", std::env::var("USER").unwrap_or_else(|_| "a user".into()));
        let reply = connect_to(&url, &security)
            .await?
            .request_checkpoint(moxin_proto::v1::CheckpointRequest { reason })
            .await
            .map_err(|s| anyhow!("the coordinator refused: {}", s.message()))?
            .into_inner();
        println!(
            "checkpoint requested after step {} (generation {}); it appears under checkpoints/ once written",
            reply.step, reply.generation
        );
        Ok(())
    })
}

/// The coordinator URL of `target`: a coordinator URL, or a run directory whose
/// `coordinator/state.json` names a running job's coordinator.
pub(crate) fn coordinator_of(target: &str) -> Result<String> {
    let url = if target.starts_with("http://") || target.starts_with("https://") {
        target.to_string()
    } else {
        let state = Path::new(target).join("coordinator/state.json");
        let text = std::fs::read_to_string(&state).with_context(|| {
            format!("{target}: no coordinator state; give a run directory of a running job or a URL")
        })?;
        let doc: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", state.display()))?;
        if let Some(phase) = doc.pointer("/phase/phase").and_then(|p| p.as_str()) {
            if matches!(phase, "finished" | "failed" | "stopped") {
                bail!("the job in {target} is not running (it is {phase})");
            }
        }
        doc.get("coordinator_url")
            .and_then(|u| u.as_str())
            .with_context(|| format!("{}: no coordinator_url (is the job running?)", state.display()))?
            .to_string()
    };
    Ok(url)
}

/// `target` as a run directory (not a URL).
pub(crate) fn run_dir_of(target: &str) -> Option<&Path> {
    (!target.starts_with("http://") && !target.starts_with("https://")).then(|| Path::new(target))
}

async fn connect_to(url: &str, security: &ClientSecurity) -> Result<moxin_proto::security::Client> {
    security.connect(url).await.context("is the job running?")
}

/// Where `launch` keeps its job's token: `<run dir>/coordinator/token`, owner-only.
const TOKEN_FILE: &str = "token";

/// The coordinator's requirements from its command-line options.
pub fn server_security(
    token_file: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
    client_ca: Option<&Path>,
) -> Result<ServerSecurity> {
    let token = JoinToken::load(token_file)?;
    Ok(ServerSecurity::load(token, cert, key, client_ca)?)
}

impl crate::ClientSecurityArgs {
    /// What to present: the token from --token-file, else MOXIN_TOKEN, else (for a run
    /// directory target) the token `launch` keeps in it; the TLS material as given.
    pub(crate) fn load(&self, run_dir: Option<&Path>) -> Result<ClientSecurity> {
        let mut token = JoinToken::load(self.token_file.as_deref())?;
        if token.is_none() {
            if let Some(file) = run_dir.map(|d| d.join("coordinator").join(TOKEN_FILE)).filter(|f| f.is_file()) {
                token = Some(JoinToken::from_file(&file)?);
            }
        }
        Ok(ClientSecurity::load(token, self.tls_ca.as_deref(), self.tls_cert.as_deref(), self.tls_key.as_deref())?)
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// Loads the configuration once, validates it for every allowed worker count, and resolves
/// it; nothing is bound or written before this succeeds.
fn resolve(config: &Path, out: Option<&Path>, overrides: &[String]) -> Result<moxin_coordinator::ResolvedJob> {
    let cfg = moxin_coordinator::JobConfig::load_with_process_env(config, overrides)
        .map_err(|e| super::invalid_job(config, e))?;
    let (min, max) = (cfg.cluster.min_workers, cfg.cluster.max());
    for world in min..=max {
        cfg.validate(world).with_context(|| format!("invalid job {} for {world} workers", config.display()))?;
    }
    moxin_coordinator::job::resolve_loaded(config, cfg, out, min).map_err(|e| super::invalid_job(config, e))
}

/// Starts the coordinator's runtime; `None` when the job already finished.
async fn start(
    job: moxin_coordinator::ResolvedJob,
    listener: TcpListener,
    security: &ServerSecurity,
) -> Result<Option<CoordinatorService>> {
    Ok(moxin_coordinator::runtime::serve(job, listener, security).await?)
}

/// Follows the job to its end; SIGINT or SIGTERM stops it cleanly.
async fn follow(service: &CoordinatorService, signals: &StopSignals) -> Phase {
    let signals = signals.clone();
    moxin_coordinator::runtime::follow(service, std::sync::Arc::new(move || signals.received().map(str::to_string)))
        .await
}
