"""Training throughput through the project's own trainer: today's padded batches vs packed ones, LoRA vs full,
each switch, side by side in one run, with tokens/s, model-FLOPs utilisation (MFU) and peak memory.

    python bench/train_throughput.py [--profile cpu] [--model DIR | --config CONFIG.json [--tokenizer DIR]]
                                     [--modes lora,full] [--variants padded,packed,packed+budget] [--steps 3]
                                     [key=value ...]

Each (mode, variant) is one real run of ``python -m medqa_zh.train`` in a project folder of its own (``--work``,
never outputs/): the profile's recipe and training split (MEDQA_DIR as for the notebooks; the examples in the
order training reads them), ``--steps`` timed optimizer steps after one warm-up step, the eval loss once at step 0 on
8 questions. Variants (``train.*`` overrides on top of the profile and the trailing ``key=value`` ones):

    padded          train.padding_free false, train.tokens_per_device null: per_device_train_batch_size rows,
                    padded to the longest of each micro-batch (the project's batches before packing)
    packed          train.padding_free true: the same micro-batches, each in one row without padding
    padded+budget   train.tokens_per_device auto, unpacked: a step's examples in as few micro-batches as the
                    device's memory allows (fewer, larger launches; padding stays)
    packed+budget   both
    packed+budget+nodropout   and train.lora.dropout 0 (LoRA only: dropout copies every adapted layer's input)

The model: ``--model DIR`` (a model folder, e.g. the stand-in), or ``--config`` a ``config.json`` of any shape,
built here with random weights (no download: a machine without a model hub measures its card before fetching
anything) with the tokenizer of ``--tokenizer`` (default: the profile's base model). Qwen2.5-0.5B-Instruct's
config ships beside this script (``bench/qwen2.5-0.5b-instruct.config.json``). Random weights make the loss
meaningless; speed and memory are the real model's.

Reported per run: the median step, tokens/s over the timed steps (every token of the examples, padding not
counted), MFU (run.json's model FLOPs per token from the model's shape, over one peak for every row: the first
run's, a GPU's data sheet or a matmul measured on this machine), the micro-batches a step, and peak memory. Then each variant over ``padded``
of its mode, and LoRA over full.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_scaling import prepare_project, train_in  # noqa: E402

QWEN_CONFIG = Path(__file__).with_name("qwen2.5-0.5b-instruct.config.json")
VARIANTS = {
    "padded": {"train.padding_free": False, "train.tokens_per_device": None},
    "packed": {"train.padding_free": True, "train.tokens_per_device": None},
    "padded+budget": {"train.padding_free": False, "train.tokens_per_device": "auto"},
    "packed+budget": {"train.padding_free": True, "train.tokens_per_device": "auto"},
    "packed+budget+nodropout": {"train.padding_free": True, "train.tokens_per_device": "auto", "train.lora.dropout": 0.0},
}


def random_model(config_path: Path, tokenizer: str, out: Path) -> Path:
    """A model of ``config_path``'s shape with random weights, saved with ``tokenizer`` into ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from medqa_zh import models

    if (out / "config.json").is_file():
        return out
    config = AutoConfig.for_model(**json.loads(config_path.read_text(encoding="utf-8")))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    models.load_tokenizer(tokenizer, setting="--tokenizer").save_pretrained(tmp)
    tmp.rename(out)
    return out


def run_one(work: Path, profile: str, mode: str, variant: str, steps: int, extra: dict) -> dict:
    overrides = {**extra, **VARIANTS[variant], "train.max_steps": steps + 1, "train.launch.num_processes": 1}
    if mode == "full":
        overrides["train.full.max_steps"] = steps + 1
    run, wall = train_in(work, profile, mode, overrides, f"{mode} {variant}")
    from medqa_zh import runs

    seconds, tokens = run["steps"]["seconds"][1:], run["steps"]["tokens"]  # the first step warms up
    per_second = (tokens[-1] - tokens[0]) / sum(seconds)
    mfu = run["mfu"]
    achieved = per_second * mfu["flops_per_token"] / 1e12
    return {"mode": mode, "variant": variant, "step_s": statistics.median(seconds), "tokens_per_s": per_second,
            "achieved_tflops": achieved, "peak": mfu["peak"]["name"], "peak_tflops": mfu["peak"]["tflops"],
            "micro": runs.micro_batch_text(run["micro_batches"]), "peak_gib": run["peak_memory_gib"], "wall_s": wall,
            "device": run["device"], "precision": run["precision"], "threads": run["torch_threads"],
            "examples_per_step": run["examples_per_step"], "steps": [round(t, 3) for t in seconds],
            "train_loss": run["last_train_loss"]}


def override(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: write key=value, e.g. train.max_length=512")
    return key, yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", help="a model folder (default: the profile's base model)")
    model.add_argument("--config", type=Path, help=f"a config.json to build with random weights, e.g. {QWEN_CONFIG.name}")
    parser.add_argument("--tokenizer", help="with --config: the tokenizer's folder (default: the profile's base model)")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--variants", default="padded,packed,packed+budget")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run, after one warm-up")
    parser.add_argument("--work", type=Path, default=None, help="the runs' project folder (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", type=override, metavar="key=value")
    opts = parser.parse_args()
    modes, variants = opts.modes.split(","), opts.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    work = opts.work or Path(tempfile.mkdtemp(prefix="medqa-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    prepare_project(work, opts.profile)
    extra = dict(opts.overrides)
    if opts.config or opts.model:
        from medqa_zh import config

        tokenizer = opts.tokenizer or config.load(opts.profile).base_model
        folder = random_model(opts.config, tokenizer, work / "random-model") if opts.config else Path(opts.model)
        extra["model.base"] = str(Path(folder).resolve())

    results = []
    for mode in modes:
        for variant in variants:
            if variant.endswith("nodropout") and mode != "lora":
                continue
            print(f"{mode} {variant}: {opts.steps} + 1 steps ...", file=sys.stderr, flush=True)
            results.append(run_one(work, opts.profile, mode, variant, opts.steps, extra))
            r = results[-1]
            print(f"{mode} {variant}: steps {r['steps']} s, {r['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)

    first = results[0]
    for r in results:  # one denominator for every row: the first run's peak (a measured one varies from run to run)
        r["mfu"] = r["achieved_tflops"] / first["peak_tflops"]
    print(f"\nThe {opts.profile} profile's recipe on {first['device']} ({first['precision']}, {first['threads']} threads), "
          f"{first['examples_per_step']} examples per optimizer step, median of {opts.steps} steps after one warm-up; "
          f"MFU over {first['peak']} = {first['peak_tflops']:.3g} TFLOP/s\n")
    print("| mode | variant | micro-batches a step | median step (s) | tokens/s | MFU | peak memory (GiB) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['mode']} | {r['variant']} | {r['micro']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['mfu']:.1%} | {r['peak_gib']:.2f} |")
    print()
    by = {(r["mode"], r["variant"]): r for r in results}
    for (mode, variant), r in by.items():
        if variant != "padded" and (mode, "padded") in by:
            print(f"{mode}, {variant} vs padded: tokens/s x{r['tokens_per_s'] / by[mode, 'padded']['tokens_per_s']:.2f}, "
                  f"peak memory x{r['peak_gib'] / by[mode, 'padded']['peak_gib']:.2f}")
    for variant in variants:
        if ("lora", variant) in by and ("full", variant) in by:
            print(f"LoRA vs full, {variant}: tokens/s x{by['lora', variant]['tokens_per_s'] / by['full', variant]['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
