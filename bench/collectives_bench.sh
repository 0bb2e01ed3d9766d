#!/usr/bin/env bash
# All-reduce bus bandwidth, 64 MiB fp32 on loopback: our CPU TCP ring vs torch.distributed
# gloo, both run here in the same invocation at 2 and 4 ranks. Prints one line per case.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --quiet
for ranks in 2 4; do
  ours=$(./target/release/moxin-train bench all-reduce --ranks "$ranks" --mib 64 --iters 7)
  gloo=$(.venv/bin/python bench/gloo_allreduce.py --ranks "$ranks" --mib 64 --iters 7 2>/dev/null)
  .venv/bin/python - "$ours" "$gloo" <<'PY'
import json, sys
o, g = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"ranks {o['ranks']}: moxin ring busbw {o['busbw_gb_s']:.2f} GB/s, gloo {g['busbw_gb_s']:.2f} GB/s, ratio {o['busbw_gb_s'] / g['busbw_gb_s']:.2f}")
PY
done
