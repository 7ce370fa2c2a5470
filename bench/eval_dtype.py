"""Letter scoring in ``model.dtype: auto`` (what this machine resolves it to) against explicit dtypes,
side by side on the same questions.

    python bench/eval_dtype.py MODEL_DIR QUESTIONS_JSONL [--start 2900] [--n 32] [--batch 16]
                               [--dtypes auto float32 bfloat16] [--device cpu]

Each setting of ``--dtypes`` is resolved as the profile's ``model.dtype`` is
(``models.inference_dtype``; the line ``models.dtype_line`` prints for it is shown); settings that
resolve to the same dtype share one measurement. Each dtype's model is loaded once and warms up on
two questions. The questions are then scored in chunks of ``--batch``: every chunk by every dtype,
the order rotating from chunk to chunk, so that a noisy, shared machine slows all alike. Printed:
questions/s of each, its ratio to the first setting's, and on how many questions it chose the same
letter as the first (with the largest letter log-probability difference).
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("questions", help="a MedQA-format jsonl, e.g. ../shared/medqa/questions/Mainland/dev.jsonl")
    p.add_argument("--start", type=int, default=2900)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtypes", nargs="+", default=["auto", "float32", "bfloat16"],
                   help="model.dtype settings to compare; the first is the reference")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda (default cpu: the case this bench is for)")
    a = p.parse_args()

    import torch

    from medqa_zh import data, evaluate, models

    everything, _ = data.read_questions(a.questions)
    questions = everything[a.start: a.start + a.n]
    device = models.best_device(a.device)
    settings: dict[str, list[str]] = {}  # resolved dtype -> the settings that give it
    for setting in a.dtypes:
        print(models.dtype_line(setting, device))
        settings.setdefault(models.inference_dtype(setting, device), []).append(setting)
    tokenizer = models.load_tokenizer(a.model_dir, setting="MODEL_DIR")
    loaded = {dtype: models.load_model(a.model_dir, dtype, setting="MODEL_DIR", device=device) for dtype in settings}
    print(f"{len(questions)} questions ({a.start}..{a.start + len(questions) - 1}), {a.model_dir} on {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__} (CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()})", flush=True)
    for model in loaded.values():  # warm-up, not timed
        evaluate.letter_scores(model, tokenizer, questions[:2], a.batch, progress=False)

    rows = {dtype: [] for dtype in settings}
    seconds = dict.fromkeys(settings, 0.0)
    chunks = [questions[i: i + a.batch] for i in range(0, len(questions), a.batch)]
    order = list(settings)
    for i, chunk in enumerate(chunks):
        for dtype in order[i % len(order):] + order[: i % len(order)]:
            t0 = time.perf_counter()
            rows[dtype] += evaluate.letter_scores(loaded[dtype], tokenizer, chunk, a.batch, progress=False)
            took = time.perf_counter() - t0
            seconds[dtype] += took
            print(f"  chunk {i + 1}/{len(chunks)} {dtype}: {len(chunk)} questions in {took:.1f} s", flush=True)

    first = order[0]
    rate = {dtype: len(rows[dtype]) / seconds[dtype] for dtype in settings}
    print(f"\n| model.dtype | resolved | questions | seconds | questions/s | vs {'/'.join(settings[first])} "
          "| same letter | largest Δ log-prob | accuracy |\n|---|---|---|---|---|---|---|---|---|")
    for dtype in settings:
        same = sum(x["pred"] == y["pred"] for x, y in zip(rows[first], rows[dtype], strict=True))
        diff = max(abs(x["logprobs"][k] - y["logprobs"][k]) for x, y in zip(rows[first], rows[dtype], strict=True)
                   for k in x["logprobs"])
        acc = evaluate.accuracy(rows[dtype])["accuracy"]
        print(f"| {', '.join(settings[dtype])} | {dtype} | {len(rows[dtype])} | {seconds[dtype]:.1f} | "
              f"{rate[dtype]:.3f} | {rate[dtype] / rate[first]:.2f}x | {same}/{len(rows[dtype])} | {diff:.3f} | {acc:.3f} |")


if __name__ == "__main__":
    main()
