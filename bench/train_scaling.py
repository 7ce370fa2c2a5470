"""Data-parallel training on this machine: examples per second in 1 and in 2 processes, side by side.

    python bench/train_scaling.py [--profile cpu] [--mode lora] [--processes 1,2] [--steps 6] [--per-device 4]

Each configuration is one real run of ``python -m medqa_zh.train`` (an ``accelerate launch`` of N
processes when N > 1, as the notebooks start it) with the same global batch: ``--per-device`` examples
per micro-batch, and the gradient accumulation chosen so that per-device x accumulation x processes is
the same for every N (the largest N accumulates once). The runs train the profile's model on its splits
(MEDQA_DIR, MEDQA_BASE_MODEL as for the notebooks) but write into a project folder of their own
(``--work``), never into outputs/. The eval loss is computed once, at step 0, on 8 questions.

Reported per configuration: the median optimizer step (timed by the main process; the processes step
together), examples and tokens per second of the global batch, the wall time of the whole run (start-up,
loading, the eval, saving) and the main process's peak memory. On a CPU the N processes share the cores
(the launch gives each cores / N threads), so the ratio says what splitting the same cores gains or costs;
on GPUs each process has a GPU of its own.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prepare_project(work: Path, profile: str) -> Path:
    """A project of its own (the profiles, pyproject.toml) with the profile's clean splits written, as 01 writes them."""
    from medqa_zh import config, data

    shutil.copytree(REPO / "profiles", work / "profiles", dirs_exist_ok=True)  # today's, in a reused --work too
    shutil.copy(REPO / "pyproject.toml", work / "pyproject.toml")
    os.environ["MEDQA_ROOT"] = str(work)
    data.ensure_splits(config.setup(profile))
    return work


# what every bench run sets: a short run, started afresh, its eval loss once (at step 0, on 8 questions), no checkpoint
SHORT_RUN = {"train.resume": False, "train.eval_questions": 8, "train.eval_steps": 10_000, "train.save_steps": 10_000,
             "train.logging_steps": 1}


def train_in(work: Path, profile: str, mode: str, overrides: dict, label: str) -> tuple[dict, float]:
    """Train ``mode`` once with ``python -m medqa_zh.train`` in the project ``work`` (:func:`prepare_project`), with
    :data:`SHORT_RUN` and ``overrides``; its ``run.json`` and the wall time of the whole process. Stops the bench with
    the run's output when it fails (``label`` says which)."""
    cmd = [sys.executable, "-m", "medqa_zh.train", "--profile", profile, "--mode", mode,
           *(f"{k}={json.dumps(v)}" for k, v in {**SHORT_RUN, **overrides}.items())]
    env = {**os.environ, "MEDQA_ROOT": str(work),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "lib"), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{label} failed:\n{(done.stdout + done.stderr)[-4000:]}")
    from medqa_zh import runs

    return runs.read_run(work / "outputs" / profile / "models" / mode), wall


def run_one(work: Path, profile: str, mode: str, processes: int, accumulation: int, per_device: int, steps: int) -> dict:
    overrides = {"train.launch.num_processes": processes, "train.per_device_train_batch_size": per_device,
                 "train.gradient_accumulation_steps": accumulation, "train.max_steps": steps}
    run, wall = train_in(work, profile, mode, overrides, f"{processes} process(es)")
    step = run["median_step_seconds"]
    return {"processes": processes, "per_device": per_device, "accumulation": accumulation,
            "examples_per_step": run["examples_per_step"], "threads": run["torch_threads"], "step_s": step,
            "examples_per_s": run["examples_per_step"] / step, "tokens_per_s": run["tokens_per_second"],
            "wall_s": wall, "peak_gib": run["peak_memory_gib"], "parallelism": run["parallelism"],
            "device": run["device"], "precision": run["precision"], "steps": run["optimizer_steps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--mode", choices=("lora", "full"), default="lora")
    parser.add_argument("--processes", default="1,2", help="process counts to compare, e.g. 1,2")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per configuration (the median is reported)")
    parser.add_argument("--per-device", type=int, default=4, help="examples per micro-batch in each process")
    parser.add_argument("--work", type=Path, default=None, help="the runs' project folder (default: a temporary one)")
    opts = parser.parse_args()
    counts = sorted({int(n) for n in opts.processes.split(",")})
    largest = counts[-1]
    if any(largest % n for n in counts):
        parser.error(f"--processes {opts.processes}: each count must divide the largest, for one global batch")
    work = opts.work or Path(tempfile.mkdtemp(prefix="medqa-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    prepare_project(work, opts.profile)

    results = []
    for n in counts:
        print(f"{n} process(es): training {opts.steps} steps ...", file=sys.stderr, flush=True)
        results.append(run_one(work, opts.profile, opts.mode, n, largest // n, opts.per_device, opts.steps))
        print(f"{n} process(es): median step {results[-1]['step_s']:.2f} s", file=sys.stderr, flush=True)

    first = results[0]
    print(f"\n{opts.mode} on the {opts.profile} profile, {first['device']} ({first['precision']}), "
          f"{first['examples_per_step']} examples per optimizer step, median of {opts.steps} steps\n")
    print("| processes | per device x accumulation | threads per process | parallelism | median step (s) | "
          "examples/s | tokens/s | whole run (s) | peak memory, main process (GiB) |")
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['processes']} | {r['per_device']} x {r['accumulation']} | {r['threads']} | {r['parallelism']} | "
              f"{r['step_s']:.2f} | {r['examples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['wall_s']:.0f} | "
              f"{r['peak_gib']:.2f} |")
    print()
    for r in results[1:]:
        print(f"{r['processes']} vs {first['processes']} process(es): examples/s x{r['examples_per_s'] / first['examples_per_s']:.2f}, "
              f"whole run x{r['wall_s'] / first['wall_s']:.2f} (time)")


if __name__ == "__main__":
    main()
