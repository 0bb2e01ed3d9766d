#!/usr/bin/env bash
# Step-time breakdown of bench-small trained by `launch --workers 2` (one intra-op thread per
# worker on this 2-core machine): medians of compute (forward/backward, during which gradient
# buckets already reduce-scatter), exposed communication (time the step waited for the ring),
# optimizer, and the ring's busy time, from metrics.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --quiet
run=$(mktemp -d)/run
MOXIN_LOG=warn ./target/release/moxin-train launch configs/bench-small.toml --workers 2 --out "$run" \
  --set train.steps=20 --set train.micro_batch_size=4 --set runtime.threads=1 --set checkpoint.enabled=false
.venv/bin/python - "$run/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][5:]
med = lambda k: statistics.median(r[k] for r in rows)
step, comp, exposed, opt, busy = (med(k) for k in ("step_time_s", "compute_s", "comm_exposed_s", "optimizer_s", "comm_s"))
print(f"bench-small, 2 workers, steps 6-20 medians: step {step:.3f} s = compute {comp:.3f} s ({comp/step:.0%}) "
      f"+ exposed communication {exposed:.3f} s ({exposed/step:.0%}) + optimizer {opt:.3f} s ({opt/step:.0%}); "
      f"ring busy {busy:.3f} s; {med('tokens_per_s'):.0f} tokens/s")
PY
rm -rf "$(dirname "$run")"
