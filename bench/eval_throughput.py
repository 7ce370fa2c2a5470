"""How fast can a model be evaluated? Letter scoring vs the original workflow's method vs generate-and-parse,
and the HTTP API at several concurrencies, side by side on the same questions.

    python bench/eval_throughput.py MODEL_DIR QUESTIONS_JSONL [--start 2900] [--n 50] [--dtype bfloat16]

Methods, each on the same ``--n`` questions of ``QUESTIONS_JSONL`` (MedQA format) from ``--start``:

- ``letter``: :func:`medqa_zh.evaluate.letter_scores`, one batched forward pass per ``--batch``
  questions;
- ``rotations-whole`` / ``rotations-shared``: :func:`medqa_zh.debias.rotation_scores`, letter scores
  under all k cyclic rotations of the options: every rotated question as a whole prompt through
  ``letter`` (batched), or the part before the options run once per question and its KV cache
  shared by its k rotations (the table's accuracy is rotation 0's; the debiased accuracy and the
  largest score difference between the two are printed below it);
- ``original``: what the original LLaMA-Factory workflow (which this project replaces) did: a raw prompt (question and options, no chat template),
  *sampled* generation (temperature 0.1), up to 512 new tokens, one question at a time;
  ``--original-n`` limits it to the first questions when time is short (its questions/s is then over
  those);
- ``generate``: :func:`medqa_zh.evaluate.generate_answers`, greedy, batched, ``--max-new-tokens``;
- ``api-cN``: :func:`medqa_zh.evaluate.api_scorer` against ``transformers serve`` (``--backend``) with
  N requests in flight, for each N in ``--concurrency``; ``api-cb-cN`` the same with
  ``--continuous-batching`` (transformers only), which batches concurrent requests.

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
    a = p.parse_args()

    import torch

    from medqa_zh import data, debias, evaluate, models, serve

    torch.manual_seed(0)
    questions, _ = data.read_questions(a.questions)
    questions = questions[a.start: a.start + a.n]
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
    results["generate"] = timed("generate", lambda: evaluate.generate_answers(
        model, tokenizer, questions, a.max_new_tokens, a.batch, progress=False))
    original_questions = questions[: a.original_n or len(questions)]
    results["original"] = timed("original", partial(original_method, model, tokenizer, original_questions))
    for cb in (False, True) if a.backend == "transformers" else (False,):
        with serve.serve(a.model_dir, backend=a.backend, dtype=a.dtype, continuous_batching=cb, quiet=True) as server:
            evaluate.api_scorer(server.base_url, server.model, max_new_tokens=a.max_new_tokens)(questions[:2])  # warm-up
            for c in a.concurrency:
                name = f"api{'-cb' if cb else ''}-c{c}"
                score = evaluate.api_scorer(server.base_url, server.model, max_new_tokens=a.max_new_tokens,
                                            concurrency=c)
                results[name] = timed(name, partial(score, questions))

    original_rate = len(original_questions) / results["original"][1]
    reference = {r["id"]: r["pred"] for r in results["generate"][0]}
    table = []
    for name, (rows, seconds) in results.items():
        acc = evaluate.accuracy(rows)
        agree = sum(r["pred"] == reference[r["id"]] for r in rows) / len(rows)
        table.append({"method": name, "questions": len(rows), "seconds": round(seconds, 2),
                      "questions_per_s": round(len(rows) / seconds, 3),
                      "vs_original": round(len(rows) / seconds / original_rate, 1),
                      "accuracy": round(acc["accuracy"], 3), "invalid": acc["invalid"], "failed": acc["failed"],
                      "agree": round(agree, 3)})
    original_tokens = [r["new_tokens"] for r in results["original"][0]]
    print(f"\noriginal method: {sum(original_tokens) / len(original_tokens):.0f} new tokens per question on average "
          f"(max {max(original_tokens)}), {sum(original_tokens) / results['original'][1]:.1f} tokens/s")
    header = list(table[0])
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in table:
        print("| " + " | ".join(str(row[k]) for k in header) + " |")
    letter = next(r for r in table if r["method"] == "letter")
    print(f"\nletter scoring vs the original workflow's method: {letter['vs_original']}x (goal: >= 20x)")
    k = len(questions[0].options)
    for name in rotations:
        print(f"{name}: {k} rotations take {results[name][1] / results['letter'][1]:.2f}x one plain letter-scoring pass"
              + (" (goal: <= 3x)" if name.endswith("shared") else ""))
    diff = max(abs(x[letter] - y[letter]) for a_, b_ in zip(rotations["rotations-whole"], rotations["rotations-shared"], strict=True)
               for x, y in zip(a_["logprobs"], b_["logprobs"], strict=True) for letter in x)
    debiased = evaluate.accuracy(debias.results(rotations["rotations-shared"], "debiased"))["accuracy"]
    print(f"shared prefix vs whole prompts: largest log-probability difference {diff:.2g}; debiased accuracy {debiased:.3f}")
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump({"args": vars(a), "table": table}, f, indent=2)


if __name__ == "__main__":
    main()
