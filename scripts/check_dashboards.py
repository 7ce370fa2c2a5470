"""Read a finished run's dashboards back with each tool's own reader and compare every point with the run's record.

TensorBoard's event files (``models/<mode>/tensorboard/``) are read with its ``EventAccumulator``, trackio's store
(``outputs/<profile>/trackio/``) with its ``SQLiteStorage``, in a process of its own (trackio fixes its store when
it is first imported). Each logged series of ``train_log.jsonl``, and for LoRA the learning curve of
``tables/02_learning_curve.csv``, must appear in each dashboard the run reported to, at the same steps, with the
same values (to float32's precision, TensorBoard's).

    .venv/bin/python scripts/check_dashboards.py --profile cpu [--mode lora]

Prints one line per series and dashboard; exit status 1 when any differs or is missing.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from medqa_zh import config, dashboards, models, results, runs  # noqa: E402

SERIES = {"train/loss": "loss", "eval/loss": "eval_loss", "train/learning_rate": "learning_rate",
          "train/grad_norm": "grad_norm"}


def same(seen: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    return [s for s, _ in seen] == [s for s, _ in expected] and all(
        abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(seen, expected, strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=os.environ.get("MEDQA_PROFILE", "smoke"))
    parser.add_argument("--mode", choices=("lora", "full"), default="lora")
    args = parser.parse_args(argv)
    cfg = config.load(args.profile)
    folder = models.folder(cfg, args.mode)
    key = runs.read_run_key(folder)
    if key is None:
        sys.exit(f"{folder} holds no run (no checkpoints/{runs.SETTINGS_FILE}): train it first (notebook 02 or 03)")
    watch = dashboards.watch(cfg, folder)  # where the dashboards keep this run; those that hold it are checked
    log = runs.read_log(folder)
    series = {tag: [(r["step"], r[k]) for r in log if k in r] for tag, k in SERIES.items()}
    curve_path = cfg.out / "tables" / results.CURVE_TABLE
    curve = pd.read_csv(curve_path) if args.mode == "lora" and curve_path.is_file() else pd.DataFrame()
    curve_series = {tag: list(zip(curve["step"].astype(int), curve[column], strict=True)) for column, tag in
                    dashboards.CURVE_TAGS.items()} if len(curve) else {}
    name = dashboards.run_name(key)
    shown = {}
    if watch.tensorboard.is_dir():
        shown["tensorboard"] = ({tag: dashboards.read_tensorboard(watch.tensorboard, tag) for tag in series},
                                {tag: dashboards.read_tensorboard(watch.tensorboard / dashboards.CURVE_DIR, tag)
                                 for tag in curve_series})
    if watch.store.joinpath(f"{watch.project}.db").is_file():
        logged = dashboards.read_trackio(watch.store, watch.project)
        pick = lambda rows, tag: [(r["step"], r[tag]) for r in rows if tag in r]  # noqa: E731
        shown["trackio"] = ({tag: pick(logged.get(name, []), tag) for tag in series},
                            {tag: pick(logged.get(name + "-curve", []), tag) for tag in curve_series})
    if not shown:
        sys.exit(f"no dashboard holds {folder}'s run: train it with train.report_to tensorboard or trackio")
    bad = 0
    for tool, (training, curve_points) in shown.items():
        for tag, expected in [*series.items(), *curve_series.items()]:
            seen = (training | curve_points)[tag]
            ok = same(seen, expected)
            bad += not ok
            print(f"{tool:12s} {tag:28s} {len(expected):3d} points in the record, {len(seen):3d} shown: "
                  f"{'equal' if ok else 'DIFFERENT'}")
    print(f"{args.mode} run {name} ({folder}): {'every point equal' if not bad else f'{bad} series differ'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
