//! The worker agent: registers with the coordinator, heartbeats, waits for its assignment,
//! trains on a dedicated OS thread (tch tensors are not `Sync`, and the training loop must
//! not share a thread with the async runtime), and reports progress over gRPC.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use moxin_proto::security::{Client, ClientSecurity};
use moxin_proto::v1::{
    event, Assignment, CheckpointPart, CollectiveId, FailureReport, JobSpec, RegisterRequest, StepMetrics, StepReport,
    WatchRequest, WorkerIdentity,
};
use tokio::sync::mpsc;

use crate::checkpoint::{Committed, Committer};
use crate::driver::StopSignals;
use crate::trainer::{Handover, RunEnd, Trainer};
use crate::WorkerError;

mod group;
mod link;
use group::{connect_collective, local_devices};
use link::{check_url, connect, guarded, heartbeats, rpc_error, stale_or, timed, Forgotten, Progress, RPC_TIMEOUT};

/// How a worker process connects.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Coordinator URL, e.g. `http://10.0.0.1:50051` (`https://` with TLS).
    pub coordinator: String,
    /// The join token and TLS material presented to the coordinator.
    pub security: ClientSecurity,
    /// Where this worker would like to rank (groups order hinted workers by it).
    pub rank_hint: Option<u32>,
    /// Address to accept collective connections on (`host:port`; port 0 picks one). The
    /// host must be reachable by the other workers.
    pub collective_listen: String,
    /// Serve Prometheus metrics here.
    pub metrics_listen: Option<SocketAddr>,
    /// Give up connecting to the coordinator after this long.
    pub connect_timeout: Duration,
    /// `--device`: the device to train on (else the job's `runtime.device` and the
    /// `LOCAL_RANK` / `SLURM_LOCALID` rules of [`crate::device`]).
    pub device: Option<tch::Device>,
    /// SIGINT / SIGTERM: stop at the next step boundary (checkpointing first).
    pub signals: StopSignals,
}

/// How the worker's part of the job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEnd {
    /// Training finished (`train.steps` reached, now or before).
    Done,
    /// Stopped early on request (a signal here, or the coordinator's stop); checkpointed.
    Stopped(String),
    /// The coordinator stopped the job as failed.
    JobFailed(String),
}

enum TrainMsg {
    Step(StepMetrics),
    /// Rank 0 of an NCCL group made the group's id; the coordinator passes it on.
    CollectiveId(Vec<u8>),
    /// The training thread is done: how, at which step, and the state it hands to this
    /// worker's next generation (after a handover stop).
    Ended(Result<(RunEnd, u64, Option<Handover>), WorkerError>),
    /// A checkpoint writer finished this rank's files: the coordinator commits them.
    Checkpoint(CheckpointPart, std::sync::mpsc::Sender<Result<Committed, WorkerError>>),
}

/// A cluster worker's checkpoint files are committed by the coordinator: the writer thread
/// hands its report to the agent, which owns the connection, and waits for the answer.
struct CoordinatorCommits {
    agent: mpsc::UnboundedSender<TrainMsg>,
}

impl Committer for CoordinatorCommits {
    fn commit(&self, part: CheckpointPart) -> Result<Committed, WorkerError> {
        let (reply, answer) = std::sync::mpsc::channel();
        let gone = || Committed::Abandoned("the worker is shutting down".into());
        if self.agent.send(TrainMsg::Checkpoint(part, reply)).is_err() {
            return Ok(gone());
        }
        answer.recv().unwrap_or_else(|_| Ok(gone()))
    }
}

/// What one coordinator session hands to the next.
#[derive(Default)]
struct Carry {
    /// The newest generation this worker was assigned to.
    generation: u64,
    backlog: Backlog,
    /// Since when the coordinator has been away (cleared once a registration succeeds): a
    /// hung coordinator accepts connections but never answers, so the deadline covers
    /// connecting and registering together.
    lost_since: Option<Instant>,
}

/// What a worker could not tell a coordinator that went away, told to the next one.
#[derive(Default)]
struct Backlog {
    /// Steps trained as rank 0 that could not be reported.
    steps: Vec<StepMetrics>,
    /// Checkpoint files that could not be reported: a restarted coordinator still at
    /// their generation commits them.
    parts: Vec<CheckpointPart>,
}

/// Runs the agent to completion on a fresh tokio runtime.
pub fn run(opts: AgentOptions) -> Result<AgentEnd, WorkerError> {
    check_url(&opts.coordinator)?;
    if let Some(addr) = opts.metrics_listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| WorkerError::Setup(format!("--metrics-listen {addr}: {e}")))?;
        moxin_proto::register_counters(&[]);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| WorkerError::Setup(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(run_async(opts))
}

async fn run_async(opts: AgentOptions) -> Result<AgentEnd, WorkerError> {
    let listener = TcpListener::bind(&opts.collective_listen)
        .map_err(|e| WorkerError::Setup(format!("--collective-listen {}: {e}", opts.collective_listen)))?;
    let collective_address = listener.local_addr().map_err(|e| WorkerError::Setup(e.to_string()))?;
    if collective_address.ip().is_unspecified() {
        return Err(WorkerError::Setup(format!(
            "--collective-listen {}: give an address the other workers can reach, not a wildcard",
            opts.collective_listen
        )));
    }
    let listener = Arc::new(listener);
    let mut carry = Carry::default();
    let mut lost: Option<String> = None;
    // One session per coordinator incarnation: when the coordinator dies, training stops at
    // the next step with a checkpoint, and the worker registers again once it is back (a
    // restarted coordinator continues the job from state.json and the checkpoint).
    loop {
        let budget = opts.connect_timeout.saturating_sub(carry.lost_since.map_or(Duration::ZERO, |t| t.elapsed()));
        let connecting = async {
            tokio::select! {
                client = connect(&opts.coordinator, &opts.security, budget) => Some(client),
                _ = signalled(&opts.signals) => None,
            }
        };
        let Some(connected) = connecting.await else {
            // Already stopped with a checkpoint when the coordinator was lost (if it was).
            return Ok(AgentEnd::Stopped("stopped by a signal while waiting for the coordinator".into()));
        };
        let mut client = match connected {
            Ok(client) => client,
            Err(e) => {
                return Err(match lost {
                    Some(why) => WorkerError::CoordinatorLost(format!(
                        "{why}; it did not come back within {:.0} s (--connect-timeout)",
                        opts.connect_timeout.as_secs_f64()
                    )),
                    None => e,
                })
            }
        };
        if let Some(why) = &lost {
            tracing::warn!("reconnected to the coordinator after: {why}");
        }
        let result = session(
            &opts,
            &mut client,
            listener.clone(),
            collective_address,
            &mut carry,
            budget.max(Duration::from_secs(1)),
        )
        .await;
        match result {
            Err(WorkerError::CoordinatorLost(why)) if opts.signals.received().is_none() => {
                let since = *carry.lost_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= opts.connect_timeout {
                    return Err(WorkerError::CoordinatorLost(format!(
                        "{why}; it did not come back within {:.0} s (--connect-timeout)",
                        opts.connect_timeout.as_secs_f64()
                    )));
                }
                tracing::warn!(
                    "{why}; reconnecting for up to {:.0} s",
                    (opts.connect_timeout - since.elapsed()).as_secs_f64()
                );
                lost = Some(why);
            }
            other => return other,
        }
    }
}

/// Resolves once a stop signal arrived.
async fn signalled(signals: &StopSignals) {
    while signals.received().is_none() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Registers with the coordinator and follows the job until it ends for this worker or
/// the coordinator is lost.
async fn session(
    opts: &AgentOptions,
    client: &mut Client,
    listener: Arc<TcpListener>,
    collective_address: SocketAddr,
    carry: &mut Carry,
    budget: Duration,
) -> Result<AgentEnd, WorkerError> {
    let (devices, nccl_version) = local_devices(opts.device);
    let identity = WorkerIdentity {
        host: moxin_data::process::hostname(),
        pid: std::process::id(),
        instance: format!(
            "{:016x}",
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
                ^ (std::process::id() as u64) << 40
        ),
    };
    let registered = timed(
        RPC_TIMEOUT.min(budget),
        client.register(RegisterRequest {
            identity: Some(identity),
            software_version: moxin_proto::SOFTWARE_VERSION.into(),
            cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            devices,
            collective_address: collective_address.to_string(),
            nccl_version,
            rank_hint: opts.rank_hint,
        }),
    )
    .await
    .map_err(|s| rpc_error("the registration", s))?
    .into_inner();
    carry.lost_since = None;
    let worker_id = registered.worker_id.clone();
    let job = registered.job.ok_or_else(|| WorkerError::Spec("registration returned no job".into()))?;
    tracing::info!(worker = %worker_id, job = %job.name, "registered");
    // Steps this worker trained as rank 0 while the coordinator was away, before any new
    // group reports (the coordinator logs only those that continue its log).
    for m in carry.backlog.steps.drain(..) {
        let request =
            StepReport { worker_id: worker_id.clone(), metrics: Some(m), backfill: true, ..Default::default() };
        timed(RPC_TIMEOUT, client.report_step(request)).await.map_err(|s| rpc_error("a backfilled step report", s))?;
    }
    // Before any new group can form (which abandons older generations' checkpoints).
    for mut part in carry.backlog.parts.drain(..) {
        part.worker_id = worker_id.clone();
        let step = part.step;
        match timed(RPC_TIMEOUT, client.commit_checkpoint(part)).await {
            Ok(_) => tracing::info!(step, "reported this rank's checkpoint files to the coordinator again"),
            Err(status) => tracing::warn!(step, "the checkpoint of step {step} is abandoned: {}", status.message()),
        }
    }

    let step = Arc::new(Progress::default());
    let forgotten = Arc::new(AtomicU8::new(Forgotten::No as u8));
    let interval = Duration::from_millis(registered.heartbeat_interval_ms.max(10) as u64);
    let heartbeat =
        tokio::spawn(heartbeats(client.clone(), worker_id.clone(), step.clone(), interval, forgotten.clone()));
    let mut agent = Agent {
        client: client.clone(),
        worker_id: worker_id.clone(),
        job,
        listener,
        step,
        device: opts.device,
        signals: opts.signals.clone(),
        forgotten,
        training: None,
        pending: None,
        generation: carry.generation,
        stop_reason: None,
        finished: false,
        last: None,
        backlog: Backlog::default(),
        leaving: false,
        collective_id: None,
        carried: None,
    };
    let result = agent.drive().await;
    let result = agent.wind_down(result).await;
    carry.generation = agent.generation;
    carry.backlog = std::mem::take(&mut agent.backlog);
    heartbeat.abort();
    match &result {
        Err(e) if !matches!(e, WorkerError::CoordinatorLost(_)) => {
            let report = FailureReport { worker_id: worker_id.clone(), message: e.to_string(), ..Default::default() };
            let _ = timed(RPC_TIMEOUT, client.report_failure(report)).await;
        }
        // Leaving on purpose is not a failure: say so, so that the others re-form without
        // counting it as one.
        Ok(AgentEnd::Stopped(reason)) if agent.leaving => {
            let report = FailureReport {
                worker_id: worker_id.clone(),
                message: reason.clone(),
                left: true,
                ..Default::default()
            };
            let _ = timed(RPC_TIMEOUT, client.report_failure(report)).await;
        }
        _ => {}
    }
    result
}

/// The training thread of one generation.
struct Training {
    assignment: Assignment,
    messages: mpsc::UnboundedReceiver<TrainMsg>,
    ids: std::sync::mpsc::Sender<Vec<u8>>,
    /// Stops the trainer at the next step boundary (the group agrees on the step).
    stop: Arc<AtomicBool>,
    /// Asks the trainer for a checkpoint at the next step boundary (the group agrees).
    checkpoint: Arc<AtomicBool>,
    /// Stops the trainer at the next step boundary for a new generation, handing the
    /// state over in memory (the group agrees).
    handover: Arc<AtomicBool>,
    /// This worker will not be in the next generation (released).
    leaving: Arc<AtomicBool>,
    /// The next generation's collective addresses, once assigned.
    next_peers: Arc<std::sync::Mutex<Option<Vec<String>>>>,
}

/// One worker's side of the job: follows the coordinator's events, runs one training
/// thread per generation it is assigned to, reports steps, and survives its group
/// breaking (it waits for the next generation).
struct Agent {
    client: Client,
    worker_id: String,
    job: JobSpec,
    /// Accepts ring connections for every generation (each handshake names its generation).
    listener: Arc<TcpListener>,
    step: Arc<Progress>,
    device: Option<tch::Device>,
    signals: StopSignals,
    /// Set by the heartbeats when the coordinator dropped this worker or stopped answering.
    forgotten: Arc<AtomicU8>,
    training: Option<Training>,
    /// A newer generation's assignment, started once the running one has stopped.
    pending: Option<Assignment>,
    /// The newest generation assigned to this worker.
    generation: u64,
    /// Why the job is stopping (a signal here, or the coordinator's stop).
    stop_reason: Option<String>,
    /// The job reached its last step, as this worker's training thread or the coordinator
    /// said first; the other one's word ends this worker.
    finished: bool,
    last: Option<StepMetrics>,
    /// What could not be reported because the coordinator was lost.
    backlog: Backlog,
    /// This worker leaves on purpose (a signal, or released by the coordinator).
    leaving: bool,
    /// The newest generation's NCCL id, as the coordinator relayed it.
    collective_id: Option<(u64, Vec<u8>)>,
    /// The state the last generation's group handed over, for the next one.
    carried: Option<Handover>,
}

impl Agent {
    /// Follows events until the job ends for this worker. Returns with the training thread
    /// possibly still running; [`Agent::wind_down`] stops it and waits.
    async fn drive(&mut self) -> Result<AgentEnd, WorkerError> {
        let mut events = timed(RPC_TIMEOUT, self.client.watch(WatchRequest { worker_id: self.worker_id.clone() }))
            .await
            .map_err(|s| rpc_error("the event subscription", s))?
            .into_inner();
        let mut poll = tokio::time::interval(Duration::from_millis(100));
        loop {
            let message = async {
                match self.training.as_mut() {
                    Some(t) => t.messages.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = poll.tick() => {
                    match self.forgotten.load(Ordering::Relaxed) {
                        x if x == Forgotten::Dropped as u8 => return Err(WorkerError::Coordinator(
                            "the coordinator dropped this worker (it was declared lost); start it again to rejoin".into(),
                        )),
                        x if x == Forgotten::Unreachable as u8 => return Err(WorkerError::CoordinatorLost(
                            "the coordinator stopped answering heartbeats".into(),
                        )),
                        _ => {}
                    }
                    if let (None, Some(signal)) = (&self.stop_reason, self.signals.received()) {
                        tracing::warn!("{signal}: stopping at the next step boundary (checkpointing first)");
                        self.stop_reason = Some(format!("stopped by {signal}"));
                        self.leaving = true;
                        match &self.training {
                            Some(t) => t.stop.store(true, Ordering::Relaxed),
                            None => return Ok(AgentEnd::Stopped(format!("stopped by {signal}"))),
                        }
                    }
                }
                event = events.message() => {
                    let event = match event {
                        Ok(Some(event)) => event,
                        // Finished here and the coordinator is gone: it has nothing left to say.
                        _ if self.finished => return Ok(AgentEnd::Done),
                        Ok(None) => return Err(WorkerError::CoordinatorLost("the coordinator closed the event stream".into())),
                        Err(status) => return Err(rpc_error("the event stream", status)),
                    };
                    if let Some(end) = self.on_event(event.kind)? {
                        return Ok(end);
                    }
                }
                msg = message => {
                    let msg = msg.ok_or_else(|| WorkerError::Panic("the training thread ended without a word".into()))?;
                    if let Some(end) = self.on_training_message(msg).await? {
                        return Ok(end);
                    }
                }
            }
        }
    }

    /// Handles one coordinator event; `Some` when this worker is done.
    fn on_event(&mut self, kind: Option<event::Kind>) -> Result<Option<AgentEnd>, WorkerError> {
        match kind {
            Some(event::Kind::Assignment(a)) => {
                if a.generation <= self.generation {
                    return Ok(None);
                }
                tracing::info!(rank = a.rank, world = a.world_size, generation = a.generation, "assigned");
                self.generation = a.generation;
                // A group re-formed after this one finished (its rank 0 was lost before it
                // could report): the new group resumes at the last step and reports it.
                self.finished = false;
                match &self.training {
                    // The running group stops at its next step boundary and hands its
                    // state over in memory, then this generation starts from it.
                    Some(t) => {
                        if let Ok(mut next) = t.next_peers.lock() {
                            *next = Some(a.peers.clone());
                        }
                        t.handover.store(true, Ordering::Relaxed);
                        self.pending = Some(a);
                    }
                    None => self.start_training(a)?,
                }
            }
            Some(event::Kind::CollectiveId(c)) => {
                if let Some(t) = self.training.as_ref().filter(|t| t.assignment.generation == c.generation) {
                    let _ = t.ids.send(c.id.clone());
                }
                // Kept for a pending generation whose thread has not started yet.
                self.collective_id = Some((c.generation, c.id));
            }
            Some(event::Kind::Checkpoint(c)) => {
                tracing::info!(reason = %c.reason, "checkpoint requested: saving at the next step boundary");
                if let Some(t) = &self.training {
                    t.checkpoint.store(true, Ordering::Relaxed);
                }
            }
            Some(event::Kind::Release(r)) => {
                tracing::info!(reason = %r.reason, "released by the coordinator: leaving at the next step boundary");
                self.leaving = true;
                self.stop_reason.get_or_insert(format!("released: {}", r.reason));
                self.pending = None;
                self.carried = None;
                match &self.training {
                    // The group stops at its next step boundary; this worker gives its
                    // optimizer state to one that stays, then leaves.
                    Some(t) => {
                        t.leaving.store(true, Ordering::Relaxed);
                        t.handover.store(true, Ordering::Relaxed);
                    }
                    None => return Ok(Some(AgentEnd::Stopped(format!("released: {}", r.reason)))),
                }
            }
            Some(event::Kind::Stop(s)) => {
                tracing::info!(reason = %s.reason, failed = s.failed, "the coordinator says stop");
                if let Some(t) = &self.training {
                    t.stop.store(true, Ordering::Relaxed);
                }
                self.pending = None;
                if s.failed {
                    return Ok(Some(AgentEnd::JobFailed(s.reason)));
                }
                if s.finished {
                    // The coordinator confirmed the end (possibly before this worker's own
                    // training thread got there).
                    self.finished = true;
                } else {
                    self.stop_reason.get_or_insert(s.reason);
                }
                if self.training.is_none() {
                    return Ok(Some(match &self.stop_reason {
                        Some(reason) => AgentEnd::Stopped(reason.clone()),
                        None => AgentEnd::Done,
                    }));
                }
            }
            None => {}
        }
        Ok(None)
    }

    /// Handles one message from the training thread; `Some` when this worker is done.
    async fn on_training_message(&mut self, msg: TrainMsg) -> Result<Option<AgentEnd>, WorkerError> {
        let a = &self.training.as_ref().expect("messages come from a training thread").assignment;
        let (rank, generation) = (a.rank, a.generation);
        match msg {
            TrainMsg::Step(m) => {
                self.step.record_step(m.step, m.compute_s);
                if rank == 0 {
                    self.report(generation, Some(m.clone()), false).await?;
                }
                self.last = Some(m);
            }
            TrainMsg::Checkpoint(part, reply) => {
                let outcome = self.commit(part).await;
                let _ = reply.send(outcome);
            }
            TrainMsg::CollectiveId(id) => {
                let request = CollectiveId { worker_id: self.worker_id.clone(), generation, id };
                if let Err(status) =
                    guarded(&self.forgotten, RPC_TIMEOUT, self.client.share_collective_id(request)).await
                {
                    stale_or(status, "the NCCL id")?;
                }
            }
            TrainMsg::Ended(result) => {
                self.training = None;
                match result {
                    Ok((RunEnd::Finished, step, _)) => {
                        if rank != 0 {
                            if self.finished {
                                return Ok(Some(AgentEnd::Done));
                            }
                            // Stay until the coordinator confirms the end: leaving now would look
                            // like a lost worker while rank 0's last report is on its way.
                            self.finished = true;
                            return Ok(None);
                        }
                        // With nothing left to train, no step was reported: say so without metrics.
                        let last = self.last.clone().filter(|m| m.step == step);
                        self.report(generation, last, true).await?;
                        return Ok(Some(AgentEnd::Done));
                    }
                    Ok((RunEnd::Stopped, step, carried)) => {
                        if let Some(reason) = &self.stop_reason {
                            return Ok(Some(AgentEnd::Stopped(reason.clone())));
                        }
                        tracing::info!(
                            step,
                            generation,
                            in_memory = carried.is_some(),
                            "the group stopped for a new generation"
                        );
                        self.carried = carried;
                    }
                    Err(WorkerError::Collective(e)) if self.stop_reason.is_some() || self.finished => {
                        // Stopping or finished anyway: nothing to re-form for.
                        tracing::warn!(generation, "the group broke while ending: {e}");
                        return Ok(Some(match &self.stop_reason {
                            Some(reason) => AgentEnd::Stopped(reason.clone()),
                            None => AgentEnd::Done,
                        }));
                    }
                    Err(WorkerError::Collective(e)) => {
                        // The group broke (a member died or hung); this worker is fine.
                        tracing::warn!(generation, "the group broke: {e}; waiting for the next generation");
                        if self.pending.is_none() {
                            let report = FailureReport {
                                worker_id: self.worker_id.clone(),
                                message: e,
                                group_broke: true,
                                generation,
                                left: false,
                            };
                            guarded(&self.forgotten, RPC_TIMEOUT, self.client.report_failure(report))
                                .await
                                .map_err(|s| rpc_error("a failure report", s))?;
                        }
                    }
                    Err(e) => return Err(e),
                }
                if let Some(next) = self.pending.take() {
                    self.start_training(next)?;
                }
            }
        }
        Ok(None)
    }

    /// After [`Agent::drive`]: a training thread still running is asked to stop at the next
    /// step (its group agrees, so it checkpoints) and waited for, so the process never
    /// exits under a thread that is inside libtorch. Bounded: a group whose peers are gone
    /// fails its next collective within the collective timeout.
    async fn wind_down(&mut self, result: Result<AgentEnd, WorkerError>) -> Result<AgentEnd, WorkerError> {
        let Some(mut training) = self.training.take() else { return result };
        training.stop.store(true, Ordering::Relaxed);
        if let Err(e) = &result {
            tracing::warn!("{e}; stopping training at the next step");
        }
        let rank = training.assignment.rank;
        let coordinator_lost = matches!(result, Err(WorkerError::CoordinatorLost(_)));
        let ended = loop {
            match training.messages.recv().await {
                Some(TrainMsg::Ended(r)) => break Some(r),
                Some(TrainMsg::Step(m)) if rank == 0 => self.backlog.steps.push(m),
                Some(TrainMsg::Checkpoint(part, reply)) if coordinator_lost => {
                    self.backlog.parts.push(part);
                    let _ = reply.send(Ok(Committed::Abandoned(
                        "the coordinator was lost; reported again once it is back".into(),
                    )));
                }
                Some(TrainMsg::Checkpoint(part, reply)) => {
                    let outcome = self.commit(part).await;
                    let _ = reply.send(outcome);
                }
                Some(_) => {}
                None => break None,
            }
        };
        self.training = None;
        match (result, ended) {
            (Err(WorkerError::CoordinatorLost(e)), Some(Ok((_, step, _)))) => Err(WorkerError::CoordinatorLost(
                format!("{e}; training stopped at step {step} (checkpointed unless checkpoints are disabled)"),
            )),
            (Err(e), Some(Ok((_, step, _)))) => {
                tracing::warn!(step, "training stopped (checkpointed unless checkpoints are disabled)");
                Err(e)
            }
            (Err(e), _) => Err(e),
            (Ok(end), Some(Err(e))) if !matches!(end, AgentEnd::JobFailed(_)) => Err(e),
            (Ok(end), _) => Ok(end),
        }
    }

    /// Reports a step (rank 0). A report about a generation that has since been replaced
    /// is dropped: the next group redoes those steps from its checkpoint.
    async fn report(
        &mut self,
        generation: u64,
        metrics: Option<StepMetrics>,
        finished: bool,
    ) -> Result<(), WorkerError> {
        let request = StepReport {
            worker_id: self.worker_id.clone(),
            generation,
            metrics: metrics.clone(),
            finished,
            backfill: false,
        };
        match guarded(&self.forgotten, RPC_TIMEOUT, self.client.report_step(request)).await {
            Ok(_) => Ok(()),
            Err(status) => {
                let e = stale_or(status, "a step report");
                if let (Err(WorkerError::CoordinatorLost(_)), Some(m)) = (&e, metrics) {
                    self.backlog.steps.push(m);
                }
                e
            }
        }
    }

    /// Reports this rank's checkpoint files to the coordinator. Kept for the next
    /// coordinator when this one cannot be reached; abandoned when the group was replaced.
    async fn commit(&mut self, mut part: CheckpointPart) -> Result<Committed, WorkerError> {
        part.worker_id = self.worker_id.clone();
        // Committing does file I/O on the coordinator (fsyncs, renames): generous, but bounded.
        let answer =
            guarded(&self.forgotten, Duration::from_secs(120), self.client.commit_checkpoint(part.clone())).await;
        match answer {
            Ok(_) => Ok(Committed::Accepted),
            Err(status) => match stale_or(status, "a checkpoint report") {
                Ok(()) => Ok(Committed::Abandoned("the group was replaced".into())),
                Err(WorkerError::CoordinatorLost(why)) => {
                    self.backlog.parts.push(part);
                    Ok(Committed::Abandoned(format!("{why}; reported again once it is back")))
                }
                Err(e) => Err(e),
            },
        }
    }

    fn start_training(&mut self, a: Assignment) -> Result<(), WorkerError> {
        self.step.new_group();
        let peers: Vec<SocketAddr> = a
            .peers
            .iter()
            .map(|p| p.parse().map_err(|e| WorkerError::Spec(format!("peer address {p:?}: {e}"))))
            .collect::<Result<_, _>>()?;
        let (tx, messages) = mpsc::unbounded_channel();
        let (ids_tx, ids) = std::sync::mpsc::channel::<Vec<u8>>();
        let stop = Arc::new(AtomicBool::new(self.stop_reason.is_some()));
        let (job, assignment, device, listener) = (self.job.clone(), a.clone(), self.device, self.listener.clone());
        let trainer_stop = stop.clone();
        let checkpoint = Arc::new(AtomicBool::new(false));
        let trainer_checkpoint = checkpoint.clone();
        let (handover, leaving) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (trainer_handover, trainer_leaving) = (handover.clone(), leaving.clone());
        let next_peers: Arc<std::sync::Mutex<Option<Vec<String>>>> = Default::default();
        let trainer_next_peers = next_peers.clone();
        let carried = self.carried.take();
        std::thread::Builder::new()
            .name(format!("moxin-train-g{}", a.generation))
            .spawn(move || {
                let result = crate::driver::guard("training", || {
                    let runtime = job.runtime.as_ref().ok_or_else(|| WorkerError::Spec("missing runtime".into()))?;
                    let placement = crate::device::place(runtime, device)?;
                    let collective = connect_collective(&assignment, &peers, &listener, placement, &ids, &tx)?;
                    tracing::info!(rank = assignment.rank, generation = assignment.generation, backend = collective.backend(), device = ?placement.device, "group connected");
                    let committer = Arc::new(CoordinatorCommits { agent: tx.clone() });
                    let mut trainer = Trainer::new(&job, &assignment, collective, placement, committer, carried)?;
                    trainer.stop_requested = trainer_stop;
                    trainer.checkpoint_requested = trainer_checkpoint;
                    trainer.handover_requested = trainer_handover;
                    trainer.leaving = trainer_leaving;
                    trainer.next_peers = trainer_next_peers;
                    let step_tx = tx.clone();
                    let end = trainer.run(None, &mut |m| {
                        crate::driver::record_step_metrics(m);
                        step_tx.send(TrainMsg::Step(m.clone())).map_err(|_| "the agent is gone".to_string())
                    })?;
                    Ok((end, trainer.step(), trainer.take_handover()))
                });
                let _ = tx.send(TrainMsg::Ended(result));
            })
            .map_err(|e| WorkerError::Setup(format!("cannot start the training thread: {e}")))?;
        if let Some((_, id)) = self.collective_id.as_ref().filter(|(g, _)| *g == a.generation) {
            let _ = ids_tx.send(id.clone());
        }
        self.training =
            Some(Training { assignment: a, messages, ids: ids_tx, stop, checkpoint, handover, leaving, next_peers });
        Ok(())
    }
}
