"""transformers' side of bench/rollout_vs_transformers.sh: batched sampling with
`generate` (KV cache on, temperature 1, no top-k/top-p, no stop token: every row makes
exactly --max-new-tokens), best of --repeats, as JSON. `--device cuda --dtype bf16` for the
GPU comparison (scripts/gpu-check.sh)."""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--prompts", required=True)
p.add_argument("--max-new-tokens", type=int, default=64)
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--device", default="cpu")
p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
a = p.parse_args()
torch.set_num_threads(a.threads)
rows = json.load(open(a.prompts))
width = max(len(r) for r in rows)
# Left padding, as batched generation of prompts of different lengths needs.
ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=a.device)
mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=a.device)
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).to(a.device).eval()
cuda = a.device.startswith("cuda")
best = float("inf")
for _ in range(a.repeats):
    torch.manual_seed(1)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=a.max_new_tokens, min_new_tokens=a.max_new_tokens, pad_token_id=0, eos_token_id=None,
        )
    if cuda:
        torch.cuda.synchronize()
    best = min(best, time.perf_counter() - t)
    assert out.shape[1] == width + a.max_new_tokens
tokens = len(rows) * a.max_new_tokens
print(json.dumps({"rows": len(rows), "max_new_tokens": a.max_new_tokens, "threads": torch.get_num_threads(),
                  "device": a.device, "dtype": a.dtype,
                  "seconds": best, "tokens_per_s": tokens / best}))
