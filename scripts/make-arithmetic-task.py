"""Writes configs/tasks/arithmetic/: a small synthetic task for configs/pipeline-tiny.toml,
deterministic (fixed seed, no dependencies): sums of three one-digit numbers, a + b + c.

Pre-training teaches the facts (every sum x + c with x up to 18 and c up to 9, in words,
symbols and word problems), always right. SFT teaches the question with a bare answer;
distillation the two steps (a + b first, then + c) before the answer. A tenth of the
(a, b, c) triples are held out of every stage for the test set.

The SFT and distillation data come from a teacher that slips the way imitation data does:
on sums of 15 or more it writes an answer 10 short in 60% of its examples (the reasoning
step and the answer alike). Imitation learns the slip; GRPO's reward comes from the
verifier, which does not slip, so GRPO has something to correct on held-out sums, as
reinforcement learning from verifiable rewards corrects a teacher's systematic errors.
`SLIP=0 python3 scripts/make-arithmetic-task.py <dir>` writes the task with a teacher
that never slips (the control in README.md).

  pretrain.jsonl   {"text": ...}        facts and word problems (pre-training)
  sft.jsonl        {"messages": ...}    questions answered "The answer is y."
  distill.jsonl    {"messages": ...}    the same, the two steps first, then the answer
  prompts.jsonl    {"prompt", "answer"} GRPO prompts (training triples, right answers)
  test.jsonl       {"prompt", "answer"} held-out triples

Run: python3 scripts/make-arithmetic-task.py [out dir]
"""
import json
import os
import random
import sys

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "configs", "tasks", "arithmetic")
# How often the teacher slips on a sum of SLIP_FROM or more.
SLIP = float(os.environ.get("SLIP", "0.6"))
SLIP_FROM = 15

rng = random.Random(20261127)
triples = [(a, b, c) for a in range(10) for b in range(10) for c in range(10)]
rng.shuffle(triples)
test_triples, train_triples = triples[:100], triples[100:]
facts = [(x, c) for x in range(19) for c in range(10)]
names = ["Ann", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana"]
things = ["apples", "books", "coins", "stones", "cards", "shells"]


def question(a, b, c):
    return rng.choice([f"What is {a} plus {b} plus {c}?", f"Compute {a} + {b} + {c}.", f"Add {a}, {b} and {c}."])


def write(name, rows):
    with open(os.path.join(OUT, name), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


os.makedirs(OUT, exist_ok=True)
texts = []
for _ in range(4000):
    x, c = rng.choice(facts)
    kind = rng.randrange(3)
    if kind == 0:
        texts.append(f"{x} plus {c} is {x + c}. {c} plus {x} is {x + c}.")
    elif kind == 1:
        n, t = rng.choice(names), rng.choice(things)
        texts.append(f"{n} has {x} {t} and finds {c} more. Now {n} has {x + c} {t}.")
    else:
        texts.append(f"{x} + {c} = {x + c}")
write("pretrain.jsonl", [{"text": t} for t in texts])

sft, distill = [], []
for _ in range(2000):
    a, b, c = rng.choice(train_triples)
    q, x, y = question(a, b, c), a + b, a + b + c
    slipped = y >= SLIP_FROM and rng.random() < SLIP
    if slipped:
        y -= 10
    sft.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"The answer is {y}."}]})
    distill.append({"messages": [
        {"role": "user", "content": q},
        {"role": "assistant", "content": f"{a} plus {b} is {x}. {x} plus {c} is {y}. The answer is {y}."},
    ]})
write("sft.jsonl", sft)
write("distill.jsonl", distill)
write("prompts.jsonl", [{"prompt": question(a, b, c), "answer": str(a + b + c)} for a, b, c in train_triples])
write("test.jsonl", [{"prompt": f"What is {a} plus {b} plus {c}?", "answer": str(a + b + c)} for a, b, c in test_triples])
