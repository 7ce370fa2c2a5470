# 02's parts, read from what the series' LoRA run recorded it was built from (models/lora/inputs/)
import json
from types import SimpleNamespace

import datasets
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def sft_parts(run_dir, scratch):
    """The settings, the config's bookkeeping fields (writing to scratch, no dashboards) and the parts as 02's and
    03's cells read them: the base model (seeded and loaded as the series loaded it), its tokenizer, the examples in
    training order, the micro-batch plan."""
    record = json.loads((run_dir / "inputs" / "parts.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(record["model"])
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    torch.manual_seed(record["seed"])
    model = AutoModelForCausalLM.from_pretrained(record["model"], dtype=getattr(torch, record["dtype"]),
                                                 attn_implementation=record["attn_implementation"])
    model.train()
    examples = {role: read_jsonl(run_dir / "inputs" / f"{role}.jsonl") for role in ("train", "eval")}
    bookkeeping = {**record["bookkeeping"], "output_dir": str(scratch), "report_to": "none", "disable_tqdm": True}
    return record["settings"], bookkeeping, SimpleNamespace(
        model=model, tokenizer=tokenizer, examples=examples, micro=record["micro"], precision=record["precision"],
        seed=record["seed"])


class StopAt(TrainerCallback):
    """Stop after optimizer step ``last``: the learning-rate schedule stays the whole run's."""

    def __init__(self, last):
        self.last = last

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.last


def first_losses(trainer, run_dir, logged=3):
    """Train ``trainer`` through the series' first ``logged`` logged training losses; (step, series' loss, ours)."""
    theirs = [(r["step"], r["loss"]) for r in read_jsonl(run_dir / "train_log.jsonl") if "loss" in r][:logged]
    trainer.add_callback(StopAt(theirs[-1][0]))
    trainer.train()
    ours = {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}
    return [(step, loss, ours.get(step)) for step, loss in theirs]


datasets.disable_progress_bars()  # trl's tokenizing bars; the trainer's own logs stay
s, bookkeeping, p = sft_parts(OUT / "models" / "lora", SCRATCH / "lora")
