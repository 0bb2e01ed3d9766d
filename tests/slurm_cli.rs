//! `deploy/slurm/moxin-train.sbatch` on a real Slurm: a private munged, slurmctld and slurmd
//! (one node, 2 CPUs) configured in a temporary directory, driven with sbatch, scancel and
//! scontrol exactly as a cluster's users would.
//!
//! Needs Debian's `slurm-wlm` and `munge` (scripts/setup.sh installs them where it can) and
//! root (slurmd starts job steps as the submitting user); elsewhere it prints SKIPPED.

use std::cell::RefCell;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{metrics, s, BIN};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/slurm/moxin-train.sbatch");
const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny-pretrain.toml");
const STEPS: u64 = 200;

/// The programs the test runs; daemons live in sbin, which a non-login PATH may lack.
const PROGRAMS: [&str; 8] = ["munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue", "sinfo"];

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"])
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file());
    found
}

/// Why this host cannot run the test, if it cannot.
fn missing_prerequisite() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.as_deref() != Some("0") {
        return Some("not root (slurmd must run as root to start job steps)".into());
    }
    let missing: Vec<&str> = PROGRAMS.into_iter().filter(|p| which(p).is_none()).collect();
    if !missing.is_empty() {
        return Some(format!("{} not installed (Debian: apt-get install slurm-wlm munge)", missing.join(", ")));
    }
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A one-node Slurm cluster of our own; dropping it stops its daemons (also when an
/// assertion failed half-way), so no slurmctld outlives the test.
struct Cluster {
    dir: tempfile::TempDir,
    daemons: RefCell<Vec<(&'static str, Child)>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A job still running (a failed assertion) has processes outside slurmd
        // (slurmstepd, moxin-train): end them through Slurm, then the daemons.
        let _ = self.client("scancel").args(["--full", "--signal=KILL", "--user=root"]).output();
        let _ = self.client("scancel").args(["--user=root"]).output();
        let busy = || {
            self.client("squeue")
                .args(["-h", "-t", "RUNNING,COMPLETING", "-o", "%i"])
                .output()
                .is_ok_and(|o| o.status.success() && !String::from_utf8_lossy(&o.stdout).trim().is_empty())
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while busy() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        for (_, child) in self.daemons.get_mut().iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        for sub in ["ctld", "spool", "log"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let cluster = Cluster { dir, daemons: RefCell::new(Vec::new()) };

        // munge: its own key and socket, so that nothing of the host's (if any) is used.
        let mut key = [0u8; 1024];
        std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut key).unwrap();
        let key_path = d.join("munge.key");
        std::fs::write(&key_path, key).unwrap();
        std::fs::set_permissions(&key_path, std::os::unix::fs::PermissionsExt::from_mode(0o400)).unwrap();
        let socket = d.join("munge.sock");
        cluster.spawn(
            "munged",
            Command::new(which("munged").unwrap())
                .arg("--foreground")
                // --force: root, and a key in a temporary directory, are fine here.
                .arg("--force")
                .arg(format!("--key-file={}", key_path.display()))
                .arg(format!("--socket={}", socket.display()))
                .arg(format!("--pid-file={}", d.join("munged.pid").display()))
                .arg(format!("--seed-file={}", d.join("munged.seed").display())),
        );
        cluster.wait_for("munged's socket", Duration::from_secs(20), || socket.exists());

        let (ctld_port, slurmd_port) = (free_port(), free_port());
        let conf = format!(
            "ClusterName=moxintest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (120 s by
# default): short, so that the requeue test is quick.
AuthInfo=socket={socket},cred_expire=5
StateSaveLocation={d}/ctld
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Trust the node's configured CPUs whatever the host has: the test needs 2 tasks.
SlurmdParameters=config_overrides
SchedulerParameters=sched_interval=1
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=10
MinJobAge=600
NodeName=moxin0 NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
",
            socket = socket.display(),
            d = d.display(),
        );
        std::fs::write(cluster.conf(), conf).unwrap();
        let conf = cluster.conf();
        cluster.spawn("slurmctld", Command::new(which("slurmctld").unwrap()).arg("-D").arg("-f").arg(&conf));
        cluster.spawn(
            "slurmd",
            Command::new(which("slurmd").unwrap()).arg("-D").arg("-f").arg(&conf).args(["-N", "moxin0"]),
        );
        cluster.wait_for("the node to be idle", Duration::from_secs(60), || {
            cluster.client("sinfo").args(["-h", "-o", "%T"]).output().is_ok_and(|o| o.stdout.starts_with(b"idle"))
        });
        cluster
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("slurm.conf")
    }

    fn spawn(&self, name: &'static str, cmd: &mut Command) {
        let log = std::fs::File::create(self.dir.path().join(format!("log/{name}.out"))).unwrap();
        let child = cmd
            .env("SLURM_CONF", self.conf())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.daemons.borrow_mut().push((name, child));
    }

    /// A Slurm client command pointed at this cluster.
    fn client(&self, program: &str) -> Command {
        let mut cmd = Command::new(which(program).unwrap());
        cmd.env("SLURM_CONF", self.conf()).env_remove("LD_LIBRARY_PATH");
        cmd
    }

    fn wait_for(&self, what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !done() {
            for (name, child) in self.daemons.borrow_mut().iter_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("{name} exited ({status}) while waiting for {what}\n{}", self.logs());
                }
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The daemons' logs, for failure messages.
    fn logs(&self) -> String {
        let mut text = String::new();
        let mut entries: Vec<_> = std::fs::read_dir(self.dir.path().join("log")).unwrap().flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let body = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let tail: Vec<&str> = body.lines().rev().take(60).collect();
            text += &format!("--- {} (last {} lines)\n", entry.path().display(), tail.len());
            for line in tail.into_iter().rev() {
                text += line;
                text.push('\n');
            }
        }
        text
    }

    fn job_output(&self, job: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("job-{job}.out"))).unwrap_or_default()
    }

    /// The job's output and the daemons' logs, for failure messages.
    fn report(&self, job: &str) -> String {
        format!("--- job {job} output\n{}\n{}", self.job_output(job), self.logs())
    }

    /// Submits the batch script for the tiny preset into `run`; returns the job id.
    fn submit(&self, run: &Path, requeue: bool) -> String {
        let out = self
            .client("sbatch")
            .args(["--parsable", "--nodes=1", "--ntasks-per-node=2"])
            .arg(format!("--output={}/job-%j.out", self.dir.path().display()))
            .arg(SCRIPT)
            .args([CONFIG, s(run)])
            .args(["--set", &format!("train.steps={STEPS}")])
            .args([
                "--set",
                "train.seq_len=32",
                "--set",
                "train.global_batch_size=8",
                "--set",
                "train.micro_batch_size=4",
            ])
            .args(["--set", "schedule.warmup_steps=5", "--set", "checkpoint.every_steps=1000"])
            .args(["--set", "runtime.device=cpu", "--set", "runtime.threads=1"])
            .env("MOXIN_TRAIN", BIN)
            .env("MOXIN_PORT", free_port().to_string())
            .env("MOXIN_REQUEUE", if requeue { "1" } else { "0" })
            .env("MOXIN_LOG", "info")
            .env("NO_COLOR", "1")
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "sbatch failed: {}\n{}", String::from_utf8_lossy(&out.stderr), self.logs());
        String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap().to_string()
    }

    /// `scontrol show job`'s fields of `job` (empty once slurmctld forgot it).
    fn job(&self, job: &str) -> Vec<(String, String)> {
        let out = self.client("scontrol").args(["show", "job", "-o", job]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|field| field.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect()
    }

    fn field(&self, job: &str, key: &str) -> String {
        self.job(job).into_iter().find(|(k, _)| k == key).map(|(_, v)| v).unwrap_or_default()
    }

    /// Waits until `job` has ended for good (through requeues); returns its fields.
    fn wait_ended(&self, job: &str, limit: Duration) -> Vec<(String, String)> {
        let mut last = Vec::new();
        let deadline = Instant::now() + limit;
        loop {
            let fields = self.job(job);
            let state = fields.iter().find(|(k, _)| k == "JobState").map(|(_, v)| v.as_str()).unwrap_or("");
            if !matches!(state, "" | "PENDING" | "CONFIGURING" | "RUNNING" | "COMPLETING" | "REQUEUED" | "REQUEUE_FED")
            {
                return fields;
            }
            if !fields.is_empty() {
                last = fields;
            }
            assert!(Instant::now() < deadline, "job {job} still not done: {last:?}\n{}", self.report(job));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn get<'a>(fields: &'a [(String, String)], key: &str) -> &'a str {
    fields.iter().find(|(k, _)| k == key).map_or("", |(_, v)| v.as_str())
}

/// The Slurm path end to end: the script runs the coordinator and 2 workers (`srun`) of
/// one job; the signal Slurm sends before the time limit (`--signal=B:TERM@120`, sent here
/// with `scancel --batch --signal=TERM`) stops every process with a checkpoint, the job
/// requeues itself (MOXIN_REQUEUE=1) and the requeued job resumes and finishes: every step
/// once, on 2 workers, loss falling, valid checkpoints. Submitting the finished run again
/// says "already finished" and succeeds.
#[test]
fn sbatch_script_trains_stops_at_the_time_limit_signal_and_resumes_when_requeued() {
    if let Some(reason) = missing_prerequisite() {
        println!("SKIPPED: {reason}");
        return;
    }
    let started = Instant::now();
    let cluster = Cluster::start();
    let run = cluster.dir.path().join("run");

    let job = cluster.submit(&run, true);
    // Signal once training is under way (a few steps in), as the time-limit warning would.
    cluster.wait_for("the job to train 3 steps", Duration::from_secs(90), || {
        std::fs::read_to_string(run.join("metrics.jsonl")).is_ok_and(|t| t.lines().count() >= 3)
    });
    assert_eq!(cluster.field(&job, "Restarts"), "0", "{}", cluster.report(&job));
    let out = cluster.client("scancel").args(["--batch", "--signal=TERM", &job]).output().unwrap();
    assert!(out.status.success(), "scancel: {}", String::from_utf8_lossy(&out.stderr));

    let fields = cluster.wait_ended(&job, Duration::from_secs(120));
    let report = cluster.report(&job);
    assert_eq!(get(&fields, "JobState"), "COMPLETED", "{fields:?}\n{report}");
    assert_eq!(get(&fields, "ExitCode"), "0:0", "{report}");
    assert_eq!(get(&fields, "Restarts"), "1", "the job should have requeued itself once\n{report}");
    let output = cluster.job_output(&job);
    assert!(output.contains("SIGTERM: asking the coordinator and the workers"), "{report}");
    assert!(output.contains("requeueing job"), "{report}");
    assert!(output.contains("resumed from checkpoint"), "{report}");

    // Every step once, all on 2 workers; the stop was a real stop, before the end.
    let m = metrics(&run);
    let steps: Vec<u64> = m.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=STEPS).collect::<Vec<_>>(), "{report}");
    assert!(m.iter().all(|r| r["world_size"].as_u64() == Some(2)), "world sizes: {m:?}");
    let loss = |rows: &[serde_json::Value]| rows.iter().map(|r| r["loss"].as_f64().unwrap()).sum::<f64>() / 5.0;
    let (first, last) = (loss(&m[..5]), loss(&m[m.len() - 5..]));
    assert!(last < first - 2.0, "loss did not fall: {first} -> {last}");

    // Two checkpoints: the one written at the signal (before the end) and the final one;
    // both verify against their manifests.
    let mut checkpoints: Vec<PathBuf> =
        std::fs::read_dir(run.join("checkpoints")).unwrap().flatten().map(|e| e.path()).collect();
    checkpoints.sort();
    let verified: Vec<(u64, u32)> = checkpoints
        .iter()
        .map(|dir| {
            let ckpt = moxin_layout::checkpoint::Checkpoint::open(dir)
                .unwrap_or_else(|e| panic!("{} does not verify: {e}", dir.display()));
            (ckpt.manifest.step, ckpt.manifest.world_size)
        })
        .collect();
    assert_eq!(verified.len(), 2, "{checkpoints:?}\n{report}");
    assert!(verified[0].0 < STEPS && verified[1] == (STEPS, 2), "{verified:?}");
    let latest = moxin_layout::checkpoint::latest_valid(&run).unwrap().unwrap();
    assert_eq!(latest.manifest.step, STEPS);
    // The coordinator listened on every interface, so the job had a join token: made in
    // the run directory on first use, owner-only, and reused after the requeue.
    let token = run.join("coordinator/token");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&token).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "{}", token.display());
    assert_eq!(std::fs::read_to_string(&token).unwrap().len(), 64);

    // The requeue of a finished run (or a resubmission) does nothing, successfully.
    let again = cluster.submit(&run, true);
    let fields = cluster.wait_ended(&again, Duration::from_secs(60));
    let report = cluster.report(&again);
    assert_eq!(get(&fields, "JobState"), "COMPLETED", "{fields:?}\n{report}");
    assert_eq!(get(&fields, "ExitCode"), "0:0", "{report}");
    assert_eq!(get(&fields, "Restarts"), "0", "{report}");
    assert!(cluster.job_output(&again).contains("already finished"), "{report}");
    assert_eq!(metrics(&run).len(), STEPS as usize, "the finished run trained again");
    println!("slurm test: {:.1} s", started.elapsed().as_secs_f64());
}
