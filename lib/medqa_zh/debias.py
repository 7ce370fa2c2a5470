"""Knowledge or letter bias? Score each question under every cyclic rotation of its options.

A model that does not know an answer falls back on a favourite letter, and letter accuracy then
measures that habit as much as medicine. Rotating the option *contents* under fixed letters puts
every content under every letter exactly once (k rotations for k options):

    rotation 0   A. 甲  B. 乙  C. 丙  D. 丁  E. 戊      gold B (乙)
    rotation 1   A. 戊  B. 甲  C. 乙  D. 丙  E. 丁      gold C (乙)

From the k letter-score vectors of a question (:func:`rotation_scores`), :func:`summary` reports
plain accuracy (rotation 0, today's number), accuracy under each rotation, **consistency** (right
under every rotation) and **debiased accuracy**: each content's log-probability averaged over the
k rotations, best content wins. A position prior adds the same amount to every content once per
position, so it cancels in that average; this is the cyclic-permutation debiasing of Zheng et al.,
"Large Language Models Are Not Robust Multiple Choice Selectors" (ICLR 2024, PriDe). It also
reports the model's **letter prior** (its mean probability per letter, over all rotations).

The k rotated prompts share everything before the options (system turn, instruction, stem):
:func:`rotation_scores` runs that prefix once and reuses its KV cache for the k option blocks.

All k rotations of every question cost 1.7 letter-scoring passes (measured, bench/eval_throughput.py). PriDe's point is that they
are not needed for every question: the model's letter prior is estimated once, from a small
*calibration* sample scored under every rotation (:func:`estimate_prior`; it needs no gold
answers), and every other question is debiased from its **single** plain pass by dividing that prior
out (:func:`pride_results`). Both debiased readings are reported where both exist, with how often
they pick the same option (:func:`compare_debiasing`).
"""
from __future__ import annotations

import inspect
import math

import pandas as pd
from tqdm.auto import tqdm

from . import evaluate, prompts

# torch and the Hugging Face stack (transformers, peft, trl, datasets, sentence-transformers, vLLM) are
# imported inside the functions that use them, so importing this module stays fast.


def rotate(question, shift: int):
    """``question`` with its option contents moved ``shift`` letters down (cyclically); the letters
    stay, the correct letter follows its content, the answer text is unchanged."""
    letters = sorted(question.options)
    return question.permuted([letters[(i - shift) % len(letters)] for i in range(len(letters))])


def _split_prompt(tokenizer, question, context=None) -> tuple[list[int], list[list[int]]] | None:
    """Token ids of the shared prefix (everything before the options: with ``context``, the
    passages too) and of each rotation's rest (options, answer hint, chat template, ``答案：``), or
    None when the tokenizer does not split cleanly at the options (then every rotation is scored whole)."""
    rotated = [rotate(question, r) for r in range(len(question.options))]
    texts = [prompts.answer_prompt(tokenizer, q.question, q.options, context) for q in rotated]
    starts = [text.index(prompts.format_options(q.options)) for q, text in zip(rotated, texts, strict=True)]
    if len(set(starts)) != 1:
        return None
    prefix = texts[0][: starts[0]]
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prefix_ids = ids(prefix)
    rests = []
    for text in texts:
        whole, rest = ids(text), ids(text[len(prefix):])
        if whole != prefix_ids + rest:  # a token would cross the boundary
            return None
        rests.append(rest)
    return prefix_ids, rests


def _cache_kwarg(model) -> str:
    """The name this model's forward takes its KV cache by: transformers 5.24 renamed
    ``past_key_values`` (still what the pinned GPU set's 5.20 takes) to ``cache``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _last_logprobs(model, input_ids, attention_mask, last, past, position_ids):
    """Log-probabilities of the next token after position ``last`` of each row (vocabulary-wide),
    after the cached prefix ``past``, projecting only those rows' hidden states through the LM head."""
    import torch

    no_logits = torch.empty(0, dtype=torch.long, device=input_ids.device)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                **{_cache_kwarg(model): past}, logits_to_keep=no_logits, output_hidden_states=True, use_cache=True)
    hidden = out.hidden_states[-1][torch.arange(len(last), device=input_ids.device), last]
    return torch.log_softmax(model.get_output_embeddings()(hidden).float(), dim=-1)


def rotation_scores(model, tokenizer, questions, share_prefix: bool = True, batch_size: int = 8,
                    progress: bool = True, contexts: dict | None = None) -> list[dict]:
    """Letter scores of every question under each cyclic rotation of its options.

    Per question: ``id``, ``gold`` (the correct letter of rotation 0), ``letters`` and ``logprobs``:
    one ``{letter: log-probability}`` per rotation (rotation r = :func:`rotate` by r), read right
    after ``答案：`` as :func:`evaluate.letter_scores` reads them. With ``share_prefix`` the part of
    the prompt before the options runs once per question and its KV cache serves the k rotations;
    without it (the reference) every rotated question goes through :func:`evaluate.letter_scores`
    as a whole prompt, ``batch_size`` at a time. Both give the same scores within float tolerance.
    ``contexts`` (RAG: question id -> retrieved passages) puts the same passages before every
    rotation of a question; they belong to the shared prefix.
    """
    import torch

    def whole(qs):  # each rotation a question of its own, scored exactly as 06 scores rotation 0
        rotated = [rotate(q, r) for q in qs for r in range(len(q.options))]
        scores = iter(evaluate.letter_scores(model, tokenizer, rotated, batch_size, progress=False, contexts=contexts))
        return [{"id": q.id, "gold": q.answer_idx, "letters": "".join(sorted(q.options)),
                 "logprobs": [next(scores)["logprobs"] for _ in q.options], **passage_ids(q)} for q in qs]

    def passage_ids(q):  # with passages, the row records which (as 08's API rows do)
        return {} if contexts is None else {"passages": [p.id for p in contexts.get(q.id, [])]}

    if not share_prefix:
        return whole(questions)
    letters_all = "".join(sorted({letter for q in questions for letter in q.options}))
    token = evaluate.letter_token_ids(tokenizer, letters_all)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for q in tqdm(questions, desc="rotations", unit="q", disable=not progress):
        split = _split_prompt(tokenizer, q, evaluate.context_of(contexts, q.id))
        if split is None:  # a token would cross the boundary before the options: no prefix to share
            out += whole([q])
            continue
        prefix_ids, rests = split
        letters, k, n = sorted(q.options), len(rests), len(prefix_ids)
        width = max(len(r) for r in rests)
        with torch.inference_mode():
            cached = model(input_ids=torch.tensor([prefix_ids], device=model.device), use_cache=True, logits_to_keep=1)
            past = cached[_cache_kwarg(model)]
            past.batch_repeat_interleave(k)
            # the k option blocks, right-padded: each row's last real token sees the prefix and its own tokens only
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rests], device=model.device)
            mask = torch.tensor([[1] * (n + len(r)) + [0] * (width - len(r)) for r in rests], device=model.device)
            last = torch.tensor([len(r) - 1 for r in rests], device=model.device)
            positions = torch.arange(n, n + width, device=model.device).expand(k, width)
            logprobs = _last_logprobs(model, ids, mask, last, past, positions)
        rows = [{letter: float(lp[token[letter]]) for letter in letters} for lp in logprobs]
        out.append({"id": q.id, "gold": q.answer_idx, "letters": "".join(letters), "logprobs": rows, **passage_ids(q)})
    return out


# --------------------------------------------------------------------------- what the scores say


def _normalized(scores: dict) -> dict:
    """Log-probabilities renormalized over the option letters only."""
    top = max(scores.values())
    log_z = top + math.log(sum(math.exp(v - top) for v in scores.values()))
    return {letter: v - log_z for letter, v in scores.items()}


def debiased_scores(row: dict) -> dict:
    """Each content's log-probability (renormalized over the letters) averaged over the k rotations,
    keyed by its letter in rotation 0: under rotation r the content of letter j sits at letter j + r."""
    letters = row["letters"]
    k = len(letters)
    return {letters[j]: sum(_normalized(row["logprobs"][r])[letters[(j + r) % k]] for r in range(k)) / k
            for j in range(k)}


def debiased_choice(row: dict) -> str:
    """The letter (in rotation 0) of the content whose log-probability, averaged over the k
    rotations, is highest (:func:`debiased_scores`): each content sits under every letter once, so a
    letter prior cancels."""
    mean = debiased_scores(row)
    return max(mean, key=mean.get)


def per_rotation(row: dict) -> list[tuple[str, str]]:
    """(predicted, gold) letter under each rotation."""
    letters = row["letters"]
    k = len(letters)
    gold = letters.index(row["gold"])
    return [(max(scores, key=scores.get), letters[(gold + r) % k]) for r, scores in enumerate(row["logprobs"])]


def results(rows: list[dict], method: str = "plain") -> list[dict]:
    """Result rows (``id``, ``gold``, ``pred``) as :mod:`evaluate`'s metrics take them, for the
    plain reading (rotation 0) or the debiased one: accuracy, intervals and McNemar tests apply as
    they are."""
    if method not in ("plain", "debiased"):
        raise ValueError(f"method must be plain or debiased, not {method!r}")
    pick = (lambda r: per_rotation(r)[0][0]) if method == "plain" else debiased_choice
    return [{"id": r["id"], "gold": r["gold"], "pred": pick(r)} for r in rows]


def question_prior(row: dict) -> dict:
    """One calibration question's letter prior (PriDe): each letter's log-probability averaged over
    the k rotations, then normalized over the letters. Every content visits every letter once, so the
    contents add the same amount to each letter's average and only the position preference is left."""
    letters, k = row["letters"], len(row["logprobs"])
    if k != len(letters):
        raise ValueError(f"question {row['id']}: {k} rotations for {len(letters)} options; the prior needs all of them")
    mean = {letter: sum(_normalized(scores)[letter] for scores in row["logprobs"]) / k for letter in letters}
    return {letter: math.exp(lp) for letter, lp in _normalized(mean).items()}


def estimate_prior(rows: list[dict]) -> dict:
    """The model's letter prior, PriDe's way: :func:`question_prior` averaged over the calibration
    questions (:func:`rotation_scores` rows). Gold answers play no part. Letters sum to 1."""
    if not rows:
        raise ValueError("no calibration questions: PriDe's prior needs some questions scored under every rotation "
                         "(eval.calibration_questions)")
    totals, counts = {}, {}
    for row in rows:
        for letter, p in question_prior(row).items():
            totals[letter] = totals.get(letter, 0.0) + p
            counts[letter] = counts.get(letter, 0) + 1
    mean = {letter: totals[letter] / counts[letter] for letter in sorted(totals)}
    z = sum(mean.values())
    return {letter: v / z for letter, v in mean.items()}


def pride_scores(scores: dict, prior: dict) -> dict:
    """PriDe's debiased log-scores from one plain pass: each letter's log-probability (renormalized over
    this question's letters) minus the log of the prior (renormalized over the same letters)."""
    missing = set(scores) - set(prior)
    if missing:
        raise ValueError(f"the prior has no estimate for letter(s) {', '.join(sorted(missing))}: calibrate on questions "
                         "with the same options")
    log_z = math.log(sum(prior[letter] for letter in scores))
    return {letter: lp - (math.log(prior[letter]) - log_z) for letter, lp in _normalized(scores).items()}


def pride_choice(scores: dict, prior: dict) -> str:
    """The letter whose probability, divided by the prior (:func:`pride_scores`), is highest: PriDe's
    debiased prediction from one plain pass."""
    debiased = pride_scores(scores, prior)
    return max(debiased, key=debiased.get)


def pride_results(rows: list[dict], prior: dict) -> list[dict]:
    """Result rows (``id``, ``gold``, ``pred``) of the single-pass debiased reading: ``rows`` are
    letter-scoring rows (:func:`evaluate.letter_scores`, ``logprobs`` a ``{letter: log-probability}``)
    or rotation rows (their rotation 0 is that pass), ``prior`` from :func:`estimate_prior`."""
    def plain_scores(row):
        return row["logprobs"][0] if isinstance(row["logprobs"], list) else row["logprobs"]
    return [{"id": r["id"], "gold": r["gold"], "pred": pride_choice(plain_scores(r), prior)} for r in rows]


def compare_debiasing(rotations: list[dict], prior: dict) -> dict:
    """On the questions scored under every rotation: the debiased accuracy (every rotation averaged), PriDe's
    single-pass accuracy (rotation 0 with ``prior``), and how often the two pick the same option."""
    full, single = results(rotations, "debiased"), pride_results(rotations, prior)
    same = sum(a["pred"] == b["pred"] for a, b in zip(full, single, strict=True))
    return {"n": len(rotations), "debiased": evaluate.accuracy(full)["accuracy"],
            "pride": evaluate.accuracy(single)["accuracy"], "same_choice": same / len(rotations) if rotations else math.nan}


def letter_prior(rows: list[dict]) -> pd.Series:
    """The model's mean probability per letter over every question and rotation: with contents
    spread evenly over the letters, a model without a position preference gives each 1/k."""
    totals, n = {}, 0
    for row in rows:
        for scores in row["logprobs"]:
            for letter, lp in _normalized(scores).items():
                totals[letter] = totals.get(letter, 0.0) + math.exp(lp)
            n += 1
    return pd.Series({letter: total / n for letter, total in sorted(totals.items())}, name="letter prior")


def summary(rows: list[dict]) -> dict:
    """Plain accuracy (rotation 0), accuracy under each rotation (min / mean / max), consistency
    (right under every rotation) and debiased accuracy, each over the same n questions, with the
    95% Wilson interval for plain and debiased."""
    if not rows:
        raise ValueError("no questions were scored")
    k = len(rows[0]["logprobs"])
    hits = [[pred == gold for pred, gold in per_rotation(r)] for r in rows]
    by_rotation = [sum(h[r] for h in hits) / len(rows) for r in range(k)]
    plain, debiased = evaluate.accuracy(results(rows, "plain")), evaluate.accuracy(results(rows, "debiased"))
    return {
        "n": len(rows), "rotations": k,
        "plain": plain["accuracy"], "plain_ci_low": plain["ci_low"], "plain_ci_high": plain["ci_high"],
        "rotation_min": min(by_rotation), "rotation_mean": sum(by_rotation) / k, "rotation_max": max(by_rotation),
        "consistency": sum(all(h) for h in hits) / len(rows),
        "debiased": debiased["accuracy"], "debiased_ci_low": debiased["ci_low"], "debiased_ci_high": debiased["ci_high"],
    }


def table(rotations: dict, base: str | dict = "base") -> pd.DataFrame:
    """One row per model (``rotations``: model -> :func:`rotation_scores` rows): :func:`summary`,
    and the exact McNemar p-value of its debiased answers against the base model's
    (``debiased_p_vs_base``), on the same questions. ``base`` may also map each name to the one
    it is tested against (08: each retriever against the same model without passages)."""
    against = base if isinstance(base, dict) else {name: base for name in rotations}
    rows = []
    for name, got in rotations.items():
        row = {"model": name, **summary(got), "debiased_p_vs_base": math.nan}
        other = against.get(name)
        if other not in (None, name) and other in rotations:
            row["debiased_p_vs_base"] = evaluate.mcnemar(results(rotations[other], "debiased"),
                                                         results(got, "debiased"))["p_value"]
        rows.append(row)
    return pd.DataFrame(rows)


def prior_table(rotations: dict, estimated: dict | None = None) -> pd.DataFrame:
    """Per letter: the gold share (rotation 0) and, per model, its letter prior (:func:`letter_prior`),
    PriDe's estimate from the calibration questions where ``estimated`` has one (name -> :func:`estimate_prior`)
    and the share of its plain predictions; 1 / k for every letter is no preference."""
    first = next(iter(rotations.values()))
    columns = {"gold": pd.Series([r["gold"] for r in first]).value_counts(normalize=True)}
    for name, got in rotations.items():
        columns[f"{name} prior"] = letter_prior(got)
        if estimated and name in estimated:
            columns[f"{name} PriDe prior"] = pd.Series(estimated[name])
        columns[f"{name} predicted"] = pd.Series([p["pred"] for p in results(got, "plain")]).value_counts(normalize=True)
    letters = sorted(set().union(*(r["letters"] for r in first)))
    return pd.DataFrame(columns).reindex(letters).fillna(0.0)
