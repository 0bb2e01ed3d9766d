"""PyTorch reference for GPU training throughput and memory (what moxin-train is compared
against in scripts/gpu-check.sh): the same Mistral-style decoder as moxin-train (RMSNorm,
RoPE rotate-half, GQA through scaled_dot_product_attention, SwiGLU, untied head), trained
the way PyTorch users usually do: fp32 parameters, autocast to bf16, fused AdamW (matrices
decayed), global-norm clipping; optionally torch.compile on the model. Random tokens (the
throughput does not depend on them). Prints one JSON line.

Memory is reported two ways: torch's own allocator peak, and device memory in use
(total - free, as nvidia-smi counts it), which is what moxin-train reports.

With --trace-kernels N --trace-out FILE, N more steps run under torch.profiler afterwards
and FILE gets the same per-step summary `moxin-train train --trace-kernels` writes (device
span, busy and idle time; per kernel name the calls and milliseconds).

usage: python bench/pytorch_gpu_reference.py --shape gpu-1b --mode compile --steps 20
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from reference_model import Model

SHAPES = {
    # configs/gpu-1b-bench.toml
    "gpu-1b": dict(vocab=32000, dim=2048, layers=16, heads=16, kv_heads=8, ffn=5632, seq=2048, batch=8),
    # configs/moxin-7b-4l-bench.toml
    "moxin-7b-4l": dict(vocab=32000, dim=4096, layers=4, heads=32, kv_heads=8, ffn=14336, seq=4096, batch=2),
}


def peak_flops(name):
    for model, tflops in [("H200", 989), ("H100", 989), ("H800", 989), ("A100", 312), ("L40S", 362)]:
        if model in name.upper():
            return tflops * 1e12
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="gpu-1b")
    ap.add_argument("--mode", choices=["eager", "compile"], default="eager")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--trace-kernels", type=int, default=0)
    ap.add_argument("--trace-out")
    args = ap.parse_args()
    s = SHAPES[args.shape]
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = Model(s, device).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=True,
    )
    forward = torch.compile(model) if args.mode == "compile" else model
    tokens = s["batch"] * s["seq"]

    def new_batch():
        return torch.randint(0, s["vocab"], (s["batch"], s["seq"] + 1), device=device)

    def train_step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = forward(batch[:, :-1])
        loss = F.cross_entropy(logits.float().view(-1, s["vocab"]), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        return loss

    times, in_use = [], 0
    for step in range(args.steps):
        batch = new_batch()
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = train_step(batch)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        free, total = torch.cuda.mem_get_info()
        in_use = max(in_use, total - free)
    if args.trace_kernels > 0 and args.trace_out:
        trace(lambda: train_step(new_batch()), args.trace_kernels, args.trace_out)
    measured = times[args.warmup:]
    tps = tokens / statistics.median(measured)
    flops_per_token = 6 * n_params + 6 * s["layers"] * s["dim"] * s["seq"]
    peak = peak_flops(torch.cuda.get_device_name())
    print(json.dumps({
        "system": f"pytorch-{args.mode}",
        "shape": args.shape,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(),
        "params": n_params,
        "tokens_per_s_median": tps,
        "mfu": tps * flops_per_token / peak if peak else None,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
        "device_in_use_bytes": in_use,
        "steps_measured": len(measured),
        "final_loss": loss.item(),
    }))


def trace(train_step, steps, path):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            train_step()
        torch.cuda.synchronize()
    events = [(e.name, e.time_range.start, e.time_range.end)
              for e in prof.events()
              if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    summary = summarise(events, steps)
    summary["device"] = torch.cuda.get_device_name()
    json.dump(summary, open(path, "w"), indent=1)


def summarise(events, steps):
    """The per-step summary of `events`, (name, start µs, end µs) each, over `steps` steps."""
    spans = sorted((start, end) for _, start, end in events)
    busy, current = 0.0, None
    for start, end in spans:
        if current and start <= current[1]:
            current = (current[0], max(current[1], end))
        else:
            busy += current[1] - current[0] if current else 0.0
            current = (start, end)
    busy += current[1] - current[0] if current else 0.0
    span = max(e for _, e in spans) - spans[0][0] if spans else 0.0
    per_name = {}
    for name, start, end in events:
        calls, us = per_name.get(name, (0, 0.0))
        per_name[name] = (calls + 1, us + end - start)
    ms = lambda us: us / 1e3 / steps
    return {
        "steps": steps,
        "records": len(events),
        "span_ms_per_step": ms(span),
        "busy_ms_per_step": ms(busy),
        "idle_ms_per_step": ms(span - busy),
        "kernel_ms_per_step": ms(sum(us for _, us in per_name.values())),
        "kernels": [{"name": n, "calls_per_step": c / steps, "ms_per_step": ms(us)}
                    for n, (c, us) in sorted(per_name.items(), key=lambda kv: -kv[1][1])],
    }


if __name__ == "__main__":
    main()
