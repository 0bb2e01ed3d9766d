#!/usr/bin/env bash
# Chaos run (outside CI): `launch --workers 2` on the tiny preset while worker processes
# are SIGKILLed at random, one after another, until KILLS kills; compared with the same
# job run clean. Reports (JSON on stdout, the table for RELIABILITY.md on stderr):
# failures injected and survived, kill -> detection and detection -> training-again
# seconds, samples lost or duplicated, and training efficiency vs the clean run.
#
# usage: bash bench/chaos.sh [KILLS=50]     (builds the release binary first)
set -euo pipefail
cd "$(dirname "$0")/.."
KILLS=${1:-50}
cargo build --release --quiet
BIN=$(readlink -f target/release/moxin-train)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
STEPS=$((KILLS * 25 + 200))
cat >"$work/job.toml" <<EOF
[model]
preset = "tiny"
[train]
steps = $STEPS
seq_len = 32
global_batch_size = 8
micro_batch_size = 4
log_every_steps = 1
[checkpoint]
every_steps = 10
keep_last = 2
[runtime]
device = "cpu"
threads = 1
[cluster]
heartbeat_timeout_ms = 2000
collective_timeout_ms = 5000
EOF

clean_start=$(date +%s.%N)
MOXIN_LOG=warn "$BIN" launch "$work/job.toml" --workers 2 --out "$work/clean" 2>"$work/clean.log"
clean_end=$(date +%s.%N)

MOXIN_LOG=info "$BIN" launch "$work/job.toml" --workers 2 --max-restarts $((KILLS + 5)) --out "$work/chaos" \
  2>"$work/chaos.log" &
launched=$!
chaos_start=$(date +%s.%N)
python3 - "$work/chaos" "$KILLS" >"$work/kills.json" <<'PY'
import json, os, random, signal, sys, time
run, kills = sys.argv[1], int(sys.argv[2])
rng, done, last_step, deadline = random.Random(7), [], 0, time.time() + 60 * 30
while len(done) < kills and time.time() < deadline:
    try:
        s = json.load(open(f"{run}/coordinator/state.json"))
    except (OSError, ValueError):
        time.sleep(0.05)
        continue
    members = [m["pid"] for m in s.get("members", []) if m.get("rank") is not None]
    if s.get("phase", {}).get("phase") == "training" and len(members) == 2 and s.get("step", 0) >= last_step + 20:
        pid = rng.choice(members)
        try:
            os.kill(pid, signal.SIGKILL)
            done.append({"pid": pid, "at": time.time(), "step": s["step"]})
            last_step = s["step"]
        except ProcessLookupError:
            pass
    time.sleep(0.02)
print(json.dumps(done))
PY
wait "$launched"
chaos_end=$(date +%s.%N)

python3 - "$work" "$KILLS" "$STEPS" "$clean_start" "$clean_end" "$chaos_start" "$chaos_end" <<'PY'
import datetime, json, re, statistics, sys
work, kills_wanted, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
clean_s, chaos_s = float(sys.argv[5]) - float(sys.argv[4]), float(sys.argv[7]) - float(sys.argv[6])
kills = json.load(open(f"{work}/kills.json"))
state = json.load(open(f"{work}/chaos/coordinator/state.json"))
rows = [json.loads(l) for l in open(f"{work}/chaos/metrics.jsonl")]
logged = [(r["step"], r["data_cursor"]) for r in rows]
planned = [(s, s * 8) for s in range(1, steps + 1)]
missing = len(set(planned) - set(logged))
repeated = len(logged) - len(set(logged))

def stamp(line):
    m = re.match(r"\x1b\[2m(\S+)Z", line) or re.match(r"(\S+)Z", line)
    return datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.timezone.utc).timestamp() if m else None

detected, again = [], []
for line in open(f"{work}/chaos.log", errors="replace"):
    if "closed its connection" in line or "missed heartbeats" in line:
        detected.append(stamp(line))
    m = re.search(r"training again ([0-9.]+) s after losing a worker", line)
    if m:
        again.append(float(m.group(1)))
detect = []
for k in kills:
    after = [t for t in detected if t is not None and t >= k["at"] - 0.05]
    if after:
        detect.append(min(after) - k["at"])
med = lambda xs: statistics.median(xs) if xs else float("nan")
result = {
    "kills": len(kills), "failures_seen": state["failures"], "recoveries": state["recoveries"],
    "finished": state["phase"]["phase"] == "finished", "steps": steps,
    "samples_lost": missing * 8, "samples_repeated": repeated * 8,
    "kill_to_detection_s": {"median": med(detect), "max": max(detect, default=float("nan"))},
    "detection_to_training_s": {"median": med(again), "max": max(again, default=float("nan"))},
    "clean_wall_s": clean_s, "chaos_wall_s": chaos_s, "efficiency": clean_s / chaos_s,
}
print(json.dumps(result, indent=1))
print(f"| {datetime.date.today()} | {result['kills']} | {result['failures_seen']} / {result['recoveries']} | "
      f"{'yes' if result['finished'] else 'NO'} | {result['samples_lost']} / {result['samples_repeated']} | "
      f"{med(detect):.3f} (max {max(detect, default=float('nan')):.3f}) | {med(again):.2f} (max {max(again, default=float('nan')):.2f}) | "
      f"{clean_s:.0f} s / {chaos_s:.0f} s = {clean_s / chaos_s:.2f} |", file=sys.stderr)
PY
