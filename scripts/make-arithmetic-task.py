"""Writes configs/tasks/arithmetic/: a small synthetic task for configs/pipeline-tiny.toml,
deterministic (fixed seed, no dependencies). Sums of two numbers below 20; a quarter of
the (a, b) pairs are held out for the test set.

  pretrain.jsonl   {"text": ...}       arithmetic facts and word problems (pre-training)
  sft.jsonl        {"messages": ...}   questions answered "The answer is c."
  distill.jsonl    {"messages": ...}   the same, reasoning first, then the answer
  prompts.jsonl    {"prompt", "answer"} GRPO prompts (training pairs)
  test.jsonl       {"prompt", "answer"} held-out pairs

Run: python3 scripts/make-arithmetic-task.py
"""
import json
import os
import random

OUT = os.path.join(os.path.dirname(__file__), "..", "configs", "tasks", "arithmetic")
rng = random.Random(20261127)
pairs = [(a, b) for a in range(20) for b in range(20)]
rng.shuffle(pairs)
test_pairs, train_pairs = pairs[:100], pairs[100:]
names = ["Ann", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana"]
things = ["apples", "books", "coins", "stones", "cards", "shells"]


def question(a, b):
    return rng.choice([f"What is {a} plus {b}?", f"Compute {a} + {b}.", f"Add {a} and {b}."])


def write(name, rows):
    with open(os.path.join(OUT, name), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


os.makedirs(OUT, exist_ok=True)
texts = []
for _ in range(3000):
    a, b = rng.choice(train_pairs)
    kind = rng.randrange(3)
    if kind == 0:
        texts.append(f"{a} plus {b} is {a + b}. {b} plus {a} is {a + b}.")
    elif kind == 1:
        n, t = rng.choice(names), rng.choice(things)
        texts.append(f"{n} has {a} {t} and finds {b} more. Now {n} has {a + b} {t}.")
    else:
        texts.append(f"{a} + {b} = {a + b}")
write("pretrain.jsonl", [{"text": t} for t in texts])

sft, distill = [], []
for _ in range(1500):
    a, b = rng.choice(train_pairs)
    q = question(a, b)
    sft.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"The answer is {a + b}."}]})
    distill.append({"messages": [
        {"role": "user", "content": q},
        {"role": "assistant", "content": f"I add {a} and {b}: {a} plus {b} is {a + b}. The answer is {a + b}."},
    ]})
write("sft.jsonl", sft)
write("distill.jsonl", distill)
write("prompts.jsonl", [{"prompt": question(a, b), "answer": str(a + b)} for a, b in train_pairs])
write("test.jsonl", [{"prompt": f"What is {a} plus {b}?", "answer": str(a + b)} for a, b in test_pairs])
