"""Where a training step's time goes: the torch profiler over the project's own trainer, by kind of work.

    python bench/train_profile.py [--profile cpu] [--model DIR | --config CONFIG.json [--tokenizer DIR]]
                                  [--mode lora] [--steps 2] [key=value ...]

One run of ``medqa_zh.train`` (the profile's recipe and training split; ``key=value`` overrides on top, e.g.
``train.padding_free=true``) in a project folder of its own: one warm-up optimizer step, then ``--steps`` steps under
``torch.profiler``. Printed: the operators (kernels on a GPU) launched per step, and the time per step in each
kind of work, from the profiler's self times (CPU ops, and CUDA kernels when on a GPU):

    matmul        the projections and the LM head (mm, addmm, bmm, linear's kernels)
    attention     scaled-dot-product attention and its mask
    loss          log-softmax, cross entropy
    dropout       LoRA's dropout on every adapted layer's input (native_dropout, bernoulli, mul by the mask)
    casts         dtype conversions (to, _to_copy, copy_): fp32 adapters under bf16 autocast, fp32 master weights
    optimizer     AdamW and gradient clipping (_foreach_*, addcdiv, lerp, norm)
    elementwise   the rest of the arithmetic (add, mul, silu, rms norm, rotary)
    other         everything else (views, indexing, allocation)

The model: as ``bench/train_throughput.py`` (``--config`` builds a random-init model of any shape, offline).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_scaling import SHORT_RUN, prepare_project  # noqa: E402
from train_throughput import override, random_model  # noqa: E402

KINDS = {
    "matmul": ("mm", "addmm", "bmm", "matmul", "linear", "gemm", "sgemm", "cutlass", "cublas", "ampere", "sm90"),
    "loss": ("log_softmax", "nll_loss", "cross_entropy"),  # before attention: its softmax is not the loss's
    "attention": ("scaled_dot_product", "flash", "efficient_attention", "_attention", "softmax"),
    "dropout": ("dropout", "bernoulli"),
    "casts": ("aten::to", "_to_copy", "copy_", "aten::type_as"),
    "optimizer": ("_foreach", "addcdiv", "lerp", "adamw", "clip_grad", "norm"),
    "elementwise": ("add", "mul", "silu", "rsqrt", "pow", "mean", "neg", "cat", "sub", "div", "exp", "sigmoid"),
}


def kind(name: str) -> str:
    low = name.lower()
    for k, keys in KINDS.items():
        if any(key in low for key in keys):
            return k
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model")
    model.add_argument("--config", type=Path)
    parser.add_argument("--tokenizer")
    parser.add_argument("--mode", choices=("lora", "full"), default="lora")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps profiled, after one warm-up")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", type=override, metavar="key=value")
    opts = parser.parse_args()
    work = opts.work or Path(tempfile.mkdtemp(prefix="medqa-profile-"))
    work.mkdir(parents=True, exist_ok=True)
    prepare_project(work, opts.profile)

    import torch
    from transformers import TrainerCallback

    from medqa_zh import config, train

    overrides = {**SHORT_RUN, "train.max_steps": opts.steps + 1, "train.launch.num_processes": 1, **dict(opts.overrides)}
    if opts.mode == "full":
        overrides["train.full.max_steps"] = opts.steps + 1
    if opts.config or opts.model:
        tokenizer = opts.tokenizer or config.load(opts.profile).base_model
        folder = random_model(opts.config, tokenizer, work / "random-model") if opts.config else Path(opts.model)
        overrides["model.base"] = str(Path(folder).resolve())
    cfg = config.load(opts.profile, overrides)
    run = train.prepare(cfg, opts.mode)
    cuda = torch.cuda.is_available() and run.trainer.args.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    profiler = torch.profiler.profile(activities=activities,
                                      schedule=torch.profiler.schedule(wait=0, warmup=1, active=opts.steps, repeat=1))

    class Step(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            profiler.start()

        def on_step_end(self, args, state, control, **kwargs):
            profiler.step()

        def on_train_end(self, args, state, control, **kwargs):
            profiler.stop()

    run.trainer.add_callback(Step())
    metrics = train.train(run, resume=False)

    events = profiler.key_averages()
    device_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    counts, cpu_us, device_us = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        k = kind(e.key)
        cpu_us[k] += e.self_cpu_time_total
        if cuda:
            device_us[k] += getattr(e, device_key, 0)
            if getattr(e, device_key, 0) > 0:
                counts["kernels"] += e.count
        counts["ops"] += e.count if e.key.startswith("aten::") else 0
    per_step = {k: v / opts.steps for k, v in counts.items()}
    micro = metrics["micro_batches"]
    print(f"\n{opts.mode} on the {opts.profile} profile, {metrics['device']} ({metrics['precision']}), "
          f"{metrics['examples_per_step']} examples a step in {micro['per_step']} micro-batch(es) of {micro['examples']} "
          f"({'packed' if micro['packed'] else 'padded'}, ~{micro['tokens_mean']:.0f} tokens each); "
          f"{opts.steps} steps profiled after one warm-up\n")
    print(f"aten operators per step: {per_step.get('ops', 0):.0f}" +
          (f"; CUDA kernels per step: {per_step.get('kernels', 0):.0f}" if cuda else ""))
    total = sum(device_us.values() if cuda else cpu_us.values())
    print(f"\n| kind | {'GPU' if cuda else 'CPU'} time per step (s) | share |")
    print("|---|---:|---:|")
    for k, v in sorted((device_us if cuda else cpu_us).items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v / 1e6 / opts.steps:.3f} | {v / total:.1%} |")
    print(f"\nmedian step {metrics['median_step_seconds']:.2f} s (profiler overhead included), "
          f"MFU {metrics['mfu']['mfu']:.1%} of {metrics['mfu']['peak']['name']}")
    print("\n" + json.dumps({"top": [(e.key, round(getattr(e, device_key) / 1e6 / opts.steps, 4), e.count // opts.steps)
                                     for e in sorted(events, key=lambda e: -getattr(e, device_key))[:12]]},
                            ensure_ascii=False))


if __name__ == "__main__":
    main()
