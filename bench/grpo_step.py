"""What one GRPO optimizer step costs on this machine: the answer arm through the project's own code.

    MEDQA_DIR=... python bench/grpo_step.py [--model DIR] [--profile cpu] [--steps 4] [--warmup 1] [--work DIR]
                                            [key=value ...]

One run of ``grpo.prepare()`` + ``grpo.train_run()``, as notebook 04b trains, in a project folder of its own
(``--work``, default a temporary one; never outputs/): the profile's splits are written as 01 writes them, and
``--model`` (default: the profile's base model) is placed, as a link, where 04 leaves the merged SFT model
(``models/merged/``), which GRPO starts from. The settings are :data:`MEASURE` (the answer arm; 2 prompts x 8
generations a step) over the profile's ``grpo`` section, then ``key=value`` overrides on top.

Printed, per step: its seconds, the seconds inside the model's ``generate`` (timed by wrapping the policy's public
``generate``), the completions' mean length (trl's ``completions/mean_length``), the prompt + completion tokens the
step trained on (the change in trl's ``num_tokens``), the mean reward, ``frac_reward_zero_std`` and the KL. Then,
over the steps after ``--warmup``: the median step, the share spent generating, the completions per step, generated
tokens per second of generation, trained tokens per second of step, and the peak memory of training
(``run.json``'s ``peak_memory_gib``), and the machine's load average at the start and the end (other work on a shared
machine slows the steps).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_scaling import prepare_project  # noqa: E402
from train_throughput import override  # noqa: E402

# the measurement: the answer arm, 2 prompts a step of 8 generations each, a few tokens a completion; a fresh run
MEASURE = {"grpo.arm": "answer", "grpo.num_generations": 8, "grpo.per_device_train_batch_size": 16,
           "grpo.gradient_accumulation_steps": 1, "grpo.max_completion_length": 8, "grpo.beta": 0.04,
           "grpo.logging_steps": 1, "grpo.save_steps": 10_000, "grpo.spread_questions": 0, "train.resume": False,
           "train.report_to": "none"}


def timed_generate(model, seconds: list[tuple[int, float]], trainer):
    """Wrap ``model.generate`` (the instance's attribute: trl calls the unwrapped policy's ``generate``) so that each
    call's wall time is kept with the optimizer step it belongs to (``trainer.state.global_step`` + 1)."""
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append((trainer.state.global_step + 1, time.perf_counter() - start))

    model.generate = generate


def per_step(log: list[dict]) -> dict[int, dict]:
    """The last logged row of each step that carries trl's GRPO metrics (``num_tokens``)."""
    rows = {}
    for row in log:
        if "num_tokens" in row:
            rows[row["step"]] = row
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="the start model's folder, placed in models/merged/ (default: the profile's "
                                        "base model)")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps trained")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the medians")
    parser.add_argument("--work", type=Path, default=None, help="the run's project folder (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", type=override, metavar="key=value")
    opts = parser.parse_args()
    if not 0 <= opts.warmup < opts.steps:
        parser.error(f"--warmup {opts.warmup} must leave at least one of --steps {opts.steps} timed")
    temporary = opts.work is None
    work = opts.work or Path(tempfile.mkdtemp(prefix="medqa-grpo-"))
    work.mkdir(parents=True, exist_ok=True)
    prepare_project(work, opts.profile)

    import torch

    from medqa_zh import config, grpo, models, runs

    overrides = {**MEASURE, "grpo.max_steps": opts.steps, **dict(opts.overrides)}
    cfg = config.load(opts.profile, overrides)
    model_dir = Path(opts.model or cfg.base_model).resolve()
    merged = models.folder(cfg, grpo.START)
    if merged.is_symlink() or merged.is_file():
        merged.unlink()
    shutil.rmtree(merged, ignore_errors=True)
    merged.parent.mkdir(parents=True, exist_ok=True)
    merged.symlink_to(model_dir, target_is_directory=True)

    load_at_start = os.getloadavg()  # other work on the machine slows the steps: said beside the numbers
    run = grpo.prepare(cfg)
    s = run.settings
    generation: list[tuple[int, float]] = []
    timed_generate(run.trainer.model, generation, run.trainer)
    metrics = grpo.train_run(run, resume=False)

    log = per_step(runs.read_log(run.out_dir))
    step_seconds = run.log.step_seconds
    gen_seconds = {}
    for step, took in generation:
        gen_seconds[step] = gen_seconds.get(step, 0.0) + took
    completions = metrics["completions_per_step"]
    prompts_per_step = completions // s["num_generations"]
    print(f"\nGRPO, arm {s['arm']}, {opts.profile} profile, {metrics['device']} ({metrics['precision']}, "
          f"{torch.get_num_threads()} threads), start model {model_dir.name}: {prompts_per_step} prompts x "
          f"{s['num_generations']} generations = {completions} completions a step "
          f"({s['per_device_train_batch_size']} x {s['gradient_accumulation_steps']}), max_completion_length "
          f"{s['max_completion_length']}, beta {s['beta']}, loss_type {s['loss_type']}, scale_rewards {s['scale_rewards']}; "
          f"{opts.steps} steps, the first {opts.warmup} left out of the medians\n")
    print("| step | seconds | generate (s) | completion mean length | trained tokens | reward | frac_reward_zero_std | kl |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows, before = [], 0
    for i, took in enumerate(step_seconds, start=1):
        row = log.get(i, {})
        tokens = int(row["num_tokens"] - before) if "num_tokens" in row else None
        before = row.get("num_tokens", before)
        length = row.get("completions/mean_length")
        rows.append({"step": i, "seconds": took, "generate": gen_seconds.get(i), "length": length, "tokens": tokens})
        kl = row.get("kl")
        print(f"| {i} | {took:.2f} | {gen_seconds.get(i, float('nan')):.2f} | {length if length is not None else '—'} | "
              f"{tokens if tokens is not None else '—'} | {row.get('reward', float('nan')):.3f} | "
              f"{row.get('frac_reward_zero_std', float('nan')):.2f} | {kl if kl is not None else '—'} |")
    timed = rows[opts.warmup:]
    step = statistics.median(r["seconds"] for r in timed)
    print(f"\nmedian step (steps {opts.warmup + 1}-{len(rows)}): {step:.2f} s")
    print(f"completions per step: {completions}")
    if all(r["generate"] is not None for r in timed):
        gen = statistics.median(r["generate"] for r in timed)
        print(f"median generate: {gen:.2f} s ({gen / step:.0%} of the step)")
        if all(r["length"] is not None for r in timed):
            generated = sum(r["length"] * completions for r in timed)
            print(f"generated tokens/s: {generated / sum(r['generate'] for r in timed):.1f} (of generate time; "
                  f"{generated / sum(r['seconds'] for r in timed):.1f} of step time)")
        if all(r["tokens"] is not None for r in timed):  # generate reads every prompt, then writes the completions
            print(f"generate, prompt + completion tokens/s: "
                  f"{sum(r['tokens'] for r in timed) / sum(r['generate'] for r in timed):.1f}")
    else:
        print("median generate: not measured (the policy's generate was not called through the wrapper)")
    if all(r["tokens"] is not None for r in timed):
        trained = sum(r["tokens"] for r in timed)
        print(f"trained tokens/s: {trained / sum(r['seconds'] for r in timed):.1f} (prompt + completion tokens, "
              f"{trained / len(timed) / completions:.0f} a completion)")
    print(f"peak memory: {metrics['peak_memory_gib']:.2f} GiB")
    print("load average (1, 5, 15 min) at the start: {:.2f} {:.2f} {:.2f}; at the end: {:.2f} {:.2f} {:.2f}".format(
        *load_at_start, *os.getloadavg()))
    print(json.dumps({"median_step_seconds": step, "completions_per_step": completions, "steps": rows,
                      "peak_memory_gib": metrics["peak_memory_gib"]}))
    if temporary:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
