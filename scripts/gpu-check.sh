#!/usr/bin/env bash
# GPU check: runs on a one-GPU machine from a binary built elsewhere, in under ~6 minutes.
# The machine needs python3 with torch 2.11 (CUDA), no Rust. Steps, most important first,
# each bounded by a timeout; every result lands in $OUT (JSON, logs, summary.md):
#   1. doctor                      what the machine has (torch, GPU, NCCL)
#   2. bench nccl / kernels        every NCCL collective on a world of one; fused kernels vs ATen
#   3. tiny preset on CUDA         loss falls as on the CPU (ATen and fused kernels)
#   4. NCCL world of one           `launch --workers 1` over NCCL = `train` without it
#   5. two workers on one GPU      `launch --workers 2` over the ring = single-GPU `train`
#      and a worker SIGKILLed mid-run is replaced; the job finishes, every step logged once
#      and checkpoint blocking on gpu-1b, synchronous vs asynchronous
#   6. gpu-1b, moxin-7b 4 layers   moxin-train vs PyTorch eager vs torch.compile, same run
#                                  (GPU_CHECK_BENCH=0 skips this step)
#
# usage: bash scripts/gpu-check.sh [path/to/moxin-train]   (default dist/moxin-train)
# Build the binary here first:  bash scripts/build-dist.sh
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=$(readlink -f "${1:-dist/moxin-train}")
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
STEPS=${GPU_CHECK_STEPS:-12}
mkdir -p "$OUT"
TORCH_LIB=$($PY -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MOXIN_LOG=${MOXIN_LOG:-warn}
export PYTHONUNBUFFERED=1
work=$(mktemp -d)
started=$(date +%s)
say() { echo "== [$(( $(date +%s) - started ))s] $*"; }
run() { # run NAME TIMEOUT CMD...: stdout to $OUT/NAME.json, stderr to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" >"$OUT/$name.json" 2>"$OUT/$name.log"
  local rc=$?
  [ $rc -eq 0 ] || { echo "   $name failed (exit $rc):"; tail -5 "$OUT/$name.log"; }
  return $rc
}
train() { # train NAME TIMEOUT CONFIG ARGS...: a run directory under $work/NAME
  local name=$1 limit=$2 config=$3; shift 3
  timeout "$limit" "$BIN" train "$config" --out "$work/$name" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || { echo "   $name failed (exit $rc):"; tail -5 "$OUT/$name.log"; }
  cp "$work/$name/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null
  return $rc
}

say "1. doctor"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null | tee "$OUT/nvidia-smi.txt"
"$BIN" doctor | tee "$OUT/doctor.txt"
"$BIN" doctor --json >"$OUT/doctor.json" 2>/dev/null

say "2. NCCL collectives on a world of one; fused kernels vs ATen"
run nccl 120 "$BIN" bench nccl && cat "$OUT/nccl.json" | $PY -c 'import json,sys; d=json.load(sys.stdin); print("   NCCL", d["nccl_version"], "all ok:", d["all_ok"])'
run kernels 180 "$BIN" bench kernels && $PY - "$OUT/kernels.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for k in ("adamw", "cross_entropy_head"):
    print(f"   {k}: aten {d[k]['aten_ms']:.2f} ms, fused {d[k]['fused_ms']:.2f} ms ({d[k]['speedup']:.2f}x); relative error {d[k]['relative_error']}")
PY

TINY=(--set runtime.device=cuda --set train.steps=100 --set checkpoint.enabled=false)
say "3. tiny preset on CUDA (ATen kernels, fused kernels)"
train tiny-aten 120 configs/tiny-pretrain.toml "${TINY[@]}" --set runtime.kernels=aten
train tiny-fused 120 configs/tiny-pretrain.toml "${TINY[@]}" --set runtime.kernels=fused

say "4. NCCL world of one vs no NCCL"
timeout 180 "$BIN" launch configs/tiny-pretrain.toml --workers 1 --out "$work/nccl1" "${TINY[@]}" \
  --set cluster.collective=nccl >"$OUT/nccl1.log" 2>&1 || { echo "   nccl1 failed:"; tail -5 "$OUT/nccl1.log"; }
cp "$work/nccl1/metrics.jsonl" "$OUT/nccl1.metrics.jsonl" 2>/dev/null

say "5. launch --workers 2 on one GPU (ring) vs single-GPU train"
RING=(--set runtime.device=cuda --set train.steps=20 --set checkpoint.every_steps=0)
train ring-single 120 configs/tiny-pretrain.toml "${RING[@]}"
timeout 180 "$BIN" launch configs/tiny-pretrain.toml --workers 2 --out "$work/ring2" "${RING[@]}" \
  --set cluster.collective=ring >"$OUT/ring2.log" 2>&1 || { echo "   ring2 failed:"; tail -5 "$OUT/ring2.log"; }
cp "$work/ring2/metrics.jsonl" "$OUT/ring2.metrics.jsonl" 2>/dev/null
$PY - "$work/ring-single" "$work/ring2" >"$OUT/ring-equivalence.json" <<'PY'
import glob, json, sys
from safetensors.torch import load_file
def last(run):
    return load_file(sorted(glob.glob(f"{run}/checkpoints/step-*/model.safetensors"))[-1])
a, b = last(sys.argv[1]), last(sys.argv[2])
num = sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a)
den = sum(float(a[k].float().pow(2).sum()) for k in a)
print(json.dumps({"params_relative_l2": (num / den) ** 0.5, "tensors": len(a)}))
PY
cat "$OUT/ring-equivalence.json" 2>/dev/null

say "5b. a worker SIGKILLed mid-run on the GPU: replaced, the group re-forms, the job finishes"
CHAOS=(--set runtime.device=cuda --set train.steps=150 --set checkpoint.every_steps=10 \
  --set cluster.collective=ring --set cluster.heartbeat_timeout_ms=2000 --set cluster.collective_timeout_ms=10000)
timeout 240 "$BIN" launch configs/tiny-pretrain.toml --workers 2 --max-restarts 2 --out "$work/chaos" "${CHAOS[@]}" \
  >"$OUT/chaos.log" 2>&1 &
launched=$!
$PY - "$work/chaos" >"$OUT/recovery-kill.json" <<'PY'
import json, os, signal, sys, time
run = sys.argv[1]
deadline, killed = time.time() + 120, None
while time.time() < deadline and killed is None:
    try:
        s = json.load(open(f"{run}/coordinator/state.json"))
        members = [m["pid"] for m in s["members"] if m["rank"] is not None]
        if s["step"] >= 30 and len(members) == 2:
            killed = members[1]
            os.kill(killed, signal.SIGKILL)
    except (OSError, ValueError, KeyError):
        pass
    time.sleep(0.05)
print(json.dumps({"killed_pid": killed, "killed_unix_s": time.time()}))
PY
wait "$launched"; launch_exit=$?
$PY - "$work/chaos" "$launch_exit" "$OUT/recovery-kill.json" >"$OUT/recovery.json" <<'PY'
import json, sys, time
run, code, kill = sys.argv[1], int(sys.argv[2]), json.load(open(sys.argv[3]))
s = json.load(open(f"{run}/coordinator/state.json"))
steps = [json.loads(l)["step"] for l in open(f"{run}/metrics.jsonl")]
print(json.dumps({**kill, "launch_exit": code, "phase": s["phase"]["phase"], "failures": s["failures"],
                  "recoveries": s["recoveries"], "generation": s["generation"],
                  "steps_once_in_order": steps == list(range(1, 151))}))
PY
cat "$OUT/recovery.json"

say "5c. checkpoint blocking on gpu-1b (12.4 GB of state): synchronous vs asynchronous"
CKPT=(--set train.steps=8 --set checkpoint.every_steps=4 --set checkpoint.keep_last=1)
train ckpt-sync 300 configs/gpu-1b-bench.toml "${CKPT[@]}" --set checkpoint.enabled=true --set checkpoint.synchronous=true
train ckpt-async 300 configs/gpu-1b-bench.toml "${CKPT[@]}" --set checkpoint.enabled=true
du -sh "$work"/ckpt-async/checkpoints/step-* 2>/dev/null | tail -1
for mode in sync async; do
  $PY -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print('   $mode: blocking s per step', [round(x['checkpoint_blocking_s'],2) for x in r], 'write s', [round(x['checkpoint_write_s'],2) for x in r], 'median step s', sorted(x['step_time_s'] for x in r)[len(r)//2])" "$OUT/ckpt-$mode.metrics.jsonl"
done

[ "${GPU_CHECK_BENCH:-1}" = 0 ] && { say "summary"; $PY scripts/gpu_summary.py "$OUT" | tee "$OUT/summary.md"; say "done (benchmarks skipped); results in $OUT"; exit 0; }

for shape in gpu-1b moxin-7b-4l; do
  config=configs/$shape-bench.toml
  say "6. $shape: moxin-train (aten, fused), PyTorch eager, torch.compile"
  BENCH=(--set train.steps=$STEPS)
  train "$shape-moxin-aten" 240 "$config" "${BENCH[@]}" --set runtime.kernels=aten
  train "$shape-moxin-fused" 240 "$config" "${BENCH[@]}" --set runtime.kernels=fused
  train "$shape-moxin-profile" 240 "$config" --set train.steps=8 --set runtime.kernels=fused --set runtime.profile=true
  run "$shape-torch-eager" 300 $PY bench/pytorch_gpu_reference.py --shape "$shape" --mode eager --steps "$STEPS"
  run "$shape-torch-compile" 400 $PY bench/pytorch_gpu_reference.py --shape "$shape" --mode compile --steps "$STEPS"
done

say "summary"
$PY scripts/gpu_summary.py "$OUT" | tee "$OUT/summary.md"
say "done; results in $OUT"
