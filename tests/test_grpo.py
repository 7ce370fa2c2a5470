"""GRPO (notebook 04b) on the tiny smoke model: the reward, the shuffled draws, the advantages, and a planted task
that only reinforcement learning can teach."""
import json
import shutil
import statistics

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import TrainerCallback

from helpers import Crash, at_root, crash_at
from medqa_zh import answers, config, dashboards, data, grpo, models, prompts, runs, train

pytestmark = pytest.mark.timeout(1200)  # a hang fails with its stack; at least 5x the longest such test measured with both cores busy


@pytest.fixture(scope="module")
def start(smoke_root):
    """The smoke project with a start model for GRPO in merged/: the tiny model after a full SFT sharp enough (80 steps at
    a high learning rate, options shuffled) that its samples at temperature 1 are answer lines, 答案：X, with every
    letter X about as often (smoke's own LoRA run leaves the tiny model's distribution nearly flat)."""
    with at_root(smoke_root):
        cfg = config.load("smoke", {"train.full.learning_rate": 1.0e-2, "train.full.max_steps": 80,
                                    "train.shuffle_options": True, "train.eval_steps": 40, "train.save_steps": 200})
        run = train.prepare(cfg, "full", out_dir=cfg.out / "models" / "sharp")
        train.train(run, resume=False)
        merged = models.folder(cfg, "merged")
        shutil.rmtree(merged, ignore_errors=True)
        shutil.copytree(run.out_dir, merged, ignore=shutil.ignore_patterns("checkpoints*"))
    return smoke_root


@pytest.mark.parametrize("text, reward", [("答案：B", 1.0), ("答案：C", 0.0), ("答案：B和C", 0.0), ("答案：", 0.0),
                                          ("我认为是B。答案：B", 1.0), ("A、B都对", 0.0), ("", 0.0), ("答案：F", 0.0)])
def test_the_reward_is_one_only_for_exactly_the_gold_letter(text, reward):
    assert grpo.correct(text, "B") == reward


def test_the_reward_function_reads_trls_conversational_completions_and_keeps_what_it_saw():
    reward = grpo.Reward()
    assert reward.__name__ == "reward_correct"  # trl logs rewards/reward_correct/mean
    completions = [[{"role": "assistant", "content": t}] for t in ("答案：A", "答案：B", "A和B", "")]
    got = reward(prompts=[[]] * 4, completions=completions, gold=["A"] * 4, letters=["ABCDE"] * 4)
    assert got == [1.0, 0.0, 0.0, 0.0]
    assert reward.calls[0]["chosen"] == ["A", "B", None, None] and reward.first["texts"][1] == "答案：B"
    assert reward.letters(reward.calls) == {"A": 1, "B": 1, None: 2}


def test_every_draw_shuffles_the_options_and_moves_the_gold_letter_with_its_text(smoke):
    questions = data.load_split(smoke(), "train")[:20]
    drawn = grpo.stream(questions, 3, seed=0)
    assert drawn == grpo.stream(questions, 3, seed=0)  # seeded
    by_id = {q.id: q for q in questions}
    for q in drawn:
        original = by_id[q.id]
        assert q.options[q.answer_idx] == original.options[original.answer_idx]  # the gold text under its new letter
        assert sorted(q.options.values()) == sorted(original.options.values())
    first, second = drawn[:20], drawn[20:40]
    assert sum(a.options != by_id[a.id].options for a in first) > 10  # most draws differ from the file's order
    assert [q.options for q in sorted(first, key=lambda q: q.id)] != [q.options for q in sorted(second, key=lambda q: q.id)]
    rows = grpo.prompt_rows(drawn[:2], "answer")
    assert rows[0]["prompt"] == prompts.build_messages(drawn[0].question, drawn[0].options)  # as every evaluation asks
    assert rows[0]["gold"] == drawn[0].answer_idx and rows[0]["letters"] == "".join(sorted(drawn[0].options))


@pytest.mark.parametrize("scale", ["group", "batch", "none", True, False])
def test_group_advantages_center_each_group_and_scale_as_trl_says(scale):
    rewards = [1, 0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1]  # a step of three groups of 4: one with no spread
    groups = [rewards[i:i + 4] for i in range(0, len(rewards), 4)]
    std = {"group": [statistics.stdev(g) for g in groups], "batch": [statistics.stdev(rewards)] * len(groups),
           "none": None}[{True: "group", False: "none"}.get(scale, scale)]  # trl's aliases: True is group, False none
    expected = [(r - statistics.fmean(g)) / (std[k] + 1e-4) if std else r - statistics.fmean(g)
                for k, g in enumerate(groups) for r in g]
    got = grpo.group_advantages(rewards, 4, scale)
    assert got == pytest.approx(expected) and got[8:] == [0, 0, 0, 0]  # no spread: nothing to learn
    assert sum(got[:4]) == pytest.approx(0) and sum(got[4:8]) == pytest.approx(0)  # centred on each group's mean


def test_group_advantages_refuse_a_scale_trl_does_not_know_and_partial_groups():
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo.group_advantages([1, 0], 2, "global")
    with pytest.raises(ValueError, match="whole groups"):
        grpo.group_advantages([1, 0, 1], 2)


def test_a_group_needs_whole_groups_per_step(smoke):
    with pytest.raises(ValueError, match="multiple of grpo.num_generations"):
        grpo.settings(smoke(**{"grpo.num_generations": 3}))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_the_advantages_by_hand_are_the_trainers(start, smoke, scale):
    """One step of two micro-batches (four groups) under each grpo.scale_rewards: group_advantages of the step's
    rewards is what trl's loss saw for every completion (batch: divided by the std of the whole step's rewards)."""
    cfg = smoke(**{"grpo.max_steps": 1, "grpo.scale_rewards": scale, "grpo.gradient_accumulation_steps": 2})
    run = grpo.prepare(cfg, out_dir=cfg.out / "models" / f"grpo-check-{scale}")
    metrics = grpo.train_run(run, resume=False)
    assert metrics["optimizer_steps"] == 1 and (run.out_dir / "model.safetensors").is_file()
    first, g = run.reward.first, run.settings["num_generations"]
    assert len(first["rewards"]) == len(run.trainer.seen) == 2 * cfg["grpo.per_device_train_batch_size"]
    by_hand = grpo.group_advantages(first["rewards"], g, scale)
    for start_row in range(0, len(first["texts"]), g):
        texts = first["texts"][start_row:start_row + g]
        prompt = run.tokenizer.apply_chat_template(first["prompts"][start_row], tokenize=False, add_generation_prompt=True)
        trainers = {row["text"]: row["advantage"] for row in run.trainer.seen if row["prompt"] == prompt}
        assert trainers and trainers.keys() == set(texts)
        for text, advantage in zip(texts, by_hand[start_row:start_row + g], strict=True):
            assert trainers[text] == pytest.approx(advantage, abs=1e-5)
    others = [grpo.group_advantages(first["rewards"], g, other) for other in ("group", "batch", "none") if other != scale]
    assert all(other != pytest.approx(by_hand, abs=1e-3) for other in others)  # this step tells the three apart
    assert grpo.first_step(run.out_dir)["seen"] == run.trainer.seen


class _AdapterB(TrainerCallback):
    """The largest |weight| of the LoRA adapter's B matrices when training ends (0: the adapter changes nothing)."""

    largest = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.largest = max(p.abs().max().item() for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("dtype, precision", [("float32", "bf16"), ("bfloat16", "fp32")])
def test_grpo_keeps_the_start_models_dtype_from_load_to_save(start, smoke, monkeypatch, dtype, precision):
    """A start model saved in ``dtype``, trained in another precision (bf16: the trainer's autocast over float32
    weights; fp32: no autocast over bfloat16 weights): with the adapter's B still 0 after a step at learning rate 0, the saved
    grpo model is the start model, bit for bit and in its dtype."""
    cfg = smoke(**{"grpo.max_steps": 1, "grpo.learning_rate": 0.0, "train.precision": precision})
    folder = cfg.out / "models" / f"start-{dtype}"  # merged, saved in dtype, as prepare's start
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(models.folder(cfg, grpo.START), folder, ignore=shutil.ignore_patterns("checkpoints*"))
    model = models.load_model(str(folder), dtype)
    with torch.no_grad():
        for weight in model.parameters():  # float32 weights off the bfloat16 grid, so rounding them would show
            weight.mul_(1 + 2**-12)
    model.save_pretrained(folder)
    available = models.available
    monkeypatch.setattr(models, "available", lambda cfg: {**available(cfg), grpo.START: str(folder)})
    before = load_file(folder / runs.MODEL_WEIGHTS)
    assert {t.dtype for t in before.values()} == {models.torch_dtype(dtype)}
    run = grpo.prepare(cfg, out_dir=cfg.out / "models" / f"grpo-{dtype}")
    assert run.base_model == str(folder) and run.trainer.args.bf16 == (precision == "bf16")
    adapter = _AdapterB()
    run.trainer.add_callback(adapter)
    assert grpo.train_run(run, resume=False)["optimizer_steps"] == 1
    assert adapter.largest == 0
    saved = load_file(run.out_dir / runs.MODEL_WEIGHTS)
    assert saved.keys() == before.keys()
    differ = [k for k in before if saved[k].dtype != before[k].dtype or not torch.equal(saved[k], before[k])]
    assert not differ, f"{len(differ)} of {len(before)} tensors differ from the start model's, e.g. {differ[:3]}"


def test_the_sampler_draws_the_tokens_trl_draws(start, smoke, monkeypatch):
    """trl's own sampling in training (its tokenizing, its GenerationConfig, its cut after the end of the turn: the
    prompts and tokens its reward function is given), each generation started from seed 0, and grpo.sample of the
    same prompt under seed 0 draw the same tokens. One prompt a step (a group of 8) at learning rate 0: the model the
    sampler reads is the one trl sampled. At temperature 2 the draws spread over many tokens, so a difference in how
    the logits are processed (the tiny model's own generation_config has repetition_penalty 1.05; trl's 1.0) shows."""
    cfg = smoke(**{"grpo.max_steps": 3, "grpo.num_generations": 8, "grpo.per_device_train_batch_size": 8,
                   "grpo.learning_rate": 0.0, "grpo.temperature": 2.0, "grpo.max_completion_length": 12})
    run = grpo.prepare(cfg, out_dir=cfg.out / "models" / "grpo-sampler")
    trainer = run.trainer
    assert run.model.generation_config.repetition_penalty != trainer.generation_config.repetition_penalty
    generate, drawn = run.model.generate, []

    def seeded(*args, **kwargs):
        torch.manual_seed(0)
        return generate(*args, **kwargs)

    def recorded(prompts, completions, completion_ids, **kwargs):
        row = {"prompt": prompts[0], **{k: kwargs[k][0] for k in ("id", "gold", "letters")}}
        drawn.append((row, completion_ids, [grpo.completion_text(c) for c in completions]))
        return run.reward(prompts=prompts, completions=completions, **kwargs)

    trainer.reward_funcs[0] = recorded
    with monkeypatch.context() as patch:
        patch.setattr(run.model, "generate", seeded)
        trainer.train()
    assert len(drawn) == 3 and all(len(ids) == 8 for _, ids, _ in drawn)
    for row, ids, texts in drawn:
        state = torch.get_rng_state()
        samples = grpo.sample(trainer, [row], seed=0)
        assert torch.equal(torch.get_rng_state(), state)  # seeded aside: the trainer's random stream is left alone
        assert [s["tokens"] for s in samples] == ids and [s["text"] for s in samples] == texts
        assert len({tuple(t) for t in ids}) > 1  # the draws differ within the group
    trls = trainer.generation_config.to_dict()
    monkeypatch.delattr(trainer, "generation_config")  # as with vLLM: trl keeps none, and the sampler builds trl's
    assert grpo.generation_config(trainer).to_dict() == trls


def test_the_draws_cover_every_process_of_a_launched_run(start, smoke, monkeypatch):
    """With 2 processes one step samples the prompts of both (trl's generation batch: per_device_train_batch_size x
    gradient_accumulation_steps x processes completions), so the stream holds max_steps such steps of fresh draws:
    a second pass over the same rows would repeat their shuffles."""
    monkeypatch.setattr(train, "world_size", lambda: 2)
    cfg = smoke(**{"grpo.questions": 8})
    s = grpo.settings(cfg)
    run = grpo.prepare(cfg, out_dir=cfg.out / "models" / "grpo-two")
    prompts_per_step = s["per_device_train_batch_size"] * s["gradient_accumulation_steps"] * 2 // s["num_generations"]
    assert run.run_key["world_size"] == 2
    assert len(run.trainer.train_dataset) >= s["max_steps"] * prompts_per_step


def test_a_planted_task_only_reinforcement_learning_can_teach_raises_the_reward(start, smoke):
    """Every gold letter is B (no shuffle, and no SFT example says so): the SFT model answers B about as often as any
    other letter, and GRPO's reward, B or not, must rise as it learns the preference."""
    # 40 steps: the tiny base model is pretrained now (the smoke world's planted letter prior), and its SFT start takes
    # longer to move than a random model's (30 steps raised the reward 0.22 -> 0.39)
    cfg = smoke(**{"grpo.max_steps": 40, "grpo.learning_rate": 5.0e-3, "grpo.beta": 0.0, "grpo.num_generations": 8,
                   "grpo.per_device_train_batch_size": 16})
    rows = [{**row, "gold": "B"} for row in grpo.prompt_rows(data.load_split(cfg, "train")[:48], "answer")]
    run = grpo.prepare(cfg, out_dir=cfg.out / "models" / "grpo-planted", rows=rows)
    grpo.train_run(run, resume=False)
    rewards = [statistics.fmean(call["rewards"]) for call in run.reward.calls]
    first, last = statistics.fmean(rewards[:6]), statistics.fmean(rewards[-6:])
    before, after = run.reward.letters(run.reward.calls[:6]), run.reward.letters(run.reward.calls[-6:])
    print(f"planted task: mean reward {first:.2f} in the first 6 steps, {last:.2f} in the last 6; letters {before} -> {after}")
    assert first < 0.4 and last > first + 0.2, rewards
    assert after["B"] / sum(after.values()) > before["B"] / sum(before.values())


def test_a_crashed_grpo_run_resumes_from_its_last_checkpoint(start, smoke):
    cfg = smoke(**{"grpo.max_steps": 4, "grpo.save_steps": 2})
    run = grpo.prepare(cfg, out_dir=cfg.out / "models" / "grpo-crash")
    run.trainer.add_callback(crash_at(3))
    with pytest.raises(Crash):
        grpo.train_run(run, resume=False)
    first = grpo.first_step(run.out_dir)  # written when the crash came: the first step is the run's, not the resume's
    resumed = grpo.prepare(cfg, out_dir=run.out_dir)
    metrics = grpo.train_run(resumed)
    assert metrics["resumed_from"].endswith("checkpoint-2") and metrics["optimizer_steps"] == 4
    assert grpo.first_step(run.out_dir) == first
    steps = [r["step"] for r in runs.read_log(run.out_dir) if "reward" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 4  # steps 3-4 redone, each logged once
    assert grpo.train_run(grpo.prepare(cfg, out_dir=run.out_dir)) == runs.read_run(run.out_dir)  # finished: not again


def test_the_reasoning_arm_asks_for_an_analysis_first_and_trains(start, smoke):
    cfg = smoke(**{"grpo.arm": "reasoning", "grpo.max_steps": 1, "grpo.max_completion_length": 16})
    run = grpo.prepare(cfg, out_dir=cfg.out / "models" / "grpo-reasoning")
    user = run.trainer.train_dataset[0]["prompt"][1]["content"]
    assert user.endswith(prompts.REASONING_HINT) and prompts.ANSWER_FORMAT_HINT not in user
    metrics = grpo.train_run(run, resume=False)
    assert metrics["arm"] == "reasoning" and metrics["optimizer_steps"] == 1
    assert max(r["completions/max_length"] for r in runs.read_log(run.out_dir) if "completions/max_length" in r) <= 16


def test_a_grpo_run_with_another_setting_starts_over_and_names_it(start, smoke, capsys):
    cfg = smoke(**{"grpo.max_steps": 3, "grpo.save_steps": 1})
    run = grpo.prepare(cfg, out_dir=cfg.out / "models" / "grpo-changed")
    run.trainer.add_callback(crash_at(2))
    with pytest.raises(Crash):
        grpo.train_run(run, resume=False)
    other = grpo.prepare(smoke(**{"grpo.max_steps": 3, "grpo.save_steps": 1, "grpo.learning_rate": 1.0e-4}),
                         out_dir=run.out_dir)
    metrics = grpo.train_run(other)
    assert metrics["resumed_from"] is None and "(grpo.learning_rate changed)" in capsys.readouterr().out
    assert (run.out_dir / train.ASIDE / "checkpoint-1").is_dir()


def test_grpo_curves_reach_the_dashboard_as_they_are_logged(start, smoke):
    pytest.importorskip("tensorboard")
    cfg = smoke(**{"grpo.max_steps": 2, "train.report_to": "tensorboard"})
    run = grpo.prepare(cfg, out_dir=cfg.out / "models" / "grpo-watched")
    grpo.train_run(run, resume=False)
    logged = [(r["step"], r["reward"]) for r in runs.read_log(run.out_dir) if "reward" in r]
    shown = dashboards.read_tensorboard(run.out_dir / runs.TENSORBOARD_DIR, "train/reward")
    assert len(logged) == 2 and [s for s, _ in shown] == [s for s, _ in logged]
    assert [v for _, v in shown] == pytest.approx([v for _, v in logged])
    assert dashboards.read_tensorboard(run.out_dir / runs.TENSORBOARD_DIR, "train/frac_reward_zero_std")


def test_a_grpo_trainer_built_from_the_parts_with_a_reward_written_outside_is_prepares(start, smoke, monkeypatch):
    """04b's cell builds GRPOConfig, the LoRA, the reward (its own trl reward function) and grpo.Trainer from
    grpo.parts: the config equals grpo.prepare's, the reward the trainer calls is the cell's function (kept in a
    grpo.Reward), grpo.train_run trains that very trainer, and the parts it was built from are in inputs/."""
    cfg = smoke(**{"grpo.max_steps": 1})
    scored = []

    def reward_correct(completions, gold, letters, **kwargs) -> list[float]:  # trl's reward function, as 04b writes it
        texts = [c[0]["content"] for c in completions]
        scored.extend(texts)
        return [float(answers.extract_letter(t, ls) == g) for t, g, ls in zip(texts, gold, letters, strict=True)]

    p = grpo.parts(cfg, out_dir=cfg.out / "models" / "grpo-parts")
    args = grpo.grpo_config(p)
    trainer = grpo.Trainer(model=p.model, reward_funcs=[reward_correct], args=args,
                           peft_config=train.lora_config(p.settings), train_dataset=Dataset.from_list(p.rows),
                           processing_class=p.tokenizer)
    run = grpo.adopt(p, trainer)
    reward = trainer.reward
    assert reward.fn is reward_correct and run.reward is reward
    prepared = grpo.prepare(cfg, out_dir=cfg.out / "models" / "grpo-parts")
    assert prepared.trainer.args.to_dict() == trainer.args.to_dict() and prepared.run_key == run.run_key
    trained = []
    original = grpo.Trainer.train
    monkeypatch.setattr(grpo.Trainer, "train", lambda self, *a, **kw: trained.append(self) or original(self, *a, **kw))
    grpo.train_run(run, resume=False)
    assert trained == [trainer]
    n = p.settings["per_device_train_batch_size"] * p.settings["gradient_accumulation_steps"]
    inputs = run.out_dir / runs.INPUTS
    assert [json.loads(line) for line in (inputs / "rows.jsonl").read_text(encoding="utf-8").splitlines()] == p.rows
    assert json.loads((inputs / "parts.json").read_text(encoding="utf-8"))["bookkeeping"] == grpo.bookkeeping(p)
    assert len(scored) == n and reward.calls[0]["rewards"] == [grpo.correct(t, g) for t, g in
                                                               zip(reward.first["texts"], reward.calls[0]["gold"], strict=True)]
