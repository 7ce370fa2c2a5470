"""GRPO (notebook 04b) on the tiny smoke model: the reward, the shuffled draws, the advantages, and a planted task
that only reinforcement learning can teach."""
import shutil
import statistics

import pytest

from helpers import Crash, at_root, crash_at
from medqa_zh import config, dashboards, data, grpo, models, prompts, runs, train


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


def test_group_advantages_are_the_rewards_against_their_group():
    assert grpo.group_advantages([1, 1, 1, 1]) == [0, 0, 0, 0]  # no spread: nothing to learn
    adv = grpo.group_advantages([1, 0, 0, 0])
    assert adv[0] == pytest.approx(0.75 / (statistics.stdev([1, 0, 0, 0]) + 1e-4)) and sum(adv) == pytest.approx(0)


def test_a_group_needs_whole_groups_per_step(smoke):
    with pytest.raises(ValueError, match="multiple of grpo.num_generations"):
        grpo.settings(smoke(**{"grpo.num_generations": 3}))


def test_the_advantages_by_hand_are_the_trainers(start, smoke):
    cfg = smoke(**{"grpo.max_steps": 1})
    run = grpo.prepare(cfg, out_dir=cfg.out / "models" / "grpo-check")
    metrics = grpo.train_run(run, resume=False)
    assert metrics["optimizer_steps"] == 1 and (run.out_dir / "model.safetensors").is_file()
    first, g = run.reward.first, run.settings["num_generations"]
    checked = 0
    for start_row in range(0, len(first["texts"]), g):
        texts, rewards = first["texts"][start_row:start_row + g], first["rewards"][start_row:start_row + g]
        prompt = run.tokenizer.apply_chat_template(first["prompts"][start_row], tokenize=False, add_generation_prompt=True)
        by_hand = dict(zip(texts, grpo.group_advantages(rewards), strict=True))
        trainers = {row["text"]: row["advantage"] for row in run.trainer.seen if row["prompt"] == prompt}
        assert trainers and trainers.keys() == by_hand.keys()
        for text, advantage in by_hand.items():
            assert trainers[text] == pytest.approx(advantage, abs=1e-5)
        checked += 1
    assert checked == len(first["texts"]) // g
    assert any(len(set(first["rewards"][i:i + g])) > 1 for i in range(0, len(first["rewards"]), g))  # a group with a spread


def test_a_planted_task_only_reinforcement_learning_can_teach_raises_the_reward(start, smoke):
    """Every gold letter is B (no shuffle, and no SFT example says so): the SFT model answers B about as often as any
    other letter, and GRPO's reward, B or not, must rise as it learns the preference."""
    cfg = smoke(**{"grpo.max_steps": 30, "grpo.learning_rate": 5.0e-3, "grpo.beta": 0.0, "grpo.num_generations": 8,
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
