"""Tables and plots for the notebooks (saved under ``outputs/<profile>/figures``)."""
from __future__ import annotations

import argparse
import datetime as dt
import html
import importlib.util
import json
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from markdown_it import MarkdownIt
from matplotlib import font_manager

from . import debias, evaluate, files, models, planted, results
from .config import SMOKE_WARNING

# Fonts with Simplified Chinese glyphs, most common first (Linux, macOS, Windows); one installed on the system wins
CJK_FONTS = (
    "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "Source Han Sans CN", "WenQuanYi Micro Hei",
    "WenQuanYi Zen Hei", "PingFang SC", "Heiti SC", "Hiragino Sans GB", "Microsoft YaHei", "SimHei",
    "AR PL UMing CN", "Noto Sans CJK JP",
)
# else the one pip installs with this project: Noto Sans CJK SC (SIL Open Font License 1.1), from the mplfonts
# package (it also ships SimHei, whose licence does not allow redistribution: not used here)
PACKAGED_CJK_FONT = ("mplfonts", "fonts/NotoSansCJKsc-Regular.otf")
_font_checked = False


def packaged_cjk_font() -> Path | None:
    """The CJK font file a pip install brings (:data:`PACKAGED_CJK_FONT`), or None without the package."""
    package, relative = PACKAGED_CJK_FONT
    spec = importlib.util.find_spec(package)  # its location only: importing mplfonts is not needed
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / relative).is_file():
            return Path(location) / relative
    return None


def use_cjk_font() -> str | None:
    """Make matplotlib draw Chinese: put a CJK font first in ``font.sans-serif``.

    The first of :data:`CJK_FONTS` installed on the system, else the packaged Noto Sans CJK SC
    (:func:`packaged_cjk_font`, registered with matplotlib here: no root, no font cache to rebuild).
    Returns the font's name, or None (with one warning saying how to get one) when there is neither;
    labels then show empty boxes but nothing fails.
    """
    global _font_checked
    installed = {f.name for f in font_manager.fontManager.ttflist}
    name = next((n for n in CJK_FONTS if n in installed), None)
    if name is None and (path := packaged_cjk_font()) is not None:
        font_manager.fontManager.addfont(str(path))
        name = font_manager.FontProperties(fname=str(path)).get_name()
    if name is not None:
        plt.rcParams["font.sans-serif"] = [name, *(f for f in plt.rcParams["font.sans-serif"] if f != name)]
        plt.rcParams["axes.unicode_minus"] = False
        return name
    if not _font_checked:
        warnings.warn(
            "no Chinese font found, so Chinese labels in plots show as boxes. `pip install mplfonts` (a dependency "
            "of this project: reinstall it) brings Noto Sans CJK SC; or install a system font, e.g. "
            "`apt install fonts-noto-cjk` (Debian/Ubuntu), then restart the kernel.",
            stacklevel=2,
        )
    _font_checked = True
    return None


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_answer_letters(splits: dict[str, list]):
    """Share of each gold answer letter per split, with the always-guess-X baseline visible."""
    use_cjk_font()
    letters = sorted({letter for qs in splits.values() for q in qs for letter in q.options})
    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.8 / max(len(splits), 1)
    top = 0.0
    for i, (role, qs) in enumerate(splits.items()):
        counts = Counter(q.answer_idx for q in qs)
        shares = [100 * counts[x] / max(len(qs), 1) for x in letters]
        top = max(top, *shares)
        xs = [j + i * width for j in range(len(letters))]
        bars = ax.bar(xs, shares, width, label=f"{role} (n={len(qs)})")
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks([j + width * (len(splits) - 1) / 2 for j in range(len(letters))], letters)
    ax.axhline(100 / len(letters), color="grey", ls="--", lw=1, label="uniform")
    ax.set_ylim(0, top * 1.35)
    ax.set_ylabel("% of questions")
    ax.set_title("Gold answer letter")
    ax.legend(fontsize=8, loc="upper center", ncol=len(splits) + 1)
    return fig


def plot_question_lengths(splits: dict[str, list]):
    """Histogram of question-stem length in characters, per split."""
    use_cjk_font()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bins = np.histogram_bin_edges([len(q.question) for qs in splits.values() for q in qs], bins=40)
    for role, qs in splits.items():
        ax.hist([len(q.question) for q in qs], bins=bins, alpha=0.6, label=role, density=True)
    ax.set_xlabel("question length (characters)")
    ax.set_ylabel("density")
    ax.set_title("Question stem length")
    ax.legend(fontsize=8)
    return fig


def plot_top_sections(questions: list, n: int = 15):
    """The ``n`` most common MedQA sections (``meta_info``)."""
    use_cjk_font()
    top = Counter(q.meta_info for q in questions).most_common(n)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(top) + 1))
    ax.barh([name for name, _ in top], [c for _, c in top])
    ax.set_xlabel("questions")
    ax.set_title(f"Top {len(top)} sections (meta_info)")
    return fig


def plot_textbook_sizes(table):
    """Characters per textbook, from :func:`medqa_zh.data.textbook_table`."""
    use_cjk_font()
    t = table.sort_values("characters")
    fig, ax = plt.subplots(figsize=(6, 0.25 * len(t) + 1))
    ax.barh(t["book"], t["characters"] / 1e6)
    ax.set_xlabel("million characters")
    ax.set_title(f"{len(t)} textbooks, {t['characters'].sum() / 1e6:.1f} M characters")
    return fig


def plot_loss_curves(logs: dict[str, list[dict]]):
    """Training loss (lines) and held-out eval loss (markers) per optimizer step, one colour per run.

    ``logs`` maps a run name ("LoRA", "full") to its ``train_log.jsonl`` rows.
    """
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, (name, log) in enumerate(logs.items()):
        color = f"C{i}"
        train = [(r["step"], r["loss"]) for r in log if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r]
        if train:
            ax.plot(*zip(*train, strict=True), color=color, lw=1.2, label=f"{name}: train")
        if evals:
            ax.plot(*zip(*evals, strict=True), color=color, ls="--", marker="o", ms=4, label=f"{name}: eval (held out)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over answer tokens)")
    ax.set_title("SFT loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_learning_curve(curve):
    """02's learning curve: plain and PriDe-debiased accuracy on the validation questions (95%
    intervals as bands) against the optimizer step, step 0 being the base model."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for j, reading in enumerate(("plain", "pride")):
        ax.plot(curve["step"], curve[reading], marker="o", color=f"C{j}",
                label="PriDe debiased" if reading == "pride" else "plain (letter scoring)")
        ax.fill_between(curve["step"], curve[f"{reading}_ci_low"], curve[f"{reading}_ci_high"], color=f"C{j}", alpha=0.15)
    ax.set_xlabel("optimizer step (0: the base model)")
    ax.set_ylabel(f"validation accuracy, n = {int(curve['n'].iloc[0])}")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


GRPO_CURVES = (("reward", "reward_std", "reward (mean ± spread)"), ("frac_reward_zero_std", None,
               "groups with no spread (teach nothing)"), ("completions/mean_length", None, "completion length (tokens)"),
               ("kl", None, "KL to the start model"))


def plot_grpo_curves(log: list[dict]):
    """04b's curves from its ``train_log.jsonl`` rows, one panel each: the mean reward per step with its spread, the
    share of groups whose rewards do not differ, the completions' mean length and the KL to the start model (absent
    with ``grpo.beta: 0``, and said so)."""
    fig, axes = plt.subplots(1, len(GRPO_CURVES), figsize=(13, 3.0))
    for ax, (key, band, title) in zip(axes, GRPO_CURVES, strict=True):
        points = [(r["step"], r[key], r.get(band, 0.0) if band else 0.0) for r in log if key in r]
        if points:
            steps, values, spread = (list(v) for v in zip(*points, strict=True))
            ax.plot(steps, values, marker="o", ms=3, lw=1.2)
            if band:
                ax.fill_between(steps, [v - d for v, d in zip(values, spread, strict=True)],
                                [v + d for v, d in zip(values, spread, strict=True)], alpha=0.2)
        else:
            ax.text(0.5, 0.5, "not logged" + (" (grpo.beta is 0)" if key == "kl" else ""), ha="center",
                    va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_letter_shares(table):
    """Each letter's share of the chosen answers (columns: before and after training, and the gold letters), as
    grouped bars: a policy that learned a preferred letter shows a peak the gold letters do not have."""
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    width = 0.8 / len(table.columns)
    for i, column in enumerate(table.columns):
        ax.bar([x + i * width for x in range(len(table))], table[column], width, label=column)
    ax.set_xticks([x + width * (len(table.columns) - 1) / 2 for x in range(len(table))], list(table.index))
    ax.set_ylabel("share")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return fig


def plot_retrieval_quality(table):
    """From :func:`medqa_zh.rag.retrieval_quality`: per retriever, how often the top k contain the
    correct option (solid) and one wrong option on average (dashed), against k."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, (name, rows) in enumerate(table.groupby("retriever", sort=False)):
        ax.plot(rows["k"], rows["contains_correct"], color=f"C{i}", marker="o", label=f"{name}: correct option")
        ax.plot(rows["k"], rows["wrong_per_option"], color=f"C{i}", ls="--", marker=".", label=f"{name}: a wrong option")
    ax.set_xlabel("passages retrieved (k)")
    ax.set_ylabel("share of questions")
    ax.set_title("Do the passages contain the answer, or a distractor?")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _draw_baselines(ax, baselines, across: str = "y") -> None:
    """:func:`evaluate.baselines` across an accuracy plot: the chance range as a grey band with its
    expected accuracy dashed, "always X" dotted. ``across``: the axis that holds the accuracy."""
    span, line = (ax.axhspan, ax.axhline) if across == "y" else (ax.axvspan, ax.axvline)
    for _, b in (baselines.iterrows() if baselines is not None else ()):
        text = f"{b['model']} {b['accuracy']:.1%}"
        if b["model"] == "chance":
            span(b["ci_low"], b["ci_high"], color="grey", alpha=0.15, lw=0)
            line(b["accuracy"], color="grey", ls="--", lw=1, label=text)
        else:
            line(b["accuracy"], color="black", ls=":", lw=1, label=text)


# the readings of the results table, in families a figure shows one panel each
FAMILIES = ("letter", "debiased", "generated", "API", "with passages")


def reading_family(evaluation: str) -> str:
    """The family of a reading (an ``evaluation`` of :func:`results_table`): ``with passages`` (``api+rag bm25``,
    ``pride+rag dense``, ...), ``API`` (``api``, ``api@llamacpp-q8_0``), ``generated``, ``debiased`` (PriDe and every
    rotation) or ``letter``."""
    if "+" in evaluation:
        return "with passages"
    kind = evaluation.split("@")[0]
    return {results.API: "API", results.GENERATE: "generated", results.PRIDE: "debiased",
            "debiased": "debiased"}.get(kind, "letter")


def plot_accuracy_panels(summary, baselines=None):
    """Every accuracy of ``summary`` (:func:`results_table`'s rows, baselines left out) as a dot with its 95%
    interval, one panel per family of readings (:func:`reading_family`), models down the side and the readings of
    a family side by side within each model; the ``baselines`` drawn across every panel. Many readings stay
    readable: a panel holds a handful, not a dozen bars per model."""
    families = [f for f in FAMILIES if (summary["evaluation"].map(reading_family) == f).any()]
    columns = min(2, len(families))
    rows = -(-len(families) // columns)
    models = list(dict.fromkeys(summary["model"]))
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 0.5 + 0.55 * len(models) * rows + 0.9 * rows),
                             sharex=True, squeeze=False)
    for ax, family in zip(axes.flat, families, strict=False):
        part = summary[summary["evaluation"].map(reading_family) == family]
        readings = list(dict.fromkeys(part["evaluation"]))
        step = 0.7 / max(len(readings), 1)
        for j, reading in enumerate(readings):
            r = part[part["evaluation"] == reading].set_index("model").reindex(models)
            y = [m - 0.35 + step * (j + 0.5) for m in range(len(models))]
            ax.errorbar(r["accuracy"], y, xerr=[r["accuracy"] - r["ci_low"], r["ci_high"] - r["accuracy"]], fmt="o",
                        ms=4, capsize=2, lw=1, color=f"C{j}", label=reading)
        _draw_baselines(ax, baselines, across="x")
        ax.set_yticks(range(len(models)), models)
        ax.set_ylim(len(models) - 0.5, -0.5)  # the first model on top
        ax.set_xlim(0, 1)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(family, fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(families):]:
        ax.set_visible(False)
    for column in axes.T:  # the lowest panel of each column carries the scale
        lowest = [ax for ax in column if ax.get_visible()][-1]
        lowest.xaxis.set_tick_params(labelbottom=True)
        lowest.set_xlabel("accuracy (95% interval)")
    fig.tight_layout()
    return fig


def plot_accuracy(summary, label: str = "condition", baselines=None):
    """Accuracy with its 95% interval as error bars, one bar per row of ``summary`` (columns
    ``model``, ``label``, ``accuracy``, ``ci_low``, ``ci_high``), grouped by model, with the
    ``baselines`` (:func:`evaluate.baselines`) drawn across."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    models = list(dict.fromkeys(summary["model"]))
    conditions = list(dict.fromkeys(summary[label]))
    width = 0.8 / len(conditions)
    for j, cond in enumerate(conditions):
        rows = summary[summary[label] == cond].set_index("model").reindex(models)
        x = [m + j * width for m in range(len(models))]
        err = [rows["accuracy"] - rows["ci_low"], rows["ci_high"] - rows["accuracy"]]
        ax.bar(x, rows["accuracy"], width, yerr=err, capsize=3, label=str(cond), color=f"C{j}")
    _draw_baselines(ax, baselines)
    ax.set_xticks([m + 0.4 - width / 2 for m in range(len(models))], models)
    ax.set_ylabel("accuracy (95% interval)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_debiased(table, priors, baselines=None):
    """Knowledge or letter bias, at a glance. Left: each model's plain accuracy (rotation 0) next to
    its debiased accuracy, with 95% intervals and the baselines. Right: each model's letter prior
    (mean probability per letter over all rotations); the dashed line is no preference (1 / k)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1.2, 1]})
    models = list(table["model"])
    for j, reading in enumerate(("plain", "debiased")):
        x = [m + (j - 0.5) * 0.38 for m in range(len(models))]
        err = [table[reading] - table[f"{reading}_ci_low"], table[f"{reading}_ci_high"] - table[reading]]
        left.bar(x, table[reading], 0.38, yerr=err, capsize=3, label=reading, color=f"C{j}")
    _draw_baselines(left, baselines)
    left.set_xticks(range(len(models)), models)
    left.set_ylabel("accuracy (95% interval)")
    left.set_ylim(0, 1)
    left.grid(axis="y", alpha=0.3)
    left.legend(fontsize=8)
    left.set_title("plain vs debiased accuracy", fontsize=10)
    prior_columns = [c for c in priors.columns if c.endswith(" prior")]
    width = 0.8 / len(prior_columns)
    for j, column in enumerate(prior_columns):
        right.bar([i + j * width for i in range(len(priors))], priors[column], width, label=column.removesuffix(" prior"),
                  color=f"C{j + 2}")
    right.axhline(1 / len(priors), color="grey", ls="--", lw=1, label="no preference")
    right.set_xticks([i + 0.4 - width / 2 for i in range(len(priors))], list(priors.index))
    right.set_ylabel("mean probability")
    right.set_ylim(0, 1.4 * max(priors[prior_columns].to_numpy().max(), 1 / len(priors)))  # room for the legend
    right.grid(axis="y", alpha=0.3)
    right.legend(fontsize=8, ncol=3, loc="upper right")
    right.set_title("letter prior (all rotations)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_letter_distribution(table):
    """Share of each answer letter: gold vs each model's predictions (columns of ``table``, rows
    the letters and ``invalid``), from :func:`medqa_zh.evaluate.letter_distribution`."""
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    width = 0.8 / len(table.columns)
    for j, column in enumerate(table.columns):
        style = {"color": "black", "alpha": 0.35} if column == "gold" else {"color": f"C{j}"}
        ax.bar([i + j * width for i in range(len(table))], table[column], width, label=column, **style)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(table))], table.index)
    ax.set_ylabel("share of questions")
    ax.set_title("Predicted answer letter vs gold (position bias shows as one tall bar)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_sections(table):
    """Accuracy per section (rows) and model (columns), the sections' sizes in their labels."""
    use_cjk_font()
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(table) * max(1, len(table.columns) / 2) + 1))
    height = 0.8 / len(table.columns)
    for j, column in enumerate(table.columns):
        ax.barh([i + j * height for i in range(len(table))], table[column], height, label=column, color=f"C{j}")
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(table))], table.index)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy (few questions per section: wide uncertainty)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------- a run's results (notebook 10)

def readings(answers: dict) -> dict:
    """The answers as the report reads them: ``{(model, evaluation): (result rows, consistency)}``.
    Letter scores, generated and API answers as they are; every rotation (06, 08) read debiased
    (``debiased``, ``debiased+rag <retriever>``; ``consistency``: the share right under every
    rotation); letter scores also read with PriDe's prior from the same model's calibration with the
    same passages (``pride``, ``pride+rag <retriever>``). The calibration itself (validation
    questions) is no row."""
    out = {}
    for (model, raw), got in answers.items():
        kind, plus, rest = raw.partition("+")
        if kind == results.CALIBRATION:
            continue
        if kind == results.ROTATIONS:
            out[model, raw.replace(results.ROTATIONS, "debiased", 1)] = (debias.results(got, "debiased"),
                                                                         debias.summary(got)["consistency"])
            continue
        out[model, raw] = (got, float("nan"))
        calibration = answers.get((model, results.CALIBRATION + plus + rest))
        if kind == results.LETTER and calibration:
            out[model, results.PRIDE + plus + rest] = (debias.pride_results(got, debias.estimate_prior(calibration)),
                                                       float("nan"))
    return out


# a model trained from another of the run's models, and that model: its results-table rows are also compared with it
# (vs_start). grpo: 04b's GRPO starts from the merged SFT model (grpo.START; tests/test_report.py checks they agree)
START_MODELS = {"grpo": "merged"}
SUFFIXES = ("vs_base", "vs_start", "vs_no_rag")  # the three paired comparisons of a results-table row


def _against(model: str, evaluation: str, suffix: str) -> tuple[str, str] | None:
    """The (model, reading) a row is compared with: the base model on the same reading (``vs_base``), the model it
    was trained from on the same reading (``vs_start``, :data:`START_MODELS`: grpo against merged), or the same model
    without passages (``vs_no_rag``, for a reading with passages); None where there is none."""
    if suffix == "vs_base":
        return ("base", evaluation) if model != "base" else None
    if suffix == "vs_start":
        return (START_MODELS[model], evaluation) if model in START_MODELS else None
    return (model, evaluation.split("+rag")[0]) if "+rag" in evaluation else None


def results_table(answers: dict, baselines=None, primary=()):
    """One row per (model, reading) of :func:`readings`: n, accuracy, its 95% interval, invalid and
    failed answers, and up to three paired comparisons on the same questions, each the difference in
    accuracy with its 95% interval (:func:`evaluate.paired_difference_ci`, unadjusted: one comparison at a
    time), the exact McNemar p, the Holm-adjusted p (``p_adj_*``, :func:`evaluate.holm`) with the family it is
    adjusted in (``family_*``, :func:`holm_families`: ``primary`` or ``exploratory``) and the smallest difference
    those questions could detect (80% power, alpha 0.05, :func:`evaluate.detectable_difference`, from the share
    of questions the two readings disagree on in this run): against the base model on the same reading
    (``vs_base``), for a model trained from another (:data:`START_MODELS`: grpo) against that model on the same reading
    (``vs_start``) and, for RAG rows, against the same model without passages (``vs_no_rag``).
    ``primary``: the pre-registered :class:`Comparison` objects; column ``primary`` names the one a row
    carries (every other difference is exploratory). ``baselines`` (:func:`evaluate.baselines`) come
    last, as evaluation ``baseline``."""
    read = readings(answers)
    named = {(c.model, c.evaluation, c.suffix): c.name for c in primary}
    rows = []
    for (model, evaluation), (got, consistency) in read.items():
        acc = evaluate.accuracy(got)
        row = {"model": model, "evaluation": evaluation, "n": acc["n"], "accuracy": acc["accuracy"],
               "ci_low": acc["ci_low"], "ci_high": acc["ci_high"], "consistency": consistency,
               "invalid_rate": acc["invalid_rate"], "failed": acc["failed"],
               "primary": next((named[model, evaluation, s] for s in SUFFIXES if (model, evaluation, s) in named), "")}
        for suffix in SUFFIXES:
            other = _against(model, evaluation, suffix)
            test = evaluate.mcnemar(read[other][0], got) if other in read else None
            row.update(_comparison(suffix, test))
        rows.append(row)
    for _, b in (baselines.iterrows() if baselines is not None else ()):
        rows.append({"model": b["model"], "evaluation": "baseline", "n": b["n"], "accuracy": b["accuracy"],
                     "ci_low": b["ci_low"], "ci_high": b["ci_high"], "primary": ""})
    columns = ["model", "evaluation", "n", "accuracy", "ci_low", "ci_high", "consistency", "invalid_rate", "failed"]
    for suffix in SUFFIXES:  # family_<suffix> beside p_adj_<suffix>
        comparison = list(_comparison(suffix, None))
        comparison.insert(comparison.index(f"p_adj_{suffix}") + 1, f"family_{suffix}")
        columns += comparison
    table = pd.DataFrame(rows, columns=columns + ["primary"]).assign(**{f"family_{s}": "" for s in SUFFIXES})
    for family, members in holm_families(table, primary).items():
        for (i, suffix), adjusted in members:
            table.at[i, f"p_adj_{suffix}"] = adjusted
            table.at[i, f"family_{suffix}"] = family
    order = tuple(e.replace(results.ROTATIONS, "debiased") for e in results.ORDER)
    key = table.apply(lambda r: (results.position(r["evaluation"], order),  # baselines last, as given
                                 results.position(r["model"], models.NAMES) if r["evaluation"] != "baseline" else ()),
                      axis=1)
    return table.iloc[sorted(range(len(table)), key=lambda i: key.iloc[i])].reset_index(drop=True)


PRIMARY_FAMILY, EXPLORATORY_FAMILY = "primary", "exploratory"  # the two Holm families of a results table


def holm_families(table, primary=()) -> dict:
    """Holm's adjustment of a results table's paired differences (``p_vs_base``, ``p_vs_start``, ``p_vs_no_rag``) in
    two families, each adjusted on its own (:func:`evaluate.holm`): ``primary``, the pre-registered comparisons
    (``primary``: :class:`Comparison` objects) among themselves, and ``exploratory``, every other difference in
    ``table``.
    The primary family is what was named before the run, whatever else the table shows: its size is the number of
    pre-registered comparisons, and one this run did not measure counts as p = 1 (so turning a step off can make
    no other look stronger); turning an exploratory step on or off changes no primary adjusted p. Returns
    ``{family: [((row index, suffix), adjusted p), ...]}``, measured differences only, the primary family first."""
    named = list(dict.fromkeys((c.model, c.evaluation, c.suffix) for c in primary))
    tested = {(table.at[i, "model"], table.at[i, "evaluation"], suffix): (i, suffix)
              for suffix in SUFFIXES for i in table.index if table.at[i, f"p_{suffix}"] == table.at[i, f"p_{suffix}"]}
    families = {}
    others = [k for k in tested if k not in set(named)]
    for family, keys, missing in ((PRIMARY_FAMILY, named, 1.0), (EXPLORATORY_FAMILY, others, None)):
        p = [table.at[tested[k][0], f"p_{tested[k][1]}"] if k in tested else missing for k in keys]
        families[family] = [(tested[k], adjusted) for k, adjusted in zip(keys, evaluate.holm(p), strict=True)
                            if k in tested]
    return families


def _comparison(suffix: str, test: dict | None) -> dict:
    """The columns of one paired comparison (``diff_<suffix>`` with its interval, ``p_<suffix>``, the
    Holm-adjusted ``p_adj_<suffix>`` (filled in by :func:`results_table`), ``detectable_<suffix>``),
    NaN where there is nothing to compare."""
    nan = float("nan")
    if test is None:
        return {f"diff_{suffix}": nan, f"diff_{suffix}_low": nan, f"diff_{suffix}_high": nan, f"p_{suffix}": nan,
                f"p_adj_{suffix}": nan, f"detectable_{suffix}": nan}
    return {f"diff_{suffix}": test["difference"], f"diff_{suffix}_low": test["diff_ci_low"],
            f"diff_{suffix}_high": test["diff_ci_high"], f"p_{suffix}": test["p_value"], f"p_adj_{suffix}": nan,
            f"detectable_{suffix}": evaluate.detectable_difference(test["n"], test["a_only"] + test["b_only"])}


# --------------------------------------------------------------------------- the pre-registered verdict (10)

READINGS = ("letter", "pride", "debiased", "generate")  # what eval.primary_reading may name (results.NEEDS)


@dataclass(frozen=True)
class Comparison:
    """One pre-registered comparison (``eval.primary_comparisons``) in the primary reading: the results-table
    row ``(model, evaluation)`` and its paired test ``suffix`` (``vs_base``, ``vs_start`` or ``vs_no_rag``) against
    ``other``."""

    name: str                # as the profile says it: "merged vs base", "grpo vs merged", "merged+rag bm25 vs merged"
    model: str
    evaluation: str          # the reading's row name: "debiased", "debiased+rag bm25"
    suffix: str
    other: tuple[str, str]   # (model, evaluation) it is compared with


def primary_comparisons(reading: str, names) -> list[Comparison]:
    """Parse ``eval.primary_comparisons`` (``"A vs B"``) in ``reading`` (``eval.primary_reading``). Three kinds
    exist, the three a results table tests: fine-tuning, ``model vs base`` (with the same passages on both sides,
    ``model+rag R vs base+rag R``); a model against the model it was trained from, ``grpo vs merged``
    (:data:`START_MODELS`, the same passages on both sides too); and passages, ``model+rag R vs model``."""
    if reading not in READINGS:
        raise ValueError(f"eval.primary_reading: {reading!r} is none of {', '.join(READINGS)}; fix it in the profile")
    out = []
    for name in names:
        sides = [side.strip() for side in str(name).split(" vs ")]
        parsed = [side.partition("+rag ") for side in sides]
        if len(sides) != 2 or not all(model in models.NAMES for model, _, _ in parsed):
            raise ValueError(f"eval.primary_comparisons: {name!r} is not 'A vs B' with A and B each one of "
                             f"{', '.join(models.NAMES)} (optionally '+rag <retriever>'), e.g. 'merged vs base'")
        (a, _, ra), (b, _, rb) = parsed
        evaluation = reading + (f"+rag {ra}" if ra else "")
        if ra and not rb and a == b:
            out.append(Comparison(name, a, evaluation, "vs_no_rag", (a, reading)))
        elif ra == rb and b == "base" and a != "base":
            out.append(Comparison(name, a, evaluation, "vs_base", ("base", evaluation)))
        elif ra == rb and START_MODELS.get(a) == b:
            out.append(Comparison(name, a, evaluation, "vs_start", (b, evaluation)))
        else:
            starts = ", ".join(f"'{m} vs {start}'" for m, start in START_MODELS.items())
            raise ValueError(f"eval.primary_comparisons: {name!r} is neither 'model vs base', a model against the "
                             f"model it was trained from ({starts}), nor 'model+rag <retriever> vs model': the three "
                             "comparisons the results table tests")
    return out


def primary(cfg) -> tuple[str, list[Comparison]]:
    """The profile's pre-registration: ``(eval.primary_reading, its comparisons)``."""
    return cfg["eval.primary_reading"], primary_comparisons(cfg["eval.primary_reading"], cfg["eval.primary_comparisons"])


def primary_checks(comparisons, sets: dict) -> pd.DataFrame:
    """Each pre-registered comparison on each question set: ``sets`` maps a label ("eval", "eval, half 1",
    "replication") to ``(answers as results.collect gives them, the question ids to keep or None for all)``.
    One row per comparison and set with n, the difference with its 95% interval and the exact McNemar p
    (unadjusted: these are checks of one difference, not a family); a set without both answers is no row."""
    rows = []
    for label, (answers, ids) in sets.items():
        read = readings(answers)
        for c in comparisons:
            if (c.model, c.evaluation) not in read or c.other not in read:
                continue
            a, b = (read[key][0] for key in (c.other, (c.model, c.evaluation)))
            if ids is not None:
                keep = set(ids)
                a, b = ([r for r in rows_ if r["id"] in keep] for rows_ in (a, b))
                if not a:  # a reading on the first questions only (generate) may have none of a half
                    continue
            test = evaluate.mcnemar(a, b)
            rows.append({"comparison": c.name, "set": label, "n": test["n"], "diff": test["difference"],
                         "diff_low": test["diff_ci_low"], "diff_high": test["diff_ci_high"], "p": test["p_value"]})
    return pd.DataFrame(rows, columns=["comparison", "set", "n", "diff", "diff_low", "diff_high", "p"])


def validation_check(curve) -> dict | None:
    """What the run's own validation evidence says of fine-tuning: 02's learning curve (PriDe on the validation
    questions), the last point against step 0 (the base), paired; None without a curve of two points or more."""
    if curve is None or len(curve) < 2 or "pride_diff_vs_base" not in curve:
        return None
    last = curve.iloc[-1]
    return {"step": int(last["step"]), "n": int(last["n"]), "diff": float(last["pride_diff_vs_base"]),
            "diff_low": float(last["pride_diff_vs_base_low"]), "diff_high": float(last["pride_diff_vs_base_high"]),
            "p": float(last["pride_p_vs_base"])}


def _points(d, low, high) -> str:
    return f"{100 * d:+.1f} points [unadjusted 95% CI {100 * low:+.1f}, {100 * high:+.1f}]"


def _shows(d, p, alpha) -> int:
    """+1: a significant gain, -1: a significant loss, 0: no significant difference."""
    return 0 if not p < alpha else (1 if d > 0 else -1)


FINE_TUNED = ("lora", "merged")  # the models 02's learning curve (validation) speaks of


def _what(c: Comparison) -> tuple[str, str]:
    """What a pre-registered comparison asks, in plain words: (English, Chinese)."""
    if "+rag" in c.evaluation and c.suffix == "vs_no_rag":
        retriever = c.evaluation.partition("+rag ")[2]
        return f"Passages ({retriever}) for {c.model}", f"检索段落（{retriever}）对 {c.model}"
    if c.suffix == "vs_start":
        return f"GRPO after SFT ({c.model} against {c.other[0]})", f"SFT 之后的 GRPO（{c.model} 对比 {c.other[0]}）"
    return f"Fine-tuning ({c.model} against the base model)", f"微调（{c.model} 对比基座模型）"


def _plain(c: Comparison, measured: tuple | None) -> tuple[str, str]:
    """One pre-registered comparison in one plain sentence, English and Chinese: what changed, how much, how sure.
    ``measured``: (difference, low, high, shown, doubted, replicated, shown on replication or None) or None."""
    en, zh = _what(c)
    if measured is None:
        return f"- **{en}**: not measured in this run.", f"- **{zh}**：本次未测。"
    d, low, high, shown, doubted, replicated, there = measured
    way, way_zh = ("gain", "提高") if shown > 0 else ("loss", "下降")
    finding, finding_zh = (("no change shown", "未显示差异") if shown == 0 else
                           (f"a {way} on eval, unconfirmed", f"评测集上{way_zh}，未确认") if doubted else
                           (f"a {way}", way_zh))
    if there is None:
        again, again_zh = "no replication set", "无复现集"
    elif shown:
        again, again_zh = ("replicated", "已复现") if replicated else ("not replicated", "未复现")
    else:
        again, again_zh = (("none on the replication set either", "复现集上也无差异") if there == 0 else
                           (f"the replication set shows a {'gain' if there > 0 else 'loss'}",
                            f"复现集上{'提高' if there > 0 else '下降'}"))
    numbers = f"{100 * d:+.1f} points, 95% CI {100 * low:+.1f} to {100 * high:+.1f}"
    numbers_zh = f"{100 * d:+.1f} 个百分点，95% 区间 {100 * low:+.1f} 至 {100 * high:+.1f}"
    return f"- **{en}**: {finding} ({numbers}; {again}).", f"- **{zh}**：{finding_zh}（{numbers_zh}；{again_zh}）。"


def verdict(table, checks, comparisons, reading: str, validation: dict | None = None,
            replication_note: str | None = None, alpha: float = 0.05) -> str:
    """10's verdict, in words, on the pre-registered comparisons only (markdown). For each: the difference in
    ``reading`` on the eval split with its 95% interval (unadjusted, and said so), p and Holm-adjusted p (from
    ``table``, :func:`results_table`: adjusted among the pre-registered comparisons only); the same on each half of
    the eval split and on the replication set (``checks``, :func:`primary_checks`); and, for fine-tuning, the run's
    validation evidence (``validation``, :func:`validation_check`; a model of :data:`START_MODELS`, which has none,
    is said to have none). A difference is *significant* when its adjusted p is below ``alpha``; it is
    *replicated* only when the replication set shows it too (p below ``alpha``, same sign), and *unconfirmed*
    when validation, the replication set or the two halves do not agree with it."""
    family = len({(c.model, c.evaluation, c.suffix) for c in comparisons})
    others = int(sum((table[f"family_{s}"] == EXPLORATORY_FAMILY).sum() for s in SUFFIXES))
    plain: list[tuple[str, str]] = []  # one sentence per comparison, English and Chinese: the verdict's first lines
    lines = [f"**The numbers and the method.** **Pre-registered** (`eval.primary_reading`: **{reading}**; "
             f"`eval.primary_comparisons`). Significant "
             f"means a Holm-adjusted p below {alpha}, adjusted among the {family} pre-registered comparisons alone "
             "(the primary family, fixed before the run: one not measured counts as p = 1, and nothing else the "
             f"report shows changes it); the table's other {others} paired differences are exploratory, adjusted as "
             "a family of their own. The 95% intervals are unadjusted, one comparison at a time."]
    if not comparisons:
        return "No comparison is pre-registered (`eval.primary_comparisons` is empty).\n\n" + lines[0]
    rows = table.set_index(["model", "evaluation"])
    for c in comparisons:
        if (c.model, c.evaluation) not in rows.index or rows.loc[(c.model, c.evaluation), f"p_{c.suffix}"] != \
                rows.loc[(c.model, c.evaluation), f"p_{c.suffix}"]:
            lines.append(f"- **{c.name}** ({c.evaluation} against {c.other[0]} / {c.other[1]}): not measured in this "
                         "run (a notebook or setting that produces both readings is off), so nothing is concluded.")
            plain.append(_plain(c, None))
            continue
        r = rows.loc[(c.model, c.evaluation)]
        d, low, high = (r[f"diff_{c.suffix}{end}"] for end in ("", "_low", "_high"))
        p, p_adj = r[f"p_{c.suffix}"], r[f"p_adj_{c.suffix}"]
        shown = _shows(d, p_adj, alpha)
        words = [f"eval, n = {int(r['n'])}: {_points(d, low, high)}, p = {p:.2g}, adjusted p = {p_adj:.2g}"]
        doubts = []
        mine = checks[checks["comparison"] == c.name] if len(checks) else checks
        halves = mine[mine["set"].str.startswith("eval, half")]
        if len(halves):
            words.append("the halves of the eval split: " + "; ".join(
                f"{h['diff'] * 100:+.1f} [{h['diff_low'] * 100:+.1f}, {h['diff_high'] * 100:+.1f}] (n = {int(h['n'])})"
                for _, h in halves.iterrows()))
            if shown and any(h["diff"] * shown <= 0 for _, h in halves.iterrows()):
                doubts.append("one half of the eval split does not point the same way")
        replicated, there = False, None
        again = mine[mine["set"] == "replication"]
        if len(again):
            g = again.iloc[0]
            there = _shows(g["diff"], g["p"], alpha)
            replicated = shown != 0 and there == shown
            words.append(f"the replication set, n = {int(g['n'])}: {_points(g['diff'], g['diff_low'], g['diff_high'])}, "
                         f"p = {g['p']:.2g}: " + ("**replicated**" if replicated else "not replicated" if shown else
                                                   "no difference there either" if there == 0 else
                                                   f"a {'gain' if there > 0 else 'loss'} there that eval does not show"))
            if there != shown:
                doubts.append("the independent replication set does not show it" if shown else
                              "the independent replication set shows a difference that eval does not")
        else:
            words.append(f"no replication set ({replication_note or 'data.splits.replication'}), so it is not replicated")
        if c.model in START_MODELS and "+rag" not in c.evaluation:  # grpo: nothing of it was read on validation
            words.append(f"no validation evidence ({c.model} was trained on train-split prompts, and its notebook keeps "
                         "no learning curve on validation)")
        elif validation is not None and c.model in FINE_TUNED and c.suffix == "vs_base" and "+rag" not in c.evaluation:
            v_shown = _shows(validation["diff"], validation["p"], alpha)
            words.append(f"validation (02's learning curve, PriDe on {validation['n']} validation questions, step "
                         f"{validation['step']} against the base): {_points(validation['diff'], validation['diff_low'], validation['diff_high'])}, "
                         f"p = {validation['p']:.2g}")
            if v_shown != shown:
                doubts.append("validation and eval disagree: validation shows "
                              + ("no significant difference" if v_shown == 0 else "a gain" if v_shown > 0 else "a loss")
                              + ", eval " + ("none" if shown == 0 else "a gain" if shown > 0 else "a loss"))
        if shown == 0:
            head = (f"no significant difference: a gain larger than {100 * high:.1f} points and a loss larger than "
                    f"{-100 * low:.1f} are ruled out by the unadjusted 95% interval" if low < 0 < high else
                    "no significant difference after the adjustment among the pre-registered comparisons")
            head += "".join(f"; {doubt}" for doubt in doubts)
        elif doubts:
            head = f"a {'gain' if shown > 0 else 'loss'} on eval, **unconfirmed**: " + "; ".join(doubts)
        else:
            head = (f"a significant {'gain' if shown > 0 else 'loss'}"
                    + (", replicated on an independent set" if replicated else ", not yet replicated on an independent set"))
        lines.append(f"- **{c.name}** ({c.evaluation}): {head}. " + "; ".join(words) + ".")
        plain.append(_plain(c, (d, low, high, shown, bool(doubts), replicated, there)))
    # a finding first, in words; then the same in Chinese; then the numbers and the method
    return "\n".join([*(en for en, _ in plain), "", "**中文**", "", *(zh for _, zh in plain), "", *lines])


def quantization_table(reference: dict, quantized: dict, name: str = "merged"):
    """What quantization costs (04): one row per file and reading (``letter``: plain; ``pride``: debiased with the
    file's own calibration prior), with its accuracy and 95% interval, how often it chooses the model's option,
    and the paired comparison with the model itself on the same reading (difference with its 95% interval, exact
    McNemar p, the smallest difference these questions could detect, given how often the two disagree here). ``reference``: the model's
    ``{"letter": rows, "calibration": rows}``; ``quantized``: ``{quantization: the same}`` (``results.gguf_cached``)."""
    def read(got):
        prior = debias.estimate_prior(got[results.CALIBRATION])
        return {results.LETTER: got[results.LETTER], results.PRIDE: debias.pride_results(got[results.LETTER], prior)}

    base = read(reference)
    rows = []
    for label, got in [(name, reference), *((f"{name} {q}", g) for q, g in quantized.items())]:
        for reading, rows_ in read(got).items():
            acc = evaluate.accuracy(rows_)
            same = sum(a["pred"] == b["pred"] for a, b in zip(base[reading], rows_, strict=True)) / len(rows_)
            test = evaluate.mcnemar(base[reading], rows_) if label != name else None
            rows.append({"model": label, "evaluation": reading, "n": acc["n"], "accuracy": acc["accuracy"],
                         "ci_low": acc["ci_low"], "ci_high": acc["ci_high"], "same choice as the model": same,
                         **_comparison("vs_model", test)})
    return pd.DataFrame(rows)


def rag_table(answers: dict, baselines=None):
    """08's table: per (model, condition) (``no RAG``, then each retriever) accuracy with its 95%
    interval, invalid and failed answers, and the comparison with the same model without passages:
    ``only_no_rag`` (right only without them), ``only_rag``, the difference with its 95% interval
    (``diff_vs_no_rag``, ``_low``, ``_high``) and the exact McNemar p (``vs_no_rag_p``).
    ``baselines`` (:func:`evaluate.baselines`) come last, as condition ``baseline``."""
    summary = evaluate.summary_table(answers).rename(columns={"method": "condition"})
    tests = []
    for (name, condition), rows in answers.items():
        test = evaluate.mcnemar(answers[name, "no RAG"], rows)
        tests.append({"model": name, "condition": condition, "only_no_rag": test["a_only"], "only_rag": test["b_only"],
                      "diff_vs_no_rag": test["difference"], "diff_vs_no_rag_low": test["diff_ci_low"],
                      "diff_vs_no_rag_high": test["diff_ci_high"], "vs_no_rag_p": test["p_value"]})
    summary = summary.merge(pd.DataFrame(tests), on=["model", "condition"])
    if baselines is not None:
        summary = pd.concat([summary, baselines.assign(condition="baseline")], ignore_index=True)
    return summary


def significance(table, alpha: float = 0.05) -> str:
    """What :func:`results_table` says, in words, one line per paired comparison: a difference whose
    Holm-adjusted p is below ``alpha`` as a finding with its size and unadjusted 95% interval; any other as what
    it rules out (the interval's bounds: "a gain larger than Y points is ruled out by the unadjusted 95%
    interval"), with the smallest difference those questions could have detected (from the disagreement observed
    in this run). Each line gives p and the adjusted p and says which Holm family the comparison is adjusted in:
    pre-registered (``primary``) or exploratory. Markdown."""
    lines, found, raw, tested, families = [], 0, 0, 0, Counter()
    for _, r in table.iterrows():
        for suffix, against in (("vs_base", "the base model"),
                                ("vs_start", f"the model it was trained from, {START_MODELS.get(r['model'])}"),
                                ("vs_no_rag", "the same model without passages")):
            p = r.get(f"p_{suffix}")
            if p is None or p != p:
                continue
            tested += 1
            raw += p < alpha
            p_adj, role = r[f"p_adj_{suffix}"], r[f"family_{suffix}"]
            families[role] += 1
            d, low, high = (100 * r[f"diff_{suffix}{end}"] for end in ("", "_low", "_high"))
            what = f"{role}: **{r['model']} / {r['evaluation']}** against {against} (n = {int(r['n'])})"
            size = f"{d:+.1f} points [unadjusted 95% CI {low:+.1f}, {high:+.1f}], p = {p:.3g}, adjusted p = {p_adj:.3g}"
            if p_adj < alpha:
                found += 1
                lines.append(f"- {what}: a significant {'gain' if d > 0 else 'loss'} of {size}.")
            else:
                if low < 0 < high:
                    bound = (f"a gain larger than {high:.1f} points, and a loss larger than {-low:.1f}, are ruled out by "
                             "the unadjusted 95% interval")
                elif p < alpha:
                    bound = "significant alone, but not once adjusted for the differences reported"
                else:  # the interval misses 0 while the exact test, more conservative, stays above alpha
                    bound = ("the unadjusted interval excludes no change, but the exact test does not reach the threshold: "
                             "borderline")
                detectable = r.get(f"detectable_{suffix}")
                power = ("" if detectable is None or detectable != detectable else
                         f"; these questions detect {100 * detectable:.1f} points with 80% power, given the "
                         "disagreement observed here")
                lines.append(f"- {what}: no significant difference, {size}: {bound}{power}.")
    if not tested:
        return "No paired test yet: it needs the base model and another model (or a RAG run) on the same questions."
    split = ", ".join(f"{n} {family}" for family, n in sorted(families.items(), key=lambda f: f[0] != PRIMARY_FAMILY))
    head = (f"{found} of {tested} paired differences have a Holm-adjusted p < {alpha} ({raw} unadjusted; each adjusted "
            f"within its family: {split}). Each difference, with what it shows:")
    return "\n".join([head, *lines])


def letter_table(answers: dict, evaluation: str = "letter"):
    """Share of each answer letter: the gold answers and each model's predictions on ``evaluation``
    (rows A-E and invalid; columns gold, then the models)."""

    got = {model: rows for (model, ev), rows in answers.items() if ev == evaluation}
    if not got:
        return pd.DataFrame()
    first = next(iter(got.values()))
    table = pd.concat({m: evaluate.letter_distribution(rows)["predicted"] for m, rows in got.items()}, axis=1)
    table.insert(0, "gold", evaluate.letter_distribution(first)["gold"])
    return table


def section_table(answers: dict, questions, evaluation: str = "letter", top: int = 8):
    """Accuracy per section (``meta_info``) for each model on ``evaluation``: the ``top`` largest
    sections of ``questions``, labelled with their sizes."""

    sections = {q.id: q.meta_info for q in questions}
    largest = Counter(sections.values()).most_common(top)  # ties: first seen first
    columns = {}
    for (model, ev), rows in answers.items():
        if ev == evaluation:
            t = evaluate.by_section([{**r, "meta_info": sections[r["id"]]} for r in rows]).set_index("section")
            columns[model] = t["accuracy"]
    if not columns:
        return pd.DataFrame()
    table = pd.DataFrame(columns).reindex([name for name, _ in largest])
    table.index = [f"{name} (n={n})" for name, n in largest]
    return table


def device_line(device: dict, runtime: dict | None = None) -> str:
    """The manifest's machine in words: ``cuda: 2 x NVIDIA A10G (compute capability 8.6); training
    bf16, models in bfloat16`` or ``cpu: x86_64, 2 threads; training fp32, models in float32``."""
    runtime = runtime or {}
    if device.get("device") == "cuda":
        count = device.get("count") or 1
        where = f"cuda: {f'{count} x ' if count > 1 else ''}{device.get('name')}"
        if runtime.get("compute_capability"):
            where += f" (compute capability {runtime['compute_capability']})"
    else:
        where = f"{device.get('device')}: {device.get('name') or 'unknown'}, {device.get('threads')} threads"
    if runtime.get("train_precision"):
        where += f"; training {runtime['train_precision']}, models in {runtime.get('eval_dtype')}"
    return where


def manifest_summary(cfg):
    """The run at a glance, from ``manifest.json``: profile, models, data, code version, machine,
    library versions and when each notebook last ran."""
    m = json.loads((cfg.out / "manifest.json").read_text(encoding="utf-8"))
    git = m.get("git", {})
    device = m.get("torch_device", {})
    rows = {
        "profile": f"{m['profile']} ({m['profile_file']})",
        "base model": m.get("base_model"),
        "MedQA data": cfg["data.medqa_dir"],
        "embedder (RAG)": cfg.embedder,
        "splits": ", ".join(f"{role} {spec}" for role, spec in cfg["data.splits"].items()),
        "eval questions": f"{cfg['data.splits.eval']}, first {cfg['eval.max_questions'] or 'all'} (generated answers: "
                          f"first {'all' if cfg['eval.generate_questions'] is None else cfg['eval.generate_questions']})",
        "git commit": f"{(git.get('commit') or 'unknown')[:12]}{' + uncommitted changes' if git.get('dirty') else ''}",
        "device": device_line(device, m.get("runtime", {})),
        "settings overridden": ", ".join(f"{k} (from {v['from']})" for k, v in m.get("overrides", {}).items())
        if isinstance(m.get("overrides"), dict) else "",
    }
    rows.update({f"version: {k}": v for k, v in m.get("packages", {}).items()
                 if k in ("python", "torch", "transformers", "peft", "trl", "sentence-transformers", "bm25s", "vllm")})
    rows.update({f"ran: {name}": info.get("time") for name, info in sorted(m.get("notebooks", {}).items())})
    return pd.Series(rows, name="run").to_frame()


def steps_note(off) -> str:
    """10's note on the steps a profile turns off (``off``: :func:`steps.table`), markdown: how many, and the table."""
    if not len(off):
        return "**Every step of the series is on** in this profile: nothing below is missing by choice."
    return (f"**{len(off)} step{'s are' if len(off) > 1 else ' is'} off in this profile** (beside each: the setting that "
            "turns it on, or what this environment lacks, such as llama.cpp): their results are missing below by choice "
            "or for want of a tool, not by failure.\n\n" + markdown_table(off))


def markdown_table(table, digits: int = 3) -> str:
    """A pandas frame as a GitHub markdown table (floats rounded, NaN left empty)."""
    def cell(v):
        if isinstance(v, float):
            return "" if v != v else f"{v:.{digits}f}"
        return str(v)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _pct(v) -> str:
    return "" if v != v else f"{100 * v:.1f}"


def _difference(row, suffix: str) -> str:
    """``+2.9 [-2.0, +7.8], p = 0.28, adjusted 1 (exploratory)`` (points; the interval unadjusted, the adjusted p
    with its Holm family), or ``—`` where the row has no such comparison."""
    p = row.get(f"p_{suffix}")
    if p is None or p != p:
        return "—"
    d, low, high = (100 * row[f"diff_{suffix}{end}"] for end in ("", "_low", "_high"))
    return (f"{d:+.1f} [{low:+.1f}, {high:+.1f}], p = {p:.2g}, adjusted {row[f'p_adj_{suffix}']:.2g} "
            f"({row[f'family_{suffix}']})")


READABLE_COLUMNS = ("model", "reading", "n", "accuracy [95% CI]",
                    "Δ vs base [unadjusted 95% CI], p, Holm-adjusted p (family)",
                    "Δ vs start model [unadjusted 95% CI], p, Holm-adjusted p (family)",
                    "Δ vs no passages [unadjusted 95% CI], p, Holm-adjusted p (family)",
                    "detectable Δ (80% power, from the observed disagreement)", "pre-registered")


def readable_frame(table) -> pd.DataFrame:
    """:func:`results_table` as a reader wants it: accuracy [95% CI] in percent, each difference in points with its
    (unadjusted) interval, p and Holm-adjusted p with the family it is adjusted in (``primary``: the pre-registered
    comparisons among themselves; ``exploratory``), the detectable difference (from the disagreement observed in
    this run; of the row's nearest comparison: without passages, else with the start model, else with the base; empty
    where that one has none: no question discordant), the
    pre-registered comparison a row carries, and the baselines as rows of their own
    (``READABLE_COLUMNS``; every cell text but ``n``)."""
    rows = []
    for _, r in table.iterrows():
        # the nearest comparison the row has (.get: a table written before vs_start has no such columns); its
        # detectable difference, empty where none is (no question discordant), never another comparison's
        nearest = next((s for s in ("vs_no_rag", "vs_start", "vs_base") if (p := r.get(f"p_{s}")) is not None and p == p),
                       None)
        detectable = r[f"detectable_{nearest}"] if nearest else float("nan")
        rows.append((r["model"], r["evaluation"], int(r["n"]),
                     f"{_pct(r['accuracy'])} [{_pct(r['ci_low'])}, {_pct(r['ci_high'])}]",
                     *(_difference(r, s) for s in ("vs_base", "vs_start", "vs_no_rag")), _pct(detectable),
                     r["primary"] if isinstance(r["primary"], str) else ""))
    return pd.DataFrame(rows, columns=list(READABLE_COLUMNS))


def readable_results(table) -> str:
    """:func:`readable_frame` as markdown. ``python -m medqa_zh.report markdown outputs/<profile>`` prints it from
    the run's ``10_results.csv`` (docs/results-cpu.md's tables are made so)."""
    return markdown_table(readable_frame(table))


def readable_checks(checks) -> str:
    """:func:`primary_checks` as markdown: each pre-registered comparison on each question set, in points (the
    interval and p unadjusted: each a check of one difference)."""
    lines = ["| comparison | questions | n | Δ [unadjusted 95% CI] | p (unadjusted) |", "|---|---|---|---|---|"]
    for _, r in checks.iterrows():
        lines.append(f"| {r['comparison']} | {r['set']} | {int(r['n'])} | {100 * r['diff']:+.1f} "
                     f"[{100 * r['diff_low']:+.1f}, {100 * r['diff_high']:+.1f}] | {r['p']:.2g} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- reports/index.html (run_all.sh)

_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,td:nth-child(2),th{text-align:left}.smoke{padding:10px;border:2px solid #c00;background:#fee;
font-weight:bold}.failed{color:#b00;font-weight:bold}figure{display:inline-block;margin:8px;vertical-align:top}
figure img{max-width:520px;border:1px solid #ddd}figcaption{font-size:85%;color:#555}
#verdict li{margin:.4em 0;line-height:1.45}"""


def record_timing(out_dir, notebook: str, seconds: float, status: str) -> Path:
    """Keep one notebook's wall time and status (ok | failed) in ``reports/timings.json``."""
    path = Path(out_dir) / "reports" / "timings.json"
    timings = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    timings[notebook] = {"seconds": round(float(seconds), 1), "status": status,
                         "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    return files.write_text(path, json.dumps(timings, indent=1))


def _both(english: str, chinese: str) -> str:
    """A heading in both languages: English, then Chinese (marked as such, so browsers pick a Chinese font)."""
    return f"{english} · <span lang='zh-CN'>{chinese}</span>"


READING_NOTE = ("Accuracy in percent with its 95% interval; each Δ in percentage points, paired on the same "
                "questions (against the base model, the model it was trained from (grpo: merged), or the same model "
                "without passages), with its unadjusted 95% interval (one comparison at a time), p (exact McNemar) and "
                "p adjusted by Holm within its family: primary (the pre-registered comparisons, among themselves; the "
                "verdict's) or exploratory (every other difference, as a family of its own); the detectable Δ is the "
                "smallest difference these questions find 80% of the time, given how often the two readings disagree "
                "in this run (the observed disagreement, not a share planned before the run). The baselines are rows "
                "of their own (chance, always the commonest training letter).")
RESULTS_TABLE = "10_results"  # results_table as 10 writes it: .csv and .md (the index shows it)
PRIMARY_TABLE = "10_primary"  # primary_checks as 10 writes it: .csv
VERDICT_TEXT = "10_verdict"  # verdict as 10 writes it: .md (the index opens with it)


def verdict_html(out_dir) -> str:
    """The index's first section: 10's verdict (``tables/10_verdict.md``, :data:`VERDICT_TEXT`) rendered from
    markdown (CommonMark; raw HTML in it is escaped, not passed through), or one line saying 10 has not written it."""
    path = Path(out_dir) / "tables" / f"{VERDICT_TEXT}.md"
    head = f"<section id='verdict'><h2>{_both('Verdict', '结论')}</h2>"
    if not path.is_file():
        return head + f"<p>{_both('No verdict yet: 10_report writes it.', '还没有结论：由 10_report 生成。')}</p></section>"
    return head + MarkdownIt("commonmark", {"html": False}).render(path.read_text(encoding="utf-8")) + "</section>"


def write_index(out_dir, notebooks: list[str]) -> Path:
    """``reports/index.html`` of one profile's outputs: 10's verdict in words first (:func:`verdict_html`), the
    results table of 10, the run (manifest), every notebook of the series with its status, wall time and HTML
    report, and 10's figures.
    Headings are in English and Chinese. Links are relative, so the folder can be copied or served as it is."""
    out = Path(out_dir)
    reports = out / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    timings_path = reports / "timings.json"
    timings = json.loads(timings_path.read_text(encoding="utf-8")) if timings_path.is_file() else {}
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    profile = manifest.get("profile", out.name)
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>MedQA-zh · {html.escape(profile)}"
             f"</title><style>{_STYLE}</style></head><body><h1>MedQA-zh · {_both('profile', '配置')} "
             f"<code>{html.escape(profile)}</code></h1>"]
    if manifest.get("settings", {}).get("smoke", profile == "smoke"):
        parts.append(f"<p class='smoke'>⚠ {html.escape(SMOKE_WARNING)}</p>")
    parts.append(verdict_html(out))  # the reader's first question: what did the run find?
    planted_csv = out / "tables" / planted.TABLE
    if planted_csv.is_file():  # smoke: the planted world's effects beside what the run found
        found = pd.read_csv(planted_csv, keep_default_na=False, na_values=[""])
        parts.append(f"<h2>{_both('What was planted, and what this run found', '埋设的效应与本次发现')}</h2>")
        parts.append(planted.readable(found).to_html(index=False, classes="planted", border=0))
    table_csv = out / "tables" / f"{RESULTS_TABLE}.csv"
    parts.append(f"<h2>{_both('Results', '结果')}</h2>")
    if table_csv.is_file():
        table = pd.read_csv(table_csv, keep_default_na=False, na_values=[""])
        parts.append(f"<p>{READING_NOTE}</p>")
        parts.append(readable_frame(table).to_html(index=False, classes="results", border=0))
        parts.append(f"<p>{_both('Every column, raw', '全部列（原始数据）')}: "
                     f"<a href='../tables/{RESULTS_TABLE}.csv'>{RESULTS_TABLE}.csv</a> · "
                     f"<a href='../tables/{RESULTS_TABLE}.md'>{RESULTS_TABLE}.md</a></p>")
    else:
        parts.append(f"<p>{_both('No results table yet: it is written by 10_report.', '还没有结果表：由 10_report 生成。')}</p>")
    total = sum(t["seconds"] for name, t in timings.items() if name in notebooks)
    parts.append(f"<h2>{_both('Notebooks', '笔记本')}</h2>")
    if manifest:
        git = manifest.get("git", {})
        commit = (git.get("commit") or "unknown")[:12] + (" (uncommitted changes)" if git.get("dirty") else "")
        parts.append(f"<p>Base model <code>{html.escape(str(manifest.get('base_model')))}</code> · commit "
                     f"<code>{html.escape(commit)}</code> · last notebook started {html.escape(manifest.get('time', ''))}"
                     f" · <a href='../manifest.json'>manifest.json</a></p>")
    parts.append(f"<table><tr><th>{_both('notebook', '笔记本')}</th>"
                 f"<th>{_both('status', '状态')}</th><th>{_both('wall time (s)', '用时（秒）')}</th>"
                 f"<th>{_both('report', '报告')}</th></tr>")
    for name in notebooks:
        t = timings.get(name)
        report = reports / f"{name}.html"
        link = f"<a href='{name}.html'>{name}.html</a>" if report.is_file() else "—"
        status = "not run" if t is None else t["status"]
        css = " class='failed'" if status == "failed" else ""
        parts.append(f"<tr><td>{name}</td><td{css}>{status}</td><td>{'' if t is None else t['seconds']}</td>"
                     f"<td>{link}</td></tr>")
    parts.append(f"<tr><th>{_both('total', '合计')}</th><th></th><th>{total:.0f}</th><th></th></tr></table>")
    figures = sorted((out / "figures").glob("10_*.png"))
    if figures:
        parts.append(f"<h2>{_both('Figures', '图')}</h2>")
        parts += [f"<figure><a href='../figures/{f.name}'><img src='../figures/{f.name}' alt='{f.stem}'></a>"
                  f"<figcaption>{f.stem}</figcaption></figure>" for f in figures]
    parts.append("</body></html>")
    return files.write_text(reports / "index.html", "\n".join(parts))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m medqa_zh.report",
                                description="index: write outputs/<profile>/reports/index.html (run_all.sh calls this); "
                                            "markdown: print 10's results and pre-registered checks as readable "
                                            "markdown tables (what docs/results-cpu.md shows)")
    p.add_argument("command", choices=["index", "markdown"])
    p.add_argument("out_dir", help="outputs/<profile>")
    p.add_argument("--notebooks", default="notebooks", help="folder of the series' NN_*.ipynb")
    p.add_argument("--timing", nargs=3, metavar=("NOTEBOOK", "SECONDS", "STATUS"),
                   help="record one notebook's wall time and status (ok | failed) first")
    a = p.parse_args(argv)
    if a.command == "markdown":
        tables = Path(a.out_dir) / "tables"
        for name, render in ((RESULTS_TABLE, readable_results), (PRIMARY_TABLE, readable_checks)):
            path = tables / f"{name}.csv"
            if not path.is_file():
                raise SystemExit(f"{path} is missing: run notebook 10 for this profile first")
            print(render(pd.read_csv(path, keep_default_na=False, na_values=[""])))
        return
    if a.timing:
        record_timing(a.out_dir, a.timing[0], float(a.timing[1]), a.timing[2])
    names = sorted(f.stem for pattern in ("[0-9][0-9]_*.ipynb", "[0-9][0-9][a-z]_*.ipynb")  # 04_merge, 04b_grpo
                   for f in Path(a.notebooks).glob(pattern))
    print(write_index(a.out_dir, names))


if __name__ == "__main__":
    main()
