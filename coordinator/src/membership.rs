//! Who is in the job and what its group is doing: a pure state machine, with no gRPC, no
//! clock of its own and no I/O, so every transition is unit-tested (below) and the server
//! only turns its [`Change`]s into messages.
//!
//! ```text
//!             enough live workers                     finished / stop / failure
//! admitting ───────────────────────▶ training ──────────────────────────────▶ finished | stopped | failed
//!     ▲   (forming: generation g+1)   │  ▲ │
//!     │                               │  │ │ a member lost or its group broke, a worker
//!     │ fewer than min_workers left   │  └─┘ joined (≤ max_workers): re-forming, g+1
//!     └───────────────────────────────┘
//! admitting for longer than the replacement timeout ──▶ failed
//! ```
//!
//! Every group gets a new *generation*; a worker's reports and collective ids carry the
//! generation they belong to, and anything from an older generation is ignored, so a
//! re-formation can never mix members of two groups. Generations keep counting across
//! coordinator restarts (the server reloads the last one from `state.json`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

/// A registered worker's id (`w1`, `w2`, …).
pub type WorkerId = String;

/// Which group sizes the job can train with (its batch geometry: the global batch must
/// split into whole micro-batches on every worker). A group is only ever formed at such a
/// size; live workers beyond it wait as standby.
#[derive(Clone)]
pub struct SizeRule(Arc<dyn Fn(usize) -> bool + Send + Sync>);

impl SizeRule {
    /// Sizes for which `fits` says yes.
    pub fn new(fits: impl Fn(usize) -> bool + Send + Sync + 'static) -> Self {
        SizeRule(Arc::new(fits))
    }

    fn fits(&self, workers: usize) -> bool {
        (self.0)(workers)
    }
}

impl std::fmt::Debug for SizeRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SizeRule")
    }
}

/// Where the job is.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "phase", content = "detail", rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for `min_workers` live workers: at the start, or after losses left too few.
    Admitting,
    /// The current generation's group is training.
    Training,
    /// `train.steps` were reached.
    Finished,
    /// The job failed; the message says why.
    Failed(String),
    /// Stopped on request (a signal, Ctrl-C, `scale --workers 0`).
    Stopped(String),
}

impl Phase {
    /// Finished, failed or stopped: nothing changes any more.
    pub fn is_over(&self) -> bool {
        matches!(self, Phase::Finished | Phase::Failed(_) | Phase::Stopped(_))
    }

    /// The phase's name as `state.json` writes it.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Admitting => "admitting",
            Phase::Training => "training",
            Phase::Finished => "finished",
            Phase::Failed(_) => "failed",
            Phase::Stopped(_) => "stopped",
        }
    }
}

/// Why a registration is refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// The job has ended.
    Over(String),
    /// It has `max_workers` already.
    Full(String),
}

/// What the server must do after a transition.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Nothing to tell anyone.
    None,
    /// Send generation `generation`'s assignments to `members` (rank = index); members of
    /// an older group not listed are no longer in it.
    Form {
        /// The new generation.
        generation: u64,
        /// Its members by rank.
        members: Vec<WorkerId>,
    },
    /// Tell every worker to stop (`failed`: the job failed).
    Stop {
        /// Why.
        reason: String,
        /// Whether it is a failure.
        failed: bool,
    },
    /// Tell every worker the job reached its last step.
    Finish,
}

/// The membership of one job.
#[derive(Debug, Clone)]
pub struct Membership {
    min: usize,
    max: usize,
    phase: Phase,
    generation: u64,
    /// Live workers watching for events: those with a rank hint by hint, then the others
    /// in the order they joined. A group is the first `max` of them, so ranks follow the
    /// hints, and scaling down releases the highest.
    live: Vec<WorkerId>,
    /// Rank hints of live workers (a Kubernetes completion index, Slurm's SLURM_PROCID).
    hints: std::collections::HashMap<WorkerId, u32>,
    /// The current generation's members by rank (empty while admitting).
    group: Vec<WorkerId>,
    /// Since when the job has had too few workers to train (only after it first trained).
    short_since: Option<Instant>,
    /// Groups formed (including the first).
    formations: u64,
    /// The group sizes the job can train with.
    sizes: SizeRule,
}

impl Membership {
    /// A job that trains with `min..=max` workers, at any size in that range;
    /// `generation` is the last one an earlier coordinator of the run formed (0 for a new run).
    pub fn new(min: u32, max: u32, generation: u64) -> Self {
        Self::with_sizes(min, max, generation, SizeRule::new(|_| true))
    }

    /// [`Membership::new`] for a job that trains only at the sizes `sizes` allows.
    pub fn with_sizes(min: u32, max: u32, generation: u64, sizes: SizeRule) -> Self {
        Membership {
            min: min.max(1) as usize,
            max: max.max(min).max(1) as usize,
            phase: Phase::Admitting,
            generation,
            live: Vec::new(),
            hints: Default::default(),
            group: Vec::new(),
            short_since: None,
            formations: 0,
            sizes,
        }
    }

    /// The phase.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The current (or last) generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The current group, by rank.
    pub fn group(&self) -> &[WorkerId] {
        &self.group
    }

    /// Live workers.
    pub fn live(&self) -> &[WorkerId] {
        &self.live
    }

    /// Groups formed so far by this coordinator; more than one means re-formations.
    pub fn formations(&self) -> u64 {
        self.formations
    }

    /// Whether another worker may register now, with `registered` already registered.
    pub fn admits(&self, registered: usize) -> Result<(), Refusal> {
        if self.phase.is_over() {
            return Err(Refusal::Over(format!("the job is over ({})", self.phase.name())));
        }
        if registered >= self.max {
            return Err(Refusal::Full(format!(
                "the job already has its maximum of {} workers (cluster.max_workers)",
                self.max
            )));
        }
        Ok(())
    }

    /// Worker `id` is registered and listening: admitted at once if the job is short of
    /// workers, else at the next step boundary through a re-formation that includes it.
    /// With a `rank_hint` it takes its place among the hinted workers (ties: the earlier
    /// one first); unhinted workers follow them in the order they joined.
    pub fn joined(&mut self, id: &str, rank_hint: Option<u32>) -> Change {
        if self.phase.is_over() || self.live.iter().any(|w| w == id) {
            return Change::None;
        }
        let key = |hint: Option<&u32>| hint.map_or(u64::MAX, |&h| u64::from(h));
        let mine = key(rank_hint.as_ref());
        let at = self.live.iter().position(|w| key(self.hints.get(w)) > mine).unwrap_or(self.live.len());
        self.live.insert(at, id.to_string());
        if let Some(hint) = rank_hint {
            self.hints.insert(id.to_string(), hint);
        }
        self.form_if_possible()
    }

    /// Worker `id` is gone (died, missed heartbeats, failed, or left). A group that loses
    /// a member re-forms without it; with fewer than `min_workers` left, the job waits
    /// for replacements (see [`Membership::tick`]).
    pub fn lost(&mut self, id: &str, now: Instant) -> Change {
        let before = self.live.len();
        self.live.retain(|w| w != id);
        self.hints.remove(id);
        if self.live.len() == before || self.phase.is_over() {
            return Change::None;
        }
        if !self.group.iter().any(|w| w == id) {
            return Change::None;
        }
        self.group.clear();
        self.phase = Phase::Admitting;
        self.short_since.get_or_insert(now);
        self.form_if_possible()
    }

    /// A member of `generation` reports that its group broke (a collective failed) while
    /// it is itself alive: re-form with the live workers (a dead member is reported by
    /// [`Membership::lost`], before or after this). Reports about older generations are
    /// stale and ignored.
    pub fn group_broke(&mut self, id: &str, generation: u64, now: Instant) -> Change {
        if self.phase != Phase::Training || generation != self.generation || !self.group.iter().any(|w| w == id) {
            return Change::None;
        }
        self.group.clear();
        self.phase = Phase::Admitting;
        self.short_since.get_or_insert(now);
        self.form_if_possible()
    }

    /// New group size bounds (`moxin-train scale`). A group larger than `max` shrinks when
    /// its extra members leave (the deployment stops them); a group can grow up to `max`
    /// as workers join.
    pub fn resize(&mut self, min: u32, max: u32) -> Change {
        self.min = min.max(1) as usize;
        self.max = max.max(min).max(1) as usize;
        if self.phase.is_over() {
            return Change::None;
        }
        self.form_if_possible()
    }

    /// The group size bounds `(min, max)`.
    pub fn bounds(&self) -> (u32, u32) {
        (self.min as u32, self.max as u32)
    }

    /// The last step was reported.
    pub fn finished(&mut self) -> Change {
        if self.phase.is_over() {
            return Change::None;
        }
        self.phase = Phase::Finished;
        Change::Finish
    }

    /// Stops the job (on request, or as failed).
    pub fn stop(&mut self, reason: &str, failed: bool) -> Change {
        if self.phase.is_over() {
            return Change::None;
        }
        self.phase = if failed { Phase::Failed(reason.to_string()) } else { Phase::Stopped(reason.to_string()) };
        Change::Stop { reason: reason.to_string(), failed }
    }

    /// Time passes: a job that has been short of workers for longer than
    /// `replacement_timeout` fails.
    pub fn tick(&mut self, now: Instant, replacement_timeout: Duration) -> Change {
        match (&self.phase, self.short_since) {
            (Phase::Admitting, Some(since)) if now.duration_since(since) > replacement_timeout => self.stop(
                &format!(
                    "only {} of the {} workers it needs (cluster.min_workers) for {:.0} s \
                     (cluster.replacement_timeout_ms); start more workers, or lower min_workers",
                    self.live.len(),
                    self.min,
                    replacement_timeout.as_secs_f64()
                ),
                true,
            ),
            _ => Change::None,
        }
    }

    fn form_if_possible(&mut self) -> Change {
        // The largest size within the bounds that the live workers fill and the job's batch
        // splits over (workers join one at a time: a scale from 2 to 4 passes 3).
        let most = self.live.len().min(self.max);
        let Some(wanted) = (self.min..=most).rev().find(|&w| self.sizes.fits(w)) else {
            return Change::None;
        };
        let grows = self.phase == Phase::Training && wanted > self.group.len();
        if !(self.phase == Phase::Admitting || grows) {
            return Change::None;
        }
        self.generation += 1;
        self.formations += 1;
        self.group = self.live[..wanted].to_vec();
        self.phase = Phase::Training;
        self.short_since = None;
        Change::Form { generation: self.generation, members: self.group.clone() }
    }
}

/// The members whose compute seconds per step exceed `factor` × the median of the *other*
/// members' (`(worker, seconds)`; members without a time yet are skipped), with that median.
pub fn stragglers(times: &[(WorkerId, f64)], factor: f64) -> Vec<(WorkerId, f64)> {
    if factor <= 0.0 {
        return Vec::new();
    }
    let known: Vec<&(WorkerId, f64)> = times.iter().filter(|t| t.1 > 0.0).collect();
    known
        .iter()
        .filter_map(|(id, t)| {
            let mut others: Vec<f64> = known.iter().filter(|o| &o.0 != id).map(|o| o.1).collect();
            if others.is_empty() {
                return None;
            }
            others.sort_by(f64::total_cmp);
            let n = others.len();
            let median = if n % 2 == 1 { others[n / 2] } else { (others[n / 2 - 1] + others[n / 2]) / 2.0 };
            (*t > factor * median).then(|| (id.clone(), median))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_much_slower_than_the_median_is_a_straggler() {
        let t = |pairs: &[(&str, f64)]| pairs.iter().map(|(w, s)| (w.to_string(), *s)).collect::<Vec<_>>();
        let ids = |v: Vec<(WorkerId, f64)>| v.into_iter().map(|(w, _)| w).collect::<Vec<_>>();
        let group = t(&[("w1", 1.0), ("w2", 1.1), ("w3", 0.9), ("w4", 2.0)]);
        assert_eq!(stragglers(&group, 1.5), [("w4".to_string(), 1.0)]);
        assert!(stragglers(&group, 2.5).is_empty());
        assert!(stragglers(&group, 0.0).is_empty(), "0 turns the check off");
        assert!(stragglers(&t(&[("w1", 9.0)]), 1.5).is_empty(), "one member has no peers to lag");
        assert_eq!(
            ids(stragglers(&t(&[("w1", 1.0), ("w2", 1.6)]), 1.5)),
            ["w2"],
            "two members compare with each other"
        );
        assert_eq!(ids(stragglers(&t(&[("w1", 1.0), ("w2", 0.0), ("w3", 1.0), ("w4", 3.0)]), 1.5)), ["w4"]);
    }

    fn form(generation: u64, members: &[&str]) -> Change {
        Change::Form { generation, members: members.iter().map(|m| m.to_string()).collect() }
    }

    #[test]
    fn forms_once_min_workers_join_and_generations_continue_after_a_restart() {
        let mut m = Membership::new(2, 3, 7);
        assert_eq!(m.joined("w1", None), Change::None);
        assert_eq!(m.phase(), &Phase::Admitting);
        assert_eq!(m.joined("w2", None), form(8, &["w1", "w2"]));
        assert_eq!(m.phase(), &Phase::Training);
        assert_eq!(m.joined("w2", None), Change::None, "joining twice changes nothing");
    }

    #[test]
    fn a_joiner_within_max_re_forms_the_group_and_beyond_max_is_refused() {
        let mut m = Membership::new(1, 2, 0);
        assert_eq!(m.joined("w1", None), form(1, &["w1"]));
        assert!(m.admits(1).is_ok());
        assert_eq!(m.joined("w2", None), form(2, &["w1", "w2"]));
        assert!(matches!(m.admits(2), Err(Refusal::Full(why)) if why.contains("max_workers")));
    }

    #[test]
    fn a_lost_member_re_forms_with_the_survivors_or_waits_for_replacements() {
        let t0 = Instant::now();
        let mut m = Membership::new(2, 3, 0);
        m.joined("w1", None);
        m.joined("w2", None);
        assert_eq!(m.joined("w3", None), form(2, &["w1", "w2", "w3"]));
        assert_eq!(m.lost("w2", t0), form(3, &["w1", "w3"]));
        // Below min_workers: wait, then a replacement re-forms the group.
        assert_eq!(m.lost("w1", t0), Change::None);
        assert_eq!(m.phase(), &Phase::Admitting);
        assert_eq!(m.tick(t0 + Duration::from_secs(5), Duration::from_secs(60)), Change::None);
        assert_eq!(m.joined("w4", None), form(4, &["w3", "w4"]));
        assert_eq!(m.formations(), 4);
        // Losing someone who is not a member (or is already gone) changes nothing.
        assert_eq!(m.lost("w9", t0), Change::None);
    }

    #[test]
    fn too_long_without_enough_workers_fails_the_job() {
        let t0 = Instant::now();
        let mut m = Membership::new(2, 2, 0);
        m.joined("w1", None);
        m.joined("w2", None);
        m.lost("w1", t0);
        assert_eq!(m.tick(t0 + Duration::from_secs(30), Duration::from_secs(60)), Change::None);
        let Change::Stop { reason, failed: true } = m.tick(t0 + Duration::from_secs(61), Duration::from_secs(60))
        else {
            panic!("expected a failure")
        };
        assert!(reason.contains("only 1 of the 2 workers"), "{reason}");
        assert!(matches!(m.phase(), Phase::Failed(_)));
        assert!(matches!(m.admits(1), Err(Refusal::Over(_))), "a failed job admits no one");
    }

    #[test]
    fn a_broken_group_re_forms_once_and_stale_reports_are_ignored() {
        let t0 = Instant::now();
        let mut m = Membership::new(2, 2, 0);
        m.joined("w1", None);
        m.joined("w2", None);
        assert_eq!(m.group_broke("w1", 1, t0), form(2, &["w1", "w2"]));
        assert_eq!(m.group_broke("w2", 1, t0), Change::None, "w2's report about generation 1 is stale");
        assert_eq!(m.generation(), 2);
    }

    #[test]
    fn resizing_grows_with_joiners_and_shrinks_as_members_leave() {
        let t0 = Instant::now();
        let mut m = Membership::new(2, 2, 0);
        m.joined("w1", None);
        m.joined("w2", None);
        assert_eq!(m.resize(3, 3), Change::None, "the group keeps training until a third worker joins");
        assert_eq!(m.joined("w3", None), form(2, &["w1", "w2", "w3"]));
        assert_eq!(m.resize(2, 2), Change::None);
        assert_eq!(m.lost("w3", t0), form(3, &["w1", "w2"]), "the leaver's group re-forms at the new size");
        assert_eq!(m.bounds(), (2, 2));
    }

    #[test]
    fn groups_form_only_at_sizes_the_batch_splits_over() {
        let now = Instant::now();
        // A global batch of 16 in micro-batches of 4: 1, 2 or 4 workers, never 3.
        let mut m = Membership::with_sizes(1, 4, 0, SizeRule::new(|w| 16 % (4 * w) == 0));
        assert_eq!(m.joined("w1", None), form(1, &["w1"]));
        assert_eq!(m.joined("w2", None), form(2, &["w1", "w2"]));
        assert_eq!(m.joined("w3", None), Change::None, "3 does not split the batch: w3 waits");
        assert_eq!(m.joined("w4", None), form(3, &["w1", "w2", "w3", "w4"]));
        // Losing one of four re-forms with two; the third survivor waits as standby.
        assert_eq!(m.lost("w2", now), form(4, &["w1", "w3"]));
        assert_eq!(m.live(), ["w1", "w3", "w4"]);
        // Scaled from 2 to 4 (min = max = 4): no group of 3 on the way.
        let mut m = Membership::with_sizes(2, 2, 0, SizeRule::new(|w| 16 % (4 * w) == 0));
        m.joined("a", None);
        assert_eq!(m.joined("b", None), form(1, &["a", "b"]));
        assert_eq!(m.resize(4, 4), Change::None);
        assert_eq!(m.joined("c", None), Change::None);
        assert_eq!(m.joined("d", None), form(2, &["a", "b", "c", "d"]));
    }

    #[test]
    fn the_end_is_final() {
        let mut m = Membership::new(1, 1, 0);
        m.joined("w1", None);
        assert_eq!(m.finished(), Change::Finish);
        assert_eq!(m.stop("late", true), Change::None);
        assert_eq!(m.lost("w1", Instant::now()), Change::None);
        assert_eq!(m.phase(), &Phase::Finished);
        let mut m = Membership::new(1, 1, 0);
        assert_eq!(m.stop("Ctrl-C", false), Change::Stop { reason: "Ctrl-C".into(), failed: false });
        assert_eq!(m.joined("w1", None), Change::None);
        assert_eq!(m.phase(), &Phase::Stopped("Ctrl-C".into()));
    }

    #[test]
    fn rank_hints_order_the_group_and_scaling_down_releases_the_highest() {
        let now = Instant::now();
        let mut m = Membership::new(3, 4, 0);
        // Joined as 2, 0, (none), 1: ranks follow the hints, the unhinted worker last.
        assert_eq!(m.joined("w1", Some(2)), Change::None);
        assert_eq!(m.joined("w2", Some(0)), Change::None);
        assert_eq!(m.joined("w3", None), form(1, &["w2", "w1", "w3"]));
        assert_eq!(m.joined("w4", Some(1)), form(2, &["w2", "w4", "w1", "w3"]));
        assert_eq!(m.live(), ["w2", "w4", "w1", "w3"]);
        // A hinted replacement takes its predecessor's place.
        assert_eq!(m.lost("w4", now), form(3, &["w2", "w1", "w3"]));
        assert_eq!(m.joined("w5", Some(1)), form(4, &["w2", "w5", "w1", "w3"]));
        // Equal hints keep the order they joined in.
        let mut m = Membership::new(2, 2, 0);
        m.joined("a", Some(7));
        assert_eq!(m.joined("b", Some(7)), form(1, &["a", "b"]));
    }
}
