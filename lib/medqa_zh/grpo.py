"""Reinforcement learning with a verifiable reward: GRPO (trl's ``GRPOTrainer``) after SFT and merge (notebook 04b).

A multiple-choice question needs no reward model: the completion names exactly one option letter and it is the
gold one (reward 1), or it does not (0). GRPO samples ``grpo.num_generations`` completions of each prompt (a
group), and each completion's advantage is its reward against its group's mean, scaled as ``grpo.scale_rewards``
says (trl's three ways; std is the sample standard deviation, Bessel-corrected; the batch is every completion of
one optimizer step, over all processes):

    group:  advantage_i = (reward_i - mean(group)) / (std(group) + 1e-4)
    batch:  advantage_i = (reward_i - mean(group)) / (std(batch) + 1e-4)
    none:   advantage_i =  reward_i - mean(group)

so a group whose completions are all right, or all wrong, teaches nothing (its advantages are 0: trl logs the
share of such groups as ``frac_reward_zero_std``). The policy starts from the merged SFT model (04), in the dtype it
was saved in, with a fresh LoRA adapter (``train.precision`` bf16 / fp16: the trainer's forward passes compute under
autocast); the KL term (``grpo.beta``) is measured against that start, which is the same model with the adapter
switched off (no second copy in memory). Each time a question is drawn its options are shuffled anew (seeded, the
gold letter moved with its content), so a preferred letter earns nothing. Two arms (``grpo.arm``): ``answer``
(``答案：X``, a few tokens: a CPU can run it) and ``reasoning`` (a short analysis, then ``答案：X``; a GPU, with vLLM
colocated where it is installed). The trained adapter is merged into the start model and saved as a plain model,
``models/grpo/``, in the start model's dtype, which 06-08 evaluate like ``merged``.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import shutil
import statistics
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers import GenerationConfig, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from . import answers, dashboards, data, files, models, prompts, runs, train

# trl and peft ask the model for properties transformers 5 renamed while the trainer is built (04b builds it in a
# cell): noise about the libraries' versions, not about this run
warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)

ARMS = ("answer", "reasoning")
NAME = "grpo"  # the model it writes: models.folder(cfg, NAME)
START = "merged"  # the model it starts from
FIRST_STEP = "first_step.json"  # in checkpoints/: what the first optimizer step's rewards and loss saw (04b's check)
SCALES = ("group", "batch", "none")  # grpo.scale_rewards: trl's ways to scale the centred rewards


# --------------------------------------------------------------------------- the reward


def correct(text: str, gold: str, letters: str = answers.LETTERS) -> float:
    """The reward of one completion: 1.0 when ``text`` names exactly one option letter (``answers.extract_letter``,
    the parser every evaluation uses) and it is ``gold``; 0.0 for a wrong letter, several letters or none."""
    return float(answers.extract_letter(text, letters) == gold)


def completion_text(completion) -> str:
    """A completion as trl passes it: a string, or (conversational) a list with the assistant's message."""
    return completion if isinstance(completion, str) else "".join(m["content"] for m in completion)


def reward_correct(completions, gold, letters, **kwargs) -> list[float]:
    """trl's reward function of :func:`correct`: one reward per completion of a batch (``gold`` and ``letters`` are the
    dataset's columns, :func:`prompt_rows`)."""
    return [correct(completion_text(c), g, ls) for c, g, ls in zip(completions, gold, letters, strict=True)]


class Reward:
    """A trl reward function (``fn``, :func:`reward_correct` unless told) that keeps what it saw: each call's step,
    gold letters, chosen letters and rewards (``calls``), and the first call's prompts and texts (``first``), which
    04b's advantage check reads. :class:`Trainer` wraps the reward function it is given in one."""

    def __init__(self, fn=reward_correct):
        self.fn = fn  # 04b passes the one its cell writes
        self.__name__ = fn.__name__  # the name trl logs its mean under: rewards/<name>/mean
        self.calls: list[dict] = []
        self.first: dict | None = None

    def __call__(self, prompts, completions, gold, letters, trainer_state=None, **kwargs) -> list[float]:
        texts = [completion_text(c) for c in completions]
        chosen = [answers.extract_letter(t, ls) for t, ls in zip(texts, letters, strict=True)]
        rewards = [float(r) for r in self.fn(prompts=prompts, completions=completions, gold=gold, letters=letters,
                                             trainer_state=trainer_state, **kwargs)]
        step = trainer_state.global_step if trainer_state is not None else None
        self.calls.append({"step": step, "gold": list(gold), "chosen": chosen, "rewards": rewards})
        if self.first is None:
            self.first = {"prompts": prompts, "texts": texts, "gold": list(gold), "letters": list(letters),
                          "rewards": rewards}
        return rewards

    def letters(self, calls: list[dict]) -> Counter:
        """How often each letter was chosen in ``calls`` (None: no single letter)."""
        return Counter(letter for call in calls for letter in call["chosen"])


def scale_rewards(value) -> str:
    """``grpo.scale_rewards`` as trl reads it: ``group``, ``batch`` or ``none``, with trl's aliases ``True`` (group)
    and ``False`` (none)."""
    scale = {True: "group", False: "none"}[value] if isinstance(value, bool) else value
    if scale not in SCALES:
        raise ValueError(f"grpo.scale_rewards is {value!r}; it must be one of {list(SCALES)} (or true / false)")
    return scale


def group_advantages(rewards: list[float], num_generations: int, scale="group") -> list[float]:
    """GRPO's advantages of one step's ``rewards`` (every completion the step sampled, its groups of
    ``num_generations`` one after another, as trl scores them): each reward less its group's mean, divided by the
    standard deviation (Bessel-corrected, plus 1e-4) of its group with ``scale: group``, of all ``rewards`` with
    ``batch``; not divided with ``none`` (:func:`scale_rewards`)."""
    scale = scale_rewards(scale)
    if len(rewards) % num_generations:
        raise ValueError(f"{len(rewards)} rewards are not whole groups of {num_generations}")
    batch_std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    out = []
    for start in range(0, len(rewards), num_generations):
        group = rewards[start:start + num_generations]
        mean = statistics.fmean(group)
        std = {"group": statistics.stdev(group) if len(group) > 1 else 0.0, "batch": batch_std, "none": None}[scale]
        out += [(r - mean) / (std + 1e-4) if std is not None else r - mean for r in group]
    return out


# --------------------------------------------------------------------------- the prompts


def stream(questions: list[data.Question], draws: int, seed: int) -> list[data.Question]:
    """The questions in the order GRPO draws them: ``draws`` passes, each in its own seeded order and with every
    question's options shuffled anew (``train.shuffled``: the gold letter moves with its content)."""
    return train.stream(questions, draws, seed, shuffle_options=True)


def prompt_rows(questions: list[data.Question], arm: str) -> list[dict]:
    """One dataset row per drawn question: the prompt (system + user, as every evaluation asks it; the reasoning arm
    asks for a short analysis first), the gold letter and the option letters."""
    return [{"id": q.id, "prompt": prompts.build_messages(q.question, q.options, reasoning=arm == "reasoning"),
             "gold": q.answer_idx, "letters": "".join(sorted(q.options))} for q in questions]


# --------------------------------------------------------------------------- settings


def settings(cfg) -> dict:
    """The profile's ``grpo`` section, checked."""
    s = copy.deepcopy(dict(cfg["grpo"]))
    s["resume"] = cfg["train.resume"]  # as 02's runs: continue from the last checkpoint of the same run
    s["scale_rewards"] = scale_rewards(s["scale_rewards"])
    if s["arm"] not in ARMS:
        raise ValueError(f"{cfg.source.name}: grpo.arm is {s['arm']!r}; it must be one of {list(ARMS)}")
    batch = s["per_device_train_batch_size"] * s["gradient_accumulation_steps"]
    if s["num_generations"] < 2 or batch % s["num_generations"]:
        raise ValueError(f"{cfg.source.name}: grpo.per_device_train_batch_size x grpo.gradient_accumulation_steps "
                         f"({batch} completions a step) must be a multiple of grpo.num_generations "
                         f"({s['num_generations']}, at least 2): a step learns from whole groups")
    return s


@contextlib.contextmanager
def quiet():
    """trl and peft ask the model for properties transformers 5 renamed (``is_gradient_checkpointing``, ...): noise
    about the libraries' versions, not about this run, kept out of the notebook."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)
        yield


class Trainer(GRPOTrainer):
    """trl's ``GRPOTrainer``, keeping what the loss of the first optimizer step saw: each completion's prompt and
    text, and the advantage trl gave it (``seen``), for 04b's check of the advantages by hand. Once that step is
    done, it and the reward's first call are written to ``checkpoints/first_step.json`` (:func:`first_step`), which a
    resumed run keeps."""

    def __init__(self, *args, reward_funcs, **kwargs):
        funcs = reward_funcs if isinstance(reward_funcs, list | tuple) else [reward_funcs]
        if len(funcs) != 1 or not callable(funcs[0]):
            raise ValueError(f"grpo.Trainer trains on one reward function (a callable, as trl takes it); got {funcs!r}")
        self.reward = funcs[0] if isinstance(funcs[0], Reward) else Reward(funcs[0])  # what it saw, kept
        super().__init__(*args, reward_funcs=[self.reward], **kwargs)
        self.seen: list[dict] = []
        self.add_callback(_FirstStep(self, self.reward))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.state.global_step == 0 and model.training:
            decode = self.processing_class.decode
            for i in range(len(inputs["advantages"])):
                prompt = inputs["prompt_ids"][i][inputs["prompt_mask"][i].bool()]
                completion = inputs["completion_ids"][i][inputs["completion_mask"][i].bool()]
                self.seen.append({"prompt": decode(prompt), "text": decode(completion, skip_special_tokens=True),
                                  "advantage": float(inputs["advantages"][i])})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class _FirstStep(TrainerCallback):
    def __init__(self, trainer: Trainer, reward: Reward):
        self.trainer, self.reward = trainer, reward

    def on_step_end(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / FIRST_STEP
        if state.global_step == 1 and state.is_world_process_zero and self.reward.first and not path.exists():
            files.write_text(path, json.dumps({**self.reward.first, "seen": self.trainer.seen}, ensure_ascii=False))


@dataclass
class Run(train.Run):
    """A GRPO run: :class:`train.Run`'s fields, and the reward it is trained on."""

    reward: Reward | None = None


@dataclass
class Parts:
    """What the GRPO trainer is built from (:func:`parts`): the ``grpo`` settings, the start model (04's merged SFT
    model, in the dtype it was saved in) and its tokenizer, and the prompt rows in the order they are drawn. 04b builds
    its trainer from these in a cell; :func:`prepare` builds the same from them."""

    cfg: object
    settings: dict
    precision: str
    device: str
    out_dir: Path
    seed: int
    start: str  # the start model's folder
    rows: list  # the dataset's rows (prompt_rows): prompt, gold letter, option letters
    tokenizer: object
    model: object
    watch: dashboards.Watch
    use_vllm: bool  # the reasoning arm on a GPU where vLLM is installed: it samples, colocated


def parts(cfg, out_dir: str | Path | None = None, rows: list[dict] | None = None) -> Parts:
    """The start model with its tokenizer, and the prompts from the train split (``grpo.max_steps`` steps of fresh
    draws, each step's prompts over all processes; or ``rows``, in the form of :func:`prompt_rows`)."""
    s = settings(cfg)
    start = models.available(cfg).get(START)
    if start is None:
        raise FileNotFoundError(f"GRPO starts from the merged SFT model, and {models.folder(cfg, START)} has none: "
                                "run notebooks 02 and 04 first")
    out_dir = Path(out_dir) if out_dir else models.folder(cfg, NAME)
    watch = dashboards.watch(cfg, out_dir).check()  # a train.report_to typo stops here, before any model loads
    device = models.best_device(cfg["model.device"])
    precision = models.training_precision(cfg["train.precision"], device)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = int(cfg["seed"])
    questions = data.load_split(cfg, "train")[: s["questions"]]
    # one step's prompts over all processes: trl's generation batch is per_device_train_batch_size x
    # gradient_accumulation_steps x processes completions, whole groups of num_generations
    prompts_per_step = runs.examples_per_step(s, train.world_size()) // s["num_generations"]
    draws = -(-s["max_steps"] * prompts_per_step // len(questions))  # enough passes for max_steps: every draw fresh
    rows = rows if rows is not None else prompt_rows(stream(questions, draws, seed), s["arm"])
    tokenizer = models.load_tokenizer(start, setting=START)
    torch.manual_seed(seed)
    # in the dtype it was saved in (auto): the policy starts as that model exactly, and save() stores that dtype;
    # with train.precision bf16 / fp16 the trainer's forward passes compute under autocast (accelerate's)
    model = models.load_model(start, "auto", setting=START)
    use_vllm = s["arm"] == "reasoning" and device == "cuda" and importlib.util.find_spec("vllm") is not None
    return Parts(cfg, s, precision, device, out_dir, seed, start, rows, tokenizer, model, watch, use_vllm)


def bookkeeping(p: Parts) -> dict:
    """The GRPOConfig fields that say where a run writes and how it runs, not what it learns (activation
    checkpointing among them, named as this transformers names it)."""
    return dict(
        output_dir=str(p.out_dir / "checkpoints"),
        **{train.checkpointing_field(): bool(p.settings["activation_checkpointing"])},
        shuffle_dataset=False,  # the rows are already the draws, each pass in its own seeded order
        use_cpu=p.device == "cpu",
        use_vllm=p.use_vllm,
        vllm_mode="colocate",
        logging_steps=p.settings["logging_steps"],
        logging_first_step=True,
        save_strategy="steps",
        save_steps=p.settings["save_steps"],
        data_seed=p.seed,
        report_to=p.watch.others,
        disable_tqdm=False,
        dataloader_num_workers=0,
    )


def grpo_config(p: Parts) -> GRPOConfig:
    """The run's GRPOConfig from the ``grpo`` settings: what 04b's cell writes out field by field, and what
    :func:`prepare` builds."""
    s = p.settings
    return GRPOConfig(
        max_steps=s["max_steps"],
        learning_rate=float(s["learning_rate"]),
        num_generations=s["num_generations"],
        per_device_train_batch_size=s["per_device_train_batch_size"],
        gradient_accumulation_steps=s["gradient_accumulation_steps"],
        max_completion_length=s["max_completion_length"],
        temperature=float(s["temperature"]),
        beta=float(s["beta"]),
        loss_type=s["loss_type"],
        scale_rewards=s["scale_rewards"],
        bf16=p.precision == "bf16",
        fp16=p.precision == "fp16",
        seed=p.seed,
        **bookkeeping(p),
    )


def adopt(p: Parts, trainer: Trainer) -> Run:
    """The library's part around a trainer built from ``p``: the callbacks that write ``train_log.jsonl`` and feed the
    dashboards, the run key :func:`train_run` compares to resume, and the parts the trainer was built from
    (``train.write_inputs``). The trainer is the one :func:`train_run` trains."""
    s = p.settings
    log = train.JsonlLog(p.out_dir / runs.LOG_FILE)
    for callback in (log, *p.watch.callbacks()):
        trainer.add_callback(callback)
    run_key = {
        "mode": NAME, "base_model": p.cfg.base_model, "base_fingerprint": models.fingerprint(p.model),
        "precision": p.precision, "seed": p.seed, "world_size": train.world_size(),
        "optimizer": {k: s[k] for k in ("max_steps", "arm", "num_generations", "max_completion_length", "temperature",
                                        "learning_rate", "beta", "loss_type", "scale_rewards", "lora")}
        | {"examples_per_step": s["per_device_train_batch_size"] * s["gradient_accumulation_steps"]},
        "inputs": {"data": _digest(p.rows), "start": models.answers_fingerprint(p.cfg, START),
                   "prompt": train.prompt_digest(), "template": _digest(p.tokenizer.chat_template)},
    }
    run_key = json.loads(json.dumps(run_key, default=str))
    if trainer.accelerator.is_main_process:
        train.write_inputs(p.out_dir, {"model": p.start, "settings": s, "precision": p.precision, "seed": p.seed,
                                       "bookkeeping": bookkeeping(p)}, {"rows": p.rows})
    trainer.args.run_name = dashboards.run_name(run_key)
    return Run(NAME, p.out_dir, s, p.precision, p.start, p.tokenizer, trainer.model, trainer, {}, log, run_key,
               watch=p.watch, reward=trainer.reward)


def prepare(cfg, out_dir: str | Path | None = None, rows: list[dict] | None = None) -> Run:
    """The run that 04b's cells build step by step, in one call: :func:`parts`, :func:`grpo_config`, a fresh LoRA
    (``grpo.lora``: :func:`train.lora_config`), the reward (:func:`reward_correct`), the :class:`Trainer` and
    :func:`adopt`."""
    p = parts(cfg, out_dir, rows)
    with quiet():
        trainer = Trainer(model=p.model, reward_funcs=[reward_correct], args=grpo_config(p),
                          train_dataset=Dataset.from_list(p.rows), processing_class=p.tokenizer,
                          peft_config=train.lora_config(p.settings))
    return adopt(p, trainer)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- sampling outside the trainer


def generation_config(trainer: GRPOTrainer) -> GenerationConfig:
    """How the trainer samples a completion: trl's own ``GenerationConfig``, built from the GRPOConfig (temperature,
    top_p, top_k, min_p, repetition_penalty 1.0, max_completion_length, every end-of-turn id), not the model's
    ``generation_config`` (the model's repetition_penalty, top_k and top_p do not apply). With vLLM trl keeps none
    (vLLM samples with the same settings): built here as trl builds it for transformers."""
    if getattr(trainer, "generation_config", None) is not None:
        return trainer.generation_config
    tokenizer = trainer.processing_class
    return GenerationConfig(max_new_tokens=trainer.max_completion_length, do_sample=True,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=trainer.eos_token_ids, temperature=trainer.temperature, top_p=trainer.top_p,
                            top_k=trainer.top_k, min_p=trainer.min_p, repetition_penalty=trainer.repetition_penalty,
                            cache_implementation=trainer.args.cache_implementation,
                            **(trainer.args.generation_kwargs or {}), disable_compile=True)


def sample(trainer: GRPOTrainer, rows: list[dict], seed: int = 0, model=None) -> list[dict]:
    """Each row's prompt sampled as the trainer samples a group: ``grpo.num_generations`` times, with the trainer's
    :func:`generation_config`, cut after the first end-of-turn token as trl cuts it; scored with :func:`correct`. One
    dict per completion (``id``, ``gold``, ``letters``, ``tokens``: the completion's token ids, ``text``, ``chosen``
    letter or None, ``reward``). ``model``: another model to sample (default: the trainer's). 04b runs it under the
    start model before training (which prompts have a reward spread) and under the trained model after (the letters
    each chooses). Seeded with ``seed`` without touching the trainer's random stream: its training samples what it would
    have sampled without this call."""
    tokenizer, config, eos = trainer.processing_class, generation_config(trainer), trainer.eos_token_ids
    model = model if model is not None else trainer.accelerator.unwrap_model(trainer.model_wrapped)
    model.eval()
    with torch.random.fork_rng():  # seeded here, and the trainer's own random stream left as it was
        torch.manual_seed(seed)
        return _sample(model, tokenizer, config, eos, rows, trainer.num_generations)


def _sample(model, tokenizer, config, eos, rows, num_generations) -> list[dict]:
    out = []
    for row in rows:
        ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        ids = {k: v.repeat(num_generations, 1).to(model.device) for k, v in ids.items()}  # a group, as trl
        with torch.no_grad():
            new = model.generate(**ids, generation_config=config)[:, ids["input_ids"].shape[1]:].tolist()
        for tokens in new:
            end = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
            text = tokenizer.decode(tokens[:end], skip_special_tokens=True)
            out.append({"id": row["id"], "gold": row["gold"], "letters": row["letters"], "tokens": tokens[:end],
                        "text": text, "chosen": answers.extract_letter(text, row["letters"]),
                        "reward": correct(text, row["gold"], row["letters"])})
    return out


def spread(samples: list[dict]) -> list[dict]:
    """Per prompt of :func:`sample`'s completions: the mean reward, and whether the group has a spread (some right,
    some wrong: only such a group has non-zero advantages, and teaches anything)."""
    by_id: dict[str, list[float]] = {}
    for s in samples:
        by_id.setdefault(s["id"], []).append(s["reward"])
    return [{"id": i, "mean_reward": statistics.fmean(r), "spread": len(set(r)) > 1} for i, r in by_id.items()]


# --------------------------------------------------------------------------- training



def train_run(run: Run, resume: bool | None = None) -> dict:
    """Train (resuming from the last checkpoint of the same run, as 02 does: ``train.resume``), merge the adapter into
    the start model and save it as ``models/grpo/`` with ``run.json``; a finished run is not trained again."""
    resume = bool(run.settings["resume"]) if resume is None else resume
    done = run.out_dir / runs.RUN_FILE
    if resume and done.is_file():
        previous = json.loads(done.read_text(encoding="utf-8"))
        if train.same_run(previous.get("run_key"), run.run_key):
            print(f"{run.out_dir} already holds this GRPO run, finished; returning its measurements "
                  "(set train.resume to false to train again)")
            return previous
    accelerator = run.trainer.accelerator
    checkpoint, changes = train.resume_point(run, resume)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        train.tidy(run, resume, checkpoint, changes)
        run.watch.restart(run.run_key, runs.read_log(run.out_dir))
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    with train.peak_memory() as memory, quiet():
        result = run.trainer.train(resume_from_checkpoint=checkpoint)
    wall = time.perf_counter() - start
    log = runs.read_log(run.out_dir)
    steps = len(run.log.step_seconds)
    metrics = {
        "mode": NAME, "arm": run.settings["arm"], "start_model": run.base_model, "precision": run.precision,
        "device": memory["device"], "optimizer_steps": run.trainer.state.global_step, "steps_this_session": steps,
        "resumed_from": checkpoint, "wall_seconds": wall,
        "median_step_seconds": statistics.median(run.log.step_seconds) if steps else None,
        "completions_per_step": runs.examples_per_step(run.settings, run.run_key["world_size"]),  # all processes
        "peak_memory_gib": memory["peak_gib"], "train_loss_mean": result.training_loss if steps else None,
        "reward_first": next((r["reward"] for r in log if "reward" in r), None),
        "reward_last": next((r["reward"] for r in reversed(log) if "reward" in r), None),
        "settings": run.settings, "out_dir": str(run.out_dir), "run_key": run.run_key,
    }
    save(run, metrics)
    return metrics


def save(run: Run, metrics: dict) -> Path:
    """The adapter merged into the start model (peft's ``merge_and_unload``), saved in the start model's dtype with
    the tokenizer and ``run.json``: a plain model folder, which 06-08 load, serve and export like ``merged``."""
    out = run.out_dir
    accelerator = run.trainer.accelerator
    if accelerator.is_main_process:
        tmp = out.with_name(out.name + ".saving")
        shutil.rmtree(tmp, ignore_errors=True)
        model = accelerator.unwrap_model(run.trainer.model_wrapped).merge_and_unload()
        model.save_pretrained(tmp)
        run.tokenizer.save_pretrained(tmp)
        (tmp / runs.RUN_FILE).write_text(json.dumps(metrics, indent=2, default=str, ensure_ascii=False), encoding="utf-8")
        files.move_into(tmp, out, last=(runs.MODEL_WEIGHTS, runs.RUN_FILE))
    accelerator.wait_for_everyone()
    return out


def first_step(run_dir: str | Path) -> dict:
    """What the first optimizer step of the run in ``run_dir`` saw: the prompts, completion texts and rewards of its
    first generation (``Reward.first``) and each completion's advantage in the loss (``seen``: ``Trainer.seen``)."""
    path = Path(run_dir) / "checkpoints" / FIRST_STEP
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: train the GRPO run first (grpo.train_run())")
    return json.loads(path.read_text(encoding="utf-8"))
