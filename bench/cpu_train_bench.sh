#!/usr/bin/env bash
# CPU training throughput of moxin-train vs PyTorch eager on the bench-small preset, all run
# here in the same invocation (interleaved, `rounds` times each) on 2 threads; prints the
# ratios of medians. Not a test: machines are noisy, so only the ratios from one run mean
# anything.
#
# For each precision (fp32; bf16 = moxin-train's bf16 parameters with fp32 master weights
# vs PyTorch's `torch.autocast("cpu", dtype=torch.bfloat16)`), PyTorch runs twice: as it
# comes, and with glibc's malloc told through GLIBC_TUNABLES what moxin-train tells it
# in-process (keep large freed blocks; `device::keep_freed_host_memory`), so the table can
# separate the allocator from the rest.
#   bash bench/cpu_train_bench.sh [rounds] [precisions]     # e.g. 3 "fp32 bf16"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --quiet
rounds=${1:-2}
precisions=${2:-fp32 bf16}
steps=30; warmup=5
tunables="glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=2147483647"
out=$(mktemp -d)
median_of_run() {
  .venv/bin/python - "$1/metrics.jsonl" "$warmup" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][int(sys.argv[2]):]
print(statistics.median(r["tokens_per_s"] for r in rows))
PY
}
eager() {
  env "$@" .venv/bin/python bench/pytorch_eager_train.py --steps $steps --warmup $warmup --threads 2 \
    --precision "$precision" 2>/dev/null | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_s_median"])'
}
for precision in $precisions; do
  ours=(); theirs=(); tuned=()
  for r in $(seq "$rounds"); do
    run="$out/run-$precision-$r"
    MOXIN_LOG=warn ./target/release/moxin-train train configs/bench-small.toml --out "$run" \
      --set train.steps=$steps --set runtime.precision="$precision" >/dev/null 2>&1
    ours+=("$(median_of_run "$run")")
    theirs+=("$(eager GLIBC_TUNABLES=)")
    tuned+=("$(eager GLIBC_TUNABLES=$tunables)")
  done
  .venv/bin/python - "$precision" "${ours[*]}" "${theirs[*]}" "${tuned[*]}" <<'PY'
import statistics, sys, platform, os
precision = sys.argv[1]
ours, theirs, tuned = ([float(x) for x in a.split()] for a in sys.argv[2:5])
o, t, u = statistics.median(ours), statistics.median(theirs), statistics.median(tuned)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
fmt = lambda xs: ", ".join(f"{x:.0f}" for x in xs)
print(f"== {precision}; machine: {cpu}, {os.cpu_count()} cores; 2 threads each")
print(f"moxin-train                    tokens/s per round: {fmt(ours)}  median {o:.0f}")
print(f"pytorch eager                  tokens/s per round: {fmt(theirs)}  median {t:.0f}")
print(f"pytorch eager, malloc tunables tokens/s per round: {fmt(tuned)}  median {u:.0f}")
print(f"ratio moxin-train / pytorch eager: {o / t:.3f}; / eager with the same malloc settings: {o / u:.3f}")
PY
done
rm -rf "$out"
