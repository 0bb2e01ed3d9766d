"""PyTorch eager reference for bench-small training throughput (the baseline moxin-train is
compared against). Same architecture and step as moxin-train: Mistral-style decoder (RMSNorm,
RoPE rotate-half, GQA through scaled_dot_product_attention, SwiGLU, untied head), fp32
parameters, AdamW (matrices decayed), global-norm clipping. `--precision bf16` runs forward
and loss under `torch.autocast("cpu", dtype=torch.bfloat16)`, PyTorch's mixed precision
(fp32 parameters and optimizer, bf16 matrix products). Prints one JSON line with tokens/s.

usage: python bench/pytorch_eager_train.py --steps 30 --warmup 5 --threads 2 [--precision bf16]
"""
import contextlib
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from reference_model import Model

# bench-small (configs/models/bench-small.toml)
SHAPE = dict(vocab=8192, dim=384, layers=6, heads=6, kv_heads=2, ffn=1024, seq=256)
VOCAB, SEQ = SHAPE["vocab"], SHAPE["seq"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--foreach", action="store_true", help="AdamW's multi-tensor implementation")
    args = ap.parse_args()
    mixed = args.precision == "bf16"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Model(SHAPE, torch.device("cpu"))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=args.foreach or None,
    )
    times = []
    for step in range(args.steps):
        batch = torch.randint(0, VOCAB, (args.batch, SEQ + 1))
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if mixed else contextlib.nullcontext():
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.float().view(-1, VOCAB), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    measured = times[args.warmup:]
    tokens = args.batch * SEQ
    print(json.dumps({
        "system": "pytorch-eager",
        "torch": torch.__version__,
        "threads": args.threads,
        "precision": args.precision,
        "tokens_per_s_median": tokens / statistics.median(measured),
        "steps_measured": len(measured),
    }))


if __name__ == "__main__":
    main()
