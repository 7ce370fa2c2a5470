"""Which LoRA recipe teaches the model something a debiased evaluation can see? A measured study.

    MEDQA_DIR=... MEDQA_BASE_MODEL=... python bench/recipes.py [--questions 200] [--variants a,b] [--out DIR]
                                                               [--profile cpu] [--fresh]

Each variant is the ``cpu`` profile's LoRA run with a few ``train`` settings changed (``VARIANTS``;
every variant pins the settings it does not change to the study's reference, ``REFERENCE``, so a
later change of the profile's defaults does not change what a row means). Per variant, in a fresh
process: train (``medqa_zh.train``, as notebook 02 does), then merge the adapter in memory and score
the first ``--questions`` questions of the **validation** split under every cyclic rotation of their
options (``medqa_zh.debias.rotation_scores``). ``base`` is the untrained model, scored the same way.
The study chooses a recipe, so it never looks at the eval split: the numbers the series reports come
from questions that took no part in the choice.

One table, one row per variant: training wall time (evaluation-loss passes included) and the
median optimizer step, examples seen, plain and debiased accuracy
with 95% Wilson intervals, consistency (right under every rotation), the difference of the debiased
accuracy from the base's with its 95% paired interval and exact McNemar p, and the *letter spread*: the largest gap, over the letters,
between the share of plain predictions on a letter and the share of gold answers on it (0: the
predictions spread like the answers; 0.8: everything on one letter).

Results are kept under ``--out`` (default ``outputs/recipes``): ``<variant>.json`` (summary and the
training measurements) and ``<variant>-rotations.jsonl`` (letter scores). A rerun skips finished
variants, so an interrupted study resumes; ``--fresh`` starts over. The variants run one after
another in this one invocation, so their times compare like with like on this machine.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

# the reference recipe: the cpu profile before this study (its LoRA run learned a letter prior)
REFERENCE = {
    "train.shuffle_options": False, "train.completion": "letter", "train.loss_on": "completion",
    "train.max_steps": 24, "train.learning_rate": 2.0e-4,
}
VARIANTS = {
    "base": None,  # no training
    "reference": {},
    "shuffle": {"train.shuffle_options": True},
    "shuffle+text": {"train.shuffle_options": True, "train.completion": "letter_text"},
    "shuffle+text+prompt-loss": {"train.shuffle_options": True, "train.completion": "letter_text", "train.loss_on": "all"},
    "shuffle+text+lr5e-4": {"train.shuffle_options": True, "train.completion": "letter_text", "train.learning_rate": 5.0e-4},
    "shuffle+text+64steps": {"train.shuffle_options": True, "train.completion": "letter_text", "train.max_steps": 64},
}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "+-" else "_" for c in name)


def overrides(variant: str) -> dict:
    return {**REFERENCE, **VARIANTS[variant]}


def run_one(variant: str, questions: int, out: Path, profile: str = "cpu") -> dict:
    """Train one variant (unless ``base``) and score its rotations; writes and returns the summary."""
    from medqa_zh import config, data, debias, models, results, train

    cfg = config.setup(profile, overrides(variant) if VARIANTS[variant] is not None else None)
    data.ensure_splits(cfg)
    measured = {}
    if VARIANTS[variant] is not None:
        folder = out / _slug(variant)
        run = train.prepare(cfg, "lora", out_dir=folder)
        measured = train.train(run, resume=True)
        del run
    dtype, device = models.eval_dtype(cfg), models.eval_device(cfg)
    model = models.load_model(cfg.base_model, dtype, setting="MEDQA_BASE_MODEL", device=device)
    if VARIANTS[variant] is not None:
        # merged in memory for scoring: the same function as base + adapter (04 checks it), and an
        # unmerged adapter on every linear layer doubles the scoring time on a CPU
        model = models.load_adapter(model, out / _slug(variant), cfg.base_model).merge_and_unload()
    tokenizer = models.load_tokenizer(cfg.base_model, setting="MEDQA_BASE_MODEL")
    qs = data.load_split(cfg, "validation")[:questions]  # choosing: never the eval split
    t0 = time.perf_counter()
    score = lambda batch: debias.rotation_scores(model, tokenizer, batch, progress=False)  # noqa: E731
    rows = results.run_cached(out / f"{_slug(variant)}-rotations.jsonl", qs, score,  # a rerun resumes
                               batch_size=int(cfg["eval.batch_size"]), desc=f"{variant}: rotations")
    scoring = time.perf_counter() - t0
    result = {
        "variant": variant, "overrides": VARIANTS[variant], "split": "validation", "summary": debias.summary(rows),
        "scoring_seconds": scoring, "train_seconds": measured.get("wall_seconds"),
        "examples_seen": measured.get("optimizer_steps", 0) * measured.get("examples_per_step", 0),
        "padding_share": measured.get("padding_share"), "last_eval_loss": measured.get("last_eval_loss"),
        "median_step_seconds": measured.get("median_step_seconds"),
    }
    (out / f"{_slug(variant)}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    return result


def spread(rows: list[dict], method: str) -> float:
    """Largest |predicted share − gold share| over the letters."""
    from medqa_zh import debias, evaluate

    shares = evaluate.letter_distribution(debias.results(rows, method), "".join(sorted(rows[0]["letters"])))
    return float((shares["predicted"] - shares["gold"]).abs().max())


def _step_seconds(out: Path, variant: str, meta: dict) -> float | None:
    """Median optimizer-step time: from the summary, else from the variant's run.json."""
    if meta.get("median_step_seconds") or VARIANTS[variant] is None:
        return meta.get("median_step_seconds")
    from medqa_zh import runs

    folder = out / _slug(variant)
    return runs.read_run(folder).get("median_step_seconds") if (folder / runs.RUN_FILE).is_file() else None


def table(out: Path, variants: list[str]):
    import pandas as pd

    from medqa_zh import debias, evaluate, results

    rotations = {}
    for v in variants:
        path = out / f"{_slug(v)}-rotations.jsonl"
        if path.is_file():
            rotations[v] = results.read(path)
    rows = []
    for v, got in rotations.items():
        meta = json.loads((out / f"{_slug(v)}.json").read_text(encoding="utf-8"))
        s = meta["summary"]
        test = (evaluate.mcnemar(debias.results(rotations["base"], "debiased"), debias.results(got, "debiased"))
                if "base" in rotations and v != "base" else None)
        rows.append({
            "variant": v,
            "train (min)": f"{meta['train_seconds'] / 60:.1f}" if meta["train_seconds"] else "—",
            "step (s)": f"{step:.1f}" if (step := _step_seconds(out, v, meta)) else "—",
            "examples": meta["examples_seen"],
            "plain": f"{s['plain']:.1%} [{s['plain_ci_low']:.1%}, {s['plain_ci_high']:.1%}]",
            "debiased": f"{s['debiased']:.1%} [{s['debiased_ci_low']:.1%}, {s['debiased_ci_high']:.1%}]",
            "consistency": f"{s['consistency']:.1%}",
            "Δ debiased vs base [95% CI]": "—" if test is None else
            f"{test['difference']:+.1%} [{test['diff_ci_low']:+.1%}, {test['diff_ci_high']:+.1%}]",
            "McNemar p (debiased vs base)": "—" if test is None else f"{test['p_value']:.3f}",
            "letter spread (plain)": f"{spread(got, 'plain'):.2f}",
            "letter spread (debiased)": f"{spread(got, 'debiased'):.2f}",
            "n": s["n"],
        })
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=200, help="validation questions scored under every rotation")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("outputs/recipes"))
    parser.add_argument("--profile", default="cpu", help="the profile whose data, model and train settings it starts from")
    parser.add_argument("--fresh", action="store_true", help="delete earlier results and start over")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if args.one:
        run_one(args.one, args.questions, args.out, args.profile)
        return
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    if "base" not in variants:
        variants.insert(0, "base")  # McNemar needs it
    for v in variants:
        if (args.out / f"{_slug(v)}.json").is_file():
            print(f"{v}: done earlier, kept")
            continue
        print(f"=== {v}: {overrides(v) if VARIANTS[v] is not None else 'no training'}", flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--one", v, "--questions", str(args.questions), "--out", str(args.out),
                        "--profile", args.profile],
                       check=True)
        print(f"=== {v}: {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    from medqa_zh import report

    text = report.markdown_table(table(args.out, variants))
    (args.out / "recipes.md").write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
