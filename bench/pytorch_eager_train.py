"""PyTorch eager reference for bench-small training throughput (the baseline moxin-train is
compared against). Same architecture and step as moxin-train: Mistral-style decoder (RMSNorm,
RoPE rotate-half, GQA through scaled_dot_product_attention, SwiGLU, untied head), fp32,
AdamW (matrices decayed), global-norm clipping. Prints one JSON line with tokens/s.

usage: python bench/pytorch_eager_train.py --steps 30 --warmup 5 --threads 2
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# bench-small (configs/models/bench-small.toml)
VOCAB, DIM, LAYERS, HEADS, KV_HEADS, FFN, SEQ = 8192, 384, 6, 6, 2, 1024, 256
HEAD_DIM = DIM // HEADS


def rope_tables(seq):
    inv = torch.exp(torch.arange(0, HEAD_DIM // 2, dtype=torch.float32) * (-2.0 * math.log(10000.0) / HEAD_DIM))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = nn.Parameter(torch.ones(DIM))
        self.q_proj = nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)
        self.post_attention_layernorm = nn.Parameter(torch.ones(DIM))
        self.gate_proj = nn.Linear(DIM, FFN, bias=False)
        self.up_proj = nn.Linear(DIM, FFN, bias=False)
        self.down_proj = nn.Linear(FFN, DIM, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        h = F.rms_norm(x, (DIM,), eps=1e-5) * self.input_layernorm
        q = self.q_proj(h).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k_proj(h).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v_proj(h).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, DIM))
        h = F.rms_norm(x, (DIM,), eps=1e-5) * self.post_attention_layernorm
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.Parameter(torch.ones(DIM))
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        cos, sin = rope_tables(SEQ)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens):
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        return self.lm_head(F.rms_norm(x, (DIM,), eps=1e-5) * self.norm)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Model()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
    )
    times = []
    for step in range(args.steps):
        batch = torch.randint(0, VOCAB, (args.batch, SEQ + 1))
        start = time.perf_counter()
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
        "tokens_per_s_median": tokens / statistics.median(measured),
        "steps_measured": len(measured),
    }))


if __name__ == "__main__":
    main()
