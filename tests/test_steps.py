"""steps: a switch set to off turns its step off, says which setting did, and leaves no earlier run's files."""
import ast
import sys
from pathlib import Path

import pytest

from medqa_zh import config, models, runs, steps

# each step, and a setting that turns it off on its own (the smoke profile has every step on)
OFF = {
    "learning_curve": ({"train.curve_questions": 0}, "train.curve_questions"),
    "gguf": ({"gguf.export": False}, "gguf.export"),
    "gguf_quantization": ({"gguf.evaluate": []}, "gguf.evaluate"),
    "grpo": ({"grpo.max_steps": 0}, "grpo.max_steps"),
    "generate": ({"eval.generate_questions": 0}, "eval.generate_questions"),
    "rotations": ({"eval.rotations": False}, "eval.rotations"),
    "api": ({"eval.api_models": []}, "eval.api_models"),
    "gguf_api": ({"gguf.api_models": []}, "gguf.api_models"),
    "rag": ({"rag.models": []}, "rag.models"),
    "rag_rotations": ({"rag.rotation_retrievers": []}, "rag.rotation_retrievers"),
}


def test_every_step_is_covered_and_on_in_the_smoke_profile(project):
    assert set(OFF) == set(steps.NAMES)
    cfg = config.load("smoke")
    assert all(steps.off(cfg, name) is None for name in steps.NAMES)
    assert steps.table(cfg).empty


@pytest.mark.parametrize("name", list(OFF))
def test_a_setting_turns_its_step_off_and_names_itself(project, name):
    overrides, key = OFF[name]
    cfg = config.load("smoke", overrides)
    assert key in steps.off(cfg, name)
    table = steps.table(cfg)
    assert steps.step(name).what in set(table["step"]) and any(key in why for why in table["off because"])


def test_turning_off_one_switch_turns_off_what_needs_it(project):
    cfg = config.load("smoke", {"gguf.export": False, "eval.generate_questions": 0, "eval.rotations": False})
    off = {name for name in steps.NAMES if steps.off(cfg, name)}
    assert off == {"gguf", "gguf_quantization", "generate", "rotations", "api", "gguf_api", "rag", "rag_rotations"}
    # merged missing from gguf.models: nothing for the proofs of 04 to check
    assert "gguf.models" in steps.off(config.load("smoke", {"gguf.models": ["base"]}), "gguf")


def test_skip_says_so_in_one_line_and_deletes_an_earlier_runs_files(project, capsys):
    cfg = config.load("smoke", {"eval.rotations": False})
    stale = cfg.out / "tables" / "06_debiased.csv"
    stale.parent.mkdir(parents=True)
    stale.write_text("model,accuracy\nbase,0.5\n")
    kept = cfg.out / "tables" / "06_direct.csv"  # not the step's
    kept.write_text("model\n")
    assert steps.skip(cfg, "rotations") is True
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and line.startswith("skipped: ") and "eval.rotations is false (true turns it on)" in line
    assert "removed an earlier run's tables/06_debiased.csv" in line
    assert not stale.exists() and kept.exists()
    # a step that is on: nothing said, nothing deleted
    stale.write_text("model\n")
    assert steps.skip(config.load("smoke"), "rotations") is False
    assert capsys.readouterr().out == "" and stale.exists()


def test_evaluations_of_a_step_that_is_off(project):
    cfg = config.load("smoke", {"eval.generate_questions": 0, "eval.rotations": False, "gguf.export": False})
    for evaluation in ("generate", "api", "api+rag bm25", "rotations", "rotations+rag bm25", "calibration",
                       "api@llamacpp-q8_0"):
        assert steps.evaluation_off(cfg, evaluation), evaluation
    assert steps.evaluation_off(cfg, "letter") is None
    assert "eval.rotations" in steps.evaluation_off(cfg, "letter+rag bm25")  # 08's debiased view with passages
    on = config.load("smoke")
    every = ("letter", "generate", "api", "rotations", "calibration", "api@llamacpp-q8_0", "api+rag bm25",
             "letter+rag bm25", "calibration+rag bm25")
    assert not any(steps.evaluation_off(on, e) for e in every)
    # rag.models empty: no answers with passages; the plain API answers still come from 07
    no_rag = config.load("smoke", {"rag.models": []})
    assert [e for e in every if steps.evaluation_off(no_rag, e)] == ["api+rag bm25", "letter+rag bm25",
                                                                      "calibration+rag bm25"]
    both = config.load("smoke", {"rag.models": [], "eval.api_models": []})
    assert "eval.api_models is empty" in steps.evaluation_off(both, "api")


def test_an_unknown_step_is_an_error_that_lists_them():
    with pytest.raises(KeyError, match="learning_curve"):
        steps.step("gguf_exports")


def test_serving_the_gguf_with_gguf_export_off_stops_when_the_profile_loads(project):
    with pytest.raises(ValueError, match=r"serve.backend is llamacpp.*gguf.export is false"):
        config.load("smoke", {"serve.backend": "llamacpp", "gguf.export": False})
    config.load("smoke", {"serve.backend": "transformers", "gguf.export": False})  # nothing to serve from 04: fine


def test_the_report_says_how_many_steps_were_off(project):
    from medqa_zh import report

    assert "Every step of the series is on" in report.steps_note(steps.table(config.load("smoke")))
    one = steps.table(config.load("smoke", {"train.curve_questions": 0}))
    assert len(one) == 1 and "**1 step is off in this profile**" in report.steps_note(one)
    assert "**2 steps are off" in report.steps_note(steps.table(config.load("smoke", {"rag.models": []})))
    # the note carries the table: each step off, in full, with its setting
    note = report.steps_note(one)
    assert "| notebook | step | off because |" in note and "train.curve_questions is 0" in note


GET_IT = ("llama-cpp-python", "sudo apt install g++", "conda install -c conda-forge cxx-compiler", "./run_all.sh again")


def test_without_llama_cpp_its_steps_are_off_and_say_which_package_and_how_to_get_it(project, monkeypatch, capsys):
    """As where ./run_all.sh found no C++ compiler and left the gguf extra out: the import stopped, as it fails
    without the package (find_spec is None), not a switch of the test's own."""
    from medqa_zh import export, report

    assert steps.llama_cpp_missing() is None  # installed here
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    why = steps.llama_cpp_missing()
    assert why.startswith("llama.cpp is not installed") and all(s in why for s in GET_IT), why
    cfg = config.load("smoke")  # every setting on: only the environment turns these off
    off = {name: steps.off(cfg, name) for name in steps.NAMES if steps.off(cfg, name)}
    assert off == {"gguf": why, "gguf_quantization": why, "gguf_api": why}
    assert steps.evaluation_off(cfg, "api@llamacpp-q8_0") == why and steps.evaluation_off(cfg, "api") is None
    # a setting that turns a step off is named first: it would be off with llama.cpp too
    assert "gguf.export is false" in steps.off(config.load("smoke", {"gguf.export": False}), "gguf")
    # 04 and 07: one line, and no earlier run's table; 10: the reason in its table of steps that are off
    stale = cfg.out / "tables" / "04_gguf_template.csv"
    stale.parent.mkdir(parents=True)
    stale.write_text("case\n")
    assert steps.skip(cfg, "gguf") is True
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"skipped: {steps.step('gguf').what}: llama.cpp is not installed") and "\n" not in line
    assert line.endswith("removed an earlier run's tables/04_gguf_template.csv") and not stale.exists()
    note = report.steps_note(steps.table(cfg))
    assert "**3 steps are off" in note and "what this environment lacks" in note and note.count(why) == 3
    # 04's export makes no file and says why; the tools' installer stops with the same reason, in one line
    assert export.export_models(cfg).empty and capsys.readouterr().out == f"no GGUF files are made: {why}\n"
    with pytest.raises(SystemExit) as stop:
        export.main(["install-tools"])
    assert stop.value.code == 2 and capsys.readouterr().err == f"error: {why}\n"
    with pytest.raises(export.ExportError, match="llama.cpp is not installed"):
        export.llama_cpp_version()


def test_serving_the_gguf_without_llama_cpp_stops_when_the_profile_loads(project, monkeypatch):
    config.load("smoke", {"serve.backend": "llamacpp"})  # llama.cpp installed: fine
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(ValueError, match=r"serve.backend is llamacpp, but llama.cpp is not installed") as e:
        config.load("smoke", {"serve.backend": "llamacpp"})
    assert all(s in str(e.value) for s in GET_IT) and "serve.backend: auto" in str(e.value)
    config.load("smoke")  # the transformers backend: llama.cpp not needed


def test_grpo_off_says_so_in_one_line_and_its_model_is_kept_but_not_this_runs(project, capsys):
    """grpo.max_steps: 0 turns 04b off: its tables and figures go, the model an earlier run trained stays on disk
    (expensive to train again) but models.available leaves it out, so 06-08 do not evaluate it as this run's."""
    on = config.load("smoke")
    weights = models.folder(on, "grpo") / runs.MODEL_WEIGHTS
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"an earlier run's grpo model")
    (on.out / "tables").mkdir(parents=True)
    (on.out / "tables" / "04b_spread.csv").write_text("prompt,spread\n")
    assert models.available(on)["grpo"] == str(models.folder(on, "grpo"))
    cfg = config.load("smoke", {"grpo.max_steps": 0})
    assert steps.off(cfg, "grpo") == "grpo.max_steps is 0 (a number of steps turns it on)"
    assert steps.skip(cfg, "grpo") is True
    line = capsys.readouterr().out.strip()
    assert line == (f"skipped: {steps.step('grpo').what}: grpo.max_steps is 0 (a number of steps turns it on); "
                    "removed an earlier run's tables/04b_spread.csv")
    assert "grpo" not in models.available(cfg) and weights.is_file()  # left out, not deleted
    assert "merged" not in models.available(cfg)  # nothing else appears: merged was never made here
    # 04b runs after 04's GGUF steps and before 06's
    order = list(steps.NAMES)
    assert order.index("gguf_quantization") < order.index("grpo") < order.index("generate")


def test_steps_imports_none_of_the_projects_modules():
    tree = ast.parse(Path(steps.__file__).read_text(encoding="utf-8"))
    imported = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and (node.level or (node.module or "").startswith("medqa_zh"))]
    assert imported == []  # models imports steps (available): steps importing back would be a cycle
