"""Turns the files scripts/gpu-check.sh leaves in $OUT into summary.md: a table of
moxin-train vs PyTorch eager vs torch.compile per shape (tokens/s median over steps 6+,
ratios, MFU, peak device memory in use), and the equivalence checks."""
import json
import os
import statistics
import sys

out = sys.argv[1]
WARMUP = 5


def load_json(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return None


def metrics(name):
    try:
        rows = [json.loads(l) for l in open(os.path.join(out, f"{name}.metrics.jsonl"))]
    except OSError:
        return None
    return rows


def moxin(name):
    rows = metrics(name)
    if not rows:
        return None
    steady = rows[WARMUP:] or rows
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady),
        "memory": max(r["peak_memory_bytes"] for r in rows),
        "loss": (rows[0]["loss"], rows[-1]["loss"]),
        "rows": rows,
    }


def gib(b):
    return f"{b / 2**30:.1f} GiB" if b else "-"


doctor = load_json("doctor.json") or {}
device = (doctor.get("devices") or [{}])[0].get("name", "unknown GPU")
print(f"# GPU check on {device}\n")
print(f"torch {doctor.get('torch_version')}; NCCL {(doctor.get('nccl') or {}).get('version')}\n")

print("## Throughput and memory (same run, same GPU)\n")
print("| shape | system | tokens/s | vs eager | vs compile | MFU | peak device memory in use |")
print("|---|---|---|---|---|---|---|")
for shape in ("gpu-1b", "moxin-7b-4l"):
    eager, compiled = load_json(f"{shape}-torch-eager.json"), load_json(f"{shape}-torch-compile.json")
    e = eager["tokens_per_s_median"] if eager else None
    c = compiled["tokens_per_s_median"] if compiled else None
    systems = []
    for variant, label in (("aten", "ATen kernels, autograd blocks"), ("fused", "fused kernels, autograd blocks"),
                           ("explicit", "fused kernels, hand-written blocks: the default"),
                           ("keepall", "the default with recompute = none"),
                           ("optstream", "the default + optimizer_stream = true"),
                           ("bf16gemm", "the default, weight gradients via a bf16 product + copy"),
                           ("split", "the default + split_projections = true"),
                           ("tuned", "the default + gemm = tuned (cuBLASLt, algorithms chosen by timing)"),
                           ("splittuned", "the default + split_projections = true + gemm = tuned"),
                           ("cublaslt", "the default, cuBLASLt preferred (TORCH_BLAS_PREFER_CUBLASLT=1)")):
        m = moxin(f"{shape}-moxin-{variant}")
        if m:
            systems.append((f"moxin-train ({label})", m["tokens_per_s"], m["mfu"], m["memory"]))
    for label, d in (("PyTorch eager (autocast bf16, fused AdamW)", eager), ("torch.compile", compiled)):
        if d:
            systems.append((label, d["tokens_per_s_median"], d.get("mfu") or 0, d["device_in_use_bytes"]))
    for label, tps, mfu, mem in systems:
        ve = f"{tps / e:.2f}x" if e else "-"
        vc = f"{tps / c:.2f}x" if c else "-"
        print(f"| {shape} | {label} | {tps:,.0f} | {ve} | {vc} | {100 * mfu:.1f}% | {gib(mem)} |")
    for label, d in (("eager", eager), ("compile", compiled)):
        if d:
            print(f"| {shape} | (torch {label} allocator peak) | | | | | {gib(d['peak_allocated_bytes'])} allocated, {gib(d['peak_reserved_bytes'])} reserved |")

print("\n## Step breakdown (profile mode, the defaults, CUDA-synchronised)\n")
print("| shape | step s | compute s | optimizer s | comm exposed s |")
print("|---|---|---|---|---|")
for shape in ("gpu-1b", "moxin-7b-4l"):
    rows = metrics(f"{shape}-moxin-profile")
    if rows:
        steady = rows[3:] or rows
        med = lambda k: statistics.median(r[k] for r in steady)
        print(f"| {shape} | {med('step_time_s'):.3f} | {med('compute_s'):.3f} | {med('optimizer_s'):.3f} | {med('comm_exposed_s'):.4f} |")

PHASES = ("data", "forward", "head", "backward", "embedding_backward", "grad_norm", "optimizer")
LAYERS = {"gpu-1b": 16, "moxin-7b-4l": 4}
print("\n## Phases of the step (profile mode: each phase ends with a device synchronisation), milliseconds\n")
print("| shape | " + " | ".join(PHASES) + " | sum | per block forward | per block backward |")
print("|---|" + "---|" * (len(PHASES) + 3))
for shape in ("gpu-1b", "moxin-7b-4l"):
    rows = [r for r in (metrics(f"{shape}-moxin-profile") or [])[3:] if r.get("phase_s")]
    if rows:
        med = {p: 1e3 * statistics.median(r["phase_s"].get(p, 0.0) for r in rows) for p in PHASES}
        layers = LAYERS[shape]
        cells = " | ".join(f"{med[p]:.1f}" for p in PHASES)
        print(f"| {shape} | {cells} | {sum(med.values()):.1f} | {med['forward'] / layers:.2f} | {med['backward'] / layers:.2f} |")

# Kernel categories, first match wins (lower-cased names; CUPTI's are mangled, the
# profiler's demangled: both contain these words).
CATEGORIES = (
    ("attention", ("flash", "fmha", "attn", "sdpa", "cudnn")),
    ("optimizer", ("adamw", "adam", "multi_tensor")),
    ("cross-entropy", ("ce_row_stats", "ce_grad", "log_softmax", "cross_entropy", "nll_loss")),
    ("GEMM", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk")),
    ("norm / RoPE / SwiGLU kernels (moxin)", ("rmsnorm_", "rope_", "swiglu_")),
    ("fused elementwise (Triton)", ("triton",)),
    ("copies, casts, fills", ("memcpy", "memset", "copy", "cast", "fill")),
    ("reductions", ("reduce",)),
    ("elementwise (ATen)", ("elementwise", "vectorized", "unrolled", "index")),
)


def category(name):
    low = name.lower()
    return next((c for c, words in CATEGORIES if any(w in low for w in words)), "other")


print("\n## Where the device time goes (kernel traces of 3 steps), milliseconds per step\n")
for shape in ("gpu-1b", "moxin-7b-4l"):
    traces = [(label, load_json(f"{shape}-{name}-kernels.json"))
              for label, name in (("moxin-train (defaults)", "moxin"), ("torch.compile", "torch-compile"))]
    traces = [(label, t) for label, t in traces if t]
    if not traces:
        continue
    sums = []
    for label, t in traces:
        per = {}
        for k in t["kernels"]:
            per[category(k["name"])] = per.get(category(k["name"]), 0.0) + k["ms_per_step"]
        sums.append(per)
    cats = [c for c, _ in CATEGORIES] + ["other"]
    print(f"| {shape} | " + " | ".join(label for label, _ in traces) + " |")
    print("|---|" + "---|" * len(traces))
    for c in cats:
        if any(per.get(c) for per in sums):
            print(f"| {c} | " + " | ".join(f"{per.get(c, 0.0):.1f}" for per in sums) + " |")
    for key, label in (("kernel_ms_per_step", "all kernels (sum)"), ("busy_ms_per_step", "device busy"),
                       ("idle_ms_per_step", "device idle between kernels"), ("span_ms_per_step", "span")):
        print(f"| **{label}** | " + " | ".join(f"{t[key]:.1f}" for _, t in traces) + " |")
    for label, t in traces:
        print(f"\n{label}, the 12 longest kernels:\n")
        for k in t["kernels"][:12]:
            print(f"- {k['ms_per_step']:.2f} ms, {k['calls_per_step']:.1f} calls: `{k['name'][:110]}` ({category(k['name'])})")
    print()

base = moxin("switch-default")
if base:
    print("\n## Switches (gpu-1b, same run)\n")
    print("| run | tokens/s | vs the defaults | peak device memory in use | loss at the end |")
    print("|---|---|---|---|---|")
    for name, label in (("switch-default", "the defaults"), ("switch-window", "model.sliding_window = 1024 (seq = 2 x window)"),
                        ("switch-recompute-blocks", "runtime.recompute = blocks"),
                        ("switch-grad-bf16", "runtime.grad_reduce = bf16")):
        m = moxin(name)
        if m:
            print(f"| {label} | {m['tokens_per_s']:,.0f} | {m['tokens_per_s'] / base['tokens_per_s']:.2f} | {gib(m['memory'])} | {m['loss'][1]:.3f} |")

print("\n## Correctness\n")
for name in ("tiny-aten", "tiny-fused", "tiny-explicit", "tiny-optstream", "tiny-split", "tiny-tuned", "nccl1"):
    rows = metrics(name)
    if rows:
        print(f"- {name}: loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f} over {len(rows)} steps")
def compare(first, second, label, relative):
    """Prints the largest loss difference (absolute, or relative to `first`'s) between two runs' steps."""
    a, b = metrics(first), metrics(second)
    if a and b:
        diffs = [abs(x["loss"] - y["loss"]) / (abs(x["loss"]) if relative else 1.0) for x, y in zip(a, b)]
        kind = "relative" if relative else "|loss|"
        print(f"- {label}: max {kind} difference over {len(diffs)} steps = {max(diffs):.2e}")


compare("tiny-explicit", "nccl1", "NCCL world of one vs no NCCL (the defaults)", False)
compare("tiny-aten", "tiny-fused", "fused vs ATen kernels (tiny, bf16)", True)
compare("tiny-explicit", "tiny-optstream", "AdamW on its own stream vs on torch's (tiny, the defaults)", False)
compare("tiny-fused", "tiny-explicit", "hand-written vs autograd block backward (tiny, bf16, fused kernels)", True)
compare("tiny-explicit", "tiny-split", "one GEMM per projection part vs fused projections (tiny, the defaults)", True)
compare("tiny-explicit", "tiny-tuned", "tuned cuBLASLt GEMMs vs libtorch's (tiny, the defaults)", True)
eq = load_json("ring-equivalence.json")
if eq:
    print(f"- 2 workers on one GPU over the ring vs single-GPU train, 20 steps: parameters differ by {eq['params_relative_l2']:.2e} (relative L2)")
nccl = load_json("nccl.json")
if nccl:
    print(f"- NCCL {nccl['nccl_version']} collectives on a world of one: all equal = {nccl['all_ok']} ({len(nccl['results'])} checks)")
k = load_json("kernels.json")
if k:
    for name in ("adamw", "cross_entropy_head"):
        print(f"- fused {name}: {k[name]['speedup']:.2f}x ATen ({k[name]['aten_ms']:.2f} -> {k[name]['fused_ms']:.2f} ms); relative errors {k[name]['relative_error']}")
    blk = k.get("block")
    if blk:
        for name, p in blk["pieces"].items():
            print(f"- fused {name} (forward + backward, gpu-1b block, 16k tokens): {p['speedup']:.2f}x ATen "
                  f"({p['aten_ms']:.2f} -> {p['fused_ms']:.2f} ms); relative L2 to fp32: {p['relative_l2']}")
        if "rope_packed_relative_l2" in blk:
            print(f"- fused RoPE on packed rows (positions restarting every 300 tokens): relative L2 to fp32 {blk['rope_packed_relative_l2']}")
        ms = blk["forward_backward_ms"]
        print(f"- one gpu-1b block forward + backward: autograd {ms['autograd']:.2f} ms, hand-written with ATen pieces "
              f"{ms['explicit_aten']:.2f} ms, with fused pieces {ms['explicit_fused']:.2f} ms "
              f"({blk['speedup_explicit_fused_vs_autograd']:.2f}x autograd)")
        for system, errs in blk["relative_l2_vs_fp32_autograd"].items():
            print(f"  - {system}: relative L2 to fp32 autograd: " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))
r = load_json("recovery.json")
if r:
    print(
        f"- a worker SIGKILLed mid-run (2 workers on one GPU, ring): launch exit {r['launch_exit']}, phase {r['phase']}, "
        f"failures {r['failures']}, recoveries {r['recoveries']}, generation {r['generation']}, "
        f"every step logged once in order: {r['steps_once_in_order']}"
    )

if k and k.get("projection_gemms"):
    print("\n## Projection GEMMs: fused (moxin-train) vs split (q/k/v and gate/up separate), TFLOP/s\n")
    print("| shape | projection (m x n x k) | role | fused | split | split time / fused |")
    print("|---|---|---|---|---|---|")
    for shape, r in k["projection_gemms"].items():
        for name, p in r["projections"].items():
            for role, e in p["roles"].items():
                split = f"{e['split_tflops']:.0f}" if "split_tflops" in e else "-"
                ratio = f"{e['split_vs_fused']:.3f}" if "split_vs_fused" in e else "-"
                print(f"| {shape} | {name} ({p['m']} x {p['n']} x {p['k']}) | {role} | {e['fused_tflops']:.0f} | {split} | {ratio} |")
        b = r["block_ms"]
        print(f"| {shape} | one block (forward, input and fp32 weight gradients) | ms | {b['fused']:.2f} | {b['split']:.2f} | {b['split_vs_fused']:.3f} |")
    tuned = k.get("tuned_gemms") or {}
    if tuned.get("error"):
        print(f"\nTuned GEMMs refused: {tuned['error']}")
    elif tuned:
        print("\n| shape | one block's projection GEMMs, ms | libtorch (cuBLAS) | tuned cuBLASLt | tuned / libtorch |")
        print("|---|---|---|---|---|")
        for shape, r in k["projection_gemms"].items():
            for way in ("fused", "split"):
                a, t = r["block_ms"][way], tuned[shape]["block_ms"][way]
                print(f"| {shape} | {way} | {a:.2f} | {t:.2f} | {t / a:.3f} |")
        for shape in k["projection_gemms"]:
            errs = {f"{name} {role}": e["relative_difference_vs_aten"]
                    for name, p in tuned[shape]["projections"].items() for role, e in p["roles"].items()
                    if role != "weight_grad_bf16"}
            worst = max(errs, key=errs.get)
            print(f"\n- tuned vs libtorch's results, {shape}: largest relative difference {errs[worst]:.1e} ({worst})")
        problems = (tuned.get("problems") or {}).get("problems") or []
        print("\n| tuned problem (m x n x k, cuBLASLt's terms) | out | first pick ms | chosen ms | chosen / first | candidates |")
        print("|---|---|---|---|---|---|")
        for p in [p for p in problems if p.get("first_pick_ms") and p.get("chosen_ms")][:24]:
            ratio = p["chosen_ms"] / p["first_pick_ms"]
            print(f"| {p['m']} x {p['n']} x {p['k']} | {p['out']} | {p['first_pick_ms']:.3f} | {p['chosen_ms']:.3f} | {ratio:.3f} | {p['candidates']} |")
    print("\n| shape | projection | residual added inside the GEMM (addmm), ms | GEMM then add, ms | addmm / (GEMM + add) |")
    print("|---|---|---|---|---|")
    for shape, r in k["projection_gemms"].items():
        for name, p in r["projections"].items():
            e = p.get("residual")
            if e:
                print(f"| {shape} | {name} | {e['addmm_ms']:.3f} | {e['mm_then_add_ms']:.3f} | {e['addmm_vs_mm_then_add']:.3f} |")

print("\n## Checkpoints (gpu-1b, local disk)\n")
for mode in ("sync", "async"):
    rows = metrics(f"ckpt-{mode}")
    try:
        size = int(open(os.path.join(out, f"ckpt-{mode}.bytes")).read().split()[0])
    except (OSError, ValueError, IndexError):
        size = None
    if rows:
        blocking = [round(r["checkpoint_blocking_s"], 2) for r in rows if r["checkpoint_blocking_s"] > 0]
        writes = [r["checkpoint_write_s"] for r in rows if r["checkpoint_write_s"] > 0]
        rate = ", ".join(f"{size / w / 1e9:.2f} GB/s" for w in writes) if size else "-"
        print(f"- {mode}: blocking s {blocking}; background write s {[round(w, 2) for w in writes]} ({rate}) for {size} bytes")
w = load_json("ckpt-write.json")
if w:
    print(
        f"- bench checkpoint-write, {w['bytes'] / 1e9:.2f} GB: hashed while written {w['ours_s']:.2f} s "
        f"({w['ours_gb_per_s']:.2f} GB/s) vs serialise+fsync+read back+hash {w['reference_s']:.2f} s "
        f"({w['reference_gb_per_s']:.2f} GB/s): {w['speedup']:.2f}x"
    )
    if w.get("optimizer_files", 1) > 1:
        print(
            f"  - optimizer partition as {w['optimizer_files']} files vs one: {w['ours_gb_per_s']:.2f} vs "
            f"{w['ours_one_file_gb_per_s']:.2f} GB/s ({w['speedup_over_one_file']:.2f}x)"
        )

print("\n## Rollouts (gpu-1b, bf16, 64 ragged prompts x 256 new tokens)\n")
ours = [d["tokens_per_s"] for d in (load_json(f"rollout-moxin-{i}.json") for i in (1, 2)) if d]
theirs = [d["tokens_per_s"] for d in (load_json(f"rollout-hf-{i}.json") for i in (1, 2)) if d]
if ours:
    print(f"- moxin-train bench rollout tokens/s: {', '.join(f'{x:.0f}' for x in ours)}")
if theirs:
    print(f"- transformers generate tokens/s: {', '.join(f'{x:.0f}' for x in theirs)}")
if ours and theirs:
    print(f"- ratio of the bests: {max(ours) / max(theirs):.2f}x")

try:
    timings = [line.rstrip("\n").split("\t") for line in open(os.path.join(out, "timings.tsv")) if "\t" in line]
except OSError:
    timings = []
if timings:
    print("\n## Seconds per part\n")
    print(", ".join(f"{name} {secs} s" for name, secs in timings) + f"; {sum(int(s) for _, s in timings)} s in all")
