"""A plain PyTorch GRPO, written independently of moxin-train's, to check what GRPO does on
a checkpoint: loads an `export-hf` folder with transformers' MistralForCausalLM and runs
GRPO on a `{"prompt", "answer"}` task (group-normalised advantages, sequence-mean-token-mean
loss at ratio 1 — one update per rollout batch — no KL term, AdamW, gradient clipping 1.0),
then prints greedy accuracy on the training prompts and the held-out set before and after.

  moxin-train export-hf runs/pipeline-tiny/distill /tmp/distill-hf
  .venv/bin/python bench/pytorch_grpo.py /tmp/distill-hf configs/tasks/arithmetic --steps 100

Prompts are rendered as moxin-train renders them (bos, then "<|user|>\\n", the prompt,
"\\n", "<|assistant|>\\n", each piece tokenized on its own); the verifier accepts a
completion whose last "answer is N" matches (enough for the shipped arithmetic task).
"""
import argparse
import json
import random
import re

import torch
from tokenizers import Tokenizer
from transformers import MistralForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("model", help="export-hf folder")
ap.add_argument("task", help="folder with prompts.jsonl (training) and test.jsonl (held out)")
ap.add_argument("--steps", type=int, default=100)
ap.add_argument("--lr", type=float, default=3e-5)
ap.add_argument("--prompts-per-step", type=int, default=8)
ap.add_argument("--group", type=int, default=8)
ap.add_argument("--temperature", type=float, default=0.7)
ap.add_argument("--max-new-tokens", type=int, default=32)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()

torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)
rng = random.Random(args.seed)
tokenizer = Tokenizer.from_file(f"{args.model}/tokenizer.json")
config = json.load(open(f"{args.model}/config.json"))
BOS, EOS = config["bos_token_id"], config["eos_token_id"]
model = MistralForCausalLM.from_pretrained(args.model, dtype=torch.float32)


def encode(text):
    return tokenizer.encode(text, add_special_tokens=False).ids


def prompt_ids(prompt):
    return [BOS] + encode("<|user|>\n") + encode(prompt) + encode("\n") + encode("<|assistant|>\n")


def load(name):
    return [json.loads(line) for line in open(f"{args.task}/{name}") if line.strip()]


def correct(completion, answer):
    found = re.findall(r"answer is\s*(-?\d+)", tokenizer.decode([t for t in completion if t != EOS]))
    return 1.0 if found and found[-1] == answer else 0.0


@torch.no_grad()
def sample(prompts, temperature, per_prompt):
    """Completions (ending at EOS when one came) of each prompt, `per_prompt` each, left-padded batch."""
    rows = [prompt_ids(p["prompt"]) for p in prompts for _ in range(per_prompt)]
    width = max(map(len, rows))
    ids = torch.tensor([[EOS] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    how = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                         eos_token_id=EOS, pad_token_id=EOS, **how)
    completions = [r[: r.index(EOS) + 1] if EOS in r else r for r in out[:, width:].tolist()]
    return rows, completions


def accuracy(data):
    model.eval()
    hits = 0.0
    for i in range(0, len(data), 64):
        chunk = data[i : i + 64]
        _, completions = sample(chunk, 0.0, 1)
        hits += sum(correct(c, p["answer"]) for p, c in zip(chunk, completions))
    return hits / len(data)


train, test = load("prompts.jsonl"), load("test.jsonl")
print(json.dumps({"before": {"train": accuracy(train), "test": accuracy(test)}}), flush=True)
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
order = list(range(len(train)))
rng.shuffle(order)
G = args.group
for step in range(args.steps):
    batch = [train[order[(step * args.prompts_per_step + j) % len(train)]] for j in range(args.prompts_per_step)]
    rows, completions = sample(batch, args.temperature, G)
    rewards = torch.tensor([correct(c, batch[i // G]["answer"]) for i, c in enumerate(completions)])
    groups = rewards.view(-1, G)
    advantages = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)
    model.train()
    optimizer.zero_grad()
    seqs = [r + c for r, c in zip(rows, completions)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [EOS] * (width - len(s)) for s in seqs])
    logits = model(input_ids=ids).logits[:, :-1].float() / args.temperature
    logp = torch.log_softmax(logits, -1).gather(2, ids[:, 1:].unsqueeze(2)).squeeze(2)
    weights = torch.zeros_like(logp)
    for i, (r, c) in enumerate(zip(rows, completions)):
        weights[i, len(r) - 1 : len(r) - 1 + len(c)] = 1.0 / len(c)
    loss = -(logp * weights * advantages.unsqueeze(1)).sum() / len(seqs)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    print(json.dumps({"step": step + 1, "reward_mean": rewards.mean().item()}), flush=True)
print(json.dumps({"after": {"train": accuracy(train), "test": accuracy(test)}}), flush=True)
