"""Reading a training run's folder, without the training stack: what ``train`` writes and later steps read.

A run folder (``outputs/<profile>/models/<mode>/``, see ``models.folder``) holds::

    run.json              the settings and measurements of the finished run (:func:`read_run`)
    train_log.jsonl       one line per logging / evaluation step, appended during training (:func:`read_log`)
    adapter_model.safetensors + adapter_config.json (LoRA)  or  model.safetensors (full SFT)
    checkpoints/          Trainer checkpoints, and run_settings.json: the run they belong to (:func:`read_run_key`)
    tensorboard/          with train.report_to tensorboard: the dashboard's event files (``dashboards``)

Notebooks 03 and 10, ``results`` and the bench scripts read runs through this module; it imports no
torch, so reading a finished run's numbers costs no model stack.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

RUN_FILE = "run.json"
LOG_FILE = "train_log.jsonl"
TENSORBOARD_DIR = "tensorboard"  # train.report_to tensorboard: the event files, beside the run's other files (dashboards)
INPUTS = "inputs"  # what a run's trainer was built from: parts.json and its rows in training order (.jsonl)
SETTINGS_FILE = "run_settings.json"  # in checkpoints/: the run key of the run that wrote them
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_WEIGHTS = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"  # a model saved in shards


def read_run(run_dir: str | Path) -> dict:
    """A finished run's ``run.json`` (its settings and measurements)."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the training notebook for this model has not finished")
    return json.loads(path.read_text(encoding="utf-8"))


def read_run_key(run_dir: str | Path) -> dict | None:
    """The run key (what makes two runs the same run) of the run whose checkpoints ``run_dir`` holds, finished or
    not; None before training started."""
    path = Path(run_dir) / "checkpoints" / SETTINGS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_log(run_dir: str | Path) -> list[dict]:
    """The rows of a run's ``train_log.jsonl`` (``run_dir``: the run's folder, e.g. ``models.folder(cfg, "lora")``);
    none before training started."""
    return read_log_file(Path(run_dir) / LOG_FILE)


def read_log_file(path: Path) -> list[dict]:
    """The rows of one ``train_log.jsonl``; none when it does not exist."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def loss_summary(log: list[dict]) -> dict:
    """First and last logged training loss, and the eval losses, from ``train_log.jsonl`` rows."""
    train = [(r["step"], r["loss"]) for r in log if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r]
    return {
        "first_train_loss": train[0][1] if train else None, "last_train_loss": train[-1][1] if train else None,
        "first_eval_loss": evals[0][1] if evals else None, "last_eval_loss": evals[-1][1] if evals else None,
        "train_points": len(train), "eval_points": len(evals),
    }


def examples_per_step(settings: dict, processes: int = 1) -> int:
    """The global batch: examples in one optimizer step over all ``processes`` (``settings``: a run's ``train``
    settings, ``per_device_train_batch_size`` x ``gradient_accumulation_steps`` x processes)."""
    return settings["per_device_train_batch_size"] * settings["gradient_accumulation_steps"] * processes


# --------------------------------------------------------------------------- how much of the machine a run used

# Dense peaks (no structured sparsity) of common GPUs from NVIDIA's data sheets, TFLOP/s, for the precision a run
# computes in: bf16 / fp16 on the tensor cores, fp32 without TF32 (PyTorch's default for matmuls). A name is matched
# as a word of ``torch.cuda.get_device_name()``, the longest first ("H100 PCIe" before "H100", "A100" is not "A10").
# A device not listed here (and every CPU) is measured instead: see ``train.peak_flops``.
GPU_PEAK_TFLOPS = {
    "H200": {"bf16": 989, "fp16": 989, "fp32": 67},         # H200 SXM, as the H100 SXM
    "H100 PCIe": {"bf16": 756, "fp16": 756, "fp32": 51},
    "H100": {"bf16": 989, "fp16": 989, "fp32": 67},         # H100 SXM (80GB HBM3)
    "A100": {"bf16": 312, "fp16": 312, "fp32": 19.5},
    "L4": {"bf16": 121, "fp16": 121, "fp32": 30.3},
    "A10": {"bf16": 125, "fp16": 125, "fp32": 31.2},
    "T4": {"fp16": 65, "fp32": 8.1},                       # no bf16: precision auto trains in fp16 there
}


def gpu_peak(device_name: str, precision: str) -> dict | None:
    """The data-sheet peak of a GPU named ``device_name`` for ``precision`` (bf16 | fp16 | fp32), as
    ``{"name", "tflops", "source"}``; None when it is not in :data:`GPU_PEAK_TFLOPS`."""
    words = f" {device_name.replace('-', ' ')} "
    for name in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if f" {name} " in words and precision in GPU_PEAK_TFLOPS[name]:
            return {"name": f"{name} {precision} dense", "tflops": GPU_PEAK_TFLOPS[name][precision], "source": "data sheet"}
    return None


# what full SFT keeps for every parameter, in bytes, all float32: the master weight (half-precision training computes
# with a copy), its gradient, and AdamW's two moment estimates (running means of the gradient and of its square)
FULL_SFT_BYTES_PER_PARAMETER = {"weights": 4, "gradients": 4, "AdamW's two moments": 8}


def flops_per_token(shape: dict, mode: str, adapter_parameters: int, attended: float, head_share: float) -> float:
    """Model FLOPs of one trained token (multiply-adds count 2), the numerator of MFU.

    ``shape``: the model's ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` and ``vocab_size``. Forward: every
    projection of every layer, the attention scores and their weighting (``attended``: the positions a
    token attends to, on average), and the LM head, which runs only at the share of tokens the loss
    reads (``head_share``: the answer-only loss projects those alone). Backward costs the forward again
    for the inputs' gradients and once more for the weights' (full SFT); LoRA's frozen base needs no
    weight gradients, its adapters (``adapter_parameters``) 6 FLOPs a parameter. Recomputation
    (activation checkpointing) is not counted, as MFU's convention has it.
    """
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    head_dim = shape.get("head_dim") or h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * head_dim, shape["num_key_value_heads"] * head_dim
    projections = layers * (h * q + 2 * h * kv + q * h + 3 * h * inter)
    attention = layers * 2 * 2 * q * attended  # QK^T and the weighted sum of V
    head = h * shape["vocab_size"] * head_share
    forward = 2 * projections + attention + 2 * head
    if mode == "full":
        return 3 * forward
    return 2 * forward + 6 * adapter_parameters


def cost_table(runs: dict[str, dict]) -> pd.DataFrame:
    """Runs side by side (name -> ``run.json``): parameters, step time, tokens/s, peak memory, losses."""
    rows = {}
    for name, m in runs.items():
        rows[name] = {
            "trainable parameters": m["parameters"]["trainable"],
            "trainable share": f"{m['parameters']['trainable_share']:.2%}",
            "precision": m["precision"],
            "optimizer steps": m["optimizer_steps"],
            "median step (s)": round(m["median_step_seconds"], 3) if m["median_step_seconds"] else math.nan,
            "tokens/s": round(m["tokens_per_second"]) if m.get("tokens_per_second") else math.nan,
            "MFU": mfu_text(m),
            "micro-batches a step": micro_batch_text(m.get("micro_batches")),
            "peak memory (GiB)": round(m["peak_memory_gib"], 2),
            "saved weights (MiB)": round(sum(p.stat().st_size for p in Path(m["out_dir"]).glob("*.safetensors")) / 2**20, 1),
            "first → last train loss": f"{m['first_train_loss']:.3f} → {m['last_train_loss']:.3f}",
            "last eval loss": round(m["last_eval_loss"], 3) if m["last_eval_loss"] is not None else math.nan,
        }
    return pd.DataFrame(rows)


def mfu_text(run: dict) -> str:
    """A run's model-FLOPs utilisation and the peak it is measured against, in words ("—" for a run without one)."""
    mfu = run.get("mfu") or {}
    return f"{mfu['mfu']:.1%} of {mfu['peak']['name']} ({mfu['peak']['tflops']:.3g} TFLOP/s)" if mfu.get("mfu") else "—"


def micro_batch_text(micro: dict | None) -> str:
    """How a run fed a step to the device, in words: micro-batches x examples, packed or padded rows, tokens each."""
    if not micro:
        return "—"
    rows = "1 packed row" if micro["packed"] else f"{micro['examples']} rows"
    return f"{micro['per_step']} x {micro['examples']} examples ({rows}, ~{micro['tokens_mean']:.0f} tokens)"
