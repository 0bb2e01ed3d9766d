//! The coordinator's watch over its workers: the failure detector (a closed event stream,
//! missed heartbeats), what a lost or departed worker means for the job, and the straggler
//! flags. A child module of `server`, so it works on the state without widening its API.

use std::time::{Duration, Instant};

use super::{CoordinatorService, State};
use crate::membership::Change;

impl CoordinatorService {
    /// Runs the failure detector until the job ends: a worker whose event stream closed
    /// (its process is gone) or that is silent for longer than `heartbeat_timeout` is lost,
    /// and its group re-forms without it; a job short of workers for longer than
    /// `cluster.replacement_timeout_ms` fails.
    pub async fn watch_workers(self, heartbeat_timeout: Duration) {
        let replacement = Duration::from_millis(self.job.config.cluster.replacement_timeout_ms as u64);
        let mut phase = self.phase();
        let mut tick = tokio::time::interval(Duration::from_millis(100).min(heartbeat_timeout / 4));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = phase.changed() => {}
            }
            let mut s = self.lock();
            if s.membership.phase().is_over() {
                return;
            }
            self.reap(&mut s, heartbeat_timeout);
            let change = s.membership.tick(Instant::now(), replacement);
            if change != Change::None {
                self.apply(&mut s, change);
            }
        }
    }

    /// Declares lost every worker whose stream closed or whose heartbeats stopped.
    pub(super) fn reap(&self, s: &mut State, heartbeat_timeout: Duration) {
        let lost: Vec<(String, String)> = s
            .workers
            .iter()
            .filter_map(|(id, w)| {
                if w.events.as_ref().is_some_and(|tx| tx.is_closed()) {
                    Some((
                        id.clone(),
                        format!("{} closed its connection (the process exited or was killed)", w.describe(id)),
                    ))
                } else if w.last_seen.elapsed() > heartbeat_timeout {
                    Some((
                        id.clone(),
                        format!(
                            "{} missed heartbeats for {:.1} s (timeout {:.1} s)",
                            w.describe(id),
                            w.last_seen.elapsed().as_secs_f64(),
                            heartbeat_timeout.as_secs_f64()
                        ),
                    ))
                } else {
                    None
                }
            })
            .collect();
        for (id, why) in lost {
            self.lose(s, &id, &why);
        }
    }

    /// Worker `id` is gone: forget it and let the membership decide what follows.
    pub(super) fn lose(&self, s: &mut State, id: &str, why: &str) {
        self.remove(s, id, why, true)
    }

    /// Forgets worker `id`, a failure or a departure on purpose (`failed` = false), and
    /// lets the membership decide what follows.
    pub(super) fn remove(&self, s: &mut State, id: &str, why: &str, failed: bool) {
        let Some(w) = s.workers.remove(id) else { return };
        if let Some(reason) = self.stop_signal.get().and_then(|signalled| signalled()) {
            let change = s.membership.stop(&format!("stopped by {reason}"), false);
            self.apply(s, change);
        }
        let member = w.rank.is_some();
        // Once the job is over (finished, failed or stopping on request), workers leaving or
        // exiting is the shutdown itself, not a failure, and no group re-forms.
        let over = s.membership.phase().is_over();
        let next = match (over, member) {
            (true, _) => "the job is over",
            (false, true) => "its group re-forms without it",
            (false, false) => "it was not training",
        };
        if failed && !over {
            s.failures += 1;
            metrics::counter!("moxin_workers_lost_total").increment(1);
            tracing::error!("{why}; {next}");
            s.last_failure = Some(why.to_string());
            if member {
                s.recovering_since.get_or_insert_with(Instant::now);
            }
        } else if failed {
            // Not counted (the job is over), but a worker dying while it wrote the final
            // checkpoint is worth a look.
            tracing::warn!("{why}; {next}");
        } else {
            tracing::info!("{why}; {next}");
        }
        let change = s.membership.lost(id, Instant::now());
        self.apply(s, change);
    }

    /// Flags group members much slower than the group's median compute time for a few
    /// heartbeats running (and clears the flag when they catch up), logging each change
    /// once. Heartbeats arrive one worker at a time, so a worker's fresh figure is briefly
    /// compared with the others' older ones; requiring the lag to last keeps a step that
    /// slowed everyone from flagging each worker in turn.
    pub(super) fn flag_stragglers(&self, s: &mut State) {
        let cluster = &self.job.config.cluster;
        let factor = cluster.straggler_factor;
        let hold = Duration::from_millis(3 * u64::from(cluster.heartbeat_interval_ms));
        let times: Vec<(String, f64)> =
            s.membership.group().iter().filter_map(|id| s.workers.get(id).map(|w| (id.clone(), w.compute_s))).collect();
        let slow = crate::membership::stragglers(&times, factor);
        let mut changed = false;
        let at = Instant::now();
        for (id, w) in s.workers.iter_mut() {
            let lag = slow.iter().find(|(w, _)| w == id).map(|(_, median)| *median);
            w.slow_since = lag.and(w.slow_since.or(Some(at)));
            let now = w.slow_since.is_some_and(|since| at.duration_since(since) >= hold);
            if now != w.straggler {
                changed = true;
                w.straggler = now;
                metrics::gauge!("moxin_straggler", "worker" => id.clone()).set(f64::from(u8::from(now)));
                if let Some(median) = lag {
                    tracing::warn!(
                        "straggler: {} computes a step in {:.3} s, {:.1}x the other members' median {:.3} s \
                         (cluster.straggler_factor = {factor}); the whole group waits for it",
                        w.describe(id),
                        w.compute_s,
                        w.compute_s / median.max(1e-12),
                        median
                    );
                } else {
                    tracing::info!("{} no longer straggles", w.describe(id));
                }
            }
        }
        if changed {
            metrics::gauge!("moxin_stragglers").set(s.workers.values().filter(|w| w.straggler).count() as f64);
            self.persist(s);
        }
    }
}
