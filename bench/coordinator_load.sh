#!/usr/bin/env bash
# 1,000 simulated workers heartbeating at 1 Hz against one coordinator process for 20 s:
# heartbeat round-trip p50/p99 (client side) and the coordinator's CPU use (from /proc).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --quiet
workers=${1:-1000}; seconds=${2:-20}
dir=$(mktemp -d)
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$dir/job.toml" <<TOML
[model]
preset = "tiny"
[train]
steps = 1
seq_len = 32
global_batch_size = $workers
micro_batch_size = 1
[cluster]
min_workers = $workers
listen = "127.0.0.1:$port"
heartbeat_timeout_ms = 10000
TOML
MOXIN_LOG=warn ./target/release/moxin-train coordinator "$dir/job.toml" --out "$dir/run" &
pid=$!
sleep 3
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
t0=$(ticks); s0=$(date +%s.%N)
result=$(./target/release/moxin-train bench heartbeats --coordinator "http://127.0.0.1:$port" --workers "$workers" --seconds "$seconds")
t1=$(ticks); s1=$(date +%s.%N)
kill "$pid" 2>/dev/null || true
hz=$(getconf CLK_TCK)
.venv/bin/python - "$result" "$t0" "$t1" "$s0" "$s1" "$hz" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); t0, t1, s0, s1, hz = map(float, sys.argv[2:])
cpu = (t1 - t0) / hz / (s1 - s0)
print(f"{r['workers']} workers, {r['heartbeats']} heartbeats: p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.2f} ms; coordinator CPU {cpu:.3f} cores")
PY
rm -rf "$dir"
