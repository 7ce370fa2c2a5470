"""The smoke world's planted effects, beside what the series found.

``medqa_zh.tiny`` builds the smoke world with its effects written down before any run, in the planted file
(``tiny.planted``): which questions ask about facts the training split teaches (``trained``), which about facts
only the textbooks state (``passage``), which about facts nothing states (``unknown``), the base model's planted
letter skew, chance, and the thresholds each effect must meet. This module measures each effect from a run's
answers and tables, the same way for every notebook: each prints its own, and 10 shows them all in one table
(:func:`table`): what was planted, what was measured with its 95% interval, and found or not.

Real MedQA has no planted file: :func:`read` returns None there and nothing here runs.
"""
from __future__ import annotations

import math

import pandas as pd

from . import debias, evaluate, results, tiny

TABLE = "10_planted.csv"  # table()'s rows, as 10 writes them
# kind: "difference" (a paired difference of accuracies) or "share"; found: "found", "not found" or "not measured"
COLUMNS = ["effect", "planted", "measured", "ci_low", "ci_high", "n", "kind", "threshold", "found", "how"]


def read(cfg) -> dict | None:
    """The run's planted file (smoke), or None (real data)."""
    return tiny.planted(cfg.path("data.medqa_dir"))


def ids(planted: dict, group: str) -> set[str]:
    """The ids of the questions of one group (``trained``, ``passage``, ``unknown``)."""
    return {qid for qid, q in planted["questions"].items() if q["group"] == group}


def only(rows: list[dict], keep: set[str]) -> list[dict]:
    """The answer rows of the questions in ``keep``."""
    return [r for r in rows if r["id"] in keep]


def gain(planted: dict, read_answers: dict, better: tuple[str, str], than: tuple[str, str], group: str) -> dict | None:
    """A paired difference on one group's questions: ``better`` (a (model, reading) of
    :func:`report.readings`) against ``than``, both on the same questions: McNemar's exact p and the difference's
    95% interval (:func:`evaluate.mcnemar`); None when either side was not measured."""
    if better not in read_answers or than not in read_answers:
        return None
    keep = ids(planted, group)
    a, b = only(read_answers[than][0], keep), only(read_answers[better][0], keep)
    return evaluate.mcnemar(a, b) if a and b else None


def letter_skew(planted: dict, answers: dict, model: str = "base") -> dict | None:
    """The planted letter prior, measured on ``model``'s eval answers (``answers``: :func:`results.collect`'s
    raw answers): the skewed letter's share of the plain letter reading's answers and of the debiased reading's
    (every rotation), its share of the gold letters, its true prior (the model's mean probability of it over
    every rotation of the unknown group's questions, which no model can know: a pure letter prior) and PriDe's
    estimate of it (from the model's validation calibration); None where 06 did not score them."""
    letter = planted["letter_skew"]["letter"]
    plain = answers.get((model, results.LETTER))
    rotations = answers.get((model, results.ROTATIONS))
    calibration = answers.get((model, results.CALIBRATION))
    if not plain or not rotations or not calibration:
        return None
    share = lambda rows, key: sum(r[key] == letter for r in rows) / len(rows)  # noqa: E731
    debiased = debias.results(rotations, "debiased")
    unknown = only(rotations, ids(planted, "unknown"))
    return {"letter": letter, "n": len(plain), "plain_share": share(plain, "pred"), "gold_share": share(plain, "gold"),
            "debiased_share": share(debiased, "pred"), "debiased_gold_share": share(debiased, "gold"),
            "n_debiased": len(debiased),
            "true_prior": float(debias.letter_prior(unknown)[letter]) if unknown else math.nan, "n_unknown": len(unknown),
            "pride_prior": debias.estimate_prior(calibration)[letter]}


def grpo_reward(log: list[dict], spread: pd.DataFrame | None) -> dict | None:
    """04b's run as the planted table reads it: the mean reward of the first and of the last logged step
    (``train_log.jsonl``'s ``reward``) and the share of prompts with a reward spread before training
    (``tables/04b_spread.csv``); None without a log."""
    rewards = [row["reward"] for row in log if "reward" in row]
    if not rewards:
        return None
    share = float(spread["spread"].astype(bool).mean()) if spread is not None and len(spread) else math.nan
    return {"reward_first": rewards[0], "reward_last": rewards[-1], "spread_share": share, "steps": len(rewards)}


def readable(found: pd.DataFrame) -> pd.DataFrame:
    """:func:`table` as a reader wants it: the measured value and its interval in one column (points for
    differences, shares otherwise)."""
    def value(r):
        if r["measured"] != r["measured"]:
            return "—"
        interval = f" [{r['ci_low']:.2f}, {r['ci_high']:.2f}]" if r["ci_low"] == r["ci_low"] else ""
        return f"{r['measured']:+.2f}{interval}" if r["kind"] == "difference" else f"{r['measured']:.2f}{interval}"
    return pd.DataFrame({"effect": found["effect"], "planted": found["planted"], "threshold": found["threshold"],
                         "measured [95% CI]": found.apply(value, axis=1),
                         "n": found["n"].map(lambda n: "—" if pd.isna(n) else str(int(n))), "found": found["found"]})


def _row(effect, planted_text, threshold_text, found, how, measured=math.nan, low=math.nan, high=math.nan, n=None,
         kind="share"):
    return {"effect": effect, "planted": planted_text, "measured": measured, "ci_low": low, "ci_high": high,
            "n": n, "kind": kind, "threshold": threshold_text, "found": found, "how": how}


def _verdict(value: bool | None) -> str:
    return "not measured" if value is None else ("found" if value else "not found")


def table(planted: dict, answers: dict, replication: dict | None = None, reading: str = "debiased",
          retrieval: pd.DataFrame | None = None, top_k: int | None = None, retriever: str = "bm25",
          grpo: dict | None = None) -> pd.DataFrame:
    """One row per planted effect: what was built, what this run measured (with its 95% interval where it is a
    difference or a share), the threshold the world fixed (``planted["thresholds"]``), and found / not found /
    not measured.

    ``answers`` / ``replication``: :func:`results.collect`'s raw answers on eval and on the replication set;
    ``reading``: the pre-registered reading the differences are read in; ``retrieval``: 08's recall table
    (``rag.gold_recall``), read for ``retriever`` at ``top_k``; ``grpo``: 04b's reward before and after and its
    share of prompts with a spread (:func:`grpo_reward`)."""
    from . import report  # here, not at the top: report imports this module (index.html shows the table)

    t = planted["thresholds"]
    read_eval = report.readings(answers)
    read_rep = report.readings(replication) if replication else {}
    rows = []
    for where, read_answers in (("eval", read_eval), ("replication", read_rep)):
        test = gain(planted, read_answers, ("merged", reading), ("base", reading), "trained")
        rows.append(_row(
            f"SFT teaches facts ({where})", "trained-fact questions: facts the train split teaches, other options",
            f"merged vs base, {reading}: 95% low end >= {t['sft_lower_bound']:+.2f}",
            _verdict(None if test is None else test["diff_ci_low"] >= t["sft_lower_bound"]),
            f"merged vs base on the trained group, {reading} reading",
            *((test["difference"], test["diff_ci_low"], test["diff_ci_high"], test["n"]) if test else ()),
            kind="difference"))
        rag = f"{reading}+rag bm25"
        test = gain(planted, read_answers, ("merged", rag), ("merged", reading), "passage")
        rows.append(_row(
            f"passages supply facts ({where})", "passage-only questions: facts in the textbooks, in no training question",
            "merged+rag bm25 vs merged: 95% low end > 0",
            _verdict(None if test is None else test["diff_ci_low"] > 0),
            f"merged with bm25's passages vs without, on the passage group, {reading} reading",
            *((test["difference"], test["diff_ci_low"], test["diff_ci_high"], test["n"]) if test else ()),
            kind="difference"))
    if retrieval is not None and top_k is not None:
        hit = retrieval[(retrieval["retriever"] == retriever) & (retrieval["k"] == top_k)]
        r = hit.iloc[0] if len(hit) else None
        rows.append(_row(
            "retrieval finds the gold passage", "every trained and passage question's gold sentence, in one textbook",
            f"{retriever} recall@{top_k} >= {t['retrieval_recall_at_k']:.2f}",
            _verdict(None if r is None else r["recall"] >= t["retrieval_recall_at_k"]),
            f"share of questions whose top {top_k} {retriever} passages hold the gold sentence",
            *((r["recall"], r["ci_low"], r["ci_high"], int(r["n"])) if r is not None else ())))
    skew = letter_skew(planted, answers)
    built = f"base pretrained on gold letter {planted['letter_skew']['letter']} in {planted['letter_skew']['share']:.0%}"
    if skew:
        low, high = evaluate.wilson(round(skew["plain_share"] * skew["n"]), skew["n"])
        excess = skew["plain_share"] - skew["gold_share"]
        rows.append(_row("letter skew, plain reading", built,
                         f"base's {skew['letter']} share >= its gold share {skew['gold_share']:.2f} "
                         f"+ {t['skew_plain_excess']:.2f}",
                         _verdict(excess >= t["skew_plain_excess"]), "share of base's plain letter answers",
                         skew["plain_share"], low, high, skew["n"]))
        low, high = evaluate.wilson(round(skew["debiased_share"] * skew["n_debiased"]), skew["n_debiased"])
        rows.append(_row("letter skew removed, debiased reading", built,
                         f"within {t['skew_debiased_within']:.2f} of the gold share {skew['debiased_gold_share']:.2f}",
                         _verdict(abs(skew["debiased_share"] - skew["debiased_gold_share"]) <= t["skew_debiased_within"]),
                         "share of base's debiased answers (every rotation)", skew["debiased_share"], low, high,
                         skew["n_debiased"]))
        rows.append(_row("PriDe estimates the prior", built,
                         f"within {t['pride_within']:.2f} of the true prior {skew['true_prior']:.2f}",
                         _verdict(None if math.isnan(skew["true_prior"])
                                  else abs(skew["pride_prior"] - skew["true_prior"]) <= t["pride_within"]),
                         "PriDe's prior of the skewed letter (validation); true prior: base's mean probability over "
                         "every rotation of the unknown group", skew["pride_prior"], n=skew["n_unknown"]))
    else:
        rows.append(_row("letter skew", built, "", _verdict(None), "06's letter scores, rotations and calibration"))
    if grpo:
        rise = grpo["reward_last"] - grpo["reward_first"]
        rows.append(_row("GRPO raises the reward", "no GRPO effect is planted in this world yet",
                         f"mean reward rises >= {t['grpo_reward_rise']:.2f}, prompts with a spread >= "
                         f"{t['grpo_spread_share']:.0%}",
                         _verdict(None if math.isnan(grpo["spread_share"])
                                  else rise >= t["grpo_reward_rise"] and grpo["spread_share"] >= t["grpo_spread_share"]),
                         "04b: mean reward of the last logged step less the first's", rise, kind="difference"))
    return pd.DataFrame(rows, columns=COLUMNS).astype({"n": "Int64"})
