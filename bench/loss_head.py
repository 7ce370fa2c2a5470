"""What the LM head costs in the SFT loss, three ways, measured side by side in one run.

    python bench/loss_head.py MODEL_DIR QUESTIONS_JSONL [--batch 8 16] [--steps 2] [--methods all,union,rows]

Only the answer tokens (``答案：B<|im_end|>\\n``, 5 per question) carry labels, yet the LM head of a
Qwen2.5 model has 151,936 outputs. The three ways to get the loss:

* ``all``: every position through the head (transformers' own ``labels=`` loss; what trl 1.x does
  off Triton GPUs): a [batch, length, 151936] float32 tensor;
* ``union``: the positions labelled in *any* row, for every row (``logits_to_keep`` = their union;
  this project's loss before): rows of different lengths have their answers at different positions,
  so about batch x 5 positions for each of the batch's rows;
* ``rows``: each row's own labelled positions only (``medqa_zh.train.answer_logits``, the loss the
  trainer uses now): batch x 5 rows in all.

Each (batch, method) runs in a fresh Python process: the model with a LoRA adapter on every linear
layer (r=16, as notebook 02), a batch of real questions rendered with the model's chat template,
right-padded, the prompt masked; one warm-up step, then ``--steps`` timed forward + backward passes.
It prints the logits computed, the median step time and the process's peak memory (resident set on
a CPU, allocated memory on a GPU), and the ratios against ``rows``. The loss is the same three ways
(printed: the check that they compute one thing).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

METHODS = ("all", "union", "rows")


def batch_of(tokenizer, questions, device):
    """Prompt + answer token ids, right-padded, labels only on the answer (as trl's collator)."""
    import torch

    from medqa_zh import train

    rows = []
    for example in train.to_examples(questions):
        ids = train._ids(tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=True))
        prompt = len(train._ids(tokenizer.apply_chat_template(example["prompt"], tokenize=True,
                                                               add_generation_prompt=True)))
        rows.append((ids, prompt))
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    labels = torch.full((len(rows), length), -100)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, prompt) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, prompt: len(ids)] = torch.tensor(ids[prompt:])
        attention[i, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device), "labels": labels.to(device)}


def loss_and_logits(model, batch, method):
    """(loss, number of logits computed) for one method."""
    import torch.nn.functional as F

    from medqa_zh import train

    targets = batch["labels"][:, 1:]
    if method == "rows":
        logits, wanted, _ = train.answer_logits(model, batch, model.get_output_embeddings())
        return F.cross_entropy(logits, wanted), logits.numel()
    if method == "union":
        keep = (targets != -100).any(dim=0).nonzero().squeeze(1)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep,
                       use_cache=False).logits.float()
        return F.cross_entropy(logits.flatten(0, 1), targets[:, keep].flatten(), ignore_index=-100), logits.numel()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100), logits.numel()


def one(model_dir: str, questions_path: str, batch_size: int, method: str, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from medqa_zh import data, models, train

    device = models.best_device()
    torch.manual_seed(0)
    model = models.load_model(model_dir, "float32", setting="MODEL_DIR", device=device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    tokenizer = models.load_tokenizer(model_dir, setting="MODEL_DIR")
    questions, _ = data.read_questions(questions_path)
    batch = batch_of(tokenizer, questions[:batch_size], device)

    def step():
        loss, count = loss_and_logits(model, batch, method)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return loss.item(), count

    step()  # warm-up
    times = []
    with train.peak_memory() as memory:
        for _ in range(steps):
            t0 = time.perf_counter()
            loss, count = step()
            times.append(time.perf_counter() - t0)
    return {"batch": batch_size, "method": method, "tokens": int(batch["attention_mask"].sum()),
            "length": batch["input_ids"].shape[1], "labelled": int((batch["labels"] != -100).sum()),
            "logits": count, "loss": loss, "step_s": statistics.median(times), "peak_gib": memory["peak_gib"],
            "device": memory["device"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("questions", help="a MedQA jsonl, e.g. data/medqa/questions/Mainland/dev.jsonl")
    p.add_argument("--batch", type=int, nargs="+", default=[8])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration in this process
    a = p.parse_args()
    if a.one:
        batch, method = a.one.split(":")
        print(json.dumps(one(a.model_dir, a.questions, int(batch), method, a.steps)))
        return

    rows = []
    for batch in a.batch:
        for method in a.methods.split(","):
            if method not in METHODS:
                p.error(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
            print(f"batch {batch}, {method} ...", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, a.model_dir, a.questions, "--steps", str(a.steps),
                                  "--one", f"{batch}:{method}"], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"batch {batch}, {method} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))

    print(f"\ndevice: {rows[0]['device']}; LoRA r=16 on every linear layer, fp32; median of {a.steps} "
          "forward + backward steps\n")
    print("| batch | method | padded length | labelled tokens | logits computed | loss | step (s) | peak memory (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['method']} | {r['length']} | {r['labelled']} | {r['logits']:,} | {r['loss']:.4f} "
              f"| {r['step_s']:.2f} | {r['peak_gib']:.2f} |")
    print()
    for batch in a.batch:
        by = {r["method"]: r for r in rows if r["batch"] == batch}
        if "rows" not in by:
            continue
        for method in ("all", "union"):
            if method in by:
                print(f"batch {batch}, {method} vs rows: logits x{by[method]['logits'] / by['rows']['logits']:.1f}, "
                      f"step time x{by[method]['step_s'] / by['rows']['step_s']:.2f}, "
                      f"peak memory {by[method]['peak_gib'] - by['rows']['peak_gib']:+.2f} GiB")


if __name__ == "__main__":
    main()
