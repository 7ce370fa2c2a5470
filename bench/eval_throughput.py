"""How fast can a model be evaluated? Letter scoring vs the original workflow's method vs generate-and-parse,
and the HTTP API at several concurrencies, side by side on the same questions.

    python bench/eval_throughput.py MODEL_DIR QUESTIONS_JSONL [--start 2900] [--n 50] [--dtype bfloat16]
                                    [--calibration-start 2400] [--calibration 20] [--debiasing-only]

Methods, each on the same ``--n`` questions of ``QUESTIONS_JSONL`` (MedQA format) from ``--start``:

- ``letter``: :func:`medqa_zh.evaluate.letter_scores`, one batched forward pass per ``--batch``
  questions;
- ``rotations-whole`` / ``rotations-shared``: :func:`medqa_zh.debias.rotation_scores`, letter scores
  under all k cyclic rotations of the options: every rotated question as a whole prompt through
  ``letter`` (batched), or the part before the options run once per question and its KV cache
  shared by its k rotations (the table's accuracy is rotation 0's; the debiased accuracy and the
  largest score difference between the two are printed below it);
- ``pride``: PriDe's single-pass debiasing: the ``--calibration`` questions from ``--calibration-start``
  (the cpu profile's validation split) scored under every rotation (shared prefix) for the letter
  prior, then one ``letter`` pass per question; its time is both. The cost of each debiased view is
  printed as a ratio to one plain letter pass, measured here, and projected to the profile's sizes
  (``--eval-size`` eval questions, ``--calibration`` calibration questions), with how often PriDe and
  every rotation pick the same option;
- ``original``: what the original LLaMA-Factory workflow (which this project replaces) did: a raw prompt (question and options, no chat template),
  *sampled* generation (temperature 0.1), up to 512 new tokens, one question at a time;
  ``--original-n`` limits it to the first questions when time is short (its questions/s is then over
  those);
- ``generate``: :func:`medqa_zh.evaluate.generate_answers`, greedy, batched, ``--max-new-tokens``;
- ``api-cN``: :func:`medqa_zh.evaluate.api_scorer` against the CPU server (``--backend``) with
  N requests in flight, for each N in ``--concurrency``.

``agree`` is the share of questions where a method chose the same letter as ``generate``.

Every method runs in this one invocation (the API server in a child process while the in-process
model idles), so the ratios compare like with like on this machine. Accuracy is printed next to
speed only to show that the faster methods do not answer worse; on 50 questions it is noise.
"""
from __future__ import annotations

import argparse
import json
import time
from functools import partial


def original_method(model, tokenizer, questions, max_new_tokens: int = 512) -> list[dict]:
    """The original workflow's evaluation, reproduced: raw prompt, sampling at temperature 0.1, batch 1."""
    import torch
    from tqdm.auto import tqdm

    from medqa_zh import answers, prompts

    rows = []
    for q in tqdm(questions, desc="original method", unit="q"):
        text = f"{q.question}\n{prompts.format_options(q.options)}\n答案："
        enc = tokenizer(text, return_tensors="pt").to(model.device)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, temperature=0.1, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
        reply = tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
        rows.append({"id": q.id, "gold": q.answer_idx, "pred": answers.extract_letter(reply, "".join(q.options)),
                     "new_tokens": int(out.shape[1] - enc.input_ids.shape[1])})
    return rows


def timed(name, fn):
    print(f"{name} ...", flush=True)
    t0 = time.perf_counter()
    rows = fn()
    return rows, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("questions", help="a MedQA-format jsonl, e.g. ../shared/medqa/questions/Mainland/dev.jsonl")
    p.add_argument("--start", type=int, default=2900)
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--original-n", type=int, default=None,
                   help="questions for the original workflow's method (default: all --n)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 8])
    p.add_argument("--backend", default="transformers")
    p.add_argument("--out", help="also write the table as JSON here")
    p.add_argument("--calibration-start", type=int, default=2400, help="first calibration question (validation)")
    p.add_argument("--calibration", type=int, default=20, help="calibration questions for PriDe's prior")
    p.add_argument("--eval-size", type=int, default=525, help="eval questions the projected costs are for")
    p.add_argument("--debiasing-only", action="store_true",
                   help="only letter, the rotations and PriDe (no generation, original method or API)")
    a = p.parse_args()

    import torch

    from medqa_zh import data, debias, evaluate, models, serve

    torch.manual_seed(0)
    everything, _ = data.read_questions(a.questions)
    questions = everything[a.start: a.start + a.n]
    calibration = everything[a.calibration_start: a.calibration_start + a.calibration]
    if {q.id for q in calibration} & {q.id for q in questions}:
        p.error("the calibration questions overlap the measured ones: move --calibration-start")
    device = models.best_device()  # the GPU when there is one, as the server below uses it
    dtype = models.inference_dtype(a.dtype, device)
    model = models.load_model(a.model_dir, dtype, setting="MODEL_DIR", device=device)
    tokenizer = models.load_tokenizer(a.model_dir, setting="MODEL_DIR")
    print(f"{len(questions)} questions, {a.model_dir} in {dtype} on {device}, {torch.get_num_threads()} threads")

    evaluate.letter_scores(model, tokenizer, questions[:2], a.batch, progress=False)  # warm-up, not timed
    results = {}
    results["letter"] = timed("letter", lambda: evaluate.letter_scores(model, tokenizer, questions, a.batch,
                                                                       progress=False))
    rotations = {}
    for name, shared in (("rotations-whole", False), ("rotations-shared", True)):
        rows, seconds = timed(name, partial(debias.rotation_scores, model, tokenizer, questions, share_prefix=shared,
                                                batch_size=a.batch, progress=False))
        rotations[name] = rows
        results[name] = debias.results(rows, "plain"), seconds
    calibrated, calibration_seconds = timed("pride calibration", partial(
        debias.rotation_scores, model, tokenizer, calibration, batch_size=a.batch, progress=False))
    prior = debias.estimate_prior(calibrated)
    letter_rows, letter_seconds = timed("pride", lambda: evaluate.letter_scores(model, tokenizer, questions, a.batch,
                                                                                progress=False))
    results["pride"] = debias.pride_results(letter_rows, prior), calibration_seconds + letter_seconds
    if not a.debiasing_only:
        results["generate"] = timed("generate", lambda: evaluate.generate_answers(
            model, tokenizer, questions, a.max_new_tokens, a.batch, progress=False))
        original_questions = questions[: a.original_n or len(questions)]
        results["original"] = timed("original", partial(original_method, model, tokenizer, original_questions))
    if not a.debiasing_only:
        with serve.serve(a.model_dir, backend=a.backend, dtype=a.dtype, quiet=True) as server:
            evaluate.api_scorer(server.base_url, server.model, max_new_tokens=a.max_new_tokens)(questions[:2])  # warm-up
            for c in a.concurrency:
                name = f"api-c{c}"
                score = evaluate.api_scorer(server.base_url, server.model, max_new_tokens=a.max_new_tokens,
                                            concurrency=c)
                results[name] = timed(name, partial(score, questions))

    original_rate = len(original_questions) / results["original"][1] if "original" in results else float("nan")
    reference = {r["id"]: r["pred"] for r in results["generate" if "generate" in results else "letter"][0]}
    table = []
    for name, (rows, seconds) in results.items():
        acc = evaluate.accuracy(rows)
        agree = sum(r["pred"] == reference[r["id"]] for r in rows) / len(rows)
        table.append({"method": name, "questions": len(rows), "seconds": round(seconds, 2),
                      "questions_per_s": round(len(rows) / seconds, 3),
                      "vs_original": round(len(rows) / seconds / original_rate, 1),
                      "accuracy": round(acc["accuracy"], 3), "invalid": acc["invalid"], "failed": acc["failed"],
                      "agree": round(agree, 3)})
    if "original" in results:
        original_tokens = [r["new_tokens"] for r in results["original"][0]]
        print(f"\noriginal method: {sum(original_tokens) / len(original_tokens):.0f} new tokens per question on average "
              f"(max {max(original_tokens)}), {sum(original_tokens) / results['original'][1]:.1f} tokens/s")
    header = list(table[0])
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in table:
        print("| " + " | ".join(str(row[k]) for k in header) + " |")
    letter = next(r for r in table if r["method"] == "letter")
    if "original" in results:
        print(f"\nletter scoring vs the original workflow's method: {letter['vs_original']}x (goal: >= 20x)")
    k = len(questions[0].options)
    for name in rotations:
        print(f"{name}: {k} rotations take {results[name][1] / results['letter'][1]:.2f}x one plain letter-scoring pass"
              + (" (goal: <= 3x)" if name.endswith("shared") else ""))
    diff = max(abs(x[letter] - y[letter]) for a_, b_ in zip(rotations["rotations-whole"], rotations["rotations-shared"], strict=True)
               for x, y in zip(a_["logprobs"], b_["logprobs"], strict=True) for letter in x)
    debiased = evaluate.accuracy(debias.results(rotations["rotations-shared"], "debiased"))["accuracy"]
    print(f"shared prefix vs whole prompts: largest log-probability difference {diff:.2g}; debiased accuracy {debiased:.3f}")
    # the cost of each debiased view, per eval question, as a ratio to one plain letter pass (measured above)
    per_letter = results["letter"][1] / len(questions)
    per_rotated = calibration_seconds / len(calibration)
    cyclic = results["rotations-shared"][1] / len(questions) / per_letter
    pride = (a.calibration * per_rotated + a.eval_size * per_letter) / (a.eval_size * per_letter)
    compared = debias.compare_debiasing(rotations["rotations-shared"], prior)
    print(f"\ncost of a debiased reading of {a.eval_size} eval questions, per question, in plain letter passes "
          f"(one pass: {per_letter:.3f} s/question here):")
    print(f"  every rotation (cyclic, shared prefix): {cyclic:.2f}x")
    print(f"  PriDe, prior from {a.calibration} calibration questions + one pass each: {pride:.2f}x "
          f"(the calibration: {per_rotated / per_letter:.2f} passes per calibration question)")
    print(f"  on these {compared['n']} questions: debiased {compared['debiased']:.3f}, PriDe {compared['pride']:.3f}, "
          f"same option {compared['same_choice']:.1%}")
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump({"args": vars(a), "table": table}, f, indent=2)


if __name__ == "__main__":
    main()
