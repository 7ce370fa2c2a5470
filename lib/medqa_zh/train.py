"""Supervised fine-tuning with trl's ``SFTTrainer``: LoRA (peft) or all parameters.

Each question becomes a *prompt/completion* pair in chat form, built by ``medqa_zh.prompts``:

    prompt      [system, user]        the question and its options; no loss here
    completion  [assistant "答案：B"]  the only tokens the loss sees: 答案：B<|im_end|>\\n

trl renders both with the base model's own chat template (the one every evaluation uses) and
masks the prompt tokens out of the labels; the loss then sends only the answer positions through
the LM head (see :class:`AnswerOnlySFTTrainer`). Three switches decide what the model can learn:

    train.shuffle_options   permute each example's option contents (seeded per question and epoch)
                            and remap its letter, so gold letters are uniform: no letter prior to learn
    train.completion        letter (答案：B) | letter_text (答案：B. <B's text>): the letter first, so
                            letter scoring and answer parsing read the same position either way
    train.loss_on           completion (the answer only) | all (the prompt too)

The training stream is built here (:func:`stream`): ``train.epochs`` passes over the split, each in its
own seeded order, read in that order; inside each optimizer step the examples are sorted by
length, so each micro-batch pads less and the step's gradient is unchanged. Every knob comes from
the profile's ``train`` section (``train.full`` overrides it for full SFT). A run writes, under
``outputs/<profile>/models/<mode>/``:

    adapter_model.safetensors + adapter_config.json   (LoRA)  or  model.safetensors (full)
    tokenizer files, base_model.json (which base it trained on), run.json (settings, measurements)
    train_log.jsonl     one line per logging / evaluation step, appended as training goes
    checkpoints/        Trainer checkpoints; a rerun resumes from the last one, and 02's learning
                        curve scores each one kept (``train.save_total_limit``)

One process or many: ``python -m medqa_zh.train --profile P --mode lora|full [key=value ...]`` (:func:`main`)
runs what the notebooks run. Started by ``accelerate launch`` or ``torchrun``, every process runs it and they
train data-parallel (each reads every N-th micro-batch of the same stream; only the main process writes);
with ``train.launch.num_processes`` above 1 a notebook or a plain ``python -m`` starts that launch itself.
"""
from __future__ import annotations

import argparse
import array
import codecs
import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
import yaml
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from . import children, config, dashboards, data, files, models, prompts, runs

# peft asks the model a property transformers 5 renamed while it wraps it (in SFTTrainer's __init__): noise, not a fault
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)

# unlike the other modules, this one imports torch and the training stack at the top: it trains,
# and only the training notebooks (02, 03) and bench/recipes.py import it (a finished run is read with `runs`)

MODES = ("lora", "full")
LOSS_ON = ("completion", "all")
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")  # train.attn_implementation
# the settings that change the optimizer's path, beside the inputs (the tokens trained on): a run resumes across a
# change of any other one (how a step reaches the device, what is logged, evaluated, kept or launched), whose steps
# are the same; examples_per_step is one process's share of a step (per_device_train_batch_size x accumulation)
OPTIMIZER_PATH = ("learning_rate", "lr_scheduler_type", "warmup_ratio", "weight_decay", "max_grad_norm", "max_steps",
                  "epochs", "shuffle_options", "completion", "loss_on", "lora")


# --------------------------------------------------------------------------- settings


def settings(cfg, mode: str) -> dict:
    """The profile's ``train`` section for ``mode``: ``train.full`` overrides it for full SFT
    (where its values are not null)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    s = copy.deepcopy({k: v for k, v in cfg["train"].items() if k not in ("lora", "full")})
    if mode == "full":  # a null in train.full means: as for LoRA (in a group, key by key)
        for k, v in cfg["train.full"].items():
            if isinstance(v, dict):
                s.setdefault(k, {}).update({kk: vv for kk, vv in v.items() if vv is not None})
            elif v is not None:
                s[k] = v
    else:
        s["lora"] = dict(cfg["train.lora"])
    missing = [k for k in ("max_length", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate")
               if s.get(k) is None]
    if missing:
        raise KeyError(f"{cfg.source.name}: train.{missing[0]} is not set")
    for key, allowed in (("completion", prompts.COMPLETIONS), ("loss_on", LOSS_ON), ("shuffle_options", (True, False)),
                         ("padding_free", (True, False)), ("attn_implementation", ATTENTION)):
        if s[key] not in allowed:
            raise ValueError(f"{cfg.source.name}: train.{key} is {s[key]!r}; it must be one of {list(allowed)}")
    budget = s["tokens_per_device"]
    if budget not in (None, "auto") and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(f"{cfg.source.name}: train.tokens_per_device is {budget!r}; it must be null, auto or a whole "
                         "number of tokens")
    if int(s["epochs"]) != s["epochs"]:
        raise ValueError(f"{cfg.source.name}: train.epochs must be a whole number (use train.max_steps to stop "
                         "earlier)")
    return s


# --------------------------------------------------------------------------- more than one process


def processes(s: dict) -> int:
    """How many processes train: ``train.launch.num_processes`` (``auto``: one per visible GPU, at least one)."""
    n = s["launch"]["num_processes"]
    if n == "auto":
        return max(torch.cuda.device_count(), 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"train.launch.num_processes is {n!r}; it must be a whole number >= 1 or auto")
    return n


def world_size() -> int:
    """Processes in this run: a launcher (``accelerate launch``, ``torchrun``) sets ``WORLD_SIZE``; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


LAUNCHED = "MEDQA_TRAIN_LAUNCHED"  # set in the processes :func:`launch` starts: they never launch again


def to_launch(s: dict) -> bool:
    """Whether this process should start ``train.launch.num_processes`` processes rather than train itself."""
    if world_size() > 1 or processes(s) == 1:
        return False
    if os.environ.get(LAUNCHED):
        raise RuntimeError(f"this process was started to train in {os.environ[LAUNCHED]} processes, but it is alone "
                           "(no WORLD_SIZE from the launcher): the launcher started no process group. Check the "
                           "accelerate config (train.launch.config) or start it with torchrun.")
    return True


def launch_command(cfg, mode: str) -> list[str]:
    """The ``accelerate launch`` command line that trains ``mode`` with ``train.launch`` of ``cfg``:
    this module's entry point, the profile, and the overrides that did not come from the environment
    (the environment reaches the processes as it is)."""
    s = settings(cfg, mode)
    n = processes(s)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n)]
    if models.best_device(cfg["model.device"]) == "cpu":  # the cores shared out (accelerate's default: 1 each)
        cmd += ["--num_cpu_threads_per_process", str(max(1, torch.get_num_threads() // n))]
    config_file = s["launch"]["config"]
    if config_file:
        path = Path(config_file).expanduser()
        path = path if path.is_absolute() else cfg.root / path
        if not path.is_file():
            raise FileNotFoundError(f"train.launch.config = {config_file!r}: {path} is missing "
                                    "(the shipped accelerate configs are in profiles/accelerate/)")
        cmd += ["--config_file", str(path)]
    else:
        # plain data parallel through torch.distributed (one process per GPU; on a CPU, gloo: accelerate's
        # own --cpu would need MPI); precision is the Trainer's (train.precision), not accelerate's
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["-m", "medqa_zh.train", "--profile", cfg.name, "--mode", mode]
    cmd += [f"{key}={json.dumps(o['value'], ensure_ascii=False)}" for key, o in cfg.overrides.items()
            if o["from"] != "environment"]
    return cmd


def launch(command: list[str], out_dir: Path, cwd: Path | None = None) -> dict:
    """Run ``command`` (see :func:`launch_command`), stream its output here as it comes (the progress
    bars too) and into ``<out_dir>/launch.log``, and return the ``run.json`` it wrote."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "launch.log"
    print("$ " + " ".join(command), flush=True)
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", LAUNCHED: command[command.index("--num_processes") + 1]}
    with open(log_path, "wb") as log, children.start(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                     cwd=cwd, env=env) as proc:
        try:
            while chunk := proc.stdout.read1(1 << 16):
                log.write(chunk)
                sys.stdout.write(decode.decode(chunk))
                sys.stdout.flush()
            proc.wait()
        except BaseException:  # an interrupted cell stops every process of the run, not only the launcher
            children.stop(proc)
            raise
    if proc.returncode:
        raise RuntimeError(f"the launched training stopped with exit code {proc.returncode}: its output is above and "
                           f"in {log_path}. A rerun resumes from its last checkpoint.")
    return runs.read_run(out_dir)


def to_examples(questions: list[data.Question], completion: str = "letter") -> list[dict]:
    """trl's conversational prompt/completion format, built by ``medqa_zh.prompts``."""
    out = []
    for q in questions:
        messages = q.messages(with_answer=True, completion=completion)
        out.append({"id": q.id, "prompt": messages[:-1], "completion": messages[-1:]})
    return out


def shuffled(question: data.Question, seed: int, epoch: int) -> data.Question:
    """``question`` with its option contents in a random order, the same for the same seed,
    question and epoch; the correct letter follows its content."""
    order = sorted(question.options)
    random.Random(f"{seed}:{epoch}:{question.id}").shuffle(order)
    return question.permuted(order)


def stream(questions: list[data.Question], epochs: int, seed: int, shuffle_options: bool) -> list[data.Question]:
    """What training reads, in order: ``epochs`` passes over ``questions``, each in its own seeded
    order; with ``shuffle_options`` each question's options are permuted anew in every pass."""
    out = []
    for epoch in range(epochs):
        order = list(questions)
        random.Random(f"{seed}:{epoch}:order").shuffle(order)
        out += [shuffled(q, seed, epoch) if shuffle_options else q for q in order]
    return out


def group_by_length(items: list, lengths: list[int], group: int) -> list:
    """``items`` with each consecutive run of ``group`` (one optimizer step's examples) sorted by
    length: the step sees the same examples, and its micro-batches pad to similar lengths."""
    out = []
    for start in range(0, len(items), group):
        chunk = sorted(range(start, min(start + group, len(items))), key=lambda i: lengths[i])
        out += [items[i] for i in chunk]
    return out


def padding_share(lengths: list[int], batch: int) -> float:
    """Share of the tokens in batches of ``batch`` consecutive examples that are padding."""
    padded = sum(max(lengths[i:i + batch]) * len(lengths[i:i + batch]) for i in range(0, len(lengths), batch))
    return 1 - sum(lengths) / padded if padded else 0.0


def check_attention(kernel: str, device: str) -> None:
    """Refuse, before anything loads, an attention kernel that cannot train here."""
    package = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}.get(kernel)
    if package and (device != "cuda" or importlib.util.find_spec(package) is None):
        raise ValueError(f"train.attn_implementation = {kernel} needs a CUDA GPU and the {package} package"
                         f"{'' if device == 'cuda' else f' (this run trains on {device})'}. Fix: set it to sdpa, or "
                         "install flash-attn for your CUDA and torch (docs/training.md, Speed).")
    if kernel == "flex_attention" and device != "cuda":
        raise ValueError(f"train.attn_implementation = flex_attention has no backward pass on {device} in PyTorch. "
                         "Fix: set it to sdpa (or eager) for this device.")


def micro_batch_tokens(lengths: list[int], packed: bool) -> int:
    """Tokens one micro-batch of examples of these ``lengths`` holds: their sum when packed into one row,
    else rows x the longest (padding included)."""
    return sum(lengths) if packed else len(lengths) * max(lengths, default=0)


def micro_batches(lengths: list[int], per_step: int, budget: int, packed: bool) -> int:
    """How many micro-batches one process's ``per_step`` examples are split into: the fewest, dividing
    ``per_step`` evenly, for which every micro-batch of the stream (consecutive examples, in training
    order) holds at most ``budget`` tokens (:func:`micro_batch_tokens`). The optimizer step, and so its
    gradient, is the same however it is split; only how much the device computes at once changes."""
    for count in (k for k in range(1, per_step + 1) if per_step % k == 0):
        size = per_step // count
        if all(micro_batch_tokens(lengths[i:i + size], packed) <= budget for i in range(0, len(lengths), size)):
            return count
    longest = max(lengths)
    raise ValueError(f"train.tokens_per_device = {budget} is smaller than the longest training example ({longest} tokens). "
                     f"Fix: set it to at least {longest}, or to auto or null.")


# saved activations per token and layer, in elements of the compute precision, for a decoder layer without
# activation checkpointing: the inputs of the attention and MLP projections, q/k/v, the attention output, the
# norms and residuals (about 8 x hidden) and the MLP's gate, up, activation and product (4 x intermediate).
# LoRA adds its dropout's copy of each adapted layer's input in float32 (7 projections a layer). The LM head, at the
# tokens the loss reads only, keeps float32 logits, their log-softmax and its gradient (3 x vocabulary). Checked
# against what an H200 measured (docs/training.md, Speed): within 10% at 32k tokens a step, LoRA and full SFT.
ACTIVATION_HIDDEN, ACTIVATION_INTERMEDIATE, LORA_INPUTS, LOGIT_COPIES = 8, 4, 7, 3
AUTO_MEMORY_SHARE = 0.6  # of the device's memory left after the weights and the optimizer state: the rest is headroom
# the logged entropy (entropy_sum) runs on the head's float32 logits before the backward pass, ENTROPY_CHUNK rows at a
# time (trl's entropy_from_logits' chunk), holding ENTROPY_COPIES float32 [rows, vocabulary] tensors of its own: their
# log-probabilities and the products with the probabilities. Qwen2.5's 151,936-token vocabulary: 156 MB, which
# auto_tokens sets aside (1,024 rows and three such tensors held 1.9 GB that no estimate counted)
ENTROPY_CHUNK, ENTROPY_COPIES = 128, 2


def activation_bytes_per_token(model_config, precision: str, lora: bool, head_share: float) -> float:
    """Memory the backward pass keeps per trained token (an estimate from the model's shape), when the loss reads
    ``head_share`` of the tokens."""
    h, inter = model_config.hidden_size, model_config.intermediate_size
    elem = 2 if precision in ("bf16", "fp16") else 4
    per_layer = (ACTIVATION_HIDDEN * h + ACTIVATION_INTERMEDIATE * inter) * elem + (LORA_INPUTS * h * 4 if lora else 0)
    return model_config.num_hidden_layers * per_layer + head_share * LOGIT_COPIES * model_config.vocab_size * 4


def device_memory_bytes(device: str) -> int:
    """The device's memory: a GPU's total, or the memory the system has available on a CPU."""
    if device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def entropy_bytes(vocab_size: int) -> int:
    """The most memory :func:`entropy_sum` holds at once beside the logits it reads: :data:`ENTROPY_COPIES` float32
    tensors of :data:`ENTROPY_CHUNK` rows of the vocabulary."""
    return ENTROPY_COPIES * ENTROPY_CHUNK * vocab_size * 4


def auto_tokens(model, precision: str, lora: bool, memory: int, head_share: float) -> int:
    """``train.tokens_per_device: auto``: the tokens whose activations, with the logged entropy's temporaries
    (:func:`entropy_bytes`), fill :data:`AUTO_MEMORY_SHARE` of ``memory`` left after the model's state: its weights,
    and for full SFT float32 weights, gradients and AdamW's two moments (:data:`runs.FULL_SFT_BYTES_PER_PARAMETER`). A
    LoRA adapter's own state (under 2% of the weights at r = 16) is left in the headroom."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    parameters = sum(p.numel() for p in model.parameters())
    state = weights if lora else parameters * sum(runs.FULL_SFT_BYTES_PER_PARAMETER.values())
    per_token = activation_bytes_per_token(model.config, precision, lora, head_share)
    activations = (memory - state) * AUTO_MEMORY_SHARE - entropy_bytes(model.config.vocab_size)
    return max(int(activations / per_token), 1)


def plan_micro_batches(s: dict, lengths: list[int], model, precision: str, mode: str, device: str,
                       head_share: float | None) -> dict:
    """How one process's share of an optimizer step (``per_device_train_batch_size`` x
    ``gradient_accumulation_steps`` examples) is fed to the device: with ``train.tokens_per_device`` null, as
    the profile says; with a number or ``auto`` (:func:`auto_tokens`), in the fewest micro-batches that fit it
    (:func:`micro_batches`). ``lengths``: the training stream's token lengths, in training order; ``head_share``:
    the share of them the loss reads (:func:`loss_share`; only ``auto`` needs it).

    In a launch every process calls it and gets the main process's plan: only the main process plans (each process
    reads the free memory at its own moment, and processes that split a step differently would read other examples,
    or wait for each other's gradients forever; one that reads less could not even plan). When the main process's
    plan fails, every process stops with its error."""
    if world_size() == 1:
        return _plan(s, lengths, model, precision, mode, device, head_share)
    plan, failure = None, None
    if PartialState().is_main_process:
        try:
            plan = _plan(s, lengths, model, precision, mode, device, head_share)
        except ValueError as error:  # the others are waiting for a plan: they stop with this error too
            failure, plan = error, {"error": str(error)}
    plan = broadcast_object_list([plan])[0]  # every process takes part, the main one sending
    if failure:
        raise failure
    if "error" in plan:
        raise ValueError(plan["error"])
    return plan


def _plan(s: dict, lengths: list[int], model, precision: str, mode: str, device: str, head_share: float | None) -> dict:
    per_process = s["per_device_train_batch_size"] * s["gradient_accumulation_steps"]
    budget = s["tokens_per_device"]
    if budget == "auto":
        memory = device_memory_bytes(device)
        if device == "cpu":  # the processes of a launch on this host share its memory
            memory //= local_processes()
        budget = auto_tokens(model, precision, mode == "lora", memory, head_share)
    count = micro_batches(lengths, per_process, budget, s["padding_free"]) if budget else s["gradient_accumulation_steps"]
    size = per_process // count
    tokens = [micro_batch_tokens(lengths[i:i + size], s["padding_free"]) for i in range(0, len(lengths), size)]
    return {"examples": size, "per_step": count, "packed": s["padding_free"], "token_budget": budget,
            "tokens_mean": statistics.fmean(tokens), "tokens_max": max(tokens),
            "padding_share": 1 - sum(lengths) / sum(tokens)}


def local_processes() -> int:
    """Processes of this run on this machine: the launcher's ``LOCAL_WORLD_SIZE`` (torchrun, accelerate launch)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def loss_share(tokenizer, examples: list[dict], lengths: list[int], loss_on: str, sample: int = 512) -> float:
    """The share of the tokens the loss reads: all of them with ``loss_on: all``; else the answers' share of the first
    ``sample`` examples of the stream (a random sample: the stream is shuffled), from the prompts' own lengths."""
    if loss_on == "all":
        return 1.0
    prompts_ = [len(_ids(tokenizer.apply_chat_template(e["prompt"], tokenize=True, add_generation_prompt=True)))
                for e in examples[:sample]]
    return 1 - sum(prompts_) / sum(lengths[:sample])


def token_lengths(tokenizer, examples: list[dict]) -> list[int]:
    """Length in tokens of each rendered prompt + completion (what the model trains on)."""
    return [len(_ids(tokenizer.apply_chat_template(e["prompt"] + e["completion"], tokenize=True))) for e in examples]


def _ids(rendered) -> list[int]:
    # apply_chat_template returns a list of ids, or a BatchEncoding in newer transformers
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


def check_lengths(tokenizer, examples: list[dict], max_length: int, where: str) -> list[int]:
    """Token lengths; an error when any example does not fit ``max_length``.

    trl truncates from the end, so an over-long example loses its answer and would silently be
    dropped (every label masked). Nothing is dropped here: the run stops and says what to set.
    """
    lengths = token_lengths(tokenizer, examples)
    too_long = [(n, e["id"]) for n, e in zip(lengths, examples, strict=True) if n > max_length]
    if too_long:
        longest, qid = max(too_long)
        raise ValueError(
            f"{len(too_long)} of {len(examples)} {where} examples are longer than train.max_length = {max_length} "
            f"tokens (longest: {qid}, {longest} tokens), so their answer would be cut off. "
            f"Fix: set train.max_length to at least {longest} in the profile or the overrides."
        )
    return lengths


# --------------------------------------------------------------------------- measuring


@contextlib.contextmanager
def peak_memory():
    """Measure peak memory inside the block: ``{"device", "peak_gib"}``.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the process's peak resident set size
    (``VmHWM``), reset at the start of the block on Linux (``/proc/self/clear_refs``), so it
    includes the model already loaded. Elsewhere it is the peak since the process started.
    """

    result = {"device": "cuda" if torch.cuda.is_available() else "cpu", "peak_gib": None}
    if result["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
    try:
        yield result
    finally:
        if result["device"] == "cuda":
            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            result["peak_gib"] = _peak_rss_bytes() / 2**30


def _peak_rss_bytes() -> int:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def parameter_counts(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "trainable_share": trainable / total}


def model_flops_per_token(trainer, mode: str, lengths: list[int]) -> float:
    """:func:`runs.flops_per_token` for this run's model and training stream: the positions each token
    attends to (causal, example by example, packed or not) and the share of tokens the loss reads."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    shape = model.config.get_text_config().to_dict()
    labelled = sum(sum(1 for t in row[1:] if t != -100) for row in trainer.train_dataset["labels"])
    total = sum(lengths)
    attended = sum(n * (n + 1) / 2 for n in lengths) / total
    adapters = parameter_counts(model)["trainable"] if mode == "lora" else 0
    return runs.flops_per_token(shape, mode, adapters, attended, labelled / total)


def peak_flops(device: str, precision: str) -> dict:
    """What MFU divides by: a listed GPU's data-sheet peak (:data:`runs.GPU_PEAK_TFLOPS`), else measured here
    (:func:`measured_peak`)."""
    if device == "cuda":
        listed = runs.gpu_peak(torch.cuda.get_device_name(), precision)
        if listed:
            return listed
    return measured_peak(device, precision)


def measured_peak(device: str, precision: str, size: int = 2048, seconds: float = 1.0) -> dict:
    """The FLOP/s of a square ``size`` matmul in the training precision, repeated for about ``seconds``: on a CPU,
    what its cores reach with PyTorch's kernels at the thread count training used (no data sheet fits every CPU)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count < 2:
        a @ b
        sync()
        count += 1
    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    return {"name": f"{precision} matmul {size}x{size} measured ({where})", "tflops": 2 * size**3 * count / elapsed / 1e12,
            "source": "measured"}


def mfu(tokens_per_second: float, flops_per_token: float | None, device: str, precision: str, processes: int = 1) -> dict:
    """Model-FLOPs utilisation: the model FLOPs the trained tokens needed per second, over the peak of every
    process's device together, with the peak named."""
    peak = peak_flops(device, precision)
    achieved = tokens_per_second * flops_per_token / 1e12 if flops_per_token else None
    return {"flops_per_token": flops_per_token, "achieved_tflops": achieved, "peak": peak, "processes": processes,
            "mfu": achieved / (peak["tflops"] * processes) if achieved else None}


class JsonlLog(TrainerCallback):
    """Append every log (train loss, eval loss) to ``train_log.jsonl`` as it happens, and time each
    optimizer step (forward + backward + update, without evaluation)."""

    def __init__(self, path: Path):
        self.path = path
        self.step_seconds: list[float] = []
        self.step_tokens: list[int] = []  # tokens seen by the end of each timed step (every process's)
        self.tokens_at_start = 0
        self._t0 = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.tokens_at_start = state.num_input_tokens_seen  # > 0 when resuming

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is not None:
            self.step_seconds.append(time.perf_counter() - self._t0)
            self.step_tokens.append(state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything one training run needs; :func:`prepare` builds it, :func:`train` runs it."""

    mode: str
    out_dir: Path
    settings: dict
    precision: str
    base_model: str
    tokenizer: object
    model: object
    trainer: object
    lengths: dict = field(default_factory=dict)  # role -> token lengths
    log: object = None  # the JsonlLog callback
    run_key: dict = field(default_factory=dict)
    padding: dict = field(default_factory=dict)  # share of padding in the micro-batches: random order vs sorted
    examples: dict = field(default_factory=dict)  # role -> the prompt/completion examples, in training order
    launch: list | None = None  # the command that trains it in train.launch.num_processes processes (None: here)
    micro: dict = field(default_factory=dict)  # the micro-batches: examples and tokens each, how many a step, packed or not
    flops_per_token: float | None = None  # model FLOPs of one trained token (runs.flops_per_token): MFU's numerator
    watch: dashboards.Watch | None = None  # the dashboards train.report_to asks for

    @property
    def checkpoints(self) -> Path:
        return self.out_dir / "checkpoints"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def token_digest(dataset) -> str:
    """A hash of what the trainer reads from ``dataset`` (trl's tokenized one), in order: each example's token ids and
    labels (-100 where the loss reads nothing; trl's masks where it keeps them instead). Whatever changes the training
    stream changes it: the data, the prompt, the chat template, the tokenizer, the order, the shuffled options."""
    digest = hashlib.sha256()
    for column in ("input_ids", "labels", "completion_mask", "assistant_masks"):
        if column in dataset.column_names:
            digest.update(column.encode())
            for row in dataset[column]:
                digest.update(len(row).to_bytes(4, "little") + array.array("i", row).tobytes())
    return digest.hexdigest()


def prompt_digest() -> str:
    """A hash of the prompt format (``prompts``: the system prompt, the instruction, the options' and the answer's
    form), rendered for a question of placeholders with each completion."""
    probe = [prompts.build_messages("{question}", {"A": "{A}", "B": "{B}"}, answer="A", completion=completion)
             for completion in prompts.COMPLETIONS]
    return hashlib.sha256(json.dumps(probe, ensure_ascii=False).encode()).hexdigest()


# what each part of a run key is, in words, for a run that cannot resume
KEY_WORDS = {"mode": "the mode (LoRA or full)", "base_model": "the base model (model.base)",
             "base_fingerprint": "the base model's weights", "precision": "the precision (train.precision)",
             "seed": "the seed (seed)", "world_size": "the number of processes",
             "examples_per_step": "the examples per step (per_device_train_batch_size x gradient_accumulation_steps)",
             "data": "the training data (data/questions/train.jsonl)",
             "prompt": "the prompt (prompts.py: the system prompt, the instruction or the answer's form)",
             "template": "the chat template", "tokens": "the tokens trained on (the tokenizer, or how trl tokenizes)",
             "start": "the start model (04's merged model)"}
DERIVED = ("tokens",)  # it changes with the other inputs: named only when nothing else changed
# parts of the key that earlier versions of the project recorded and that decide nothing now (the eval loss's questions
# change no training step): a checkpoint whose key has one resumes as if it had not
RETIRED = {"inputs": ("eval_tokens",)}
# settings the project renamed (the old name in a recorded key reads as the new one): train.num_train_epochs became
# train.epochs, which SFTConfig's num_train_epochs (always 1: one pass over the stream) no longer shadows
RENAMED = {"optimizer": {"num_train_epochs": "epochs"}}


def what_changed(recorded: dict | None, run_key: dict) -> list[str]:
    """What differs between a recorded run key and ``run_key``, in words (empty: the same run)."""
    recorded = recorded or {}
    if set(recorded) != set(run_key):
        return ["the run key's form (an earlier version of the project wrote it)"]
    changed = []
    for part, value in run_key.items():
        if isinstance(value, dict):
            was = recorded[part] if isinstance(recorded[part], dict) else {}
            was = {RENAMED.get(part, {}).get(k, k): v for k, v in was.items() if k not in RETIRED.get(part, ())}
            changed += [k for k in sorted(set(value) | set(was)) if was.get(k) != value.get(k)]
        elif recorded[part] != value:
            changed.append(part)
    root = [k for k in changed if k not in DERIVED]
    section = "grpo" if run_key.get("mode") == "grpo" else "train"  # where a setting of the key lives in the profile
    return [KEY_WORDS.get(k, f"{section}.{k}") for k in (root or changed)]


def checkpointing_field() -> str:
    """transformers 5.x renames ``gradient_checkpointing`` to ``activation_checkpointing``."""
    return "activation_checkpointing" if "activation_checkpointing" in SFTConfig.__dataclass_fields__ else "gradient_checkpointing"


def answer_logits(model, inputs: dict, head, autocast=contextlib.nullcontext):
    """The LM head's logits at each row's labelled positions only, and their targets:
    ``(logits [labelled tokens, vocab] float32, targets [labelled tokens], model outputs)``.
    Padded rows and packed ones (several examples in one row, ``train.padding_free``) alike.

    The model runs without its head (``logits_to_keep`` selects no position); each row's hidden
    states after the final norm are gathered where the next token is labelled, and only those go
    through ``head`` (the LM head), under ``autocast`` (the precision the forward ran in). The
    labels are the collator's: -100 everywhere but the answer tokens.
    """

    targets = inputs["labels"][:, 1:]  # the hidden state at position t predicts token t + 1
    mask = targets != -100
    no_logits = torch.empty(0, dtype=torch.long, device=targets.device)
    # packed rows (train.padding_free) come with position_ids restarting at each example and no attention mask
    # (the model then lets no example attend to another), and with the varlen kernels' boundaries
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    outputs = model(**model_inputs, logits_to_keep=no_logits, output_hidden_states=True, use_cache=False)
    hidden = outputs.hidden_states[-1][:, :-1][mask]  # [labelled tokens, hidden]; [-1]: after the final norm
    with autocast():
        logits = head(hidden).float()
    return logits, targets[mask], outputs


class AnswerOnlySFTTrainer(SFTTrainer):
    """trl's ``SFTTrainer`` with a loss that sends only the labelled positions through the LM head.

    trl 1.x computes the loss with a fused, chunked LM head that skips unlabelled positions only on
    Triton GPUs; elsewhere it projects every position through the 151,936-token head in float32
    (a [batch, length, 151936] tensor: gigabytes). Here only the answer tokens carry labels
    (with ``train.loss_on: all`` every token does, and this saves nothing), so
    :func:`answer_logits` projects just those, row by row: the same loss at about half the step
    time on a CPU (measured), and logits of a few MB instead of GB (``bench/loss_head.py``). A
    test checks the loss and its gradients against trl's own ``compute_loss``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # since the last logged point, every process's: answer tokens predicted right, answer tokens, their entropy
        self.sums = {mode: torch.zeros(3, dtype=torch.float64) for mode in ("train", "eval")}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.is_fsdp_enabled:
            # FSDP gathers the LM head's weight shards only inside the model's forward, so the head stays
            # there: trl's own loss (the same value, as the test of this class checks, at more memory)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        logits, targets, outputs = answer_logits(model, inputs, head, self.accelerator.autocast)
        count = targets.numel() if num_items_in_batch is None else num_items_in_batch
        loss = F.cross_entropy(logits, targets, reduction="sum")
        loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # the count is the whole step's, over every process, and data parallelism averages the
            # processes' gradients: each process's share of the sum is scaled back up, as the Trainer does
            loss = loss * self.accelerator.num_processes
        with torch.no_grad():
            sums = torch.stack([(logits.argmax(-1) == targets).sum().double(),
                                torch.tensor(targets.numel(), dtype=torch.float64, device=logits.device),
                                entropy_sum(logits)])
            self.sums["train" if model.training else "eval"] += self.accelerator.gather(sums[None]).sum(0).cpu()
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        """The logged point with trl's metrics of the answer tokens since the last point, over every process:
        ``mean_token_accuracy`` (weighted by tokens: the share predicted right), ``entropy`` (the mean entropy of the
        predicted distribution) and ``num_tokens`` (the input tokens trained on so far); ``eval_`` before each in an
        evaluation."""
        mode = "train" if self.model.training else "eval"
        correct, tokens, entropy = self.sums[mode].tolist()
        if tokens:
            prefix = "" if mode == "train" else "eval_"
            logs = {**logs, f"{prefix}mean_token_accuracy": correct / tokens, f"{prefix}entropy": entropy / tokens,
                    f"{prefix}num_tokens": self.state.num_input_tokens_seen}
            self.sums[mode].zero_()
        return super().log(logs, *args, **kwargs)


def entropy_sum(logits, chunk: int = ENTROPY_CHUNK):
    """The summed entropy (nats) of the distributions ``logits`` [tokens, vocab] give, a chunk of rows at a time (with
    ``train.loss_on: all`` every token is a row: a whole log-softmax at once would double the logits' memory). Beside
    ``logits`` it holds two float32 tensors of ``chunk`` rows at most (:func:`entropy_bytes`, which the auto plan sets
    aside): the log-probabilities, and the probabilities multiplied by them in place."""
    total = logits.new_zeros((), dtype=torch.float64)
    for rows in logits.split(chunk):
        logp = rows.float().log_softmax(-1)
        total -= logp.exp().mul_(logp).sum().double()
    return total


class OneDeviceConfig(SFTConfig):
    """trl's ``SFTConfig`` that keeps a single-process run on one device.

    Started without a launcher on a machine with several GPUs, the Trainer wraps the model in
    ``nn.DataParallel``, which splits every tensor argument of the forward along dim 0 (the loss's
    index tensor too, so shapes break) and silently multiplies the batch by the GPU count. Here the
    run uses the first visible GPU only (``n_gpu`` is at most 1), as transformers itself does for
    model-parallel runs; several GPUs are a launched path (``accelerate launch`` / ``torchrun``, one
    process each, where ``n_gpu`` is 1 anyway). :attr:`visible_gpus` is what transformers would have used.
    """

    @property
    def visible_gpus(self) -> int:
        return super().n_gpu

    @property
    def n_gpu(self) -> int:
        return min(self.visible_gpus, 1)


def lora_config(s: dict) -> LoraConfig:
    """peft's ``LoraConfig`` from the ``train`` settings (:func:`settings`; GRPO's fresh adapter from ``grpo.lora`` too): rank, alpha (the update is scaled by
    alpha / r), dropout and the adapted modules of ``train.lora`` (``all-linear``: every linear layer but the output
    head, resolved by peft when it wraps the model)."""
    lora = s["lora"]
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=lora["target_modules"], task_type="CAUSAL_LM")


@dataclass
class Parts:
    """What an SFT trainer is built from (:func:`parts`): the ``train`` settings, the base model and its tokenizer,
    the prompt/completion examples in training order, and how a step reaches the device (``micro``: the examples of
    a micro-batch and the micro-batches of a step, :func:`plan_micro_batches`). 02 and 03 build their trainer from
    these in a cell; :func:`prepare` builds the same from them (launched processes run that)."""

    cfg: object
    mode: str
    settings: dict
    precision: str
    device: str
    out_dir: Path
    seed: int
    world: int  # processes that train (the launched ones, or this one)
    tokenizer: object
    model: object
    examples: dict  # role (train, eval) -> the prompt/completion examples, in training order
    lengths: dict  # role -> token lengths
    padding: dict  # share of padding in the micro-batches: random order vs sorted
    micro: dict
    watch: dashboards.Watch
    launch: list | None  # the command that trains in train.launch.num_processes processes (None: here)

    def rows(self, role: str = "train") -> list[dict]:
        """The examples of ``role`` as trl's trainer takes them: prompt/completion rows, in training order."""
        return [{k: e[k] for k in ("prompt", "completion")} for e in self.examples[role]]

    def dataset(self, role: str = "train") -> Dataset:
        """:meth:`rows` as a Dataset."""
        return Dataset.from_list(self.rows(role))


def parts(cfg, mode: str = "lora", out_dir: str | Path | None = None) -> Parts:
    """Load the base model and the splits, check them and plan the micro-batches: everything an SFT trainer is
    built from. Raises a clear error for a base model that cannot be loaded, a missing or empty split, or a
    ``train.max_length`` shorter than an example.

    With ``train.launch.num_processes`` above 1, started outside a launcher (a notebook's kernel), the parts are
    built on the CPU for a look at the data and parameters only; :func:`train` starts the launched processes."""
    datasets.disable_progress_bars()  # tokenizing takes seconds; the training bar is the one to watch
    s = settings(cfg, mode)
    out_dir = Path(out_dir) if out_dir else models.folder(cfg, mode)
    watch = dashboards.watch(cfg, out_dir).check()  # a train.report_to typo stops here, before any model loads
    device = models.best_device(cfg["model.device"])
    launched = to_launch(s)
    command = launch_command(cfg, mode) if launched else None
    if launched:
        device = "cpu"  # a preview: the launched processes train, and the GPUs stay free for them
    world = processes(s) if launched else world_size()
    precision = models.training_precision(s["precision"], device)
    check_attention(s["attn_implementation"], models.best_device(cfg["model.device"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = int(cfg["seed"])

    train_qs = data.load_split(cfg, "train")
    eval_qs = data.load_split(cfg, "validation")[: s["eval_questions"]]  # never the eval split
    origin = models.setting_origin(cfg)
    tokenizer = models.load_tokenizer(cfg.base_model, setting=origin)
    train_ex = to_examples(stream(train_qs, int(s["epochs"]), seed, s["shuffle_options"]), s["completion"])
    eval_ex = to_examples(eval_qs, s["completion"])  # eval loss on validation: the options as the evaluations show them
    lengths = {"train": check_lengths(tokenizer, train_ex, s["max_length"], "training"),
               "eval": check_lengths(tokenizer, eval_ex, s["max_length"], "eval-loss")}
    # one optimizer step's examples, across all processes: each process reads every world-th micro-batch
    step_size = runs.examples_per_step(s, world)
    padding = {"random order": padding_share(lengths["train"], s["per_device_train_batch_size"])}
    train_ex = group_by_length(train_ex, lengths["train"], step_size)
    lengths["train"] = group_by_length(lengths["train"], lengths["train"], step_size)
    padding["sorted within each step"] = padding_share(lengths["train"], s["per_device_train_batch_size"])

    # LoRA freezes the base, so its weights can stay in bf16 / fp16 (peft keeps the adapter in fp32);
    # full SFT keeps fp32 master weights and computes in bf16 / fp16 under autocast (half-precision
    # weights would lose small updates to rounding).
    half = {"bf16": "bfloat16", "fp16": "float16"}.get(precision)
    load_dtype = half if half and mode == "lora" else "float32"
    torch.manual_seed(seed)
    model = models.load_model(cfg.base_model, load_dtype, setting=origin, attn_implementation=s["attn_implementation"])
    model.train()
    share = loss_share(tokenizer, train_ex, lengths["train"], s["loss_on"]) if s["tokens_per_device"] == "auto" else None
    micro = plan_micro_batches(s, lengths["train"], model, precision, mode, device, share)
    padding["this run's micro-batches"] = micro["padding_share"]
    return Parts(cfg, mode, s, precision, device, out_dir, seed, world, tokenizer, model,
                 {"train": train_ex, "eval": eval_ex}, lengths, padding, micro, watch, command)


def bookkeeping(p: Parts) -> dict:
    """The SFTConfig fields that say where a run writes and how it runs, not what it learns: the checkpoints'
    folder, the order (the stream's own: already shuffled per epoch, seeded, sorted within each step), when to
    evaluate, log and save, the dashboards, the device, activation checkpointing (memory for time: the same
    gradients; :func:`checkpointing_field` names it as this transformers does)."""
    s = p.settings
    return dict(
        output_dir=str(p.out_dir / "checkpoints"),
        **{checkpointing_field(): bool(s["activation_checkpointing"])},
        per_device_eval_batch_size=s["eval_batch_size"] or p.micro["examples"],
        train_sampling_strategy="sequential",
        eval_strategy="steps", eval_steps=s["eval_steps"],
        logging_steps=s["logging_steps"], logging_first_step=True,
        save_strategy="steps", save_steps=s["save_steps"], save_total_limit=s["save_total_limit"],
        data_seed=p.seed,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,  # every trained parameter takes part in every step
        report_to=p.watch.others,  # TensorBoard and trackio are placed by `dashboards`
        use_cpu=p.device == "cpu",
        disable_tqdm=False,
        dataloader_num_workers=0,
    )


def sft_config(p: Parts) -> OneDeviceConfig:
    """The run's SFTConfig, from the ``train`` settings: what 02's cell writes out field by field, and what
    :func:`prepare` (and so every launched process) builds."""
    s = p.settings
    return OneDeviceConfig(
        learning_rate=float(s["learning_rate"]),
        lr_scheduler_type=s["lr_scheduler_type"],
        warmup_steps=float(s["warmup_ratio"]),  # below 1, transformers reads it as a fraction of the steps
        weight_decay=float(s["weight_decay"]),
        max_grad_norm=float(s["max_grad_norm"]),
        max_steps=s["max_steps"] or -1,  # -1: the epochs decide
        num_train_epochs=1,  # one pass over the stream, which holds train.epochs passes
        per_device_train_batch_size=p.micro["examples"],  # a step: these examples times the micro-batches of a step
        gradient_accumulation_steps=p.micro["per_step"],
        completion_only_loss=s["loss_on"] == "completion",
        max_length=None if s["padding_free"] else s["max_length"],  # check_lengths has enforced it; trl cuts only padded rows
        padding_free=s["padding_free"],
        packing=False,  # trl's packing reorders examples across steps: the stream's order is the project's
        bf16=p.precision == "bf16",
        fp16=p.precision == "fp16",
        seed=p.seed,
        **bookkeeping(p),
    )


def write_inputs(out_dir: Path, record: dict, rows: dict[str, list]) -> Path:
    """What a run's trainer was built from, in ``out_dir/inputs/`` (``runs.INPUTS``): ``parts.json`` (``record``: the
    model's folder and dtype, the settings, the config fields the library adds) and one ``<name>.jsonl`` of ``rows`` per
    name, in training order. A script that imports no medqa_zh rebuilds the trainer from them
    (``tests/technique.py``)."""
    folder = Path(out_dir) / runs.INPUTS
    for name, items in rows.items():
        files.write_text(folder / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items))
    files.write_text(folder / "parts.json", json.dumps(record, indent=1, ensure_ascii=False, default=str))
    return folder


def adopt(p: Parts, trainer: AnswerOnlySFTTrainer) -> Run:
    """The library's part around a trainer built from ``p``: the callbacks that write ``train_log.jsonl`` and feed
    the dashboards, the run key :func:`train` compares to resume, and the parts the trainer was built from
    (:func:`write_inputs`). The trainer is the one :func:`train` trains."""
    visible = getattr(trainer.args, "visible_gpus", 1)  # OneDeviceConfig's; trl's own SFTConfig has none
    if visible > 1:
        print(f"{visible} GPUs visible: this single-process run trains on {trainer.args.device} only "
              "(choose one with CUDA_VISIBLE_DEVICES; several GPUs need a launcher, e.g. accelerate launch)")
    log = JsonlLog(p.out_dir / runs.LOG_FILE)
    for callback in (log, *p.watch.callbacks()):
        trainer.add_callback(callback)
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and trainer.accelerator.distributed_type.value != "FSDP":
        if trainer.accelerator.is_main_process:
            print(f"the accelerate config asks for FSDP, but accelerate shards models on GPUs only: these "
                  f"{p.world} processes train data-parallel ({trainer.accelerator.distributed_type.value}), each with "
                  "the whole model")
    s, cfg = p.settings, p.cfg
    # what makes two runs the same run: resuming across a change would mix them. What is evaluated is not in it (the
    # eval loss's questions, train.eval_questions, change no training step): a resume keeps the log of the steps before
    # it, whose eval losses were on the questions of their time
    run_key = {
        "mode": p.mode, "base_model": cfg.base_model, "base_fingerprint": models.fingerprint(p.model),
        "precision": p.precision, "seed": p.seed, "world_size": p.world,
        "optimizer": {"examples_per_step": s["per_device_train_batch_size"] * s["gradient_accumulation_steps"],
                      **{k: s[k] for k in OPTIMIZER_PATH if k in s}},
        "inputs": {"data": _sha256(data.split_path(cfg, "train")), "prompt": prompt_digest(),
                   "template": hashlib.sha256(str(p.tokenizer.chat_template).encode()).hexdigest(),
                   "tokens": token_digest(trainer.train_dataset)},
    }
    run_key = json.loads(json.dumps(run_key, default=str))  # as it reads back from disk
    if trainer.accelerator.is_main_process:
        write_inputs(p.out_dir, {"model": p.model.name_or_path, "dtype": str(p.model.dtype).removeprefix("torch."),
                                 "attn_implementation": s["attn_implementation"], "settings": s, "precision": p.precision,
                                 "seed": p.seed, "micro": p.micro, "bookkeeping": bookkeeping(p)},
                     {role: p.rows(role) for role in p.examples})
    trainer.args.project, trainer.args.run_name = p.watch.project, dashboards.run_name(run_key)  # trackio's, wandb's, ...
    return Run(p.mode, p.out_dir, s, p.precision, cfg.base_model, p.tokenizer, trainer.model, trainer, p.lengths, log,
               run_key, p.padding, p.examples, p.launch, watch=p.watch, micro=p.micro,
               flops_per_token=model_flops_per_token(trainer, p.mode, p.lengths["train"]))


def prepare(cfg, mode: str = "lora", out_dir: str | Path | None = None) -> Run:
    """The run that 02's and 03's cells build step by step, built in one call (:func:`main` and the launched
    processes use it): :func:`parts`, :func:`sft_config`, peft's config for LoRA (:func:`lora_config`), the
    ``AnswerOnlySFTTrainer`` and :func:`adopt`."""
    p = parts(cfg, mode, out_dir)
    trainer = AnswerOnlySFTTrainer(model=p.model, args=sft_config(p), train_dataset=p.dataset("train"),
                                   eval_dataset=p.dataset("eval"), processing_class=p.tokenizer,
                                   peft_config=lora_config(p.settings) if mode == "lora" else None)
    return adopt(p, trainer)


def label_view(run: Run, index: int = 0, split: str = "train") -> list[tuple[str, bool]]:
    """Example ``index`` of the prepared dataset as (token text, counts in the loss) pairs,
    after trl's tokenization and the trainer's collator: the label mask the loss really uses."""
    dataset = run.trainer.train_dataset if split == "train" else run.trainer.eval_dataset
    batch = run.trainer.data_collator([dataset[index]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    return [(run.tokenizer.decode([i]), label != -100) for i, label in zip(ids, labels, strict=True)]


CHECKPOINT_FILES = ("trainer_state.json", "scheduler.pt")  # besides the weights, the optimizer and the RNG state
CHECKPOINT_WEIGHTS = (runs.ADAPTER_WEIGHTS, runs.MODEL_WEIGHTS, runs.MODEL_INDEX)
# FSDP writes the weights and the optimizer state as torch.distributed.checkpoint folders (one shard per
# process, .metadata written last) or as .bin files, under accelerate's names
FSDP_WEIGHTS, FSDP_OPTIMIZER = "pytorch_model_fsdp", "optimizer"


def _fsdp_saved(folder: Path, name: str) -> bool:
    return any((p / ".metadata").is_file() if p.is_dir() else p.suffix == ".bin" for p in folder.glob(f"{name}_*")) or \
        (folder / f"{name}.bin").is_file()


def checkpoint_missing(folder: Path) -> list[str]:
    """What a checkpoint folder lacks to resume exactly (a crash while it was being saved leaves some out)."""
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in CHECKPOINT_WEIGHTS) and not _fsdp_saved(folder, FSDP_WEIGHTS):
        missing.append("the weights (" + " or ".join(CHECKPOINT_WEIGHTS[:2]) + f", or FSDP's {FSDP_WEIGHTS}_0)")
    if not (folder / "optimizer.pt").is_file() and not _fsdp_saved(folder, FSDP_OPTIMIZER):
        missing.append("optimizer.pt")
    if not any(folder.glob("rng_state*.pth")):
        missing.append("rng_state.pth")
    return missing


def _complete_checkpoints(run: Run) -> tuple[str | None, list[tuple[Path, list[str]]]]:
    """The newest complete checkpoint, and the newer ones a crash left half-written (with what they lack)."""
    if not run.checkpoints.is_dir():
        return None, []
    found = sorted((p for p in run.checkpoints.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()),
                   key=lambda p: int(p.name[11:]), reverse=True)
    broken = []
    for folder in found:
        missing = checkpoint_missing(folder)
        if not missing:
            return str(folder), broken
        broken.append((folder, missing))
    return None, broken


def same_run(recorded: dict | None, run_key: dict) -> bool:
    """Whether a recorded run key (``run.json``, the checkpoints' settings) is ``run_key``'s run."""
    return recorded is not None and not what_changed(recorded, run_key)


ASIDE = "checkpoints.previous"  # in a run's folder: the checkpoints (and log) of the run before, set aside


def resume_point(run: Run, resume: bool) -> tuple[str | None, list[str]]:
    """The checkpoint to resume from, and what changed when the checkpoints there belong to another run (then
    none is resumed: the run starts over). As many processes as the checkpoints' run is required. Reads only: every
    process of a launched run calls it and must agree."""
    if not resume:
        return None, []
    checkpoint, _ = _complete_checkpoints(run)
    if not checkpoint:
        return None, []
    recorded_path = run.checkpoints / runs.SETTINGS_FILE
    recorded = json.loads(recorded_path.read_text(encoding="utf-8")) if recorded_path.is_file() else {}
    was, now = recorded.get("world_size", 1), run.run_key["world_size"]
    if was != now:
        step = runs.examples_per_step(run.settings)
        raise RuntimeError(
            f"{checkpoint} was written by a run in {was} process(es) ({step * was} examples per optimizer step); this run "
            f"has {now} ({step * now} per step). Resuming would skip the wrong examples and change the batch mid-run. "
            f"Fix: train with {was} process(es) again (train.launch.num_processes, or the launcher's), or set "
            f"train.resume to false (starts over; the checkpoints are set aside in {run.out_dir / ASIDE})."
        )
    changes = what_changed(recorded, run.run_key)
    return (None, changes) if changes else (checkpoint, [])


def _set_aside(run: Run, why: str) -> None:
    """Move the checkpoints (and the log) of the run before to :data:`ASIDE`, replacing any set aside earlier."""
    aside = run.out_dir / ASIDE
    if aside.exists():
        shutil.rmtree(aside)
    run.checkpoints.rename(aside)
    log_path = run.out_dir / runs.LOG_FILE
    if log_path.is_file():
        log_path.rename(aside / runs.LOG_FILE)
    print(f"{why}: this run starts over. The earlier run's checkpoints and log are kept in {aside} (delete it to free the "
          "disk; the next run set aside replaces it)")


def tidy(run: Run, resume: bool, checkpoint: str | None, changes: list[str]) -> None:
    """Make the run folder fit the checkpoint resumed from (one process writes this): set the checkpoints aside when
    not resuming them, drop half-written ones, record the run key, cut the log back to the checkpoint."""
    if run.checkpoints.is_dir() and any(run.checkpoints.glob("checkpoint-*")) and (not resume or changes):
        _set_aside(run, "train.resume is false" if not resume else
                   f"{run.checkpoints} holds checkpoints of another run ({', '.join(changes)} changed), and resuming "
                   "them would mix two runs")
    for folder, missing in _complete_checkpoints(run)[1]:
        print(f"{folder} is incomplete (no {', '.join(missing)}: a crash while saving it); removed, "
              "resuming from the one before")
        shutil.rmtree(folder)
    if checkpoint is None and run.checkpoints.exists():  # a fresh start keeps nothing of an earlier try's folder
        shutil.rmtree(run.checkpoints)
    (run.out_dir / runs.RUN_FILE).unlink(missing_ok=True)  # a folder whose run is training holds no finished run
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    files.write_text(run.checkpoints / runs.SETTINGS_FILE, json.dumps(run.run_key, indent=2, default=str, ensure_ascii=False))
    log_path = run.out_dir / runs.LOG_FILE
    if checkpoint:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
        _truncate_log(log_path, state["global_step"])
        print(f"resuming from {checkpoint} (step {state['global_step']})")
    else:
        log_path.unlink(missing_ok=True)


def _truncate_log(path: Path, last_step: int) -> None:
    """Keep only log rows up to the checkpoint a resumed run starts from (the rest is redone)."""
    rows = [r for r in runs.read_log_file(path) if r["step"] <= last_step]
    files.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def train(run: Run, resume: bool | None = None) -> dict:
    """Train (resuming from the last checkpoint of the same run when there is one), save the
    adapter or model with the tokenizer, and return the measurements written to ``run.json``.

    A run that :func:`prepare` planned for several processes is started here with ``accelerate
    launch`` (its output streams in), after the preview's model is freed."""
    if run.launch:
        command, out_dir = run.launch + ([f"train.resume={json.dumps(resume)}"] if resume is not None else []), run.out_dir
        run.model = run.trainer = None
        models.free_memory()
        return launch(command, out_dir, cwd=config.project_root())
    resume = bool(run.settings["resume"]) if resume is None else resume
    done = run.out_dir / runs.RUN_FILE
    if resume and done.is_file():
        previous = json.loads(done.read_text(encoding="utf-8"))
        if same_run(previous.get("run_key"), run.run_key):
            print(f"{run.out_dir} already holds this run, finished; returning its measurements "
                  "(set train.resume to false to train again)")
            if run.trainer.accelerator.is_main_process:  # train.report_to may have changed since the run
                run.watch.restart(run.run_key, runs.read_log(run.out_dir), keep_curve=True)
            return previous
    accelerator = run.trainer.accelerator
    checkpoint, changes = resume_point(run, resume)  # every process, before any of them changes the folder
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tidy(run, resume, checkpoint, changes)
        run.watch.restart(run.run_key, runs.read_log(run.out_dir))  # the dashboards show the log as it now is
    accelerator.wait_for_everyone()
    run.trainer.args.eval_on_start = checkpoint is None  # the base model's eval loss is the curve's step 0
    start = time.perf_counter()
    with peak_memory() as memory:
        result = run.trainer.train(resume_from_checkpoint=checkpoint)
    wall = time.perf_counter() - start
    metrics = _measurements(run, result, wall, memory, resumed_from=checkpoint)
    save(run, metrics)
    return metrics


def _measurements(run: Run, result, wall: float, memory: dict, resumed_from: str | None) -> dict:
    state = run.trainer.state
    steps_run = len(run.log.step_seconds)
    log = runs.read_log(run.out_dir)
    tokens = state.num_input_tokens_seen - run.log.tokens_at_start
    step_s = statistics.median(run.log.step_seconds) if run.log.step_seconds else None
    per_second = tokens / sum(run.log.step_seconds) if steps_run and tokens else None
    return {
        "mode": run.mode, "precision": run.precision, "base_model": run.base_model,
        "device": memory["device"], "torch_threads": _threads(),
        "parameters": parameter_counts(run.model),
        "examples": {k: len(v) for k, v in run.lengths.items()},
        "tokens_per_example": {k: {"mean": statistics.fmean(v), "max": max(v)} for k, v in run.lengths.items()},
        "optimizer_steps": state.global_step, "steps_this_session": steps_run, "resumed_from": resumed_from,
        "epochs": state.epoch * int(run.settings["epochs"]), "wall_seconds": wall,
        "median_step_seconds": step_s,
        "steps": {"seconds": [round(t, 4) for t in run.log.step_seconds],  # each optimizer step this session, and the
                  "tokens": run.log.step_tokens},                          # tokens seen by its end (every process's)
        "world_size": run.run_key["world_size"],
        "parallelism": run.trainer.accelerator.distributed_type.value,  # NO, MULTI_CPU, MULTI_GPU (DDP), FSDP, DEEPSPEED
        "examples_per_step": runs.examples_per_step(run.settings, run.run_key["world_size"]),  # all processes together
        "padding_share": run.padding,
        "micro_batches": run.micro,
        "tokens_this_session": tokens,
        "tokens_per_second": per_second,
        "mfu": mfu(per_second, run.flops_per_token, memory["device"], run.precision, run.run_key["world_size"])
        if per_second else None,
        "peak_memory_gib": memory["peak_gib"],
        "train_loss_mean": result.training_loss if steps_run else None,
        **runs.loss_summary(log),
        "settings": run.settings,
        "out_dir": str(run.out_dir),
        "run_key": run.run_key,
    }


def _threads() -> int:
    return torch.get_num_threads()


def save(run: Run, metrics: dict | None = None) -> Path:
    """Write the adapter (LoRA) or the whole model (full SFT; its float32 master weights cast to
    bfloat16 when training ran in bf16), the tokenizer, the base fingerprint and ``run.json``.

    Every process of a launched run calls it (a sharded model's weights are gathered from all of
    them); only the main process writes."""

    out = run.out_dir
    accelerator = run.trainer.accelerator
    state = accelerator.get_state_dict(run.trainer.model_wrapped)  # FSDP / ZeRO-3: gathered from every shard
    if accelerator.is_main_process:
        # into a folder of its own first, then file by file into the run's folder (which also holds the
        # log and checkpoints), the weights and run.json last: whoever finds the weights finds a whole model
        tmp = out.with_name(out.name + ".saving")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash while saving
        model = accelerator.unwrap_model(run.trainer.model_wrapped)
        if run.mode == "lora":
            model.save_pretrained(tmp)  # the adapter only; its weights are not sharded (data parallel)
        else:
            # a tied weight (Qwen2.5-0.5B's lm_head is its embedding) is saved once, under its first name, as the base has it
            names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
            state = {k: v for k, v in state.items() if k in names}
            if run.precision == "bf16":
                state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
            model.save_pretrained(tmp, state_dict=state)
        run.tokenizer.save_pretrained(tmp)
        models.write_fingerprint(run.run_key["base_fingerprint"], run.base_model, tmp)
        if metrics is not None:
            (tmp / runs.RUN_FILE).write_text(json.dumps(metrics, indent=2, default=str, ensure_ascii=False), encoding="utf-8")
        files.move_into(tmp, out, last=(*CHECKPOINT_WEIGHTS, runs.RUN_FILE))
    accelerator.wait_for_everyone()
    return out


# --------------------------------------------------------------------------- the entry point a launcher starts


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not an override: write key=value, e.g. train.max_steps=20")
    return key, yaml.safe_load(value)


def main(argv: list[str] | None = None) -> dict:
    """``python -m medqa_zh.train --profile P --mode lora|full [key=value ...]``: what notebooks 02 and 03 run.

    Started by ``accelerate launch`` or ``torchrun``, every process runs this and they train data-parallel;
    started plainly, it trains here, or launches ``train.launch.num_processes`` processes when that is above 1.
    """
    parser = argparse.ArgumentParser(prog="python -m medqa_zh.train", description=main.__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=None, help="profiles/<profile>.yaml (default: $MEDQA_PROFILE or smoke)")
    parser.add_argument("--mode", choices=MODES, default="lora")
    parser.add_argument("overrides", nargs="*", type=_override, metavar="key=value",
                        help="settings by dotted key, values in YAML, e.g. train.max_steps=20 train.launch.num_processes=2")
    opts = parser.parse_args(argv)
    overrides = dict(opts.overrides)
    if world_size() == 1:
        cfg = config.setup(opts.profile, overrides, notebook=f"python -m medqa_zh.train --mode {opts.mode}")
        if to_launch(settings(cfg, opts.mode)):  # launch the processes, with no model loaded here
            return launch(launch_command(cfg, opts.mode), models.folder(cfg, opts.mode), cwd=cfg.root)
    else:
        cfg = config.load(opts.profile, overrides)
        # joins the process group the launcher set up (gloo on a CPU, which accelerate picks only when told)
        state = PartialState(cpu=models.best_device(cfg["model.device"]) == "cpu")
        if state.is_main_process:  # the manifest and the smoke assets: written once
            config.setup(opts.profile, overrides, notebook=f"python -m medqa_zh.train --mode {opts.mode}")
        state.wait_for_everyone()
    metrics = train(prepare(cfg, opts.mode))
    if metrics.get("out_dir") and (world_size() == 1 or int(os.environ.get("RANK", "0")) == 0):
        print(f"{opts.mode}: {metrics['optimizer_steps']} optimizer steps of {metrics['examples_per_step']} examples "
              f"({metrics.get('world_size', 1)} process(es)); wrote {metrics['out_dir']}")
    return metrics


if __name__ == "__main__":
    # run the imported module's main, not this __main__ copy's: the checkpoints then pickle OneDeviceConfig as
    # medqa_zh.train.OneDeviceConfig (training_args.bin), which loads anywhere, not as __main__.OneDeviceConfig
    from medqa_zh import train as _module

    _module.main()
