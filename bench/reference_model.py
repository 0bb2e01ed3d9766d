"""The Mistral-style decoder moxin-train trains, written in plain PyTorch: the reference model
of bench/pytorch_eager_train.py (CPU) and bench/pytorch_gpu_reference.py (GPU). RMSNorm,
RoPE rotate-half, GQA through scaled_dot_product_attention, SwiGLU, untied head; matrices
initialised normal(0, 0.02). A shape is a dict: vocab, dim, layers, heads, kv_heads, ffn, seq."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def rope_tables(seq, head_dim, device):
    inv = torch.exp(torch.arange(0, head_dim // 2, dtype=torch.float32, device=device) * (-2.0 * math.log(10000.0) / head_dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32, device=device), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class Block(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s
        d, hd = s["dim"], s["dim"] // s["heads"]
        self.input_layernorm = nn.Parameter(torch.ones(d))
        self.q_proj = nn.Linear(d, s["heads"] * hd, bias=False)
        self.k_proj = nn.Linear(d, s["kv_heads"] * hd, bias=False)
        self.v_proj = nn.Linear(d, s["kv_heads"] * hd, bias=False)
        self.o_proj = nn.Linear(s["heads"] * hd, d, bias=False)
        self.post_attention_layernorm = nn.Parameter(torch.ones(d))
        self.gate_proj = nn.Linear(d, s["ffn"], bias=False)
        self.up_proj = nn.Linear(d, s["ffn"], bias=False)
        self.down_proj = nn.Linear(s["ffn"], d, bias=False)

    def forward(self, x, cos, sin):
        s = self.s
        b, t, d = x.shape
        hd = d // s["heads"]
        h = F.rms_norm(x, (d,), eps=1e-5) * self.input_layernorm
        q = self.q_proj(h).view(b, t, s["heads"], hd).transpose(1, 2)
        k = self.k_proj(h).view(b, t, s["kv_heads"], hd).transpose(1, 2)
        v = self.v_proj(h).view(b, t, s["kv_heads"], hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, d))
        h = F.rms_norm(x, (d,), eps=1e-5) * self.post_attention_layernorm
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Model(nn.Module):
    def __init__(self, s, device):
        super().__init__()
        d = s["dim"]
        self.embed_tokens = nn.Embedding(s["vocab"], d)
        self.layers = nn.ModuleList(Block(s) for _ in range(s["layers"]))
        self.norm = nn.Parameter(torch.ones(d))
        self.lm_head = nn.Linear(d, s["vocab"], bias=False)
        cos, sin = rope_tables(s["seq"], d // s["heads"], device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens):
        x = self.embed_tokens(tokens)
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        d = x.shape[-1]
        return self.lm_head(F.rms_norm(x, (d,), eps=1e-5) * self.norm)
