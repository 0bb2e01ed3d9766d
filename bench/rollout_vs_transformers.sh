#!/usr/bin/env bash
# GRPO rollout speed: moxin-train's batched, KV-cached sampling vs transformers' `generate`
# on the same model (bench-small, exported with export-hf), the same prompts (ragged:
# 24-64 tokens), the same threads, in one invocation (interleaved, twice each); prints the
# ratio of the best times. Not a test: machines are noisy, only the ratio means anything.
#   bash bench/rollout_vs_transformers.sh [rows] [new tokens] [threads]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
cargo build --release --quiet
rows=${1:-16}; new=${2:-64}; threads=${3:-2}
B=./target/release/moxin-train
out=$(mktemp -d)
MOXIN_LOG=warn $B train configs/bench-small.toml --out "$out/run" --set train.steps=1 --set checkpoint.enabled=true \
  --set checkpoint.every_steps=1 >/dev/null
$B export-hf "$out/run" "$out/hf" >/dev/null
.venv/bin/python - "$out/prompts.json" "$rows" <<'PY'
import json, random, sys
rng = random.Random(0)
rows = [[rng.randrange(3, 8192) for _ in range(rng.randint(24, 64))] for _ in range(int(sys.argv[2]))]
json.dump(rows, open(sys.argv[1], "w"))
PY
ours=(); theirs=()
for round in 1 2; do
  ours+=("$($B bench rollout --checkpoint "$out/run" --prompts "$out/prompts.json" --max-new-tokens "$new" \
    --threads "$threads" | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_s"])')")
  theirs+=("$(HF_HUB_OFFLINE=1 .venv/bin/python bench/hf_generate.py --model "$out/hf" --prompts "$out/prompts.json" \
    --max-new-tokens "$new" --threads "$threads" 2>/dev/null | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_s"])')")
done
.venv/bin/python - "${ours[*]}" "${theirs[*]}" "$rows" "$new" "$threads" <<'PY'
import sys, os, platform
ours = [float(x) for x in sys.argv[1].split()]
theirs = [float(x) for x in sys.argv[2].split()]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"machine: {cpu}, {os.cpu_count()} cores; {sys.argv[5]} threads each; {sys.argv[3]} rows x {sys.argv[4]} new tokens")
print(f"moxin-train  tokens/s: {', '.join(f'{x:.0f}' for x in ours)}  best {max(ours):.0f}")
print(f"transformers tokens/s: {', '.join(f'{x:.0f}' for x in theirs)}  best {max(theirs):.0f}")
print(f"ratio moxin-train / transformers generate: {max(ours) / max(theirs):.2f}")
PY
rm -rf "$out"
