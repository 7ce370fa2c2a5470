"""results: each evaluation's answers on disk, resumable after a crash, indexed for the report."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from medqa_zh import config, models, results, runs

QUESTIONS = [SimpleNamespace(id=f"dev:{i}", answer_idx="A") for i in range(8)]


class Boom(RuntimeError):
    pass


def test_run_cached_resumes_after_a_crash_and_never_repeats(tmp_path):
    questions = QUESTIONS
    path = tmp_path / "results.jsonl"
    calls = []

    def score(batch, fail_on=None):
        calls.append([q.id for q in batch])
        if fail_on is not None and len(calls) == fail_on:
            raise Boom
        return [{"id": q.id, "gold": q.answer_idx, "pred": "A"} for q in batch]

    with pytest.raises(Boom):
        results.run_cached(path, questions, lambda b: score(b, fail_on=3), batch_size=3, progress=False)
    assert len(results.read(path)) == 6  # two batches were written before the crash
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"id": "torn')  # and a crash in the middle of writing a line
    calls.clear()
    rows = results.run_cached(path, questions, score, batch_size=3, progress=False)
    assert [r["id"] for r in rows] == [q.id for q in questions]
    assert sum(len(c) for c in calls) == len(questions) - 6  # only the unfinished ones
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(questions) and len({json.loads(line)["id"] for line in lines}) == len(questions)
    calls.clear()
    assert results.run_cached(path, questions, score, progress=False) == rows and not calls


def test_a_results_file_torn_inside_a_chinese_character_is_named_and_that_question_redone(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    rows = [{"id": f"q:{i}", "gold": "A", "pred": "A", "answer": "答案：A"} for i in range(3)]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    cut = text.rindex("答".encode("utf-8")) + 1  # one byte into a three-byte character of the last line
    path.write_bytes(text[:cut])
    assert results.read(path) == rows[:2]
    assert f"{path}:3: incomplete last line" in capsys.readouterr().out
    questions = [type("Q", (), {"id": r["id"], "answer_idx": "A"})() for r in rows]
    redone = []
    out = results.run_cached(path, questions, lambda batch: redone.extend(batch) or [rows[2]], progress=False)
    assert out == rows and [q.id for q in redone] == ["q:2"]
    assert results.read(path) == rows  # the torn line is gone from the file


def test_run_cached_refuses_results_of_other_questions(tmp_path):
    questions = QUESTIONS
    path = tmp_path / "results.jsonl"
    path.write_text('{"id": "other:1", "gold": "A", "pred": "A"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="not in this evaluation"):
        results.run_cached(path, questions, lambda b: [], progress=False)


def test_collect_reads_what_the_evaluations_recorded_and_says_what_it_left_out(project):
    cfg = config.load("smoke")
    questions = [SimpleNamespace(id=f"q{i}") for i in range(4)]
    fp = models.answers_fingerprint(cfg, "base")
    answer = lambda batch: [{"id": q.id, "gold": "B", "pred": "B"} for q in batch]  # noqa: E731
    for method in ("letter", "generate"):
        results.run_cached(results.path_for(cfg, "base", method, fp), questions, answer, label=("base", method))
    # a model that is gone, a file of a model trained since, and answers to other questions
    results.run_cached(results.path_for(cfg, "merged", "letter", "0123abcd"), questions, answer,
                       label=("merged", "letter"))
    results.run_cached(results.path_for(cfg, "base", "api-x", "0123abcd", "api"), questions, answer,
                       label=("base", "api"))
    results.run_cached(results.path_for(cfg, "base", "api-x-rag", fp, "rag"), questions[:3], answer,
                       label=("base", "api+rag bm25"))
    index = json.loads((cfg.out / "eval" / "index.json").read_text())
    assert index["base|letter"]["file"] == f"direct/base-letter-{fp}.jsonl"

    got, skipped = results.collect(cfg, questions)
    assert list(got) == [("base", "letter"), ("base", "generate")]
    assert [r["id"] for r in got["base", "letter"]] == ["q0", "q1", "q2", "q3"]
    reasons = {(s["model"], s["evaluation"]): s["reason"] for s in skipped}
    assert "merged model is gone" in reasons["merged", "letter"]
    assert "trained again" in reasons["base", "api"]
    assert "answers 3 questions, not the 4" in reasons["base", "api+rag bm25"]
    # a rerun replaces the entry: now the API answers are current
    results.run_cached(results.path_for(cfg, "base", "api-x", fp, "api"), questions, answer,
                       label=("base", "api"))
    got, _ = results.collect(cfg, questions)
    assert ("base", "api") in got
    # a profile that turns generation off: the answers an earlier run generated are left out, and why
    got, skipped = results.collect(config.load("smoke", {"eval.generate_questions": 0}), questions)
    assert list(got) == [("base", "letter")]
    reasons = {(s["model"], s["evaluation"]): s["reason"] for s in skipped}
    assert "eval.generate_questions is 0" in reasons["base", "generate"] and "earlier run" in reasons["base", "api"]


def test_in_process_loads_a_model_only_for_what_is_missing_and_records_each_evaluation(project, tiny_assets,
                                                                                      monkeypatch):
    from medqa_zh import data

    cfg = config.setup("smoke", {"eval.rotation_questions": 2, "eval.generate_questions": 3,
                                 "eval.calibration_questions": 5})
    data.ensure_splits(cfg)
    questions = data.load_split(cfg, "eval")[:4]
    validation = data.load_split(cfg, "validation")
    loads, real = [], models.load_for_eval
    monkeypatch.setattr(models, "load_for_eval", lambda cfg, name: loads.append(name) or real(cfg, name))
    got = results.in_process(cfg, "base", questions, progress=False)
    assert list(got) == ["letter", "generate", "rotations", "calibration"] and loads == ["base"]
    assert [len(got[e]) for e in got] == [4, 3, 2, 5]  # each on its own questions (results.questions_for)
    assert all(r["id"] == q.id for e in ("letter", "generate") for r, q in zip(got[e], questions[: len(got[e])], strict=True))
    assert [r["id"] for r in got["calibration"]] == [q.id for q in validation[:5]]  # validation, never eval
    index = json.loads((cfg.out / "eval" / results.INDEX).read_text())
    assert {k for k in index} == {"base|letter", "base|generate", "base|rotations", "base|calibration"}
    assert results.in_process(cfg, "base", questions, progress=False) == got and loads == ["base"]  # all cached
    passages = {"bm25": ("rag-bm25-test", {q.id: [] for q in questions})}
    more = results.in_process(cfg, "base", questions, [results.LETTER], passages=passages, progress=False)
    assert list(more) == ["letter", "letter+rag bm25"]  # with passages: the evaluations asked for, no more
    more = results.in_process(cfg, "base", questions, [results.LETTER, results.CALIBRATION, results.ROTATIONS],
                              passages=passages, progress=False)
    assert list(more) == ["letter", "calibration", "rotations", "letter+rag bm25", "calibration+rag bm25",
                          "rotations+rag bm25"]
    assert loads == ["base", "base", "base"]
    assert "base|calibration+rag bm25" in json.loads((cfg.out / "eval" / results.INDEX).read_text())
    answers, skipped = results.collect(cfg, questions)  # each evaluation checked against its own questions
    assert not skipped and len(answers["base", "calibration"]) == 5 and len(answers["base", "generate"]) == 3
    with pytest.raises(ValueError, match="unknown in-process evaluation api"):
        results.in_process(cfg, "base", questions, ["api"])


@pytest.mark.parametrize(("kept", "steps"), [(None, [0, 2, 4]), (1, [0, 4])])
def test_the_learning_curve_reads_the_checkpoints_a_run_kept(smoke, kept, steps, monkeypatch):
    from medqa_zh import data, train

    cfg = smoke(**{"train.max_steps": 4, "train.save_steps": 2, "train.eval_steps": 2, "train.save_total_limit": kept,
                   "train.precision": "fp32", "train.curve_questions": 6, "eval.calibration_questions": 4})
    monkeypatch.setattr(models, "folder", lambda cfg, name, real=models.folder: real(cfg, name).with_name(f"{name}-{kept}"))
    run = train.prepare(cfg, "lora")
    train.train(run)
    del run
    kept_steps = [step for step, _ in results.checkpoints(models.folder(cfg, "lora"))]
    assert kept_steps == steps[1:]
    curve = results.learning_curve(cfg, progress=False)
    assert list(curve["step"]) == steps and list(curve["checkpoint"]) == ["base"] + [f"checkpoint-{s}" for s in steps[1:]]
    assert set(curve["n"]) == {6} and set(curve["calibration_n"]) == {4}
    assert curve["pride"].between(0, 1).all() and (curve["pride_ci_low"] <= curve["pride"]).all()
    # each point paired with the base (step 0) on the same validation questions: the verdict's validation evidence
    assert curve.loc[0, "pride_diff_vs_base"] == 0 and curve.loc[0, "pride_p_vs_base"] == 1
    assert (curve["pride_diff_vs_base"] == curve["pride"] - curve.loc[0, "pride"]).all()
    assert (curve["pride_diff_vs_base_low"] <= curve["pride_diff_vs_base"]).all()
    scored = {p.name.split("-")[1] for p in (cfg.out / "eval" / "curve").glob("lora-*.jsonl")}
    assert {f"step{s}" for s in steps} <= scored
    validation = {q.id for q in data.load_split(cfg, "validation")}
    for path in (cfg.out / "eval" / "curve").glob("lora-*-calibration-*.jsonl"):
        assert {r["id"] for r in results.read(path)} <= validation  # validation questions only
    none = results.learning_curve(smoke(**{"train.curve_questions": 0}), progress=False)
    assert none.empty


def test_a_crash_while_dropping_a_torn_line_keeps_every_finished_answer(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    rows = [{"id": q.id, "gold": "A", "pred": "A"} for q in QUESTIONS[:4]]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text + '{"id": "torn')  # a crash mid-line: the next run rewrites the file without it

    def crash_halfway(self, data, *args, **kwargs):  # and that rewrite is killed half-way through
        with open(self, "w", encoding="utf-8") as f:
            f.write(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", crash_halfway)
    with pytest.raises(KeyboardInterrupt):
        results.run_cached(path, QUESTIONS, lambda batch: [], progress=False)
    monkeypatch.undo()
    assert path.read_text().startswith(text)  # the four finished answers are all still there


def test_replicate_says_which_setting_leaves_its_reading_unmade(smoke):
    off = smoke(**{"eval.rotations": False, "eval.generate_questions": 0})
    for reading, key in (("debiased", "eval.rotations"), ("pride", "eval.rotations"),
                         ("generate", "eval.generate_questions")):
        got, why = results.replicate(off, ["base"], reading, progress=False)
        assert got == {} and key in why and f"no {reading} reading to replicate" in why
    assert results.replicate(off, [], "letter", progress=False) == ({}, None)  # letter scores need neither


def test_collect_leaves_out_answers_of_a_model_whose_step_is_off_and_says_which_setting(project):
    """grpo.max_steps: 0 keeps an earlier run's grpo model on disk (models.available leaves it out): its answers are
    no result of this run, and the reason names the setting, not a model that is gone."""
    cfg = config.load("smoke")
    questions = [SimpleNamespace(id=f"q{i}") for i in range(4)]
    weights = models.folder(cfg, "grpo") / runs.MODEL_WEIGHTS
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"not read: the fingerprint is patched below")
    answer = lambda batch: [{"id": q.id, "gold": "B", "pred": "B"} for q in batch]  # noqa: E731
    results.run_cached(results.path_for(cfg, "grpo", "letter", "0123abcd"), questions, answer, label=("grpo", "letter"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "answers_fingerprint", lambda cfg, name: "0123abcd")
        got, skipped = results.collect(cfg, questions)
        assert list(got) == [("grpo", "letter")] and skipped == []
        got, skipped = results.collect(config.load("smoke", {"grpo.max_steps": 0}), questions)
    assert got == {} and weights.is_file()
    assert skipped == [{"model": "grpo", "evaluation": "letter", "reason": "an earlier run's grpo model: this profile "
                        "turns its step off (grpo.max_steps is 0 (a number of steps turns it on))"}]
