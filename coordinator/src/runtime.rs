//! The coordinator as a running process: serve the gRPC API, export metrics, detect
//! failures, and follow the job to its end. `moxin-train coordinator` and `launch` are thin
//! wrappers around [`serve`] and [`follow`].

use std::time::{Duration, Instant};

use moxin_proto::security::ServerSecurity;
use tokio::net::TcpListener;

use crate::job::ResolvedJob;
use crate::server::{CoordinatorService, Phase, StopSource};

/// Why the coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The run directory's coordinator state could not be opened.
    #[error("opening the coordinator state in {dir}: {source}")]
    State {
        /// The run directory.
        dir: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The Prometheus endpoint could not be served.
    #[error("cluster.metrics_listen = {addr}: {message}")]
    Metrics {
        /// The configured address.
        addr: String,
        /// What went wrong.
        message: String,
    },
    /// The TLS configuration could not be used.
    #[error(transparent)]
    Security(#[from] moxin_proto::security::SecurityError),
}

/// Starts serving `job` on `listener`: the gRPC service (with `security`'s TLS and join
/// token check on every RPC), the Prometheus endpoint (`cluster.metrics_listen`) and the
/// failure detector, on the current tokio runtime. `None` when an earlier coordinator
/// already finished this job (nothing is started).
pub async fn serve(
    job: ResolvedJob,
    listener: TcpListener,
    security: &ServerSecurity,
) -> Result<Option<CoordinatorService>, RuntimeError> {
    let (min, max) = (job.config.cluster.min_workers, job.config.cluster.max());
    let timeout = Duration::from_millis(job.config.cluster.heartbeat_timeout_ms as u64);
    let (run_dir, name, metrics_listen) =
        (job.run_dir.clone(), job.spec.name.clone(), job.config.cluster.metrics_listen.clone());
    let service = CoordinatorService::new(job, min, max)
        .map_err(|source| RuntimeError::State { dir: run_dir.clone(), source })?;
    if let Some(step) = service.already_finished() {
        tracing::info!(
            run_dir = %run_dir.display(),
            "already finished at step {step}; nothing to do (raise train.steps to train further, or pass a new --out)"
        );
        return Ok(None);
    }
    if let Some(addr) = &metrics_listen {
        let bad = |message: String| RuntimeError::Metrics { addr: addr.clone(), message };
        let socket: std::net::SocketAddr = addr.parse().map_err(|e| bad(format!("{e}")))?;
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(socket)
            .install()
            .map_err(|e| bad(e.to_string()))?;
        moxin_proto::register_counters(&["moxin_workers_lost_total", "moxin_recoveries_total"]);
    }
    if let Ok(addr) = listener.local_addr() {
        service.set_url(&format!("{}://{addr}", security.scheme()));
        if let Some(warning) = security.exposure_warning(addr) {
            tracing::warn!("{warning}");
        }
    }
    tracing::info!(job = %name, run_dir = %run_dir.display(), min, max, "waiting for workers");
    let server =
        tonic::service::interceptor::InterceptedService::new(service.clone().into_server(), security.token_check());
    let mut builder = security.apply(tonic::transport::Server::builder())?;
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        if let Err(e) = builder.add_service(server).serve_with_incoming(incoming).await {
            tracing::error!("gRPC server stopped: {e}");
        }
    });
    tokio::spawn(service.clone().watch_workers(timeout));
    Ok(Some(service))
}

/// Shows progress until the job ends and returns how it ended. `stop_requested` is polled
/// a few times a second (and by the service when a worker leaves); once it names a reason
/// (a signal), the job is stopped cleanly: the workers checkpoint at the next step and exit.
pub async fn follow(service: &CoordinatorService, stop_requested: StopSource) -> Phase {
    service.stop_on_signal(stop_requested.clone());
    let mut phase = service.phase();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut shown = 0;
    let mut last_shown = Instant::now();
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let p = service.progress();
                if let Some(m) = p.last.filter(|m| m.step != shown && last_shown.elapsed() >= Duration::from_secs(1)) {
                    shown = m.step;
                    last_shown = Instant::now();
                    tracing::info!(
                        "step {:>6}  loss {:.4}  {:.0} tok/s  workers {}  generation {}",
                        m.step, m.loss, m.tokens_per_s, p.workers, p.generation
                    );
                }
                if let (false, Some(reason)) = (stopping, stop_requested()) {
                    stopping = true;
                    tracing::warn!("{reason}: stopping the workers (they checkpoint at the next step)");
                    service.stop(&format!("stopped by {reason}"), false);
                }
            }
            changed = phase.changed() => {
                if changed.is_err() {
                    return Phase::Failed("the coordinator's state channel closed".into());
                }
            }
        }
        let now = phase.borrow().clone();
        if now.is_over() {
            if now == Phase::Finished {
                tracing::info!("job finished");
            }
            return now;
        }
    }
}
