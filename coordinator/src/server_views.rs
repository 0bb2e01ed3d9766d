//! Views of the coordinator's state: `state.json` in the run directory (what a restarted
//! coordinator, `scale` and `status` read) and the `GetStatus` answer (`moxin-train
//! status`). A child module of `server`, so it reads the state without widening its API.

use std::time::{SystemTime, UNIX_EPOCH};

use moxin_proto::v1::{JobStatus, WorkerStatus};
use serde::Serialize;

use super::{CoordinatorService, State, Worker};
use crate::membership::Phase;

impl CoordinatorService {
    /// Writes `state.json` atomically (a temporary file renamed over it): a later
    /// coordinator continues from it.
    pub(super) fn persist(&self, s: &State) {
        #[derive(Serialize)]
        struct Member<'a> {
            worker_id: &'a str,
            host: &'a str,
            pid: u32,
            rank: Option<u32>,
            collective_address: &'a str,
        }
        let members: Vec<Member> = s
            .membership
            .live()
            .iter()
            .filter_map(|id| s.workers.get(id).map(|w| (id, w)))
            .map(|(id, w)| Member {
                worker_id: id,
                host: &w.identity.host,
                pid: w.identity.pid,
                rank: w.rank,
                collective_address: &w.collective_address,
            })
            .collect();
        let doc = serde_json::json!({
            "job": self.job.spec.name,
            "phase": s.membership.phase(),
            "generation": s.membership.generation(),
            "step": s.progress.last.as_ref().map_or(s.start_step, |m| m.step),
            "members": members,
            "failures": s.failures,
            "recoveries": s.recoveries,
            "coordinator_url": s.url,
            "stragglers": s.workers.iter().filter(|(_, w)| w.straggler).map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
            "updated_unix_s": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        });
        let tmp = self.state_file.with_extension("json.tmp");
        let written = serde_json::to_vec_pretty(&doc)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|_| std::fs::rename(&tmp, &self.state_file));
        if let Err(e) = written {
            tracing::warn!("cannot persist coordinator state to {}: {e}", self.state_file.display());
        }
    }

    /// The job now, for `GetStatus`.
    pub(super) fn status_of(&self, s: &State) -> JobStatus {
        let (phase, reason) = match s.membership.phase() {
            Phase::Admitting => ("admitting", String::new()),
            Phase::Training => ("training", String::new()),
            Phase::Finished => ("finished", String::new()),
            Phase::Failed(why) => ("failed", why.clone()),
            Phase::Stopped(why) => ("stopped", why.clone()),
        };
        let cpu_job = self.job.config.runtime.device == crate::config::Device::Cpu;
        let mut workers: Vec<WorkerStatus> = s.workers.iter().map(|(id, w)| worker_status(id, w, cpu_job)).collect();
        workers.sort_by_key(|w| (!w.member, w.rank, w.worker_id.clone()));
        let train = self.job.spec.train.unwrap_or_default();
        JobStatus {
            job: self.job.spec.name.clone(),
            phase: phase.into(),
            reason,
            generation: s.membership.generation(),
            step: s.progress.last.as_ref().map_or(s.start_step, |m| m.step),
            total_steps: train.steps,
            last: s.progress.last.clone(),
            workers,
            // The bounds now: `moxin-train scale` moves them from the config's.
            min_workers: s.membership.bounds().0,
            max_workers: s.membership.bounds().1,
            failures: s.failures,
            recoveries: s.recoveries,
        }
    }
}

fn worker_status(id: &str, w: &Worker, cpu_job: bool) -> WorkerStatus {
    let device = match w.devices.iter().find(|d| d.kind == "cuda" && !cpu_job) {
        Some(d) => format!("cuda:{} {}", d.ordinal, d.name),
        None => "cpu".into(),
    };
    WorkerStatus {
        worker_id: id.into(),
        host: w.identity.host.clone(),
        pid: w.identity.pid,
        member: w.rank.is_some(),
        rank: w.rank.unwrap_or(0),
        device,
        compute_s: w.compute_s,
        heartbeat_age_s: w.last_seen.elapsed().as_secs_f64(),
        straggler: w.straggler,
    }
}
