//! Protobuf and gRPC types of moxin-train (package `moxin.v1`).
//!
//! The coordinator resolves user configuration into a [`v1::JobSpec`]; workers train from
//! it alone. Generated from `proto/moxin/v1/*.proto` at build time without protoc.
#![forbid(unsafe_code)]
#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

/// Version 1 of the wire contract.
pub mod v1 {
    tonic::include_proto!("moxin.v1");
}

pub mod security;

/// Version of this build, sent by workers at registration so the coordinator can refuse
/// incompatible peers.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Counters every exporter serves from its start, at 0 until they count something:
/// `rate` and `increase` see no increase in the first sample of a series, so a counter
/// that first appeared at its first increment would hide that increment from alerts.
/// `extra` names the caller's own counters (the coordinator's losses and recoveries).
pub fn register_counters(extra: &[&'static str]) {
    for name in std::iter::once("moxin_tokens_total").chain(extra.iter().copied()) {
        metrics::counter!(name).absolute(0);
    }
}

/// The Prometheus view of a step, the same on a worker's exporter and the coordinator's.
pub fn record_step(m: &v1::StepMetrics) {
    metrics::gauge!("moxin_step").set(m.step as f64);
    metrics::gauge!("moxin_loss").set(m.loss);
    metrics::gauge!("moxin_mfu").set(m.mfu);
    metrics::gauge!("moxin_peak_memory_bytes").set(m.peak_memory_bytes as f64);
    // Tokens trained by this process, not the run's total (`tokens`, in metrics.jsonl): a
    // replaced worker restores an earlier checkpoint, and a counter that went down to the
    // restored total would read to Prometheus as a reset followed by all of it at once.
    let step_tokens = (m.tokens_per_s * m.step_time_s).round();
    if step_tokens.is_finite() && step_tokens > 0.0 {
        metrics::counter!("moxin_tokens_total").increment(step_tokens as u64);
    }
    metrics::histogram!("moxin_step_duration_seconds").record(m.step_time_s);
    metrics::histogram!("moxin_collective_busy_seconds").record(m.comm_s);
    metrics::histogram!("moxin_collective_exposed_seconds").record(m.comm_exposed_s);
    metrics::histogram!("moxin_optimizer_seconds").record(m.optimizer_s);
    for (phase, seconds) in &m.phase_s {
        metrics::gauge!("moxin_step_phase_seconds", "phase" => phase.clone()).set(*seconds);
    }
    if m.rollout {
        metrics::gauge!("moxin_grpo_reward_mean").set(m.reward_mean);
        metrics::gauge!("moxin_grpo_reward_std").set(m.reward_std);
        metrics::gauge!("moxin_grpo_zero_std_fraction").set(m.zero_std_fraction);
        metrics::gauge!("moxin_grpo_completion_length_mean").set(m.completion_len_mean);
        metrics::gauge!("moxin_grpo_completion_length_max").set(m.completion_len_max as f64);
        metrics::gauge!("moxin_grpo_truncation_ratio").set(m.truncation_ratio);
        metrics::gauge!("moxin_grpo_kl").set(m.kl);
        metrics::gauge!("moxin_grpo_clip_fraction").set(m.clip_fraction);
        metrics::gauge!("moxin_grpo_entropy").set(m.entropy);
        metrics::gauge!("moxin_grpo_rollout_seconds").set(m.rollout_s);
        metrics::gauge!("moxin_grpo_update_seconds").set(m.update_s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_counter_only_grows_when_a_worker_restores_an_earlier_step() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            register_counters(&["moxin_workers_lost_total"]);
            let text = handle.render();
            assert!(text.contains("moxin_tokens_total 0"), "{text}");
            assert!(text.contains("moxin_workers_lost_total 0"), "{text}");
            // 1,000 tokens a step: steps 10 and 11, then step 9 again from a checkpoint.
            for (step, tokens) in [(10, 10_000), (11, 11_000), (9, 9_000)] {
                let m =
                    v1::StepMetrics { step, tokens, tokens_per_s: 4_000.0, step_time_s: 0.25, ..Default::default() };
                record_step(&m);
            }
        });
        let text = handle.render();
        assert!(text.contains("moxin_tokens_total 3000"), "{text}");
    }

    #[test]
    fn a_profiled_step_exports_its_phases() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let step = v1::StepMetrics {
            step: 3,
            phase_s: [("forward".to_string(), 0.25), ("optimizer".to_string(), 0.125)].into_iter().collect(),
            ..Default::default()
        };
        metrics::with_local_recorder(&recorder, || record_step(&step));
        let text = handle.render();
        assert!(text.contains("moxin_step_phase_seconds{phase=\"forward\"} 0.25"), "{text}");
        assert!(text.contains("moxin_step_phase_seconds{phase=\"optimizer\"} 0.125"), "{text}");
        assert!(text.contains("moxin_step 3"), "{text}");
    }
}
