"""Evaluation: read each model's answers three ways, and measure them honestly.

* letter scoring (:func:`letter_scores`) and greedy generate-and-parse (:func:`generate_answers`),
  in-process (notebook 06);
* the same questions through an OpenAI-compatible server (:func:`api_scorer`, notebook 07);
* metrics: accuracy with a 95% interval, invalid answers, position bias, sections, and exact
  paired tests between models answering the same questions.

A result is one row per question: ``id``, ``gold`` (the correct letter), ``pred`` (the letter
the model chose, or None when its answer named no valid letter) and optionally ``meta_info``.
An invalid answer counts as wrong and is reported; it is never dropped from the denominator, and
neither is an API request that failed (its row keeps the ``error``). Where the rows are kept, and
how a run resumes, is :mod:`results`; which models a run has, :mod:`models`.
"""
from __future__ import annotations

import asyncio
import itertools
import math
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pandas as pd
from scipy import optimize, stats
from tqdm.auto import tqdm

from . import answers, prompts

# torch and the Hugging Face stack (transformers, peft, trl, datasets, sentence-transformers, vLLM) are
# imported inside the functions that use them, so importing this module stays fast.

CONFIDENCE = 0.95


def wilson(correct: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for a proportion (scipy's ``binomtest``); (nan, nan) for n = 0."""
    if n == 0:
        return math.nan, math.nan
    ci = stats.binomtest(correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _frame(results) -> pd.DataFrame:
    df = pd.DataFrame(results)
    missing = {"id", "gold", "pred"} - set(df.columns)
    if missing:
        raise ValueError(f"results need the columns id, gold and pred; missing: {', '.join(sorted(missing))}")
    if df["id"].duplicated().any():
        raise ValueError(f"results have duplicate question ids, e.g. {df['id'][df['id'].duplicated()].iloc[0]!r}")
    df = df.copy()
    df["pred"] = df["pred"].astype(object).where(df["pred"].notna(), None)
    df["correct"] = df["pred"] == df["gold"]
    return df


def accuracy(results) -> dict:
    """n, correct, accuracy with its 95% Wilson interval, the invalid answers (counted wrong), and
    ``failed``: API requests that got no answer at all (also invalid, also in ``n``)."""
    df = _frame(results)
    n, correct = len(df), int(df["correct"].sum())
    low, high = wilson(correct, n)
    invalid = int(df["pred"].isna().sum())
    failed = int(df["error"].notna().sum()) if "error" in df.columns else 0
    return {
        "n": n, "correct": correct, "accuracy": correct / n if n else math.nan, "ci_low": low, "ci_high": high,
        "invalid": invalid, "invalid_rate": invalid / n if n else math.nan, "failed": failed,
    }


def paired_difference_ci(both: int, b_only: int, a_only: int, neither: int,
                         confidence: float = CONFIDENCE) -> tuple[float, float]:
    """95% interval for the difference of two paired proportions, ``p_b - p_a``: Newcombe's
    square-and-add interval from the two Wilson intervals, with the correlation of the paired
    answers (Newcombe 1998, *Stat Med* 17:2635, method 10; Fagerland, Lydersen & Laake,
    *Statistical Analysis of Contingency Tables*, ch. 8). Counts: questions both got right, only b,
    only a, neither. Neither scipy nor statsmodels has this interval."""
    n = both + b_only + a_only + neither
    if n == 0:
        return math.nan, math.nan
    p1, p2 = (both + b_only) / n, (both + a_only) / n   # b's accuracy, a's accuracy
    l1, u1 = wilson(both + b_only, n, confidence)
    l2, u2 = wilson(both + a_only, n, confidence)
    margins = (both + b_only) * (a_only + neither) * (both + a_only) * (b_only + neither)
    phi = 0.0
    if margins > 0:
        cross = both * neither - b_only * a_only
        corrected = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
        phi = corrected / math.sqrt(margins)
    d = p1 - p2
    low = d - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    high = d + math.sqrt(max((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2, 0.0))
    return max(low, -1.0), min(high, 1.0)


def mcnemar(a, b) -> dict:
    """Two models on the same questions (results of each): the exact McNemar test and the
    difference in accuracy, ``b - a``, with its 95% interval (:func:`paired_difference_ci`).

    Only the discordant questions matter for the test: ``a_only`` (a right, b wrong) and ``b_only``.
    Under the null hypothesis of equal accuracy each discordant question is a fair coin, so the
    two-sided p-value is the binomial test of ``a_only`` out of ``a_only + b_only`` at 1/2.
    """
    fa, fb = _frame(a).set_index("id"), _frame(b).set_index("id")
    if set(fa.index) != set(fb.index):
        only = sorted(set(fa.index) ^ set(fb.index))
        raise ValueError(
            f"a paired test needs the same questions for both models; {len(only)} ids appear in only one "
            f"(e.g. {only[0]!r}). Evaluate both on the same split."
        )
    fb = fb.loc[fa.index]
    a_only = int((fa["correct"] & ~fb["correct"]).sum())
    b_only = int((~fa["correct"] & fb["correct"]).sum())
    both = int((fa["correct"] & fb["correct"]).sum())
    discordant = a_only + b_only
    p = 1.0 if discordant == 0 else float(stats.binomtest(a_only, discordant, 0.5).pvalue)
    n = len(fa)
    low, high = paired_difference_ci(both, b_only, a_only, n - both - discordant)
    return {"n": n, "a_only": a_only, "b_only": b_only, "p_value": p,
            "difference": (b_only - a_only) / n if n else math.nan, "diff_ci_low": low, "diff_ci_high": high}


def detectable_difference(n: int, discordant: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest difference in accuracy that a two-sided McNemar test at ``alpha`` finds with
    probability ``power`` on ``n`` paired questions, when a share ``discordant / n`` of them is
    answered right by exactly one of the two models (Connor 1987, *Biometrics* 43:207:
    ``n = (z_a sqrt(psi) + z_b sqrt(psi - d^2))^2 / d^2``, solved for d). NaN when no question is discordant."""
    if n <= 0 or discordant <= 0:
        return math.nan
    psi = discordant / n
    z_a, z_b = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power)
    gap = lambda d: z_a * math.sqrt(psi) + z_b * math.sqrt(max(psi - d * d, 0.0)) - d * math.sqrt(n)  # noqa: E731
    if gap(math.sqrt(psi)) > 0:  # too few questions: even all discordant ones on one side would not do
        return math.nan
    return float(optimize.brentq(gap, 1e-12, math.sqrt(psi)))


def holm(p_values) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (statsmodels' ``multipletests``, method
    ``holm``): each adjusted p is what the family-wise error rate allows, so "adjusted p < alpha" for any
    member holds with probability at most alpha when no difference is real. NaN stays NaN and is no member."""
    from statsmodels.stats.multitest import multipletests  # statsmodels imports slowly: only where it is used

    values = [float(p) for p in p_values]
    members = [i for i, p in enumerate(values) if p == p]
    adjusted = [math.nan] * len(values)
    if members:
        _, corrected, _, _ = multipletests([values[i] for i in members], method="holm")
        for i, q in zip(members, corrected, strict=True):
            adjusted[i] = float(q)
    return adjusted


def pairwise_mcnemar(results_by_model: dict) -> pd.DataFrame:
    """Exact McNemar and the difference ``b - a`` with its 95% interval between every pair of models: one row per pair."""
    rows = []
    for (name_a, a), (name_b, b) in itertools.combinations(results_by_model.items(), 2):
        rows.append({"model_a": name_a, "model_b": name_b, **mcnemar(a, b)})
    return pd.DataFrame(rows, columns=["model_a", "model_b", "n", "a_only", "b_only", "difference", "diff_ci_low",
                                       "diff_ci_high", "p_value"])


def letter_distribution(results, letters: str = "ABCDE") -> pd.DataFrame:
    """Share of each letter among gold answers and among predictions (invalid answers their own row):
    a model whose predictions pile onto one letter shows position bias."""
    df = _frame(results)
    n = len(df)
    rows = {letter: {"gold": (df["gold"] == letter).sum() / n, "predicted": (df["pred"] == letter).sum() / n}
            for letter in letters}
    rows["invalid"] = {"gold": 0.0, "predicted": df["pred"].isna().sum() / n}
    return pd.DataFrame(rows).T


def baselines(train_questions, questions) -> pd.DataFrame:
    """What needs no model, on the same eval ``questions``: ``chance`` (guessing: its expected
    accuracy, 1 / options on average, and the range a guesser's accuracy falls in 95% of the time,
    the binomial 2.5% and 97.5% quantiles) and ``always X``, always answering the most common
    correct letter of the training split (its accuracy with the Wilson interval, as for a model).
    A model inside the chance range, or below ``always X``, has shown nothing yet."""
    n = len(questions)
    if not n or not train_questions:
        raise ValueError("baselines need the training split and at least one eval question")
    expected = sum(1 / len(q.options) for q in questions) / n
    low, high = stats.binom.ppf([0.025, 0.975], n, expected) / n
    top = pd.Series([q.answer_idx for q in train_questions]).value_counts().index[0]
    always = accuracy([{"id": q.id, "gold": q.answer_idx, "pred": top if top in q.options else None} for q in questions])
    rows = [{"model": "chance", "n": n, "correct": None, "accuracy": expected, "ci_low": low, "ci_high": high,
             "invalid": None, "failed": None},
            {"model": f"always {top}", "n": n, "correct": always["correct"], "accuracy": always["accuracy"],
             "ci_low": always["ci_low"], "ci_high": always["ci_high"], "invalid": always["invalid"], "failed": 0}]
    # counts stay whole numbers (not 3.0) when these rows join a table of model results
    return pd.DataFrame(rows).astype({"correct": "Int64", "invalid": "Int64", "failed": "Int64"})


def by_section(results, min_questions: int = 1) -> pd.DataFrame:
    """Accuracy per ``meta_info`` section, with n and the 95% interval, largest sections first."""
    df = _frame(results)
    if "meta_info" not in df.columns:
        raise ValueError("results have no meta_info column to group by")
    rows = []
    for section, group in df.groupby("meta_info", sort=False):
        if len(group) < min_questions:
            continue
        correct, n = int(group["correct"].sum()), len(group)
        low, high = wilson(correct, n)
        rows.append({"section": section, "n": n, "accuracy": correct / n, "ci_low": low, "ci_high": high})
    table = pd.DataFrame(rows, columns=["section", "n", "accuracy", "ci_low", "ci_high"])
    return table.sort_values(["n", "section"], ascending=[False, True], ignore_index=True)


# --------------------------------------------------------------------------- letter scoring


def letter_token_ids(tokenizer, letters: str = "ABCDE") -> dict[str, int]:
    """The token id of each option letter as it follows ``答案：``; an error when a letter is not
    exactly one token there (letter scoring would then read the wrong position)."""
    probe = prompts.answer_prompt(tokenizer, "问题", {letter: "选项" for letter in letters})
    base = tokenizer(probe, add_special_tokens=False)["input_ids"]
    ids = {}
    for letter in letters:
        full = tokenizer(probe + letter, add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) != len(base) + 1:
            raise ValueError(f"the letter {letter!r} is not a single token after {prompts.ANSWER_PREFIX!r} with this "
                             "tokenizer, so it cannot be scored by its next-token probability")
        ids[letter] = full[-1]
    return ids


def context_of(contexts: dict | None, qid: str) -> list[tuple[str, str]] | None:
    """The (book, text) pairs :func:`prompts.build_messages` takes, from ``contexts`` (question id ->
    retrieved passages, :meth:`rag.Retrieval.contexts`); None without passages."""
    passages = (contexts or {}).get(qid)
    return [(p.book, p.text) for p in passages] if passages else None


def letter_scores(model, tokenizer, questions, batch_size: int = 8, progress: bool = True,
                  contexts: dict | None = None) -> list[dict]:
    """Letter scoring: the log-probability of each option letter as the next token after
    :func:`prompts.answer_prompt`, batched with left padding. Returns, per question, ``id``,
    ``gold``, ``pred`` (the option letter with the highest probability) and ``logprobs``.
    ``contexts`` (RAG: question id -> retrieved passages, as for :func:`api_scorer`) puts them
    before each question's options, in the same prompt.

    With left padding the last position is every prompt's own last token; position ids are passed
    explicitly, counted from each prompt's first real token (as ``generate`` does), so a prompt
    scores the same alone or in a padded batch (tested).
    """
    import torch

    letters = "".join(sorted({letter for q in questions for letter in q.options}))
    ids = letter_token_ids(tokenizer, letters)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out = []
    try:
        batches = range(0, len(questions), batch_size)
        for start in tqdm(batches, desc="letter scoring", unit="batch", disable=not progress):
            batch = questions[start: start + batch_size]
            texts = [prompts.answer_prompt(tokenizer, q.question, q.options, context_of(contexts, q.id)) for q in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            positions = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                # logits_to_keep=1: only the last position goes through the LM head (151,936 columns
                # for Qwen); projecting every position would cost more than the rest of the model
                logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                               position_ids=positions, logits_to_keep=1).logits[:, -1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            for q, row in zip(batch, logprobs, strict=True):
                scores = {letter: float(row[ids[letter]]) for letter in sorted(q.options)}
                row = {"id": q.id, "gold": q.answer_idx, "pred": max(scores, key=scores.get), "logprobs": scores}
                if contexts is not None:  # with passages, the row records which (as 08's API rows do)
                    row["passages"] = [p.id for p in contexts.get(q.id, [])]
                out.append(row)
    finally:
        tokenizer.padding_side = side
    return out


# --------------------------------------------------------------------------- generate and parse


def generate_answers(model, tokenizer, questions, max_new_tokens: int = 16, batch_size: int = 8,
                     progress: bool = True) -> list[dict]:
    """Generate-and-parse: greedy decoding from the chat prompt (the assistant turn opened, as in
    training), batched with left padding; the text is parsed by :func:`answers.extract_letter`.

    Greedy is forced here (``do_sample=False``), whatever sampling defaults the model's
    ``generation_config`` ships with. Returns ``id``, ``gold``, ``pred`` (None when the text names
    no valid option letter) and the raw ``text`` per question.
    """
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out = []
    try:
        for start in tqdm(range(0, len(questions), batch_size), desc="generating", unit="batch", disable=not progress):
            batch = questions[start: start + batch_size]
            texts = [tokenizer.apply_chat_template(prompts.build_messages(q.question, q.options), tokenize=False,
                                                   add_generation_prompt=True) for q in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.inference_mode():
                generated = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = generated[:, enc.input_ids.shape[1]:]
            for q, ids in zip(batch, new, strict=True):
                text = tokenizer.decode(ids, skip_special_tokens=True)
                out.append({"id": q.id, "gold": q.answer_idx, "pred": answers.extract_letter(text, "".join(q.options)),
                            "text": text})
    finally:
        tokenizer.padding_side = side
    return out


# --------------------------------------------------------------------------- through the HTTP API


class ServerDownError(RuntimeError):
    """Every request of a batch failed to connect: the server is gone. Finished questions are kept."""


def run_coroutine(coro):
    """Run ``coro`` to completion and return its result, also from inside a running event loop (a Jupyter
    kernel has one, where ``asyncio.run`` refuses): then in a worker thread with a loop of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def api_scorer(base_url: str, model: str, api_key: str | None = None, max_new_tokens: int = 16,
               concurrency: int = 4, timeout: float = 120.0, retries: int = 3, backoff: float = 1.0,
               contexts: dict | None = None):
    """A ``score_batch`` for :func:`run_cached` that asks an OpenAI-compatible server
    (``/v1/chat/completions``) the questions of each batch, at most ``concurrency`` at a time.

    The messages are :func:`prompts.build_messages`, as in training and in direct generation, and
    decoding is greedy (``temperature=0``). A request that times out or fails is retried
    ``retries`` times, waiting ``backoff`` x 1, 2, 4, ... seconds; one that still fails becomes a
    row with ``pred=None`` and its ``error``: counted as wrong now, tried again by the next run.
    When no request of a batch could even connect, the server is gone: :class:`ServerDownError`
    (the questions finished so far are already saved). Rows carry ``latency_s`` and ``attempts``.

    ``contexts`` (RAG): question id -> retrieved passages (with ``book``, ``text``, ``id``), put in
    the prompt by :func:`prompts.build_messages`; the row records the passage ids.
    """
    async def ask(client, semaphore, q):
        passages = contexts.get(q.id, []) if contexts is not None else None
        messages = prompts.build_messages(q.question, q.options, context=context_of(contexts, q.id))
        extra = {"passages": [p.id for p in passages]} if passages is not None else {}
        error, connect_failed = None, False
        for attempt in range(retries + 1):
            if attempt:
                await asyncio.sleep(backoff * 2 ** (attempt - 1))
            async with semaphore:
                start = time.perf_counter()
                try:
                    reply = await client.chat.completions.create(model=model, messages=messages, temperature=0,
                                                                 max_tokens=max_new_tokens)
                    text = reply.choices[0].message.content or ""
                    return {"id": q.id, "gold": q.answer_idx,
                            "pred": answers.extract_letter(text, "".join(q.options)), "text": text,
                            "latency_s": round(time.perf_counter() - start, 4), "attempts": attempt + 1,
                            "prompt_tokens": reply.usage.prompt_tokens if reply.usage else None, **extra}
                except openai.APITimeoutError as e:  # a subclass of APIConnectionError: the server did answer the connect
                    error, connect_failed = f"timeout after {timeout:g} s: {e}", False
                except openai.APIConnectionError as e:
                    error, connect_failed = f"cannot connect to {base_url}: {e}", True
                except openai.APIStatusError as e:
                    error, connect_failed = f"HTTP {e.status_code}: {e.message}", False
                    if e.status_code in (400, 401, 403, 404, 422):  # our request is wrong: retrying cannot help
                        break
        return {"id": q.id, "gold": q.answer_idx, "pred": None, "text": None, "error": error,
                "attempts": attempt + 1, "connect_failed": connect_failed, **extra}

    async def ask_all(batch):
        semaphore = asyncio.Semaphore(concurrency)
        async with openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout,
                                      max_retries=0) as client:
            return await asyncio.gather(*(ask(client, semaphore, q) for q in batch))

    def score_batch(batch):
        rows = run_coroutine(ask_all(batch))
        if rows and all(row.get("connect_failed") for row in rows):
            raise ServerDownError(f"no request reached the server at {base_url} ({rows[0]['error']}). "
                                  "The questions finished so far are saved; start the server again and rerun "
                                  "to evaluate the rest.")
        for row in rows:
            row.pop("connect_failed", None)
        return rows

    return score_batch


def measure_latency(server, questions, max_tokens: int = 16):
    """Through a running ``serve.Server``, ask each question twice, one request at a time: streamed, for the time to the first token,
    and plain, for the whole answer's time and token count. A DataFrame, one row per question."""
    client, rows = server.client(), []
    for q in questions:
        messages = prompts.build_messages(q.question, q.options)
        start, first = time.perf_counter(), None
        for chunk in client.chat.completions.create(model=server.model, messages=messages, temperature=0,
                                                    max_tokens=max_tokens, stream=True):
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
        start = time.perf_counter()
        reply = client.chat.completions.create(model=server.model, messages=messages, temperature=0,
                                               max_tokens=max_tokens)
        total = time.perf_counter() - start
        text, tokens = reply.choices[0].message.content or "", reply.usage.completion_tokens
        rows.append({"id": q.id, "first_token_s": first, "total_s": total, "completion_tokens": tokens,
                     "tokens_per_s": tokens / total, "answer": text, "pred": answers.extract_letter(text, "".join(q.options)),
                     "gold": q.answer_idx})
    return pd.DataFrame(rows)


def agreement(a, b) -> dict:
    """How often two result sets of the same questions chose the same letter (two invalid answers
    agree) and produced the same text (leading and trailing whitespace aside: servers strip it),
    matched by question id."""
    fa, fb = _frame(a).set_index("id"), _frame(b).set_index("id")
    if set(fa.index) != set(fb.index):
        raise ValueError("agreement needs the same questions in both result sets")
    fb = fb.loc[fa.index]
    same = (fa["pred"] == fb["pred"]) | (fa["pred"].isna() & fb["pred"].isna())
    out = {"n": len(fa), "same_letter": int(same.sum()), "agreement": float(same.mean()) if len(fa) else math.nan}
    if "text" in fa.columns and "text" in fb.columns:
        strip = lambda texts: texts.map(lambda t: t.strip() if isinstance(t, str) else t)  # noqa: E731
        out["same_text"] = int((strip(fa["text"]) == strip(fb["text"])).sum())
    return out


def summary_table(results: dict) -> "pd.DataFrame":
    """One row per (model, method): n, accuracy, 95% interval, invalid answers, failed requests."""
    rows = [{"model": model, "method": method, **accuracy(rows)} for (model, method), rows in results.items()]
    return pd.DataFrame(rows)


def latency_table(results: dict) -> "pd.DataFrame":
    """Per model: median and 95th-percentile request latency (seconds) of API results that have it."""
    rows = []
    for name, rs in results.items():
        seconds = pd.Series([r["latency_s"] for r in rs if r.get("latency_s") is not None], dtype=float)
        rows.append({"model": name, "requests": len(seconds), "p50_s": seconds.median(), "p95_s": seconds.quantile(0.95)})
    return pd.DataFrame(rows)
