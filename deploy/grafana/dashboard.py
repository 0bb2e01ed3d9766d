#!/usr/bin/env python3
"""Generates deploy/grafana/moxin-train.json, the Grafana dashboard for moxin-train.

Built with Grafana's own Foundation SDK (PyPI `grafana-foundation-sdk`, pinned in
scripts/setup.sh), not edited by hand:

    .venv/bin/python deploy/grafana/dashboard.py > deploy/grafana/moxin-train.json

tests/deploy_cli.rs checks that the committed JSON is this script's output and runs every
panel query against a live Prometheus scraping a running job.

Histograms are exported as Prometheus summaries (`_sum`, `_count`, `{quantile}`), so mean
times are `rate(x_sum) / rate(x_count)`.
"""

import itertools
import json
import sys

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.builders import stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
JOB = 'job=~"$job"'
PANEL_IDS = itertools.count(1)


def row(title: str) -> db.Row:
    return db.Row(title).id(next(PANEL_IDS))


def mean(metric: str, by: str = "job", extra: str = "") -> str:
    """Mean of a summary over the panel's rate interval, per `by`."""
    sel = "{" + JOB + extra + "}"
    return (
        f"sum by ({by}) (rate({metric}_sum{sel}[$__rate_interval]))"
        f" / sum by ({by}) (rate({metric}_count{sel}[$__rate_interval]))"
    )


def query(expr: str, legend: str, ref: str) -> prom.Dataquery:
    return prom.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)


def series(title: str, description: str, unit: str, queries: list[tuple[str, str]], width: int = 12):
    panel = (
        timeseries.Panel()
        .id(next(PANEL_IDS))
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(8)
        .line_width(1)
        .fill_opacity(10)
        .show_points(common.VisibilityMode.NEVER)
        .legend(
            cb.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
    )
    for i, (expr, legend) in enumerate(queries):
        panel = panel.with_target(query(expr, legend, chr(ord("A") + i)))
    return panel


def single(title: str, description: str, unit: str, expr: str, thresholds: list[tuple[float | None, str]]):
    return (
        stat.Panel()
        .id(next(PANEL_IDS))
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(6)
        .height(4)
        .graph_mode(common.BigValueGraphMode.AREA)
        .color_mode(common.BigValueColorMode.VALUE)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .thresholds(
            db.ThresholdsConfig()
            .mode(dm.ThresholdsMode.ABSOLUTE)
            .steps([dm.Threshold(value=v, color=c) for v, c in thresholds])
        )
        .with_target(query(expr, "{{job}}", "A"))
    )


def build() -> dict:
    dashboard = (
        db.Dashboard("moxin-train")
        .uid("moxin-train")
        .description("Training progress, step-time breakdown, cluster health, checkpoints and memory of moxin-train jobs.")
        .tags(["moxin-train", "training"])
        .editable()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .time("now-6h", "now")
        .refresh("30s")
        .timepicker(db.TimePicker().refresh_intervals(["10s", "30s", "1m", "5m", "15m", "1h"]))
        .with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            db.QueryVariable("job")
            .label("Job")
            .datasource(DATASOURCE)
            .query("label_values(moxin_step, job)")
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .current(dm.VariableOption(text="All", value="$__all"))
        )
    )

    dashboard = (
        dashboard.with_row(row("Progress"))
        .with_panel(
            single(
                "Step",
                "Optimizer steps completed.",
                "none",
                f"max by (job) (moxin_step{{{JOB}}})",
                [(None, "blue")],
            )
        )
        .with_panel(
            single(
                "Since the last step",
                "Seconds since the newest step (MoxinJobNotProgressing pages past 10 minutes).",
                "s",
                f"time() - max by (job) (moxin_last_step_timestamp_seconds{{{JOB}}})",
                [(None, "green"), (120, "orange"), (600, "red")],
            )
        )
        .with_panel(
            single(
                "Workers connected",
                "Workers registered with the coordinator.",
                "none",
                f"max by (job) (moxin_workers_connected{{{JOB}}})",
                [(None, "red"), (1, "green")],
            )
        )
        .with_panel(
            single(
                "Last checkpoint age",
                "Seconds since the newest committed checkpoint (MoxinCheckpointOverdue past 2 hours).",
                "s",
                f"time() - max by (job) (moxin_last_checkpoint_timestamp_seconds{{{JOB}}})",
                [(None, "green"), (3600, "orange"), (7200, "red")],
            )
        )
        .with_panel(
            series(
                "Loss",
                "Mean training loss over the step's global batch (nats per token).",
                "none",
                [(f"max by (job) (moxin_loss{{{JOB}}})", "{{job}}")],
            )
        )
        .with_panel(
            series(
                "Tokens per second",
                "Training throughput: the rate of moxin_tokens_total (tokens each exporter saw trained since it started; the highest per job).",
                "short",
                [(f"max by (job) (rate(moxin_tokens_total{{{JOB}}}[$__rate_interval]))", "{{job}}")],
            )
        )
        .with_panel(
            series(
                "MFU",
                "Model FLOPs utilisation per process: achieved training FLOP/s over the devices' peak "
                "(0 where the peak is unknown, e.g. on CPU).",
                "percentunit",
                [(f"moxin_mfu{{{JOB}}}", "{{job}} {{instance}}")],
            )
        )
        .with_panel(
            series(
                "Step time breakdown",
                "Mean step wall time and its parts: compute (forward and backward, reading data), "
                "exposed communication (waiting on collectives) and optimizer (clipping and the update). "
                "Compute is the step minus the other two, as the trainer defines them.",
                "s",
                [
                    (mean("moxin_step_duration_seconds"), "{{job}} step"),
                    (
                        f"{mean('moxin_step_duration_seconds')} - ({mean('moxin_collective_exposed_seconds')})"
                        f" - ({mean('moxin_optimizer_seconds')})",
                        "{{job}} compute",
                    ),
                    (mean("moxin_collective_exposed_seconds"), "{{job}} exposed communication"),
                    (mean("moxin_optimizer_seconds"), "{{job}} optimizer"),
                    (mean("moxin_collective_busy_seconds"), "{{job}} collectives busy (overlapped or not)"),
                ],
            )
        )
    )

    dashboard = (
        dashboard.with_row(row("Workers"))
        .with_panel(
            series(
                "Step time per process",
                "Mean step wall time of each exporter (coordinator and workers).",
                "s",
                [(mean("moxin_step_duration_seconds", by="job, instance"), "{{instance}}")],
                width=8,
            )
        )
        .with_panel(
            series(
                "Compute time per worker",
                "Each rank's forward and backward time of its last step, from its heartbeats "
                "(stragglers stand out here).",
                "s",
                [
                    (f"moxin_rank_compute_seconds{{{JOB}}}", "{{worker}}"),
                    (f"max by (job) (moxin_stragglers{{{JOB}}})", "{{job}} stragglers"),
                ],
                width=8,
            )
        )
        .with_panel(
            series(
                "Heartbeat round trip",
                "Worker → coordinator heartbeat: round trip seen by each worker and one-way latency "
                "seen by the coordinator (means over the interval).",
                "s",
                [
                    (mean("moxin_heartbeat_rtt_seconds", by="job, instance"), "{{instance}} round trip"),
                    (mean("moxin_heartbeat_latency_seconds"), "{{job}} one-way (coordinator)"),
                ],
                width=8,
            )
        )
        .with_panel(
            series(
                "Membership",
                "Workers connected and the group's membership generation (it rises each time the group "
                "re-forms).",
                "none",
                [
                    (f"max by (job) (moxin_workers_connected{{{JOB}}})", "{{job}} workers connected"),
                    (f"max by (job) (moxin_membership_generation{{{JOB}}})", "{{job}} generation"),
                ],
            )
        )
        .with_panel(
            series(
                "Workers lost and recoveries",
                "Workers lost and group recoveries in each interval (left axis), and the mean recovery "
                "time so far (loss detected → the new group's first step; right axis, seconds).",
                "none",
                [
                    (f"sum by (job) (increase(moxin_workers_lost_total{{{JOB}}}[$__rate_interval]))", "{{job}} lost"),
                    (f"sum by (job) (increase(moxin_recoveries_total{{{JOB}}}[$__rate_interval]))", "{{job}} recoveries"),
                    (f"max by (job) (moxin_recovery_seconds_sum{{{JOB}}} / moxin_recovery_seconds_count{{{JOB}}})",
                     "{{job}} mean recovery time"),
                ],
            ).override_by_query(
                "C",
                [
                    dm.DynamicConfigValue(id_val="unit", value="s"),
                    dm.DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
                ],
            )
        )
    )

    dashboard = (
        dashboard.with_row(row("Checkpoints and memory"))
        .with_panel(
            series(
                "Checkpoint time",
                "Seconds training waited for checkpointing after a step, and the background seconds of "
                "the last checkpoint write (writing and hashing).",
                "s",
                [
                    (f"moxin_checkpoint_blocking_seconds{{{JOB}}}", "{{instance}} blocking"),
                    (f"moxin_checkpoint_write_seconds{{{JOB}}}", "{{instance}} write"),
                ],
                width=8,
            )
        )
        .with_panel(
            series(
                "Last checkpoint",
                "Seconds since the newest committed checkpoint, over time.",
                "s",
                [
                    (f"time() - max by (job) (moxin_last_checkpoint_timestamp_seconds{{{JOB}}})", "{{job}} age"),
                ],
                width=8,
            )
        )
        .with_panel(
            series(
                "GPU memory",
                "Peak memory of each process (device memory in use on a GPU, peak resident memory on "
                "CPU) and the GPU's total memory (CUDA workers only).",
                "bytes",
                [
                    (f"moxin_peak_memory_bytes{{{JOB}}}", "{{instance}} peak"),
                    (f"moxin_device_memory_total_bytes{{{JOB}}}", "{{instance}} device total"),
                ],
                width=8,
            )
        )
        .with_panel(
            series(
                "GPU memory used",
                "Peak over total device memory per CUDA worker (MoxinGpuMemoryNearLimit past 95%).",
                "percentunit",
                [
                    (
                        f"moxin_peak_memory_bytes{{{JOB}}} / on (job, instance) "
                        f"moxin_device_memory_total_bytes{{{JOB}}}",
                        "{{instance}}",
                    )
                ],
                width=24,
            )
            .min(0)
            .max(1)
            .thresholds(
                db.ThresholdsConfig()
                .mode(dm.ThresholdsMode.ABSOLUTE)
                .steps([dm.Threshold(value=None, color="green"), dm.Threshold(value=0.95, color="red")])
            )
            .thresholds_style(cb.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.LINE))
        )
    )
    return json.loads(json.dumps(dashboard.build(), cls=JSONEncoder))


def main() -> None:
    json.dump(build(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
