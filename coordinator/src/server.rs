//! The coordinator's gRPC service: registration, heartbeats, group formation with ranks,
//! data slices and ZeRO-1 partitions, step reports into `metrics.jsonl`, failure detection.
//!
//! Who is in the group is decided by the pure [`Membership`] state machine; this file turns
//! its [`Change`]s into events on the workers' streams. A worker is lost when its event
//! stream closes (its process died), when it misses heartbeats, or when it reports a fatal
//! error; the group then re-forms without it under a new generation, and the survivors
//! restore from the newest checkpoint. A worker whose group broke but who is itself fine
//! says so (`FailureReport.group_broke`) and is re-grouped.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use moxin_layout::checkpoint::{CheckpointError, Commits};
use moxin_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use moxin_proto::v1::{
    event, Ack, CheckpointNow, CheckpointPart, CheckpointRequest, CheckpointResponse, CollectiveId, DeviceInfo, Event,
    FailureReport, HeartbeatRequest, HeartbeatResponse, JobStatus, RegisterRequest, RegisterResponse, Release,
    ScaleRequest, ScaleResponse, StatusRequest, StepMetrics, StepReport, Stop, WatchRequest, WorkerIdentity,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

#[path = "server_health.rs"]
mod health;
#[path = "server_views.rs"]
mod views;

pub use crate::backend::{choose_backend, MemberDevices};
use crate::job::ResolvedJob;
pub use crate::membership::Phase;
use crate::membership::{Change, Membership, Refusal, SizeRule};
use crate::plan::{assignment, GroupPlan};
use crate::rundir::MetricsLog;

/// What `launch` shows and tests read.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Latest reported step.
    pub last: Option<StepMetrics>,
    /// Registered workers.
    pub workers: usize,
    /// Membership generation.
    pub generation: u64,
    /// Workers lost so far.
    pub failures: u64,
    /// Groups that trained again after losing a member.
    pub recoveries: u64,
}

struct Worker {
    identity: WorkerIdentity,
    collective_address: String,
    devices: Vec<DeviceInfo>,
    nccl_version: String,
    last_seen: Instant,
    events: Option<mpsc::UnboundedSender<Result<Event, Status>>>,
    rank: Option<u32>,
    /// Compute seconds per step (the median of its last few), from its heartbeats.
    compute_s: f64,
    /// Flagged as a straggler now.
    straggler: bool,
    /// Since when its compute time has been over the straggler threshold, unbroken.
    slow_since: Option<Instant>,
    /// Where it would like to rank (see `RegisterRequest.rank_hint`).
    rank_hint: Option<u32>,
}

impl Worker {
    fn describe(&self, id: &str) -> String {
        format!("worker {id} ({}:{})", self.identity.host, self.identity.pid)
    }
}

struct State {
    workers: HashMap<String, Worker>,
    next_id: u64,
    membership: Membership,
    progress: Progress,
    metrics: MetricsLog,
    /// The current generation's NCCL id, once its rank 0 shared it.
    collective_id: Option<Vec<u8>>,
    /// The step the run was at when this coordinator started (from `state.json`).
    start_step: u64,
    /// Workers lost so far.
    failures: u64,
    /// Groups that trained again after losing a member.
    recoveries: u64,
    /// Since when the job has been recovering from a loss (until the next group's first step).
    recovering_since: Option<Instant>,
    /// Whether this coordinator wrote the run's `config.toml`: only once a group trained,
    /// so a job that cannot resume the run directory never replaces the config it had.
    config_written: bool,
    /// Where workers reach this coordinator, once known (`moxin-train scale` reads it).
    url: Option<String>,
    /// The latest worker failure while the job ran, as logged (who, and what it reported).
    last_failure: Option<String>,
}

/// The coordinator of one job.
#[derive(Clone)]
pub struct CoordinatorService {
    job: Arc<ResolvedJob>,
    state: Arc<Mutex<State>>,
    phase_tx: Arc<watch::Sender<Phase>>,
    state_file: PathBuf,
    previous: Option<PreviousRun>,
    /// The worker count wanted now (`launch` starts processes to match).
    desired_tx: Arc<watch::Sender<u32>>,
    /// Checkpoints being committed (a lock of its own: commits do file I/O).
    commits: Arc<Mutex<Commits>>,
    /// The coordinator process's own stop request (a signal), once [`Self::stop_on_signal`]
    /// named where to look.
    stop_signal: Arc<std::sync::OnceLock<StopSource>>,
}

/// Says whether (and why) the coordinator process was asked to stop, e.g. by a signal.
pub type StopSource = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// What an earlier coordinator of the same run directory left in `state.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct PreviousRun {
    /// Its last phase (`admitting`, `training`, `finished`, `failed`, `stopped`).
    pub phase: String,
    /// The last generation it formed.
    pub generation: u64,
    /// The last step reported to it.
    pub step: u64,
    /// Workers the run had lost, and groups that recovered, so far (the run's totals
    /// continue across coordinator restarts).
    pub failures: u64,
    /// See `failures`.
    pub recoveries: u64,
}

impl PreviousRun {
    /// Reads `state.json`; `None` if there is none or it cannot be read (then nothing is
    /// known about earlier runs, which is also what a first run sees).
    pub fn load(state_file: &std::path::Path) -> Option<PreviousRun> {
        let text = std::fs::read_to_string(state_file).ok()?;
        let doc: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| tracing::warn!("ignoring unreadable {}: {e}", state_file.display()))
            .ok()?;
        Some(PreviousRun {
            phase: doc.pointer("/phase/phase").and_then(|p| p.as_str()).unwrap_or("unknown").to_string(),
            generation: doc.get("generation").and_then(|g| g.as_u64()).unwrap_or(0),
            step: doc.get("step").and_then(|g| g.as_u64()).unwrap_or(0),
            failures: doc.get("failures").and_then(|g| g.as_u64()).unwrap_or(0),
            recoveries: doc.get("recoveries").and_then(|g| g.as_u64()).unwrap_or(0),
        })
    }
}

impl CoordinatorService {
    /// A coordinator for `job` expecting between `min_workers` and `max_workers` workers.
    /// It continues where an earlier coordinator of the run directory left off (its
    /// `state.json`): generations keep counting, and a finished job stays finished.
    pub fn new(job: ResolvedJob, min_workers: u32, max_workers: u32) -> std::io::Result<Self> {
        let metrics = MetricsLog::open(&job.run_dir)?;
        let state_dir =
            job.config.cluster.state_dir.as_ref().map(PathBuf::from).unwrap_or_else(|| job.run_dir.join("coordinator"));
        std::fs::create_dir_all(&state_dir)?;
        let state_file = state_dir.join("state.json");
        let previous = PreviousRun::load(&state_file);
        if let Some(p) = &previous {
            tracing::info!(phase = %p.phase, generation = p.generation, step = p.step, "continuing after an earlier coordinator");
        }
        let train = job.config.train.clone();
        let (phase_tx, _) = watch::channel(Phase::Admitting);
        let (desired_tx, _) = watch::channel(max_workers);
        let mut commits = Commits::new(&job.run_dir);
        // A checkpoint every rank wrote but the previous coordinator did not live to publish;
        // then its last generation may still complete one (its workers report again after
        // reconnecting); older ones never will.
        commits.recover();
        commits.abandon_before(previous.as_ref().map_or(0, |p| p.generation));
        let service = CoordinatorService {
            job: Arc::new(job),
            state: Arc::new(Mutex::new(State {
                workers: HashMap::new(),
                next_id: 1,
                // Generations never repeat across coordinator restarts: a worker of an old
                // group can never be mistaken for a member of the new one.
                membership: Membership::with_sizes(
                    min_workers,
                    max_workers,
                    previous.as_ref().map_or(0, |p| p.generation),
                    SizeRule::new(move |w| train.splits_over(w as u32)),
                ),
                progress: Progress::default(),
                metrics,
                collective_id: None,
                start_step: previous.as_ref().map_or(0, |p| p.step),
                failures: previous.as_ref().map_or(0, |p| p.failures),
                recoveries: previous.as_ref().map_or(0, |p| p.recoveries),
                recovering_since: None,
                config_written: false,
                last_failure: None,
                url: None,
            })),
            phase_tx: Arc::new(phase_tx),
            state_file,
            previous,
            desired_tx: Arc::new(desired_tx),
            commits: Arc::new(Mutex::new(commits)),
            stop_signal: Default::default(),
        };
        if service.already_finished().is_none() {
            service.persist(&service.lock());
        }
        Ok(service)
    }

    /// The step an earlier coordinator of this run directory finished the job at, if it did
    /// and this job asks for no more steps: relaunching a finished run does nothing.
    pub fn already_finished(&self) -> Option<u64> {
        let steps = self.job.spec.train.as_ref().map_or(0, |t| t.steps);
        self.previous.as_ref().filter(|p| p.phase == "finished" && p.step >= steps).map(|p| p.step)
    }

    /// The state, also after a panic elsewhere poisoned its lock (every update leaves it
    /// consistent before anything can panic).
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until every worker has closed its event stream (it exits after hearing the
    /// stop and, on a clean stop, checkpointing), so no worker loses the reply to its last
    /// report or the reason the job ended; gives up after `deadline`. Returns the workers
    /// still connected then.
    pub async fn drain(&self, deadline: Duration) -> usize {
        let streams: Vec<_> = self.lock().workers.values().filter_map(|w| w.events.clone()).collect();
        let all_closed = async {
            for tx in &streams {
                tx.closed().await;
            }
        };
        let _ = tokio::time::timeout(deadline, all_closed).await;
        streams.iter().filter(|tx| !tx.is_closed()).count()
    }

    /// The tonic service to serve.
    pub fn into_server(self) -> CoordinatorServer<Self> {
        CoordinatorServer::new(self)
    }

    /// Records the URL workers use to reach this coordinator (persisted in `state.json`).
    pub fn set_url(&self, url: &str) {
        let mut s = self.lock();
        s.url = Some(url.to_string());
        self.persist(&s);
    }

    /// The latest worker failure while the job ran (who failed, and why, as it reported),
    /// so that whoever gives up on the job can say what went wrong.
    pub fn last_failure(&self) -> Option<String> {
        self.lock().last_failure.clone()
    }

    /// The worker count wanted now: `max_workers`, until `moxin-train scale` changes it.
    pub fn desired_workers(&self) -> watch::Receiver<u32> {
        self.desired_tx.subscribe()
    }

    /// Trains with `workers` workers from now on: joiners are admitted up to that many, and
    /// members beyond it are released (at the group's next step boundary they hand their
    /// optimizer state to members that stay and leave, and the rest re-form).
    pub fn scale(&self, workers: u32) -> Result<(u32, u32), String> {
        if workers == 0 {
            return Err("--workers 0: to stop the job, send it SIGINT or SIGTERM (Ctrl-C)".into());
        }
        self.job.config.validate(workers).map_err(|e| format!("cannot train with {workers} workers: {e}"))?;
        let mut s = self.lock();
        if s.membership.phase().is_over() {
            return Err(format!("the job is over ({})", s.membership.phase().name()));
        }
        let change = s.membership.resize(workers, workers);
        // Release the newest members beyond the new size (standby workers first).
        let keep: Vec<String> = s.membership.live().iter().take(workers as usize).cloned().collect();
        for (id, w) in s.workers.iter() {
            if w.events.is_some() && !keep.contains(id) {
                tracing::info!("releasing {} (scaled to {workers} workers)", w.describe(id));
                let reason = format!("scaled down to {workers} workers");
                send(w, Event { kind: Some(event::Kind::Release(Release { reason })) });
            }
        }
        self.apply(&mut s, change);
        self.desired_tx.send_replace(workers);
        tracing::info!("scaled to {workers} workers");
        Ok(s.membership.bounds())
    }

    /// Follows the job's phase.
    pub fn phase(&self) -> watch::Receiver<Phase> {
        self.phase_tx.subscribe()
    }

    /// The latest progress.
    pub fn progress(&self) -> Progress {
        let s = self.lock();
        let mut p = s.progress.clone();
        p.workers = s.workers.len();
        p.generation = s.membership.generation();
        p.failures = s.failures;
        p.recoveries = s.recoveries;
        p
    }

    /// Where to look for the coordinator process's own stop request. Ctrl-C reaches a
    /// terminal's whole process group, so workers started beside the coordinator can hear
    /// it and leave before the coordinator's next look at it: a departure while it is set
    /// stops the job first, so that no group re-forms and nothing counts as lost.
    /// `source` is called with the service's state locked: it must not call back into the
    /// service. The first source set stays.
    pub fn stop_on_signal(&self, source: StopSource) {
        let _ = self.stop_signal.set(source);
    }

    /// Stops the job: every worker is told to stop (`failed` says whether that is a failure).
    pub fn stop(&self, reason: &str, failed: bool) {
        let mut s = self.lock();
        let change = s.membership.stop(reason, failed);
        self.apply(&mut s, change);
    }

    /// Carries out a membership change and publishes the new state (also after
    /// [`Change::None`]: the phase may have changed without anyone to tell).
    fn apply(&self, s: &mut State, change: Change) {
        match change {
            Change::None => {}
            Change::Form { generation, members } => self.form_group(s, generation, &members),
            Change::Stop { reason, failed } => {
                if failed {
                    tracing::error!("the job fails: {reason}");
                }
                broadcast(s, Event { kind: Some(event::Kind::Stop(Stop { reason, failed, finished: false })) });
            }
            Change::Finish => {
                let stop = Stop { reason: "finished".into(), failed: false, finished: true };
                broadcast(s, Event { kind: Some(event::Kind::Stop(stop)) });
            }
        }
        self.publish(s);
    }

    /// Sends generation `generation`'s assignments to `members` (rank = index).
    fn form_group(&self, s: &mut State, generation: u64, members: &[String]) {
        let world = members.len() as u32;
        // A CPU job trains on no GPU, whatever the workers have.
        let cpu_job = self.job.config.runtime.device == crate::config::Device::Cpu;
        let devices: Vec<MemberDevices> = members
            .iter()
            .filter_map(|id| s.workers.get(id).map(|w| (id, w)))
            .map(|(id, w)| MemberDevices {
                worker: format!("{id} ({}:{})", w.identity.host, w.identity.pid),
                host: w.identity.host.clone(),
                gpu: w.devices.iter().find(|d| d.kind == "cuda" && !cpu_job).map(|d| d.uuid.clone()),
                nccl: !w.nccl_version.is_empty(),
            })
            .collect();
        let backend = match choose_backend(self.job.config.cluster.collective, &devices) {
            Ok(b) => b,
            Err(message) => {
                let change = s.membership.stop(&message, true);
                return self.apply(s, change);
            }
        };
        let group_key = match moxin_proto::security::random_key() {
            Ok(key) => key.to_vec(),
            Err(e) => {
                let change = s.membership.stop(&format!("cannot make the group's key: {e}"), true);
                return self.apply(s, change);
            }
        };
        s.collective_id = None;
        self.commits.lock().unwrap_or_else(|p| p.into_inner()).abandon_before(generation);
        let group = GroupPlan {
            group_key,
            generation,
            peers: members.iter().filter_map(|id| s.workers.get(id)).map(|w| w.collective_address.clone()).collect(),
            collective_timeout_ms: self.job.config.cluster.collective_timeout_ms,
            backend,
        };
        // The new generation is on disk before anyone hears of it: a coordinator restarted
        // in between never hands out the same generation twice.
        self.persist(s);
        for w in s.workers.values_mut() {
            w.rank = None;
        }
        for (rank, id) in members.iter().enumerate() {
            let assignment = assignment(&self.job.spec, self.job.samples_per_epoch, &group, world, rank as u32);
            if let Some(w) = s.workers.get_mut(id) {
                w.rank = Some(rank as u32);
                send(w, Event { kind: Some(event::Kind::Assignment(assignment)) });
            }
        }
        tracing::info!(generation, world, backend = ?backend, "group formed");
    }

    fn publish(&self, s: &State) {
        self.persist(s);
        self.phase_tx.send_replace(s.membership.phase().clone());
        metrics::gauge!("moxin_workers_connected").set(s.workers.len() as f64);
        metrics::gauge!("moxin_membership_generation").set(s.membership.generation() as f64);
    }
}

fn broadcast(s: &State, event: Event) {
    for w in s.workers.values() {
        send(w, event.clone());
    }
}

/// Queues `event` for worker `w` (unbounded: events are few and small, and dropping one
/// would leave a worker without its assignment or stop). A worker that is gone is not an
/// error here; the failure detector reports it.
fn send(w: &Worker, event: Event) {
    if let Some(tx) = &w.events {
        if tx.send(Ok(event)).is_err() {
            tracing::debug!(host = %w.identity.host, pid = w.identity.pid, "event for a worker whose stream is closed");
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<Event, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        let req = request.into_inner();
        let identity = req.identity.ok_or_else(|| Status::invalid_argument("identity is required"))?;
        if req.software_version != moxin_proto::SOFTWARE_VERSION {
            return Err(Status::failed_precondition(format!(
                "worker version {} is incompatible with coordinator version {}; run the same moxin-train build everywhere",
                req.software_version,
                moxin_proto::SOFTWARE_VERSION
            )));
        }
        let mut s = self.lock();
        if let Err(refusal) = s.membership.admits(s.workers.len()) {
            return Err(match refusal {
                Refusal::Over(why) => Status::failed_precondition(why),
                Refusal::Full(why) => Status::resource_exhausted(why),
            });
        }
        if s.workers.values().any(|w| w.identity == identity) {
            return Err(Status::already_exists(format!(
                "a worker {}:{} (instance {}) is already registered",
                identity.host, identity.pid, identity.instance
            )));
        }
        req.collective_address
            .parse::<std::net::SocketAddr>()
            .map_err(|e| Status::invalid_argument(format!("collective_address {:?}: {e}", req.collective_address)))?;
        let id = format!("w{}", s.next_id);
        s.next_id += 1;
        tracing::info!(worker = %id, host = %identity.host, pid = identity.pid, "worker registered");
        s.workers.insert(
            id.clone(),
            Worker {
                identity,
                collective_address: req.collective_address,
                devices: req.devices,
                nccl_version: req.nccl_version,
                last_seen: Instant::now(),
                events: None,
                rank: None,
                compute_s: 0.0,
                slow_since: None,
                straggler: false,
                rank_hint: req.rank_hint,
            },
        );
        self.publish(&s);
        Ok(Response::new(RegisterResponse {
            worker_id: id,
            job: Some(self.job.spec.clone()),
            heartbeat_interval_ms: self.job.config.cluster.heartbeat_interval_ms,
        }))
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let req = request.into_inner();
        let now_ns = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        if req.sent_unix_nanos > 0 && now_ns >= req.sent_unix_nanos {
            metrics::histogram!("moxin_heartbeat_latency_seconds").record((now_ns - req.sent_unix_nanos) as f64 / 1e9);
        }
        let mut s = self.lock();
        let generation = s.membership.generation();
        let w = s.workers.get_mut(&req.worker_id).ok_or_else(|| unknown(&req.worker_id))?;
        w.last_seen = Instant::now();
        if req.compute_s > 0.0 && req.compute_s.is_finite() {
            w.compute_s = req.compute_s;
            metrics::gauge!("moxin_rank_compute_seconds", "worker" => req.worker_id.clone()).set(req.compute_s);
            self.flag_stragglers(&mut s);
        }
        Ok(Response::new(HeartbeatResponse { generation }))
    }

    type WatchStream = EventStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let id = request.into_inner().worker_id;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = self.lock();
        let w = s.workers.get_mut(&id).ok_or_else(|| unknown(&id))?;
        w.events = Some(tx);
        w.last_seen = Instant::now();
        let hint = w.rank_hint;
        let change = s.membership.joined(&id, hint);
        if change == Change::None && s.membership.phase() == &Phase::Training {
            let (live, (min, _)) = (s.membership.live().len(), s.membership.bounds());
            tracing::info!(
                worker = %id,
                live,
                "standby: the group of {} grows at its next size ({min} or more workers, one the batch splits over)",
                s.membership.group().len()
            );
        }
        self.apply(&mut s, change);
        Ok(Response::new(Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))))
    }

    async fn report_step(&self, request: Request<StepReport>) -> Result<Response<Ack>, Status> {
        let req = request.into_inner();
        let mut s = self.lock();
        // Steps a replaced group trained before it stopped (they are in the checkpoint the
        // next group starts from), and steps trained while the coordinator was away: logged
        // when they are newer than the log's last; a later group that redoes them
        // overwrites them.
        if req.backfill || (req.generation != s.membership.generation() && !req.finished) {
            if let Some(m) = req.metrics.filter(|m| m.step > s.metrics.last_step()) {
                s.metrics.append(&m).map_err(|e| Status::internal(format!("{}: {e}", s.metrics.path().display())))?;
                s.progress.last = Some(m);
            }
            return Ok(Response::new(Ack {}));
        }
        check_generation(req.generation, s.membership.generation())?;
        if let Some(m) = req.metrics {
            s.metrics.append(&m).map_err(|e| Status::internal(format!("{}: {e}", s.metrics.path().display())))?;
            record_step(&m);
            if !s.config_written {
                s.config_written = true;
                if let Err(e) =
                    crate::rundir::write_resolved_config(&self.job.run_dir, &self.job.spec.resolved_config_toml)
                {
                    tracing::warn!("cannot write config.toml into {}: {e}", self.job.run_dir.display());
                }
            }
            if let Some(since) = s.recovering_since.take() {
                s.recoveries += 1;
                // Recovered: a later give-up is about something else.
                s.last_failure = None;
                metrics::counter!("moxin_recoveries_total").increment(1);
                metrics::histogram!("moxin_recovery_seconds").record(since.elapsed().as_secs_f64());
                tracing::info!(
                    generation = s.membership.generation(),
                    "training again {:.3} s after losing a worker",
                    since.elapsed().as_secs_f64()
                );
            }
            s.progress.last = Some(m);
        } else if !req.finished {
            return Err(Status::invalid_argument("a step report needs metrics"));
        }
        // A finished report carries no metrics when the run had nothing left to train.
        if req.finished {
            let change = s.membership.finished();
            self.apply(&mut s, change);
        } else {
            self.publish(&s);
        }
        Ok(Response::new(Ack {}))
    }

    async fn share_collective_id(&self, request: Request<CollectiveId>) -> Result<Response<Ack>, Status> {
        let req = request.into_inner();
        let mut s = self.lock();
        check_generation(req.generation, s.membership.generation())?;
        let rank = s.workers.get(&req.worker_id).and_then(|w| w.rank);
        if rank != Some(0) {
            return Err(Status::permission_denied(format!(
                "only rank 0 shares the group's id; {} has rank {rank:?}",
                req.worker_id
            )));
        }
        s.collective_id = Some(req.id.clone());
        let event = CollectiveId { worker_id: String::new(), generation: req.generation, id: req.id };
        broadcast(&s, Event { kind: Some(event::Kind::CollectiveId(event)) });
        Ok(Response::new(Ack {}))
    }

    async fn report_failure(&self, request: Request<FailureReport>) -> Result<Response<Ack>, Status> {
        let req = request.into_inner();
        if !self.lock().workers.contains_key(&req.worker_id) {
            return Err(unknown(&req.worker_id));
        }
        if req.left {
            let mut s = self.lock();
            let who = s.workers.get(&req.worker_id).map_or(req.worker_id.clone(), |w| w.describe(&req.worker_id));
            self.remove(&mut s, &req.worker_id, &format!("{who} left: {}", req.message), false);
        } else if req.group_broke {
            tracing::warn!(worker = %req.worker_id, generation = req.generation, "group broke: {}", req.message);
            // Give the failure detector a moment to notice a member that died (its stream
            // closes within milliseconds), so the next group does not include it.
            let settle =
                Duration::from_millis(self.job.config.cluster.heartbeat_interval_ms as u64).min(Duration::from_secs(1));
            let service = self.clone();
            let timeout = Duration::from_millis(self.job.config.cluster.heartbeat_timeout_ms as u64);
            tokio::spawn(async move {
                tokio::time::sleep(settle).await;
                let mut s = service.lock();
                service.reap(&mut s, timeout);
                let change = s.membership.group_broke(&req.worker_id, req.generation, Instant::now());
                if change != Change::None {
                    s.recovering_since.get_or_insert_with(Instant::now);
                }
                service.apply(&mut s, change);
            });
        } else {
            let mut s = self.lock();
            let who = s.workers.get(&req.worker_id).map_or(req.worker_id.clone(), |w| w.describe(&req.worker_id));
            self.lose(&mut s, &req.worker_id, &format!("{who} failed: {}", req.message));
        }
        Ok(Response::new(Ack {}))
    }

    async fn commit_checkpoint(&self, request: Request<CheckpointPart>) -> Result<Response<Ack>, Status> {
        let part = request.into_inner();
        {
            let s = self.lock();
            if !s.workers.contains_key(&part.worker_id) {
                return Err(unknown(&part.worker_id));
            }
            check_generation(part.generation, s.membership.generation())?;
        }
        let (step, rank) = (part.step, part.rank);
        let commits = self.commits.clone();
        let added = tokio::task::spawn_blocking(move || commits.lock().unwrap_or_else(|p| p.into_inner()).add(part))
            .await
            .map_err(|e| Status::internal(format!("the checkpoint committer failed: {e}")))?;
        match added {
            Ok(Some(dir)) => tracing::info!(step, dir = %dir.display(), "checkpoint published"),
            Ok(None) => tracing::debug!(step, rank, "checkpoint part reported"),
            // The group re-formed between the generation check and the commit.
            Err(CheckpointError::Superseded { generation, by, .. }) => {
                return Err(check_generation(generation, by).unwrap_err())
            }
            Err(e) => {
                tracing::warn!(step, rank, "checkpoint not committed: {e}");
                return Err(Status::invalid_argument(format!("checkpoint of step {step} not committed: {e}")));
            }
        }
        Ok(Response::new(Ack {}))
    }

    async fn request_checkpoint(
        &self,
        request: Request<CheckpointRequest>,
    ) -> Result<Response<CheckpointResponse>, Status> {
        let reason = request.into_inner().reason;
        let s = self.lock();
        if *s.membership.phase() != Phase::Training {
            return Err(Status::failed_precondition(format!(
                "no group is training now (the job is {:?}); nothing to checkpoint",
                s.membership.phase()
            )));
        }
        let (generation, step) = (s.membership.generation(), s.progress.last.as_ref().map_or(s.start_step, |m| m.step));
        tracing::info!(generation, step, %reason, "checkpoint requested: the group saves at its next step boundary");
        for w in s.workers.values().filter(|w| w.rank.is_some()) {
            send(w, Event { kind: Some(event::Kind::Checkpoint(CheckpointNow { reason: reason.clone() })) });
        }
        Ok(Response::new(CheckpointResponse { generation, step }))
    }

    async fn get_status(&self, _request: Request<StatusRequest>) -> Result<Response<JobStatus>, Status> {
        Ok(Response::new(self.status_of(&self.lock())))
    }

    async fn scale(&self, request: Request<ScaleRequest>) -> Result<Response<ScaleResponse>, Status> {
        let workers = request.into_inner().workers;
        let (min_workers, max_workers) =
            CoordinatorService::scale(self, workers).map_err(Status::failed_precondition)?;
        Ok(Response::new(ScaleResponse { min_workers, max_workers }))
    }
}

fn unknown(id: &str) -> Status {
    Status::not_found(format!(
        "unknown worker {id}: the coordinator dropped it (lost, or the coordinator restarted); register again"
    ))
}

fn check_generation(reported: u64, current: u64) -> Result<(), Status> {
    if reported != current {
        return Err(Status::failed_precondition(format!(
            "stale generation {reported} (now {current}): the group has re-formed"
        )));
    }
    Ok(())
}

/// The step's figures as Prometheus metrics on the coordinator (the same names as a
/// worker's, plus the time of the last step).
fn record_step(m: &StepMetrics) {
    moxin_proto::record_step(m);
    metrics::gauge!("moxin_last_step_timestamp_seconds")
        .set(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()));
}
