//! The worker's link to the coordinator: URL checks, connecting, the heartbeats that find
//! a dead or hung coordinator, and bounded calls (a hung coordinator accepts connections
//! but never answers, so every call has a deadline, and calls made while training give up
//! as soon as the heartbeats do).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use moxin_proto::security::{Client, ClientSecurity, SecurityError};
use moxin_proto::v1::HeartbeatRequest;

use crate::WorkerError;

/// A coordinator URL must be `http://host:port` (or https); anything else is a typo that
/// no amount of retrying fixes.
pub(super) fn check_url(url: &str) -> Result<(), WorkerError> {
    let bad = |why: &str| {
        WorkerError::Coordinator(format!("--coordinator {url:?} {why}; expected a URL like http://10.0.0.1:50051"))
    };
    let uri: tonic::codegen::http::Uri = url.parse().map_err(|e| bad(&format!("is not a URL ({e})")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => return Err(bad(&format!("has scheme {other:?}"))),
        None => return Err(bad("has no scheme")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    Ok(())
}

/// How long a worker waits for the coordinator to answer one call. A coordinator that
/// hangs (stopped, or its host cut off) accepts connections but never answers; without a
/// bound the worker would wait forever.
pub(super) const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// `call`, failed with `DeadlineExceeded` (which means "coordinator lost") when the
/// coordinator does not answer within `limit`.
pub(super) async fn timed<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<tonic::Response<T>, tonic::Status> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(tonic::Status::deadline_exceeded(format!("no answer within {:.0} s", limit.as_secs_f64())))
    })
}

/// [`timed`], also failed (`Unavailable`) as soon as the heartbeats find the coordinator
/// unreachable: a call to a hung coordinator must not hold up the agent, whose training
/// thread and checkpoint writers wait on it, for longer than detection takes.
pub(super) async fn guarded<T>(
    forgotten: &AtomicU8,
    limit: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<tonic::Response<T>, tonic::Status> {
    let unreachable = async {
        while forgotten.load(Ordering::Relaxed) != Forgotten::Unreachable as u8 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        answer = timed(limit, call) => answer,
        _ = unreachable => Err(tonic::Status::unavailable("the coordinator stopped answering heartbeats")),
    }
}

pub(super) fn rpc_error(what: &str, status: tonic::Status) -> WorkerError {
    use tonic::Code;
    // The coordinator's TLS refusing this worker's certificate (missing, expired, another
    // CA) surfaces as a broken connection at the first call; its cause says so, and
    // retrying cannot fix it.
    let cause = match std::error::Error::source(&status) {
        Some(source) => format!("{}: {}", status.message(), moxin_proto::security::chain(source)),
        None => status.message().to_string(),
    };
    if cause.contains("CertificateRequired") {
        return WorkerError::Coordinator(format!(
            "the coordinator requires a client certificate (mutual TLS) and refused this worker over {what} \
             ({cause}); pass --tls-cert and --tls-key, signed by the CA it trusts (--tls-client-ca there)"
        ));
    }
    if moxin_proto::security::is_tls_verification(&cause) {
        return WorkerError::Coordinator(format!(
            "the coordinator's TLS refused this worker over {what} ({cause}); give --tls-cert and --tls-key: \
             an X.509 v3 certificate signed by the CA the coordinator trusts (--tls-client-ca there), not expired"
        ));
    }
    // HTTP/2 spoken to a TLS port: the server's TLS alert reads as a frame of invalid size.
    if cause.contains("frame with invalid size") {
        return WorkerError::Coordinator(format!(
            "{what} failed ({cause}); if the coordinator serves TLS, use an https:// URL and --tls-ca"
        ));
    }
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => WorkerError::CoordinatorLost(
            format!("lost the connection over {what} ({}); is the coordinator still running?", status.message()),
        ),
        _ => WorkerError::Coordinator(format!("refused {what}: {}", status.message())),
    }
}

pub(super) async fn connect(url: &str, security: &ClientSecurity, timeout: Duration) -> Result<Client, WorkerError> {
    let started = Instant::now();
    let mut last_said = Instant::now();
    loop {
        let left = timeout.saturating_sub(started.elapsed()).max(Duration::from_secs(1));
        let attempt = match tokio::time::timeout(left, security.connect(url)).await {
            Ok(Ok(client)) => Ok(client),
            // A wrong CA, an expired or refused certificate, or TLS options that do not fit
            // the URL: retrying cannot help.
            Ok(Err(e @ (SecurityError::Invalid(_) | SecurityError::File { .. })))
            | Ok(Err(e @ SecurityError::Connect { permanent: true, .. })) => {
                return Err(WorkerError::Coordinator(e.to_string()))
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("it accepted the connection but did not answer".to_string()),
        };
        match attempt {
            Ok(client) => return Ok(client),
            Err(e) if started.elapsed() < timeout => {
                // Workers often start before their coordinator: say so now and then, not at every try.
                if last_said.elapsed() >= Duration::from_secs(5) {
                    tracing::warn!(
                        "coordinator {url} not reachable yet ({e}); retrying for {:.0} s more",
                        (timeout - started.elapsed()).as_secs_f64()
                    );
                    last_said = Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                return Err(WorkerError::Coordinator(format!(
                    "cannot reach {url} after {:.0} s: {e}; check the address and that the coordinator is running",
                    timeout.as_secs_f64()
                )))
            }
        }
    }
}

pub(super) async fn heartbeats(
    mut client: Client,
    worker_id: String,
    step: Arc<Progress>,
    interval: Duration,
    forgotten: Arc<AtomicU8>,
) {
    let mut tick = tokio::time::interval(interval);
    let mut failures = 0;
    loop {
        tick.tick().await;
        let sent_unix_nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let started = Instant::now();
        let request = HeartbeatRequest {
            worker_id: worker_id.clone(),
            step: step.step.load(Ordering::Relaxed),
            sent_unix_nanos,
            compute_s: step.compute_s(),
        };
        // A heartbeat not answered within two intervals counts as failed.
        match timed((interval * 2).max(Duration::from_secs(1)), client.heartbeat(request)).await {
            Ok(_) => metrics::histogram!("moxin_heartbeat_rtt_seconds").record(started.elapsed().as_secs_f64()),
            Err(e) if e.code() == tonic::Code::NotFound => {
                tracing::error!("{}", e.message());
                forgotten.store(Forgotten::Dropped as u8, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                failures += 1;
                tracing::warn!("heartbeat failed ({failures} in a row): {}", e.message());
                // A coordinator whose host died or is cut off never closes the connection:
                // ten silent intervals in a row mean it is gone.
                if failures >= 10 {
                    forgotten.store(Forgotten::Unreachable as u8, Ordering::Relaxed);
                    return;
                }
                continue;
            }
        }
        failures = 0;
    }
}

/// What the heartbeats found out about the coordinator.
#[repr(u8)]
pub(super) enum Forgotten {
    /// All is well.
    No = 0,
    /// It no longer knows this worker.
    Dropped = 1,
    /// It stopped answering.
    Unreachable = 2,
}

/// Logged steps whose compute seconds make up the median the heartbeats carry.
const COMPUTE_WINDOW: usize = 8;

/// What the heartbeats tell the coordinator about this worker's training.
#[derive(Default)]
pub(super) struct Progress {
    pub(super) step: AtomicU64,
    /// The compute seconds of the last [`COMPUTE_WINDOW`] logged steps, oldest first. The
    /// heartbeats carry their median: a step the whole group found slow (a checkpoint, an
    /// evaluation, a busy machine) moves it little, so the coordinator's straggler check
    /// does not flag each rank in turn as their heartbeats arrive; a rank that stays slow
    /// moves it within a few steps.
    recent: std::sync::Mutex<std::collections::VecDeque<f64>>,
}

impl Progress {
    fn recent(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<f64>> {
        self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Step `step` was logged after `compute_s` seconds of compute.
    pub(super) fn record_step(&self, step: u64, compute_s: f64) {
        if compute_s.is_finite() && compute_s > 0.0 {
            let mut recent = self.recent();
            if recent.len() == COMPUTE_WINDOW {
                recent.pop_front();
            }
            recent.push_back(compute_s);
        }
        self.step.store(step, Ordering::Relaxed);
    }

    /// Forgets the compute times: a new group splits the work anew, so the old times say
    /// nothing about this rank's share.
    pub(super) fn new_group(&self) {
        self.recent().clear();
    }

    /// The median compute seconds the heartbeats carry (0 before any step).
    pub(super) fn compute_s(&self) -> f64 {
        let mut sorted: Vec<f64> = self.recent().iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        match n {
            0 => 0.0,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        }
    }
}

/// A refusal because the group moved on to a newer generation is not an error for this
/// worker (its thread is about to stop); anything else is.
pub(super) fn stale_or(status: tonic::Status, what: &str) -> Result<(), WorkerError> {
    if status.code() == tonic::Code::FailedPrecondition && status.message().starts_with("stale generation") {
        tracing::debug!("{what}: {}", status.message());
        return Ok(());
    }
    Err(rpc_error(what, status))
}

#[cfg(test)]
mod progress_tests {
    use super::*;

    #[test]
    fn heartbeats_carry_the_median_of_the_last_steps() {
        let p = Progress::default();
        assert_eq!(p.compute_s(), 0.0);
        p.record_step(1, 1.0);
        assert_eq!(p.compute_s(), 1.0);
        // One slow step (the whole group's, say) barely moves it.
        p.record_step(2, 30.0);
        p.record_step(3, 1.2);
        assert_eq!(p.compute_s(), 1.2);
        assert_eq!(p.step.load(Ordering::Relaxed), 3);
        // A new group starts afresh.
        let q = Progress::default();
        q.record_step(1, 9.0);
        q.new_group();
        assert_eq!(q.compute_s(), 0.0);
        q.record_step(2, 1.0);
        assert_eq!(q.compute_s(), 1.0);
        // Unmeasured steps count as progress but not as compute.
        p.record_step(4, f64::NAN);
        p.record_step(5, 0.0);
        assert_eq!((p.compute_s(), p.step.load(Ordering::Relaxed)), (1.2, 5));
        // A rank that stays slow shows within half the window.
        for step in 6..10 {
            p.record_step(step, 5.0);
        }
        assert_eq!(p.compute_s(), 5.0);
        // Only the last COMPUTE_WINDOW steps count.
        for step in 10..10 + COMPUTE_WINDOW as u64 {
            p.record_step(step, 0.5);
        }
        assert_eq!(p.compute_s(), 0.5);
    }
}
