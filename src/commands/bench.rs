//! `bench`: measurements that compare against a reference in the same run (see bench/*.sh).

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use moxin_proto::v1::coordinator_client::CoordinatorClient;
use moxin_proto::v1::{HeartbeatRequest, RegisterRequest, WorkerIdentity};
use moxin_worker::collective::ring::TcpRing;
use moxin_worker::collective::ReduceOp;

/// Prints a self-test report as JSON.
pub fn print(report: Result<serde_json::Value, moxin_worker::WorkerError>) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(&report?)?);
    Ok(())
}

/// Compiles the fused kernels for compute capability `arch` (e.g. 90) and lists them.
pub fn compile_kernels(arch: u32) -> Result<()> {
    use moxin_worker::cuda::kernels;
    let ptx = kernels::compile_ptx((arch / 10) as i32, (arch % 10) as i32)?.to_src();
    let found: Vec<&str> =
        kernels::KERNEL_NAMES.iter().copied().filter(|k| ptx.contains(&format!(".entry {k}("))).collect();
    println!("{}", serde_json::json!({"arch": arch, "ptx_bytes": ptx.len(), "kernels": found}));
    Ok(())
}

/// All-reduce of `mib` MiB of f32 over `ranks` ranks, each a separate process (as
/// gloo's ranks are in the reference), joined by the CPU ring on loopback: through shared
/// memory between same-host neighbours, or TCP only (`tcp_only`, the path between hosts).
/// Prints JSON with the median time of the slowest rank and the bus bandwidth
/// (nccl-tests definitions).
pub fn all_reduce(ranks: usize, mib: usize, iters: usize, tcp_only: bool) -> Result<()> {
    if ranks < 2 || mib == 0 || iters == 0 {
        anyhow::bail!("--ranks must be at least 2, --mib and --iters at least 1");
    }
    // Reserve an address per rank (a rank binds its own when it starts).
    let peers: Vec<String> = (0..ranks)
        .map(|_| TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.to_string()))
        .collect::<Result<_, _>>()?;
    let exe = std::env::current_exe()?;
    // The ranks prove their membership to each other with a shared key, as a job's do.
    let key: String = moxin_proto::security::random_key()?.iter().map(|b| format!("{b:02x}")).collect();
    let children: Vec<std::process::Child> = (0..ranks)
        .map(|rank| {
            std::process::Command::new(&exe)
                .args(["bench", "all-reduce-rank", "--rank", &rank.to_string(), "--peers", &peers.join(",")])
                .args(["--mib", &mib.to_string(), "--iters", &iters.to_string()])
                .env("MOXIN_RING_SHM", if tcp_only { "0" } else { "1" })
                .env(BENCH_KEY_ENV, &key)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .with_context(|| format!("starting rank {rank}"))
        })
        .collect::<Result<_>>()?;
    let mut per_rank: Vec<Vec<f64>> = Vec::new();
    for (rank, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output()?;
        if !out.status.success() {
            anyhow::bail!("rank {rank} failed ({})", out.status);
        }
        per_rank.push(serde_json::from_slice(&out.stdout).with_context(|| format!("rank {rank}'s output"))?);
    }
    let mut slowest: Vec<f64> = (0..iters).map(|i| per_rank.iter().map(|t| t[i]).fold(0.0, f64::max)).collect();
    slowest.sort_by(f64::total_cmp);
    let median = slowest[iters / 2];
    let bytes = (mib * (1 << 20)) as f64;
    let algbw = bytes / median / 1e9;
    let busbw = algbw * 2.0 * (ranks as f64 - 1.0) / ranks as f64;
    let system = if tcp_only { "moxin-ring-tcp" } else { "moxin-ring-shm" };
    println!(
        "{}",
        serde_json::json!({"system": system, "ranks": ranks, "processes": true, "bytes": bytes, "seconds_median": median, "algbw_gb_s": algbw, "busbw_gb_s": busbw})
    );
    Ok(())
}

/// How `bench all-reduce` hands its ranks their group key (hex).
const BENCH_KEY_ENV: &str = "MOXIN_BENCH_RING_KEY";

/// One rank of [`all_reduce`]: prints its per-iteration seconds as a JSON array.
pub fn all_reduce_rank(rank: usize, peers: &str, mib: usize, iters: usize) -> Result<()> {
    let peers: Vec<SocketAddr> =
        peers.split(',').map(|p| p.parse().with_context(|| format!("peer address {p}"))).collect::<Result<_>>()?;
    let listener = TcpListener::bind(peers.get(rank).context("rank outside --peers")?)?;
    let key = std::env::var(BENCH_KEY_ENV).context("started without its group key; run `bench all-reduce`")?;
    let key: Vec<u8> =
        (0..key.len() / 2).filter_map(|i| u8::from_str_radix(key.get(2 * i..2 * i + 2)?, 16).ok()).collect();
    let group = moxin_worker::collective::GroupKey::new(1, &key).map_err(anyhow::Error::msg)?;
    let mut ring = TcpRing::connect(rank, &peers, &listener, &group, Duration::from_secs(60))?;
    let mut buf = vec![1.0f32; mib * (1 << 20) / 4];
    ring.all_reduce(&mut buf, ReduceOp::Sum)?; // warm-up
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        ring.barrier()?;
        let t = Instant::now();
        ring.all_reduce(&mut buf, ReduceOp::Sum)?;
        times.push(t.elapsed().as_secs_f64());
    }
    println!("{}", serde_json::to_string(&times)?);
    Ok(())
}

/// `workers` simulated workers register with the coordinator at `url` and heartbeat at
/// 1 Hz for `seconds`; prints JSON with heartbeat round-trip p50/p99.
pub fn heartbeats(url: &str, workers: u32, seconds: u64) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        // A handful of HTTP/2 connections carry all simulated workers, as a real fleet's
        // many connections would be multiplexed by the server's runtime.
        let mut clients = Vec::new();
        for _ in 0..16 {
            clients.push(CoordinatorClient::connect(url.to_string()).await.with_context(|| format!("connecting to {url}"))?);
        }
        let mut ids = Vec::new();
        for i in 0..workers {
            let mut c = clients[i as usize % clients.len()].clone();
            let r = c
                .register(RegisterRequest {
                    identity: Some(WorkerIdentity { host: format!("sim-{i}"), pid: i, instance: "bench".into() }),
                    software_version: moxin_proto::SOFTWARE_VERSION.into(),
                    cpu_cores: 1,
                    devices: Vec::new(),
                    collective_address: "127.0.0.1:1".into(),
                    nccl_version: String::new(),
                    rank_hint: None,
                })
                .await?;
            ids.push(r.into_inner().worker_id);
        }
        let tasks: Vec<_> = ids
            .into_iter()
            .enumerate()
            .map(|(i, id)| {
                let mut c = clients[i % clients.len()].clone();
                tokio::spawn(async move {
                    // Spread the fleet over the second.
                    tokio::time::sleep(Duration::from_millis((i as u64 * 1000) / workers as u64)).await;
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    let mut rtts = Vec::new();
                    for _ in 0..seconds {
                        tick.tick().await;
                        let sent = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
                        let t = Instant::now();
                        if c.heartbeat(HeartbeatRequest { worker_id: id.clone(), step: 0, sent_unix_nanos: sent, compute_s: 0.0 }).await.is_ok() {
                            rtts.push(t.elapsed().as_secs_f64());
                        }
                    }
                    rtts
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await?);
        }
        all.sort_by(f64::total_cmp);
        let q = |p: f64| all[((all.len() - 1) as f64 * p) as usize] * 1e3;
        println!(
            "{}",
            serde_json::json!({"workers": workers, "heartbeats": all.len(), "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": q(1.0)})
        );
        Ok(())
    })
}

/// `bench rollout`.
pub fn rollout(
    checkpoint: &std::path::Path,
    prompts: &std::path::Path,
    max_new_tokens: usize,
    repeats: usize,
    threads: i32,
    device: &str,
    dtype: &str,
) -> Result<()> {
    let text = std::fs::read_to_string(prompts).with_context(|| format!("reading {}", prompts.display()))?;
    let rows: Vec<Vec<i64>> = serde_json::from_str(&text)
        .with_context(|| format!("{}: expected a JSON list of token-id lists", prompts.display()))?;
    print(moxin_worker::selftest::rollout(checkpoint, &rows, max_new_tokens, repeats, threads, device, dtype))
}
