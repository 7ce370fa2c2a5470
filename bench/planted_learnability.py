"""Can the tiny model learn the smoke world's planted facts? (issue 51)

Builds the smoke world's tokenizer and base model as the asset build does (``tiny.build_model`` at the size
asked, pretrained to plant its letter skew: ``tiny.pretrain``), then fine-tunes it on the train split (LoRA or
full, the completion ``letter`` or ``letter_text``) and prints, every two epochs, each eval group's accuracy
(``trained``, ``passage``, ``unknown``: tiny.GROUPS) in two readings side by side:

* letter: the option letter with the highest log-probability after ``答案：`` (evaluate.letter_scores' reading);
* answer line: each option's whole line ``答案：X. <text>`` scored by its summed log-probability (the "cloze"
  formulation lm-eval and OLMES offer beside the letter one).

and the skewed letter's share of the letter answers. A plain loop (AdamW, cosine, batch 8) rather than
``train.train``: it measures what the model can learn, not the pipeline. One thread unless told otherwise.

    ./run_all.sh exec python bench/planted_learnability.py --layers 4 --hidden 128 --mode full --lr 3e-3 --epochs 12
"""
from __future__ import annotations

import argparse
import math
import random
import time

import torch

from medqa_zh import evaluate, prompts, tiny


@torch.no_grad()
def readings(model, tokenizer, rows: list[dict], letter_ids: dict, skewed: str) -> tuple[float, float, float]:
    """(letter accuracy, answer-line accuracy, the skewed letter's share of the letter answers) on ``rows``."""
    model.eval()
    letter_right = line_right = skew = 0
    for r in rows:
        prompt = prompts.answer_prompt(tokenizer, r["question"], r["options"])
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        lines = [tokenizer(prompt + f"{x}. {r['options'][x]}", add_special_tokens=False)["input_ids"] for x in "ABCDE"]
        ids = torch.full((5, max(map(len, lines))), tokenizer.pad_token_id)
        for i, line in enumerate(lines):
            ids[i, : len(line)] = torch.tensor(line)
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
        line_scores = [sum(logp[i, t - 1, line[t]].item() for t in range(start, len(line))) for i, line in enumerate(lines)]
        letter = max("ABCDE", key=lambda x: logp[0, start - 1, letter_ids[x]].item())
        letter_right += letter == r["answer_idx"]
        line_right += "ABCDE"[max(range(5), key=line_scores.__getitem__)] == r["answer_idx"]
        skew += letter == skewed
    model.train()
    return letter_right / len(rows), line_right / len(rows), skew / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--mode", choices=("lora", "full"), default="lora")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--completion", choices=prompts.COMPLETIONS, default="letter_text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    tokenizer = tiny.build_tokenizer(a.seed)
    model = tiny.build_model(tokenizer, a.seed, hidden_size=a.hidden, layers=a.layers)
    start = time.perf_counter()
    tiny.pretrain(model, tokenizer, a.seed)
    print(f"{a.layers} layers x {a.hidden}: {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"pretrained (letter skew) in {time.perf_counter() - start:.1f} s")
    splits = tiny.make_questions(a.seed)
    world = tiny.planted_record(a.seed, splits)
    trained = {(r["question"], tuple(r["options"].values())) for r in splits["train"]}
    eval_rows = [(f"test:{i}", r) for i, r in enumerate(splits["test"], start=1)  # smoke's eval: 01 drops the repeats
                 if (r["question"], tuple(r["options"].values())) not in trained][: tiny.SPLIT_SIZES["test"]]
    groups = {g: [r for qid, r in eval_rows if world["questions"][qid]["group"] == g] for g in tiny.MIX}
    letter_ids, skewed = evaluate.letter_token_ids(tokenizer), tiny.LETTER_SKEW["letter"]

    def show(label: str) -> None:
        cells = []
        for group, rows in groups.items():
            letter, line, skew = readings(model, tokenizer, rows, letter_ids, skewed)
            cells.append(f"{group} (n={len(rows)}): letter {letter:.2f}, answer line {line:.2f}, {skewed} {skew:.2f}")
        print(f"{label}: " + "; ".join(cells), flush=True)

    show("base")
    if a.mode == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    train = list(splits["train"])
    steps = a.epochs * math.ceil(len(train) / 8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    rng, start = random.Random(a.seed), time.perf_counter()
    for epoch in range(1, a.epochs + 1):
        rng.shuffle(train)
        for i in range(0, len(train), 8):
            value = model(**tiny.answer_batch(tokenizer, train[i: i + 8], a.completion)).loss
            value.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        if epoch % 2 == 0 or epoch == a.epochs:
            show(f"epoch {epoch} ({a.mode}, lr {a.lr:g}, {a.completion}; loss {value.item():.3f}; "
                 f"{time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
