#!/usr/bin/env bash
# CPU training throughput of moxin-train vs PyTorch eager on the bench-small preset, both run
# here in the same invocation (interleaved, twice each) on 2 threads; prints the ratio of
# medians. Not a test: machines are noisy, so only the ratio from one run means anything.
#   bash bench/cpu_train_bench.sh [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --quiet
rounds=${1:-2}
steps=30; warmup=5
out=$(mktemp -d)
ours=(); theirs=()
for r in $(seq "$rounds"); do
  run="$out/run-$r"
  MOXIN_LOG=warn ./target/release/moxin-train train configs/bench-small.toml --out "$run" \
    --set train.steps=$steps >/dev/null
  ours+=("$(.venv/bin/python - "$run/metrics.jsonl" "$warmup" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][int(sys.argv[2]):]
print(statistics.median(r["tokens_per_s"] for r in rows))
PY
)")
  theirs+=("$(.venv/bin/python bench/pytorch_eager_train.py --steps $steps --warmup $warmup --threads 2 2>/dev/null \
    | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_s_median"])')")
done
.venv/bin/python - "${ours[*]}" "${theirs[*]}" <<'PY'
import statistics, sys, platform, os
ours = [float(x) for x in sys.argv[1].split()]
theirs = [float(x) for x in sys.argv[2].split()]
o, t = statistics.median(ours), statistics.median(theirs)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"machine: {cpu}, {os.cpu_count()} cores; 2 threads each")
print(f"moxin-train  tokens/s per round: {', '.join(f'{x:.0f}' for x in ours)}  median {o:.0f}")
print(f"pytorch eager tokens/s per round: {', '.join(f'{x:.0f}' for x in theirs)}  median {t:.0f}")
print(f"ratio moxin-train / pytorch eager: {o / t:.3f}")
PY
rm -rf "$out"
