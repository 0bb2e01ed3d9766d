#!/usr/bin/env bash
# All-reduce bus bandwidth, 64 MiB fp32 on loopback, ranks as separate processes on both
# sides: our CPU ring through same-host shared memory, our ring over TCP only (the path
# between hosts), and torch.distributed gloo (TCP), in the same invocation at 2 and 4 ranks.
#   bash bench/collectives_bench.sh [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --quiet
rounds=${1:-1}
for ranks in 2 4; do
  for r in $(seq "$rounds"); do
    shm=$(./target/release/moxin-train bench all-reduce --ranks "$ranks" --mib 64 --iters 7)
    tcp=$(./target/release/moxin-train bench all-reduce --ranks "$ranks" --mib 64 --iters 7 --tcp)
    gloo=$(.venv/bin/python bench/gloo_allreduce.py --ranks "$ranks" --mib 64 --iters 7 2>/dev/null)
    .venv/bin/python - "$shm" "$tcp" "$gloo" <<'PY'
import json, sys
s, t, g = (json.loads(a) for a in sys.argv[1:])
gb = g["busbw_gb_s"]
print(f"ranks {s['ranks']}: gloo {gb:.2f} GB/s | moxin ring TCP {t['busbw_gb_s']:.2f} GB/s ({t['busbw_gb_s'] / gb:.2f}x) "
      f"| moxin ring shared memory {s['busbw_gb_s']:.2f} GB/s ({s['busbw_gb_s'] / gb:.2f}x)")
PY
  done
done
