//! The worker agent: registers with the coordinator, heartbeats, waits for its assignment,
//! trains on a dedicated OS thread (tch tensors are not `Sync`, and the training loop must
//! not share a thread with the async runtime), and reports progress over gRPC.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use moxin_proto::v1::coordinator_client::CoordinatorClient;
use moxin_proto::v1::{
    event, Assignment, CollectiveBackend, CollectiveId, DeviceInfo, FailureReport, HeartbeatRequest, JobSpec,
    RegisterRequest, StepMetrics, StepReport, WatchRequest, WorkerIdentity,
};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::collective::nccl::{self, NcclCollective};
use crate::collective::ring::TcpRing;
use crate::collective::{Collective, RingCollective, Solo};
use crate::trainer::{RunEnd, Trainer};
use crate::WorkerError;

/// How a worker process connects.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Coordinator URL, e.g. `http://10.0.0.1:50051`.
    pub coordinator: String,
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
}

/// How the worker's part of the job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEnd {
    /// Training finished (or was stopped cleanly).
    Done,
    /// The coordinator stopped the job as failed.
    JobFailed(String),
}

enum TrainMsg {
    Step(StepMetrics),
    /// Rank 0 of an NCCL group made the group's id; the coordinator passes it on.
    CollectiveId(Vec<u8>),
    Ended(Result<RunEnd, String>),
}

/// The GPU this worker would train on and whether it can load NCCL, for registration.
fn local_devices(explicit: Option<tch::Device>) -> (Vec<DeviceInfo>, String) {
    if explicit == Some(tch::Device::Cpu) || !tch::Cuda::is_available() {
        return (Vec::new(), String::new());
    }
    let explicit = match explicit {
        Some(tch::Device::Cuda(n)) => Some(n),
        _ => None,
    };
    let visible = tch::Cuda::device_count().max(0) as usize;
    let Ok(ordinal) = crate::device::gpu_ordinal(explicit, &|k| std::env::var(k).ok(), visible) else {
        return (Vec::new(), String::new());
    };
    let devices = match crate::cuda::gpu_info(ordinal) {
        Ok(g) => vec![DeviceInfo {
            kind: "cuda".into(),
            name: g.name,
            memory_bytes: g.memory_bytes,
            uuid: g.uuid,
            ordinal: ordinal as u32,
        }],
        Err(e) => {
            tracing::warn!("cannot describe CUDA device {ordinal}: {e}");
            Vec::new()
        }
    };
    (devices, nccl::version().unwrap_or_default())
}

/// Runs the agent to completion on a fresh tokio runtime.
pub fn run(opts: AgentOptions) -> Result<AgentEnd, WorkerError> {
    if let Some(addr) = opts.metrics_listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| WorkerError::Spec(format!("metrics endpoint {addr}: {e}")))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| WorkerError::Spec(format!("tokio runtime: {e}")))?;
    runtime.block_on(run_async(opts))
}

fn rpc_error(what: &str, status: tonic::Status) -> WorkerError {
    WorkerError::Spec(format!("coordinator refused {what}: {}", status.message()))
}

async fn connect(url: &str, timeout: Duration) -> Result<CoordinatorClient<Channel>, WorkerError> {
    let deadline = Instant::now() + timeout;
    loop {
        match CoordinatorClient::connect(url.to_string()).await {
            Ok(client) => return Ok(client),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("coordinator {url} not reachable yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(WorkerError::Spec(format!("cannot reach the coordinator at {url}: {e}"))),
        }
    }
}

async fn run_async(opts: AgentOptions) -> Result<AgentEnd, WorkerError> {
    let listener = TcpListener::bind(&opts.collective_listen)
        .map_err(|e| WorkerError::Spec(format!("--collective-listen {}: {e}", opts.collective_listen)))?;
    let collective_address = listener.local_addr().map_err(|e| WorkerError::Spec(e.to_string()))?;
    if collective_address.ip().is_unspecified() {
        return Err(WorkerError::Spec(format!(
            "--collective-listen {}: give an address the other workers can reach, not a wildcard",
            opts.collective_listen
        )));
    }
    let mut client = connect(&opts.coordinator, opts.connect_timeout).await?;
    let (devices, nccl_version) = local_devices(opts.device);
    let identity = WorkerIdentity {
        host: hostname(),
        pid: std::process::id(),
        instance: format!(
            "{:016x}",
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
                ^ (std::process::id() as u64) << 40
        ),
    };
    let registered = client
        .register(RegisterRequest {
            identity: Some(identity),
            software_version: moxin_proto::SOFTWARE_VERSION.into(),
            cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            devices,
            collective_address: collective_address.to_string(),
            nccl_version,
        })
        .await
        .map_err(|s| rpc_error("registration", s))?
        .into_inner();
    let worker_id = registered.worker_id.clone();
    let job = registered.job.ok_or_else(|| WorkerError::Spec("registration returned no job".into()))?;
    tracing::info!(worker = %worker_id, job = %job.name, "registered");

    let step = Arc::new(AtomicU64::new(0));
    let interval = Duration::from_millis(registered.heartbeat_interval_ms.max(10) as u64);
    let heartbeat = tokio::spawn(heartbeats(client.clone(), worker_id.clone(), step.clone(), interval));
    let result = drive(&mut client, &worker_id, job, listener, step, opts.device).await;
    heartbeat.abort();
    if let Err(e) = &result {
        let _ = client.report_failure(FailureReport { worker_id: worker_id.clone(), message: e.to_string() }).await;
    }
    result
}

async fn heartbeats(
    mut client: CoordinatorClient<Channel>,
    worker_id: String,
    step: Arc<AtomicU64>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        let sent_unix_nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let started = Instant::now();
        let request =
            HeartbeatRequest { worker_id: worker_id.clone(), step: step.load(Ordering::Relaxed), sent_unix_nanos };
        match client.heartbeat(request).await {
            Ok(_) => metrics::histogram!("moxin_heartbeat_rtt_seconds").record(started.elapsed().as_secs_f64()),
            Err(e) => tracing::warn!("heartbeat failed: {}", e.message()),
        }
    }
}

async fn drive(
    client: &mut CoordinatorClient<Channel>,
    worker_id: &str,
    job: JobSpec,
    listener: TcpListener,
    step: Arc<AtomicU64>,
    device: Option<tch::Device>,
) -> Result<AgentEnd, WorkerError> {
    let mut events = client
        .watch(WatchRequest { worker_id: worker_id.to_string() })
        .await
        .map_err(|s| rpc_error("watch", s))?
        .into_inner();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = Arc::new(AtomicBool::new(false));
    let mut listener = Some(listener);
    let mut assignment: Option<Assignment> = None;
    let (id_tx, id_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let mut id_rx = Some(id_rx);
    let mut last: Option<StepMetrics> = None;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                // A worker's own Ctrl-C (or the terminal's, reaching the whole process group
                // under `launch`) is a clean stop: the group agrees on it at the next step.
                tracing::warn!("Ctrl-C: stopping at the next step boundary");
                stop.store(true, Ordering::Relaxed);
                if assignment.is_none() {
                    return Ok(AgentEnd::Done);
                }
            }
            event = events.message() => {
                match event.map_err(|s| rpc_error("the event stream", s))? {
                    Some(e) => match e.kind {
                        Some(event::Kind::Assignment(a)) => {
                            tracing::info!(rank = a.rank, world = a.world_size, generation = a.generation, "assigned");
                            let listener = listener.take().ok_or_else(|| WorkerError::Spec("second assignment: re-forming groups is not supported yet".into()))?;
                            let ids = id_rx.take().expect("one assignment per process");
                            spawn_training(job.clone(), a.clone(), listener, device, ids, stop.clone(), tx.clone())?;
                            assignment = Some(a);
                        }
                        Some(event::Kind::CollectiveId(c)) if assignment.as_ref().is_some_and(|a| a.generation == c.generation) => {
                            let _ = id_tx.send(c.id);
                        }
                        Some(event::Kind::CollectiveId(_)) => {}
                        Some(event::Kind::Stop(s)) => {
                            tracing::info!(reason = %s.reason, "coordinator says stop");
                            stop.store(true, Ordering::Relaxed);
                            if s.failed {
                                return Ok(AgentEnd::JobFailed(s.reason));
                            }
                            if assignment.is_none() {
                                return Ok(AgentEnd::Done);
                            }
                        }
                        None => {}
                    },
                    None => return Err(WorkerError::Spec("the coordinator closed the event stream".into())),
                }
            }
            msg = rx.recv() => {
                let a = assignment.as_ref().expect("training runs only after an assignment");
                match msg {
                    Some(TrainMsg::Step(m)) => {
                        step.store(m.step, Ordering::Relaxed);
                        if a.rank == 0 {
                            report(client, worker_id, a.generation, &m, false).await?;
                        }
                        last = Some(m);
                    }
                    Some(TrainMsg::CollectiveId(id)) => {
                        client
                            .share_collective_id(CollectiveId { worker_id: worker_id.to_string(), generation: a.generation, id })
                            .await
                            .map_err(|s| rpc_error("the NCCL id", s))?;
                    }
                    Some(TrainMsg::Ended(Ok(end))) => {
                        if a.rank == 0 {
                            if let (RunEnd::Finished, Some(m)) = (end, &last) {
                                report(client, worker_id, a.generation, m, true).await?;
                            }
                        }
                        return Ok(AgentEnd::Done);
                    }
                    Some(TrainMsg::Ended(Err(e))) => return Err(WorkerError::Spec(e)),
                    None => return Err(WorkerError::Spec("the training thread vanished".into())),
                }
            }
        }
    }
}

async fn report(
    client: &mut CoordinatorClient<Channel>,
    worker_id: &str,
    generation: u64,
    m: &StepMetrics,
    finished: bool,
) -> Result<(), WorkerError> {
    client
        .report_step(StepReport { worker_id: worker_id.to_string(), generation, metrics: Some(*m), finished })
        .await
        .map_err(|s| rpc_error("a step report", s))?;
    Ok(())
}

fn spawn_training(
    job: JobSpec,
    a: Assignment,
    listener: TcpListener,
    device: Option<tch::Device>,
    ids: std::sync::mpsc::Receiver<Vec<u8>>,
    stop: Arc<AtomicBool>,
    tx: mpsc::UnboundedSender<TrainMsg>,
) -> Result<(), WorkerError> {
    let peers: Vec<SocketAddr> = a
        .peers
        .iter()
        .map(|p| p.parse().map_err(|e| WorkerError::Spec(format!("peer address {p:?}: {e}"))))
        .collect::<Result<_, _>>()?;
    std::thread::Builder::new()
        .name("moxin-train".into())
        .spawn(move || {
            let result = (|| -> Result<RunEnd, WorkerError> {
                let runtime = job.runtime.as_ref().ok_or_else(|| WorkerError::Spec("missing runtime".into()))?;
                let placement = crate::device::place(runtime, device)?;
                let collective = connect_collective(&a, &peers, &listener, placement, &ids, &tx)?;
                tracing::info!(rank = a.rank, backend = collective.backend(), device = ?placement.device, "group connected");
                let mut trainer = Trainer::new(&job, &a, collective, placement)?;
                trainer.stop_requested = stop;
                let step_tx = tx.clone();
                trainer.run(None, &mut |m| {
                    metrics::gauge!("moxin_step").set(m.step as f64);
                    metrics::gauge!("moxin_loss").set(m.loss);
                    metrics::gauge!("moxin_mfu").set(m.mfu);
                    metrics::gauge!("moxin_peak_memory_bytes").set(m.peak_memory_bytes as f64);
                    metrics::counter!("moxin_tokens_total").absolute(m.tokens);
                    metrics::histogram!("moxin_step_duration_seconds").record(m.step_time_s);
                    metrics::histogram!("moxin_collective_busy_seconds").record(m.comm_s);
                    metrics::histogram!("moxin_collective_exposed_seconds").record(m.comm_exposed_s);
                    step_tx.send(TrainMsg::Step(*m)).map_err(|_| "agent gone".to_string())
                })
            })();
            let _ = tx.send(TrainMsg::Ended(result.map_err(|e| e.to_string())));
        })
        .map_err(|e| WorkerError::Spec(format!("cannot start the training thread: {e}")))?;
    Ok(())
}

/// Joins the group the assignment describes with its backend.
fn connect_collective(
    a: &Assignment,
    peers: &[SocketAddr],
    listener: &TcpListener,
    placement: crate::device::Placement,
    ids: &std::sync::mpsc::Receiver<Vec<u8>>,
    tx: &mpsc::UnboundedSender<TrainMsg>,
) -> Result<Box<dyn Collective>, WorkerError> {
    let timeout = Duration::from_millis(a.collective_timeout_ms as u64);
    let (rank, world) = (a.rank as usize, a.world_size as usize);
    let comm = |e: crate::collective::CollectiveError| WorkerError::Collective(e.to_string());
    Ok(match a.backend() {
        CollectiveBackend::Solo => Box::new(Solo),
        CollectiveBackend::Ring => {
            let ring = TcpRing::connect(rank, peers, listener, a.generation, timeout).map_err(comm)?;
            Box::new(RingCollective::new(ring))
        }
        CollectiveBackend::Nccl => {
            let ordinal = placement
                .cuda_ordinal()
                .ok_or_else(|| WorkerError::Device("the group uses NCCL but this worker trains on the CPU".into()))?;
            let id = if rank == 0 {
                let id = nccl::new_id().map_err(comm)?;
                tx.send(TrainMsg::CollectiveId(id.clone())).map_err(|_| WorkerError::Spec("agent gone".into()))?;
                id
            } else {
                ids.recv_timeout(timeout).map_err(|_| {
                    WorkerError::Collective(format!("rank 0 did not share the NCCL id within {timeout:?}"))
                })?
            };
            Box::new(NcclCollective::connect(rank, world, &id, ordinal, timeout).map_err(comm)?)
        }
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}
