#!/usr/bin/env bash
# GPU check: runs on a one-GPU machine from a binary built elsewhere. The machine needs
# python3 with torch 2.11 (CUDA) (and transformers for `rollout`), no Rust. Every part is
# bounded by a timeout; every result lands in $OUT (JSON, logs, summary.md, and
# timings.tsv: the seconds each part took).
#
# The default invocation is the check itself, sized for a short lease:
#   1.  doctor                     what the machine has (torch, GPU, NCCL); always runs
#   2.  nccl                       every NCCL collective on a world of one
#   3.  tiny                       tiny preset on CUDA, the defaults: loss falls as on the CPU
#   4.  nccl1                      `launch --workers 1` over NCCL = `train` without it
#   5.  ring                       `launch --workers 2` on one GPU over the ring = single-GPU `train`
#   6.  bench                      gpu-1b and moxin-7b 4 layers: moxin-train (the defaults) vs
#                                  PyTorch eager vs torch.compile, same run
#
# More, when asked for:
#   GPU_CHECK_ONLY="part ..."      runs only the named parts; besides the ones above:
#     kernels                      fused kernels vs ATen, projection GEMMs (fused, split, tuned)
#     chaos                        a worker SIGKILLed mid-run is replaced; every step logged once
#     ckpt                         gpu-1b checkpoints: blocking and background write seconds,
#                                  synchronous vs asynchronous (GPU_CHECK_CKPT_SYNC=0: async only)
#     ckpt-write                   `bench checkpoint-write` to the machine's local disk
#     rollout                      `bench rollout` vs transformers `generate`, gpu-1b, bf16
#     switches                     gpu-1b: the defaults vs model.sliding_window = 1024,
#                                  runtime.recompute = "blocks", runtime.grad_reduce = "bf16"
#   GPU_CHECK_ONLY=all             every part
#   GPU_CHECK_TINY="explicit ..."  tiny runs (default: explicit, the defaults): aten, fused
#                                  (autograd blocks), explicit, optstream, split, tuned; or all
#   GPU_CHECK_VARIANTS="..."       more moxin-train runs per bench shape (default: none):
#                                  aten, autograd (fused kernels, autograd blocks), keepall
#                                  (recompute = none), optstream, bf16gemm (MOXIN_GEMM_FP32_OUT=0),
#                                  split (split_projections), tuned (gemm = tuned), splittuned,
#                                  cublaslt (TORCH_BLAS_PREFER_CUBLASLT=1), profile (phases,
#                                  CUDA-synchronised), trace (every kernel of 3 steps, CUPTI, and
#                                  compile's the same way); or all
#   GPU_CHECK_SHAPES="gpu-1b"      bench shapes; GPU_CHECK_EAGER=0 / GPU_CHECK_COMPILE=0 skip
#                                  the PyTorch references; GPU_CHECK_STEPS=N steps per bench run
#   GPU_CHECK_DEADLINE_S=N         skips parts that would start after N seconds
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
# The switches of the script before GPU_CHECK_VARIANTS: they no longer do anything.
for old in GPU_CHECK_BENCH GPU_CHECK_ATEN GPU_CHECK_AUTOGRAD GPU_CHECK_KEEPALL GPU_CHECK_OPTSTREAM GPU_CHECK_GEMM \
  GPU_CHECK_SPLIT GPU_CHECK_TUNED GPU_CHECK_CUBLASLT GPU_CHECK_PROFILE GPU_CHECK_TRACE; do
  [ -n "${!old:-}" ] && say "warning: $old is no longer read; name extra bench runs in GPU_CHECK_VARIANTS (see the header)"
done
# One word list per choice; "all" picks every word.
listed() { [[ " $1 " == *" all "* || " $1 " == *" $2 "* ]]; }
want() { # want PART: whether to run PART (GPU_CHECK_ONLY, GPU_CHECK_DEADLINE_S)
  listed "${GPU_CHECK_ONLY:-nccl tiny nccl1 ring bench}" "$1" || return 1
  if [ -n "${GPU_CHECK_DEADLINE_S:-}" ] && [ $(( $(date +%s) - started )) -ge "$GPU_CHECK_DEADLINE_S" ]; then
    say "$1 skipped: past the deadline of ${GPU_CHECK_DEADLINE_S}s"; return 1
  fi
}
# timings.tsv: each part's name and seconds, written when the next part (or the summary) begins.
: >"$OUT/timings.tsv"
part_name=""; part_start=$started
part() { # part NAME TEXT...: ends the previous part, begins NAME
  [ -n "$part_name" ] && printf '%s\t%s\n' "$part_name" $(( $(date +%s) - part_start )) >>"$OUT/timings.tsv"
  part_name=$1; part_start=$(date +%s); shift
  [ $# -gt 0 ] && say "$*"
  return 0
}
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

part doctor "1. doctor"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null | tee "$OUT/nvidia-smi.txt"
"$BIN" doctor | tee "$OUT/doctor.txt"
"$BIN" doctor --json >"$OUT/doctor.json" 2>/dev/null

if want nccl; then
  part nccl "2. NCCL collectives on a world of one"
  run nccl 120 "$BIN" bench nccl && cat "$OUT/nccl.json" | $PY -c 'import json,sys; d=json.load(sys.stdin); print("   NCCL", d["nccl_version"], "all ok:", d["all_ok"])'
fi
if want kernels; then
  part kernels "fused kernels vs ATen; projection GEMMs"
  run kernels 180 "$BIN" bench kernels && $PY - "$OUT/kernels.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for k in ("adamw", "cross_entropy_head"):
    print(f"   {k}: aten {d[k]['aten_ms']:.2f} ms, fused {d[k]['fused_ms']:.2f} ms ({d[k]['speedup']:.2f}x); relative error {d[k]['relative_error']}")
b = d["block"]
for k, p in b["pieces"].items():
    print(f"   {k}: aten {p['aten_ms']:.2f} ms, fused {p['fused_ms']:.2f} ms ({p['speedup']:.2f}x); relative L2 {p['relative_l2']}")
print("   block forward+backward ms", b["forward_backward_ms"], "errors", b["relative_l2_vs_fp32_autograd"])
print("   attention backend SDPA picks:", b.get("attention_backend"), "; packed RoPE:", b.get("rope_packed_relative_l2"))
print("   bf16 products written as fp32 (weight gradients):", b.get("gemm_fp32_out"))
for shape, r in d.get("tuned_gemms", {}).items():
    if shape == "error":
        print("   tuned GEMMs refused:", r)
    elif shape != "problems":
        t = r["block_ms"]
        print(f"   {shape} projection GEMMs of a block, tuned cuBLASLt: fused {t['fused']:.2f} ms, split {t['split']:.2f} ms")
for shape, r in d.get("projection_gemms", {}).items():
    t = r["block_ms"]
    print(f"   {shape} projection GEMMs of a block: fused {t['fused']:.2f} ms, split {t['split']:.2f} ms ({t['split_vs_fused']:.3f}x)")
    for name, p in r["projections"].items():
        if "residual" in p:
            e = p["residual"]
            print(f"   {shape} {name}: residual in the GEMM {e['addmm_ms']:.3f} ms, GEMM then add {e['mm_then_add_ms']:.3f} ms")
PY
fi

TINY=(--set runtime.device=cuda --set train.steps=100 --set checkpoint.enabled=false)
if want tiny; then
  part tiny "3. tiny preset on CUDA"
  tiny() { listed "${GPU_CHECK_TINY:-explicit}" "$1"; }
  tiny aten && train tiny-aten 120 configs/tiny-pretrain.toml "${TINY[@]}" --set runtime.kernels=aten
  tiny fused && train tiny-fused 120 configs/tiny-pretrain.toml "${TINY[@]}" --set runtime.kernels=fused \
    --set runtime.block_backward=autograd
  tiny explicit && train tiny-explicit 120 configs/tiny-pretrain.toml "${TINY[@]}" --set runtime.kernels=fused \
    --set runtime.block_backward=explicit
  tiny optstream && train tiny-optstream 120 configs/tiny-pretrain.toml "${TINY[@]}" --set runtime.optimizer_stream=true
  tiny split && train tiny-split 120 configs/tiny-pretrain.toml "${TINY[@]}" --set runtime.split_projections=true
  tiny tuned && train tiny-tuned 120 configs/tiny-pretrain.toml "${TINY[@]}" --set runtime.gemm=tuned
fi

if want nccl1; then
  part nccl1 "4. NCCL world of one vs no NCCL"
  timeout 180 "$BIN" launch configs/tiny-pretrain.toml --workers 1 --out "$work/nccl1" "${TINY[@]}" \
    --set cluster.collective=nccl >"$OUT/nccl1.log" 2>&1 || { echo "   nccl1 failed:"; tail -5 "$OUT/nccl1.log"; }
  cp "$work/nccl1/metrics.jsonl" "$OUT/nccl1.metrics.jsonl" 2>/dev/null
fi

if want ring; then
  part ring "5. launch --workers 2 on one GPU (ring) vs single-GPU train"
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
fi

if want chaos; then
  part chaos "a worker SIGKILLed mid-run on the GPU: replaced, the group re-forms, the job finishes"
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
fi

# Checkpoints go to local disk (the repository's file system), not to a tmpfs /tmp.
DISK=${GPU_CHECK_DISK_DIR:-$PWD/.gpu-check-disk}
mkdir -p "$DISK"
df -hT "$DISK" /tmp >"$OUT/disk.txt" 2>&1

if want ckpt; then
  part ckpt "checkpoints of gpu-1b (12.4 GB of state): blocking and background write"
  # 100 steps, every 40: a background write (~6 s at 2 GB/s) outlasts 30 steps of ~0.2 s.
  CKPT=(--set train.steps=100 --set checkpoint.every_steps=40 --set checkpoint.keep_last=1 --set checkpoint.enabled=true)
  modes="async"; [ "${GPU_CHECK_CKPT_SYNC:-1}" = 1 ] && modes="sync async"
  for mode in $modes; do
    extra=(); [ "$mode" = sync ] && extra=(--set checkpoint.synchronous=true)
    timeout 300 "$BIN" train configs/gpu-1b-bench.toml --out "$DISK/ckpt-$mode" "${CKPT[@]}" "${extra[@]}" \
      >"$OUT/ckpt-$mode.log" 2>&1 || { echo "   ckpt-$mode failed:"; tail -5 "$OUT/ckpt-$mode.log"; }
    cp "$DISK/ckpt-$mode/metrics.jsonl" "$OUT/ckpt-$mode.metrics.jsonl" 2>/dev/null
    du -sb "$DISK/ckpt-$mode"/checkpoints/step-* 2>/dev/null | tail -1 | cut -f1 >"$OUT/ckpt-$mode.bytes"
    $PY -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print('   $mode: blocking s per step', [round(x['checkpoint_blocking_s'],2) for x in r], 'write s', [round(x['checkpoint_write_s'],2) for x in r], 'median step s', sorted(x['step_time_s'] for x in r)[len(r)//2], 'bytes', open(sys.argv[2]).read().strip())" "$OUT/ckpt-$mode.metrics.jsonl" "$OUT/ckpt-$mode.bytes"
    [ "$mode" = sync ] && rm -rf "$DISK/ckpt-sync"
  done
fi

if want ckpt-write; then
  part ckpt-write "checkpoint writer on local disk: hashed while written vs serialise, fsync, read back, hash"
  run ckpt-write 240 "$BIN" bench checkpoint-write --dir "$DISK/bench" --mib "${GPU_CHECK_CKPT_MIB:-4096}" --repeats 2 && cat "$OUT/ckpt-write.json"
  rm -rf "$DISK/bench"
fi

if want rollout; then
  part rollout "rollouts: bench rollout vs transformers generate (gpu-1b, bf16, 64 prompts of 24-64 tokens, 256 new)"
  model=$DISK/ckpt-async
  if [ ! -d "$model/checkpoints" ]; then
    model=$DISK/rollout-model
    timeout 300 "$BIN" train configs/gpu-1b-bench.toml --out "$model" --set train.steps=1 \
      --set checkpoint.enabled=true --set checkpoint.every_steps=1 >"$OUT/rollout-model.log" 2>&1
  fi
  "$BIN" export-hf "$model" "$DISK/hf" >"$OUT/rollout-export.log" 2>&1 || tail -5 "$OUT/rollout-export.log"
  $PY - "$DISK/prompts.json" <<'PY'
import json, random, sys
rng = random.Random(0)
json.dump([[rng.randrange(3, 32000) for _ in range(rng.randint(24, 64))] for _ in range(64)], open(sys.argv[1], "w"))
PY
  for round in 1 2; do
    run "rollout-moxin-$round" 240 "$BIN" bench rollout --checkpoint "$model" --prompts "$DISK/prompts.json" \
      --max-new-tokens 256 --device cuda --dtype bf16
    HF_HUB_OFFLINE=1 run "rollout-hf-$round" 240 $PY bench/hf_generate.py --model "$DISK/hf" --prompts "$DISK/prompts.json" \
      --max-new-tokens 256 --device cuda --dtype bf16
  done
  cat "$OUT"/rollout-*.json
fi
rm -rf "$DISK"

if want bench; then
  variant() { listed "${GPU_CHECK_VARIANTS:-}" "$1"; }
  for shape in ${GPU_CHECK_SHAPES:-gpu-1b moxin-7b-4l}; do
    want bench || break
    config=configs/$shape-bench.toml
    part "bench-$shape" "6. $shape: moxin-train, PyTorch eager, torch.compile"
    BENCH=(--set train.steps=$STEPS)
    train "$shape-moxin-explicit" 150 "$config" "${BENCH[@]}" --set runtime.kernels=fused --set runtime.block_backward=explicit
    variant aten && train "$shape-moxin-aten" 150 "$config" "${BENCH[@]}" --set runtime.kernels=aten
    variant autograd && train "$shape-moxin-fused" 150 "$config" "${BENCH[@]}" --set runtime.kernels=fused --set runtime.block_backward=autograd
    variant keepall && train "$shape-moxin-keepall" 150 "$config" "${BENCH[@]}" --set runtime.recompute=none
    variant optstream && train "$shape-moxin-optstream" 150 "$config" "${BENCH[@]}" --set runtime.optimizer_stream=true
    variant bf16gemm && MOXIN_GEMM_FP32_OUT=0 train "$shape-moxin-bf16gemm" 150 "$config" "${BENCH[@]}"
    variant split && train "$shape-moxin-split" 150 "$config" "${BENCH[@]}" --set runtime.split_projections=true
    variant tuned && train "$shape-moxin-tuned" 150 "$config" "${BENCH[@]}" --set runtime.gemm=tuned
    variant splittuned && train "$shape-moxin-splittuned" 150 "$config" "${BENCH[@]}" --set runtime.gemm=tuned \
      --set runtime.split_projections=true
    variant cublaslt && TORCH_BLAS_PREFER_CUBLASLT=1 train "$shape-moxin-cublaslt" 150 "$config" "${BENCH[@]}"
    variant profile && train "$shape-moxin-profile" 150 "$config" --set train.steps=8 --set runtime.profile=true
    # Every kernel of 3 steps after 5 of warm-up (CUPTI), the defaults; compile's the same way.
    TRACE=()
    if variant trace; then
      train "$shape-moxin-trace" 150 "$config" --set train.steps=8 --trace-kernels 3 &&
        cp "$work/$shape-moxin-trace/kernel_trace.json" "$OUT/$shape-moxin-kernels.json"
      TRACE=(--trace-kernels 3 --trace-out "$OUT/$shape-torch-compile-kernels.json")
    fi
    [ "${GPU_CHECK_EAGER:-1}" = 1 ] && run "$shape-torch-eager" 180 $PY bench/pytorch_gpu_reference.py --shape "$shape" --mode eager --steps "$STEPS"
    [ "${GPU_CHECK_COMPILE:-1}" = 1 ] && run "$shape-torch-compile" 300 $PY bench/pytorch_gpu_reference.py --shape "$shape" --mode compile --steps "$STEPS" "${TRACE[@]}"
  done
fi

# The defaults against one switch at a time.
if want switches; then
  part switches "gpu-1b switches: sliding window at seq = 2 x window, whole-block recomputation, bf16 gradients"
  config=configs/gpu-1b-bench.toml
  train switch-default 240 "$config" --set train.steps=$STEPS
  train switch-window 240 "$config" --set train.steps=$STEPS --set model.sliding_window=1024
  train switch-recompute-blocks 240 "$config" --set train.steps=$STEPS --set runtime.recompute=blocks
  train switch-grad-bf16 240 "$config" --set train.steps=$STEPS --set runtime.grad_reduce=bf16
fi

part ""  # ends the last part
say "summary"
$PY scripts/gpu_summary.py "$OUT" | tee "$OUT/summary.md"
say "done; results in $OUT"
