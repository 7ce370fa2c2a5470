"""Which way can the tiny model look an option up? (issue 51)

Multiple-choice answering by letter needs *symbol binding* (Robinson, Rytting and Wingate, ICLR 2023): find the
option whose text is the answer, then say the letter printed *before* that text. This bench isolates that step on
the smoke world's own tokenizer and model shape (``tiny.build_model``), from random weights, in the simplest dense
form: five option lines ``A. 肝`` (each text one token), then five queries in a random order, each asking one way:

* forward  ``C：`` -> the text of option C (look a letter up, read what follows it: an induction-style copy);
* reverse  ``肝：`` -> the letter of the option whose text is 肝 (what answering by letter needs).

Both directions train side by side in one run, the same steps, batch and learning rate, each its own model; it
prints the accuracy of the first query of held-out sequences (where no elimination helps; chance is 0.2) every
``--every`` steps. On 2 CPU cores the forward direction is learned within a few hundred steps; the reverse one was
not within thousands (4 layers x 64 or 128 too), which is why the smoke world's knowledge effects, all read through
the letter, are not found (docs/testing.md, The planted world).

    ./run_all.sh exec python bench/binding_direction.py --steps 2000
"""
from __future__ import annotations

import argparse
import math
import random
import time

import torch

from medqa_zh import tiny


def sequences(tok, rng: random.Random, n: int, reverse: bool) -> dict:
    """``n`` sequences of five option lines and five queries, labels on each query's answer token only."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    values = [enc(" " + v)[0] for v in tiny._ORGANS + tiny._TESTS]  # one token each (checked in main)
    letters, dot, colon, newline = [enc(x)[0] for x in "ABCDE"], enc(".")[0], enc("：")[0], enc("\n")[0]
    ids, labels = [], []
    for _ in range(n):
        picked = rng.sample(values, 5)
        row = [t for i, v in enumerate(picked) for t in (letters[i], dot, v, newline)]
        label = [-100] * len(row)
        for i in rng.sample(range(5), 5):
            ask, answer = (picked[i], letters[i]) if reverse else (letters[i], picked[i])
            row += [ask, colon, answer, newline]
            label += [-100, -100, answer, -100]
        ids.append(row)
        labels.append(label)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


@torch.no_grad()
def first_query_accuracy(model, batch: dict) -> float:
    """The share of sequences whose first query is answered right (greedy)."""
    model.eval()
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    first = (labels != -100).float().argmax(1)
    rows = torch.arange(len(first))
    model.train()
    return (logits[rows, first].argmax(-1) == labels[rows, first]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    tok = tiny.build_tokenizer(0)
    assert all(len(tok(" " + v, add_special_tokens=False)["input_ids"]) == 1 for v in tiny._ORGANS + tiny._TESTS)
    warmup = min(100, a.steps)

    def rate(step: int) -> float:  # linear warm-up, then cosine decay
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / a.steps))

    runs = {}
    for name, reverse in (("forward (letter -> text)", False), ("reverse (text -> letter)", True)):
        model = tiny.build_model(tok, 0, hidden_size=a.hidden, layers=a.layers)
        optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.98), weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
        runs[name] = (model, optimizer, schedule, random.Random(f"train-{name}"),
                      sequences(tok, random.Random(f"held-{name}"), 256, reverse), reverse)
    print(f"{a.layers} layers x {a.hidden}, {sum(p.numel() for p in model.parameters()):,} parameters; batch {a.batch}, "
          f"lr {a.lr:g}; first-query accuracy on 256 held-out sequences (chance 0.20)", flush=True)
    start = time.perf_counter()
    for step in range(1, a.steps + 1):
        for model, optimizer, schedule, rng, _, reverse in runs.values():
            loss = model(**sequences(tok, rng, a.batch, reverse)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        if step % a.every == 0 or step == a.steps:
            cells = [f"{name}: {first_query_accuracy(run[0], run[4]):.2f}" for name, run in runs.items()]
            print(f"step {step:5d}  " + "   ".join(cells) + f"   ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
