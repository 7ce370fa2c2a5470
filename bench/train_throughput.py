"""What one SFT optimizer step costs: LoRA vs full, fp32 vs bf16, measured side by side.

    python bench/train_throughput.py MODEL_DIR [--batch 4] [--seq 256] [--steps 3]

For each configuration a fresh Python process loads the model the way ``medqa_zh.train`` does
(LoRA: frozen base in bf16 or fp32, adapter r=16 on every linear layer, fp32; full: fp32 master
weights), runs one warm-up step, then ``--steps`` timed optimizer steps (forward, backward, AdamW
update; bf16 under autocast) on a batch of ``batch x seq`` tokens, and reports the median step
time, tokens per second, and the process's peak resident memory during the timed steps (model,
optimizer state and activations; on a GPU, peak allocated memory). The configurations run one
after another in this one invocation, so the ratios compare like with like on this machine.

On CPU, set the thread count you train with (``OMP_NUM_THREADS``); the default is every core.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CONFIGS = ("lora-fp32", "lora-bf16", "full-fp32", "full-bf16")


def one(model_dir: str, config: str, batch: int, seq: int, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from medqa_zh import models, train

    mode, precision = config.split("-")
    load_dtype = "bfloat16" if (mode, precision) == ("lora", "bf16") else "float32"
    torch.manual_seed(0)
    model = models.load_model(model_dir, load_dtype, setting="MODEL_DIR")
    if mode == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: allocates optimizer state and kernels
    times = []
    with train.peak_memory() as memory:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    counts = train.parameter_counts(model)
    median = statistics.median(times)
    return {"config": config, "trainable": counts["trainable"], "step_s": median, "tokens_per_s": batch * seq / median,
            "peak_gib": memory["peak_gib"], "device": memory["device"], "threads": torch.get_num_threads(),
            "steps": [round(t, 3) for t in times]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.one:
        print(json.dumps(one(opts.model_dir, opts.one, opts.batch, opts.seq, opts.steps)))
        return

    results = {}
    for config in opts.configs.split(","):
        if config not in CONFIGS:
            parser.error(f"unknown configuration {config!r}; choose from {', '.join(CONFIGS)}")
        print(f"{config}: running ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, opts.model_dir, "--one", config, "--batch", str(opts.batch), "--seq", str(opts.seq),
               "--steps", str(opts.steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{config} failed:\n{proc.stderr[-3000:]}")
        results[config] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{config}: steps {results[config]['steps']} s", file=sys.stderr, flush=True)

    first = next(iter(results.values()))
    print(f"\nOne optimizer step at batch {opts.batch} x {opts.seq} tokens on {first['device']} "
          f"({first['threads']} threads), median of {opts.steps} steps after one warm-up\n")
    print("| config | trainable params | step (s) | tokens/s | peak memory (GiB) |")
    print("|---|---:|---:|---:|---:|")
    for r in results.values():
        print(f"| {r['config']} | {r['trainable']:,} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_gib']:.2f} |")
    print()

    def ratio(x, y, key):
        return results[x][key] / results[y][key] if x in results and y in results else None

    lines = [
        ("bf16 vs fp32 speed, LoRA", ratio("lora-bf16", "lora-fp32", "tokens_per_s")),
        ("bf16 vs fp32 speed, full", ratio("full-bf16", "full-fp32", "tokens_per_s")),
        ("LoRA vs full speed, fp32", ratio("lora-fp32", "full-fp32", "tokens_per_s")),
        ("LoRA vs full speed, bf16", ratio("lora-bf16", "full-bf16", "tokens_per_s")),
        ("full vs LoRA peak memory, fp32", ratio("full-fp32", "lora-fp32", "peak_gib")),
        ("full vs LoRA peak memory, bf16", ratio("full-bf16", "lora-bf16", "peak_gib")),
    ]
    for name, value in lines:
        if value is not None:
            print(f"{name}: {value:.2f}x")


if __name__ == "__main__":
    main()
