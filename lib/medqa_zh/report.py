"""Tables and plots for the notebooks (saved under ``outputs/<profile>/figures``)."""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib import font_manager

# Fonts with Simplified Chinese glyphs, most common first (Linux, macOS, Windows)
CJK_FONTS = (
    "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "Source Han Sans CN", "WenQuanYi Micro Hei",
    "WenQuanYi Zen Hei", "PingFang SC", "Heiti SC", "Hiragino Sans GB", "Microsoft YaHei", "SimHei",
    "AR PL UMing CN", "Noto Sans CJK JP",
)
_font_checked = False


def use_cjk_font() -> str | None:
    """Make matplotlib draw Chinese: put the first installed CJK font first in ``font.sans-serif``.

    Returns the font's name, or None (with one warning saying how to install one) when the
    machine has none; labels then show empty boxes but nothing fails.
    """
    global _font_checked
    installed = {f.name for f in font_manager.fontManager.ttflist}
    for name in CJK_FONTS:
        if name in installed:
            plt.rcParams["font.sans-serif"] = [name, *(f for f in plt.rcParams["font.sans-serif"] if f != name)]
            plt.rcParams["axes.unicode_minus"] = False
            return name
    if not _font_checked:
        warnings.warn(
            "no Chinese font found, so Chinese labels in plots show as boxes. Install one, e.g. "
            "`apt install fonts-noto-cjk` (Debian/Ubuntu) or `brew install --cask font-noto-sans-cjk-sc` "
            "(macOS), then restart the kernel.",
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
    import numpy as np

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
            ax.plot(*zip(*train), color=color, lw=1.2, label=f"{name}: train")
        if evals:
            ax.plot(*zip(*evals), color=color, ls="--", marker="o", ms=4, label=f"{name}: eval (held out)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over answer tokens)")
    ax.set_title("SFT loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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


def plot_accuracy(summary, label: str = "condition"):
    """Accuracy with its 95% interval as error bars, one bar per row of ``summary`` (columns
    ``model``, ``label``, ``accuracy``, ``ci_low``, ``ci_high``), grouped by model."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    models = list(dict.fromkeys(summary["model"]))
    conditions = list(dict.fromkeys(summary[label]))
    width = 0.8 / len(conditions)
    for j, cond in enumerate(conditions):
        rows = summary[summary[label] == cond].set_index("model").reindex(models)
        x = [m + j * width for m in range(len(models))]
        err = [rows["accuracy"] - rows["ci_low"], rows["ci_high"] - rows["accuracy"]]
        ax.bar(x, rows["accuracy"], width, yerr=err, capsize=3, label=str(cond), color=f"C{j}")
    ax.set_xticks([m + 0.4 - width / 2 for m in range(len(models))], models)
    ax.set_ylabel("accuracy (95% interval)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig
