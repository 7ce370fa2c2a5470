"""The notebook series, run as the README runs it: ``./run_all.sh --only NN`` in a throwaway copy of
the project, each notebook in a fresh kernel under papermill, exported to HTML, indexed."""
import contextlib
import csv
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import pytest
import yaml

import technique
from helpers import REPO, processes_of, server_processes, without_llama_cpp
from medqa_zh import config, evaluate, export, merge, planted, prompts, rag, report, runs, steps, tiny

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # a hang fails with its stack; at least 5x the longest such test measured with both cores busy
SERIES = ("01_data", "02_lora_sft", "03_full_sft", "04_merge", "04b_grpo", "05_serve", "06_eval_direct", "07_eval_api",
          "08_eval_rag", "09_chat_demo", "10_report")


def _outputs_text(nb, cell_index):
    parts = []
    for out in nb["cells"][cell_index].get("outputs", []):
        parts.append("".join(out.get("text", "")))
        parts.extend("".join(v) for k, v in out.get("data", {}).items() if k.startswith("text/"))
    return "\n".join(parts)


def _change_profile(root: Path, changes: dict) -> None:
    """Set dotted keys in the smoke profile of the project at ``root``."""
    profile = root / "profiles" / "smoke.yaml"
    values = yaml.safe_load(profile.read_text(encoding="utf-8"))
    for key, value in changes.items():
        *groups, leaf = key.split(".")
        section = values
        for group in groups:
            section = section.setdefault(group, {})
        section[leaf] = value
    profile.write_text(yaml.safe_dump(values, allow_unicode=True, sort_keys=False), encoding="utf-8")


def _run_only(root: Path, name: str, env: dict | None = None) -> dict:
    """``./run_all.sh --only NN`` in the project at ``root``, as the README runs it (with the variables ``env``
    added to this process's environment); the executed notebook."""
    env = {**{k: v for k, v in os.environ.items()
              if k not in ("MEDQA_DIR", "MEDQA_BASE_MODEL", "MEDQA_EMBEDDER", "MEDQA_PROFILE", "MEDQA_ROOT")}, **(env or {})}
    env.update(MEDQA_USE_VENV="1", MEDQA_SKIP_SETUP="1")
    proc = subprocess.run(["./run_all.sh", "--only", name.split("_")[0]], cwd=root, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{name} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return json.loads((root / "outputs" / "smoke" / "runs" / f"{name}.ipynb").read_text(encoding="utf-8"))


def _said(nb) -> str:
    return "\n".join(_outputs_text(nb, i) for i in range(len(nb["cells"])))


def _code_cell(nb, needle: str) -> int:
    """The index of the one code cell whose source holds ``needle``."""
    found = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and needle in "".join(c["source"])]
    assert len(found) == 1, f"{needle!r}: {len(found)} code cells"
    return found[0]


def _series(tmp_path_factory, changes: dict | None = None, env: dict | None = None):
    """``run(name)`` runs the smoke series up to and including notebook ``name`` (each once, in order, with
    ``./run_all.sh --only NN`` in one throwaway copy of the project, whose smoke profile gets ``changes``: dotted
    keys; ``env``: variables added to run_all.sh's environment, so to every kernel's) and returns (project root,
    executed notebook). The wall time of each notebook is kept in ``run.seconds``."""
    if not (Path(sys.prefix) / "share" / "jupyter" / "kernels" / "medqa-zh").is_dir():
        pytest.skip("needs the environment that ./run_all.sh set up (run the tests with ./run_all.sh test)")
    root = tmp_path_factory.mktemp("series") / "project"
    shutil.copytree(REPO / "profiles", root / "profiles")
    shutil.copytree(REPO / "notebooks", root / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    for name in ("pyproject.toml", "run_all.sh", "lib/medqa_zh/report.html.j2"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    if changes:
        _change_profile(root, changes)
    (root / ".venv").symlink_to(sys.prefix)
    executed = {}

    def run(name):
        for earlier in SERIES[: SERIES.index(name) + 1]:
            if earlier not in executed:
                t0 = time.perf_counter()
                executed[earlier] = _run_only(root, earlier, env)
                run.seconds[earlier] = time.perf_counter() - t0
        return root, executed[name]

    run.seconds = {}
    return run


def _report_seconds(run, label):
    if run.seconds:
        print(f"\n{label}: {len(run.seconds)} notebooks in {sum(run.seconds.values()):.0f} s "
              f"({', '.join(f'{k.split(chr(95))[0]} {v:.0f}s' for k, v in run.seconds.items())})")


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """The smoke series as the profile has it (:func:`_series`)."""
    run = _series(tmp_path_factory)
    yield run
    _report_seconds(run, "smoke series")


def test_01_data_runs_on_the_smoke_profile(series):
    project, nb = series("01_data")
    assert "parameters" in nb["cells"][2]["metadata"]["tags"]
    # the smoke warning is the first output the report shows (after the title, the Chinese summary, the
    # parameters and papermill's injected parameters)
    assert "SMOKE PROFILE" in _outputs_text(nb, 4)

    run = project / "outputs" / "smoke"
    with open(run / "tables" / "01_splits.csv", encoding="utf-8") as f:
        table = {r["role"]: r for r in csv.DictReader(f)}
    assert int(table["train"]["duplicates_removed"]) == tiny.PLANTED["train_duplicates"]
    assert int(table["eval"]["overlap_removed"]) == tiny.PLANTED["test_in_train"]
    # a raw MedQA line beside the Question it becomes (asserted equal field by field in the cell)
    raw_vs_clean = _outputs_text(nb, _code_cell(nb, "raw = json.loads("))
    assert "train.jsonl, line 1" in raw_vs_clean and "Question" in raw_vs_clean and "train:1" in raw_vs_clean
    # each split drawn again by hand from its file, its duplicates counted by hand with the key (printed after the
    # asserts that tie both to the library's split and its removed counts)
    drawn = _outputs_text(nb, _code_cell(nb, "def duplicate_key(row)"))
    assert (f"train: 'train' → SplitSpec(name='train', start=None, stop=None): {table['train']['rows_in_slice']} rows of "
            f"train.jsonl, {tiny.PLANTED['train_duplicates']} duplicates, 0 in an earlier role → "
            f"{table['train']['questions']}") in drawn
    assert (f"eval: 'test[:153]' → SplitSpec(name='test', start=None, stop=153): 153 rows of test.jsonl, 0 duplicates, "
            f"{tiny.PLANTED['test_in_train']} in an earlier role → {table['eval']['questions']}") in drawn
    ids = {}
    for role in ("train", "validation", "eval"):
        n = sum(1 for _ in open(run / "data" / "sft" / f"{role}.jsonl", encoding="utf-8"))
        assert n == int(table[role]["questions"])
        lines = (run / "data" / "questions" / f"{role}.jsonl").read_text(encoding="utf-8").splitlines()
        ids[role] = {json.loads(line)["id"] for line in lines}
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["eval"] and not ids["validation"] & ids["eval"]
    # the replication set (smoke: the questions tiny appends to test), sharing no question with another role
    lines = (run / "data" / "questions" / "replication.jsonl").read_text(encoding="utf-8").splitlines()
    replication = {json.loads(line)["id"] for line in lines}
    assert len(replication) == int(table["replication"]["questions"]) == tiny.TEST_EXTRA
    assert not replication & (ids["train"] | ids["validation"] | ids["eval"])
    assert (run / "data" / "llamafactory" / "dataset_info.json").is_file()
    for fig in ("01_answer_letters", "01_question_lengths", "01_top_sections", "01_textbook_sizes"):
        assert (run / "figures" / f"{fig}.png").stat().st_size > 1000
    manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    assert "01_data" in manifest["notebooks"]


def test_02_lora_sft_held_out_loss_falls(series):
    project, nb = series("02_lora_sft")
    lora = project / "outputs" / "smoke" / "models" / "lora"
    metrics = json.loads((lora / "run.json").read_text(encoding="utf-8"))
    log = [json.loads(line) for line in (lora / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert metrics["last_train_loss"] == losses[-1]
    # the held-out loss falls; the training loss, logged from step 5, need not: the planted world's base model is
    # pretrained on the answer format, and its skewed letter prior is undone within the first steps
    assert metrics["last_eval_loss"] < metrics["first_eval_loss"]
    assert (lora / "adapter_model.safetensors").is_file()
    assert (project / "outputs" / "smoke" / "figures" / "02_loss_curve.png").stat().st_size > 1000
    text = "\n".join(_outputs_text(nb, i) for i in range(len(nb["cells"])))
    assert "5 of them in the loss: '答案：" in text  # the label mask, shown
    # the first training row as the trainer receives it, then LoraConfig, SFTConfig (OneDeviceConfig) and the trainer
    # built in one cell from those parts; the cell asserts the launched processes build the same, and the train cell
    # that the library trains this very trainer (papermill stops at a failed assert)
    row = _outputs_text(nb, _code_cell(nb, 'p = train.parts(cfg, "lora")'))
    assert '"prompt": [' in row and '"role": "assistant"' in row and '"content": "答案：' in row
    # the configs, the check against the launched processes' builder, the trainer, the library's part
    configs = _code_cell(nb, "args = train.OneDeviceConfig(")
    assert "lora = LoraConfig(" in "".join(nb["cells"][configs]["source"])
    assert _code_cell(nb, "assert args == train.sft_config(p) and lora == train.lora_config(s)") == configs + 1
    built = _code_cell(nb, "trainer = train.AnswerOnlySFTTrainer(")
    adopted = _code_cell(nb, "run = train.adopt(p, trainer)")
    assert (built, adopted) == (configs + 2, configs + 3)
    assert all("technique" in nb["cells"][i]["metadata"]["tags"] for i in (configs, built))  # tests/technique.py
    assert re.search(r"trainable: [\d,]+ of [\d,]+ parameters \(\d+\.\d+%\); a step: 1 micro-batch\(es\) of 8 examples",
                     _outputs_text(nb, adopted))
    assert "assert run.trainer is trainer" in "".join(nb["cells"][_code_cell(nb, "metrics = train.train(run)")]["source"])
    # the learning curve: the base, then every checkpoint the run kept (smoke: every 20 of 60 steps), on validation
    with open(project / "outputs" / "smoke" / "tables" / "02_learning_curve.csv", encoding="utf-8") as f:
        curve = list(csv.DictReader(f))
    n_validation = sum(1 for _ in open(project / "outputs" / "smoke" / "data" / "questions" / "validation.jsonl",
                                       encoding="utf-8"))
    assert [int(r["step"]) for r in curve] == [0, 20, 40, 60] and curve[0]["checkpoint"] == "base"
    assert all(int(r["n"]) == n_validation for r in curve)
    assert all(float(r["pride_ci_low"]) <= float(r["pride"]) <= float(r["pride_ci_high"]) for r in curve)
    assert (project / "outputs" / "smoke" / "figures" / "02_learning_curve.png").stat().st_size > 5000


def test_03_full_sft_reports_its_cost_next_to_lora(series):
    project, nb = series("03_full_sft")
    with open(project / "outputs" / "smoke" / "tables" / "03_lora_vs_full.csv", encoding="utf-8") as f:
        rows = {r[""]: r for r in csv.DictReader(f)}
    # the memory arithmetic, 16 bytes a parameter, beside the measured peak (which the cell asserts holds it)
    printed = {name: float(gib) for gib, name in re.findall(r"^\s*([\d.]+) GiB  (.+)$",
               _outputs_text(nb, _code_cell(nb, "runs.FULL_SFT_BYTES_PER_PARAMETER")), re.M)}
    state = sum(printed[f"{part} ({size} B a parameter)"] for part, size in
                (("weights", 4), ("gradients", 4), ("AdamW's two moments", 8)))
    peak = next(gib for name, gib in printed.items() if name.startswith("measured peak ("))
    assert peak == pytest.approx(float(rows["peak memory (GiB)"]["full (03)"]), abs=0.006) and peak >= state
    assert "the arithmetic's sum" in printed
    assert int(rows["trainable parameters"]["full (03)"]) > 5 * int(rows["trainable parameters"]["LoRA (02)"])
    for measured in ("median step (s)", "tokens/s", "peak memory (GiB)"):
        assert float(rows[measured]["full (03)"]) > 0 and float(rows[measured]["LoRA (02)"]) > 0
    assert (project / "outputs" / "smoke" / "models" / "full" / "model.safetensors").is_file()
    # what full SFT changes against LoRA, shown setting by setting before the trainer is built from it
    changed = _outputs_text(nb, _code_cell(nb, 'p = train.parts(cfg, "full")'))
    assert "learning_rate" in changed and "lora" in changed
    assert "assert run.trainer is trainer" in "".join(nb["cells"][_code_cell(nb, "metrics = train.train(run)")]["source"])


def test_04_merged_model_equals_base_plus_adapter(series):
    project, nb = series("04_merge")
    out = project / "outputs" / "smoke"
    # one layer merged by hand, W + (α/r)·B·A, against the stored merged weight; W alone must fail the same check
    by_hand = _outputs_text(nb, _code_cell(nb, "by_hand = W + (B @ A) * scale"))
    assert re.search(r"model\.layers\.0\.self_attn\.q_proj: W \(64, 64\) \+ 2 · B \(64, 8\) · A \(8, 64\), stored in "
                     r"float32: within rounding everywhere \([\d.]+% bit for bit\); W alone misses it in [\d.]+% of the "
                     r"entries", by_hand), by_hand
    with open(out / "tables" / "04_merge_check.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and all(r["argmax_agrees"] == "True" for r in rows)
    tolerance = merge.RELATIVE_TOLERANCE["float32"]  # the smoke profile's model.dtype
    assert max(float(r["relative_diff"]) for r in rows) <= tolerance
    assert min(float(r["max_abs_diff_base"]) / float(r["max_abs_logit"]) for r in rows) > 10 * tolerance
    assert (out / "models" / "merged" / "model.safetensors").is_file()


def test_04_exports_gguf_files_that_answer_like_the_model(series):
    project, nb = series("04_merge")
    out = project / "outputs" / "smoke"
    gguf = out / "models" / "gguf"
    # the llama.cpp calls that made merged's files, printed as the export's children ran them (their logs)
    calls = _outputs_text(nb, _code_cell(nb, "export.call_text(")).splitlines()
    assert len(calls) == 3 and calls[0].startswith("python convert_hf_to_gguf.py ") and "--outtype f16" in calls[0]
    for line, q in zip(calls, export.QUANTIZATIONS, strict=True):
        ran = (out / "logs" / f"gguf-merged-{q}.log").read_text(encoding="utf-8")
        assert f"medqa_zh.export: {line.replace(f'merged-{q}.gguf', f'merged-{q}.gguf.tmp')}\n" in ran
    assert "ftype=llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M" in calls[2]
    for name in ("merged", "base"):
        for q in export.QUANTIZATIONS:
            assert export.check_file(gguf / f"{name}-{q}.gguf")["tensors"] > 0
            assert (gguf / f"{name}-{q}.Modelfile").read_text(encoding="utf-8").startswith(f"FROM ./{name}-{q}.gguf")
    with open(out / "tables" / "04_gguf_template.csv", encoding="utf-8") as f:
        template = list(csv.DictReader(f))
    assert len(template) == 10 and all(r["same"] == "True" for r in template)  # 4 training + 4 eval + 2 chat
    with open(out / "tables" / "04_gguf_f16_letters.csv", encoding="utf-8") as f:
        letters = list(csv.DictReader(f))
    assert len(letters) == 16 and all(r["same choice"] == "True" for r in letters)
    assert max(float(r["largest |Δ log p|"]) for r in letters) < 1e-3
    n_eval = sum(1 for _ in open(out / "data" / "questions" / "eval.jsonl", encoding="utf-8"))
    with open(out / "tables" / "04_quantization.csv", encoding="utf-8") as f:
        cost = {(r["model"], r["evaluation"]): r for r in csv.DictReader(f)}
    assert set(cost) == {(m, e) for m in ("merged", "merged q8_0", "merged Q4_K_M") for e in ("letter", "pride")}
    for (model, _), r in cost.items():
        assert int(r["n"]) == n_eval and float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"])
        if model != "merged":
            assert float(r["diff_vs_model_low"]) <= float(r["diff_vs_model"]) <= float(r["diff_vs_model_high"])
            assert 0 <= float(r["p_vs_model"]) <= 1
    assert len(list((out / "eval" / "gguf").glob("merged-*.jsonl"))) == 4  # two quantizations x letter, calibration


def _generated(n_eval: int) -> int:
    """The eval questions generation answers (06's generate, 07 and 08's API): smoke's eval.generate_questions."""
    return min(n_eval, config.load("smoke")["eval.generate_questions"])


def test_06_evaluates_every_model_both_ways_with_intervals(series):
    project, nb = series("06_eval_direct")
    out = project / "outputs" / "smoke"
    said = _said(nb)  # one question, and one paired difference, by hand: each printed after its assert passed
    assert "model.dtype float32 (as set)" in said.splitlines()  # models.dtype_line: smoke sets float32 (07, 08 too)
    for line in ("letter scores by hand = library", "every rotation averaged, by hand = library",
                 "PriDe, by hand = library", "McNemar p by hand = table", "Newcombe's 95% interval by hand = table"):
        assert line in said, line
    with open(out / "tables" / "06_direct.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    n_eval = sum(1 for _ in open(out / "data" / "questions" / "eval.jsonl", encoding="utf-8"))
    baselines = [r for r in rows if r["method"] == "baseline"]
    rows = [r for r in rows if r["method"] != "baseline"]
    assert [r["model"] for r in baselines][0] == "chance" and baselines[1]["model"].startswith("always ")
    assert float(baselines[0]["accuracy"]) == pytest.approx(0.2)  # five options
    assert (out / "figures" / "06_accuracy.png").stat().st_size > 5000
    assert {(r["model"], r["method"]) for r in rows} == {
        (m, k) for m in ("base", "lora", "full", "merged", "grpo") for k in ("letter", "generate")}
    for r in rows:  # invalid answers stay in the denominator
        assert int(r["n"]) == (_generated(n_eval) if r["method"] == "generate" else n_eval)
        assert float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"])
        if r["method"] == "letter":
            assert int(r["invalid"]) == 0
    merged = {r["method"]: r["accuracy"] for r in rows if r["model"] == "merged"}
    lora = {r["method"]: r["accuracy"] for r in rows if r["model"] == "lora"}
    assert merged == lora  # the merge changed nothing that decides an answer
    results = sorted(p for p in (out / "eval" / "direct").glob("*.jsonl") if "-rotations-" not in p.name
                     and "-calibration-" not in p.name)
    assert len(results) == 10 and all(sum(1 for _ in open(p, encoding="utf-8"))
                                      == (_generated(n_eval) if "-generate-" in p.name else n_eval) for p in results)
    with open(out / "tables" / "06_mcnemar.csv", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 2 * 10  # every pair of five models, both methods
    # section 5: debiased two ways, every model: PriDe on every question, every rotation (smoke: all of them too)
    with open(out / "tables" / "06_debiased.csv", encoding="utf-8") as f:
        debiased = {(r["model"], r["evaluation"]): r for r in csv.DictReader(f)}
    assert list(debiased) == [(m, e) for e in ("letter", "pride", "debiased")
                              for m in ("base", "lora", "full", "merged", "grpo")]
    letter = {r["model"]: float(r["accuracy"]) for r in rows if r["method"] == "letter"}
    for (name, evaluation), r in debiased.items():
        assert int(r["n"]) == n_eval and float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"])
        assert (r["p_vs_base"] == "") == (name == "base")
        if name != "base":  # every difference with its interval beside its p
            assert float(r["diff_vs_base_low"]) <= float(r["diff_vs_base"]) <= float(r["diff_vs_base_high"])
            assert 0 <= float(r["p_vs_base"]) <= 1
        if evaluation == "letter":
            assert float(r["accuracy"]) == letter[name]
        assert (r["consistency"] == "") == (evaluation != "debiased")
    with open(out / "tables" / "06_pride_vs_cyclic.csv", encoding="utf-8") as f:
        compared = {r[""]: r for r in csv.DictReader(f)}
    assert list(compared) == ["base", "lora", "full", "merged", "grpo"]
    assert all(int(float(r["n"])) == n_eval and 0 <= float(r["same_choice"]) <= 1 for r in compared.values())
    with open(out / "tables" / "06_letter_prior.csv", encoding="utf-8") as f:
        prior = list(csv.DictReader(f))
    assert [r[""] for r in prior] == list("ABCDE") and sum(float(r["base prior"]) for r in prior) == pytest.approx(1)
    assert sum(float(r["merged PriDe prior"]) for r in prior) == pytest.approx(1)
    for fig in ("06_debiased", "06_cyclic"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 5000
    assert len(list((out / "eval" / "direct").glob("*-rotations-*.jsonl"))) == 5
    # section 6: the pre-registered fine-tuning comparison (merged vs base, debiased) on the replication set
    with open(out / "tables" / "06_replication.csv", encoding="utf-8") as f:
        replication = list(csv.DictReader(f))
    assert [(r["comparison"], r["set"], int(r["n"])) for r in replication] == [
        ("merged vs base", "replication", tiny.TEST_EXTRA), ("grpo vs merged", "replication", tiny.TEST_EXTRA)]
    assert float(replication[0]["diff_low"]) <= float(replication[0]["diff"]) <= float(replication[0]["diff_high"])
    assert sorted(p.name.split("-")[0] for p in (out / "eval" / "replication" / "direct").glob("*-rotations-*.jsonl")) == [
        "base", "grpo", "merged"]
    validation = (out / "data" / "questions" / "validation.jsonl").read_text(encoding="utf-8").splitlines()
    for path in (out / "eval" / "direct").glob("*-calibration-*.jsonl"):  # PriDe's prior: validation questions only
        assert [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()] == [
            json.loads(line)["id"] for line in validation]


def test_04b_grpo_trains_from_the_merged_model_and_shows_its_technique(series):
    project, nb = series("04b_grpo")
    out = project / "outputs" / "smoke"
    said = _said(nb)
    assert ("the reward of hand-made answers to a question whose gold letter is B: right 1, wrong 0, two letters 0, "
            "none 0, full-width 1, weak marker 1, a lone letter 1, English 1") in said
    assert re.search(r"three draws of \S+: the gold text stays under the gold letter \([A-E] -> [A-E] -> [A-E]\)", said)
    # the reward, GRPOConfig, the LoRA and grpo.Trainer built in cells (asserted equal to grpo.prepare's), and trained
    assert re.search(r"the first row, as the trainer receives it: \{\"id\": .*\"gold\": \"[A-E]\"", said)
    assert re.search(r"a fresh LoRA \(r = 8\) on \S+merged: [\d,]+ of [\d,]+ parameters trained", said)
    configs, built = (nb["cells"][_code_cell(nb, needle)] for needle in ("args = GRPOConfig(", "trainer = grpo.Trainer("))
    assert "lora = LoraConfig(" in "".join(configs["source"]) and "reward_funcs=[reward_correct]" in "".join(built["source"])
    assert "technique" in configs["metadata"]["tags"] and "technique" in built["metadata"]["tags"]
    assert "technique" in nb["cells"][_code_cell(nb, "def reward_correct(")]["metadata"]["tags"]
    assert "assert run.trainer is trainer" in "".join(nb["cells"][_code_cell(nb, "grpo.train_run(run)")]["source"])
    spread = re.search(r"(\d+) of 8 training prompts have a reward spread under the start model", said)
    with open(out / "tables" / "04b_spread.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert spread and len(rows) == 8 and int(spread.group(1)) == sum(r["spread"] == "True" for r in rows)
    # the planted world: its thresholds for GRPO beside what this run did
    assert re.search(r"planted world: \d+% of the prompts had a reward spread at the start \(it asks 50%\); the mean "
                     r"reward went from [\d.]+ to [\d.]+ in 6 steps \(it asks a rise of 0\.20\)", said), said
    assert re.search(r"one group of 4: rewards \[[01, ]+\], mean [\d.]+, std [\d.]+ \(scale_rewards: group\); the "
                     r"advantages by hand equal the trainer's", said), said  # smoke scales by the group's std
    checked = re.search(r"one group of 4: rewards \[([01, ]+)\]", said).group(1).split(", ")
    assert {"0", "1"} <= set(checked), checked  # the planted letter prior gives groups right and wrong answers
    metrics = runs.read_run(out / "models" / "grpo")
    assert metrics["optimizer_steps"] == 6 and metrics["arm"] == "answer"
    assert [r["step"] for r in runs.read_log(out / "models" / "grpo") if "reward" in r][-1] == 6
    for rel in ("models/grpo/model.safetensors", "tables/04b_letters.csv", "figures/04b_curves.png",
                "figures/04b_letters.png", "models/grpo/checkpoints/first_step.json"):
        assert (out / rel).is_file(), rel
    assert re.search(r"mean reward on these prompts: [\d.]+ before training, [\d.]+ after", said)


def test_05_serves_a_model_and_answers_plain_and_streamed(series):
    project, nb = series("05_serve")
    out = project / "outputs" / "smoke"
    with open(out / "tables" / "05_latency.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all(float(r["first_token_s"]) > 0 and float(r["total_s"]) > 0 for r in rows)
    assert all(r["pred"] in "ABCDE" and r["pred"] for r in rows)  # the trained smoke model answers in the format
    streaming = next(i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and "stream=True" in "".join(c["source"]))
    assert "assert streamed == answer" in "".join(nb["cells"][streaming]["source"])  # asserted, not only printed
    assert "the plain answer exactly" in _outputs_text(nb, streaming)
    assert list((out / "logs").glob("serve-merged-*.log"))
    # the command a person types for this server: python -m medqa_zh.serve with the profile's backend and dtype (on
    # smoke no vLLM line), printed after the cell asserted the server's command is the argv its process started with
    line = _outputs_text(nb, _code_cell(nb, "serve.typed_command(")).strip()
    argv = shlex.split(line)
    assert argv[:4] == ["python", "-m", "medqa_zh.serve", str(out / "models" / "merged")], argv
    assert argv[4:] == ["--profile", "smoke", "--backend", "transformers", "--dtype", "float32", "--port", "8000",
                        "--served-model-name", "merged"], argv
    assert not server_processes()  # the notebook stopped its server


def test_07_api_answers_match_direct_generation(series):
    project, nb = series("07_eval_api")
    out = project / "outputs" / "smoke"
    assert "model.dtype float32 (as set)" in _said(nb).splitlines()  # models.dtype_line, one line
    # the asyncio client written out, asserted equal to evaluate.api_scorer on the same server (the line follows the
    # assert), and, greedy on the tiny float32 model with one request generating at a time, equal to section 1's cache
    assert ("base: 5 questions, the same letters and texts as evaluate.api_scorer's on this server; "
            "5 of 5 as section 1's answers") in _said(nb)
    n_eval = sum(1 for _ in open(out / "data" / "questions" / "eval.jsonl", encoding="utf-8"))
    with open(out / "tables" / "07_api.csv", encoding="utf-8") as f:
        api = {r["model"]: r for r in csv.DictReader(f)}
    assert set(api) == {"base", "merged"}  # the smoke profile's eval.api_models
    for r in api.values():
        assert int(r["n"]) == _generated(n_eval) and int(r["failed"]) == 0
        assert float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"])
    assert float(api["merged"]["invalid_rate"]) < 0.5  # real letters, so agreement below is not on empty answers
    with open(out / "tables" / "07_agreement.csv", encoding="utf-8") as f:
        agreement = {r["model"]: r for r in csv.DictReader(f)}
    for name, r in agreement.items():
        assert float(r["agreement"]) >= 0.95, f"{name}: API and in-process answers agree on only {r['agreement']}"
    # the merged model's GGUF through llama.cpp's server too (gguf.api_models), against the transformers server
    with open(out / "tables" / "07_gguf_api.csv", encoding="utf-8") as f:
        gguf = {r["model"]: r for r in csv.DictReader(f)}
    assert set(gguf) == {"merged"} and int(gguf["merged"]["n"]) == _generated(n_eval) and gguf["merged"]["GGUF"] == "q8_0"
    assert float(gguf["merged"]["diff_ci_low"]) <= float(gguf["merged"]["difference"]) <= float(gguf["merged"]["diff_ci_high"])
    assert len(list((out / "eval" / "api").glob("*.jsonl"))) == 3
    assert list((out / "logs").glob("serve-merged-*.log"))
    assert not server_processes()


def test_08_retrieval_finds_the_synthetic_facts_and_rag_is_evaluated_per_retriever(series):
    project, nb = series("08_eval_rag")
    out = project / "outputs" / "smoke"
    said = _said(nb)
    assert "model.dtype float32 (as set)" in said.splitlines()  # models.dtype_line, one line
    # section 2: reciprocal rank fusion by hand, checked equal to the library's (the line follows the asserts)
    assert "fusion by hand == rag.reciprocal_rank_fusion: " in said and "== Retrieval.rank(..., 'hybrid', 5)" in said
    assert re.search(r"bm25 #\d+, dense #\d+", said) and re.search(r"1/\d+ \+ 1/\d+ = 0\.\d{5}", said)  # a fused score
    # section 4: one prompt as the API evaluation sent it, its passages those its cached answer records
    prompt = said[said.index("the prompt merged got with bm25 passages ("): said.index("--- reply: ")]
    assert f"--- system ---\n{prompts.SYSTEM_PROMPT}\n--- user ---\n{prompts.CONTEXT_INTRO}\n[1]《" in prompt
    assert prompts.ANSWER_FORMAT_HINT in prompt
    with open(out / "tables" / "08_retrieval_quality.csv", encoding="utf-8") as f:
        quality = {(r["retriever"], int(r["k"])): r for r in csv.DictReader(f)}
    assert set(quality) == {(r, k) for r in ("bm25-bigram", "bm25-jieba", "dense", "hybrid") for k in (1, 3, 5, 10)}
    # the proxy: BM25's passages hold the right option's text more often than a wrong one's
    assert float(quality["bm25-bigram", 1]["lift"]) > 0.3
    # and exactly, where the planted world knows each question's gold passage: BM25 must find it in its top rag.top_k
    with open(out / "tables" / rag.GOLD_RECALL_TABLE, encoding="utf-8") as f:
        recall = {(r["retriever"], int(r["k"])): r for r in csv.DictReader(f)}
    top_k = config.load("smoke")["rag.top_k"]
    assert float(recall["bm25-bigram", top_k]["recall"]) >= tiny.THRESHOLDS["retrieval_recall_at_k"]
    assert int(recall["bm25-bigram", top_k]["without_gold"]) > 0  # the unknown group: no book states its facts
    assert re.search(rf"planted: bm25-bigram finds the gold passage in its top {top_k} for \d+ of \d+ questions "
                     r"\([\d.]+ \[[\d.]+, [\d.]+\]\); the world requires 0\.80: met", said), said
    n_eval = sum(1 for _ in open(out / "data" / "questions" / "eval.jsonl", encoding="utf-8"))
    with open(out / "tables" / "08_rag.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows if r["condition"] == "baseline"][0] == "chance"
    rows = [r for r in rows if r["condition"] != "baseline"]
    assert {(r["model"], r["condition"]) for r in rows} == {
        (m, c) for m in ("base", "merged") for c in ("no RAG", "bm25", "dense", "hybrid")}
    for r in rows:
        assert int(r["n"]) == _generated(n_eval) and int(r["failed"]) == 0 and 0 <= float(r["vs_no_rag_p"]) <= 1
    rag_results = list((out / "eval" / "rag").glob("*.jsonl"))
    assert len(rag_results) == 2 * 3 + 2 * 3  # API per retriever; letter, calibration, rotations with bm25
    for path in rag_results:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert all(row["passages"] for row in rows), path.name  # every prompt carried passages, recorded by id
    # section 5: debiased accuracy with and without passages, in-process, on the same questions
    with open(out / "tables" / "08_rag_debiased.csv", encoding="utf-8") as f:
        debiased = {(r["model"], r["evaluation"]): r for r in csv.DictReader(f)}
    assert set(debiased) == {(m, e) for m in ("base", "merged")
                             for e in ("pride", "debiased", "pride+rag bm25", "debiased+rag bm25")}
    for (_, evaluation), r in debiased.items():
        assert int(r["n"]) == n_eval and float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"])
        assert (r["p_vs_no_rag"] == "") == ("+rag" not in evaluation)
        if "+rag" in evaluation:
            assert float(r["diff_vs_no_rag_low"]) <= float(r["diff_vs_no_rag"]) <= float(r["diff_vs_no_rag_high"])
    assert (out / "figures" / "08_rag_debiased.png").stat().st_size > 5000
    # section 6: the pre-registered comparison with passages on the replication set, each prompt with its passages
    with open(out / "tables" / "08_replication.csv", encoding="utf-8") as f:
        replication = list(csv.DictReader(f))
    assert [(r["comparison"], r["set"], int(r["n"])) for r in replication] == [
        ("merged+rag bm25 vs merged", "replication", tiny.TEST_EXTRA)]
    with_passages = list((out / "eval" / "replication" / "rag").glob("merged-rotations-*.jsonl"))
    assert len(with_passages) == 1 and all(json.loads(line)["passages"] for line in with_passages[0].open(encoding="utf-8"))
    assert list((out / "rag").glob("passages-*.jsonl")) and list((out / "rag").glob("dense-*/embeddings.npy"))
    assert (out / "figures" / "08_retrieval_quality.png").is_file() and (out / "figures" / "08_rag_accuracy.png").is_file()
    assert not server_processes()


def test_09_chat_turn_runs_through_the_panel_with_passages(series):
    project, nb = series("09_chat_demo")
    text = "\n".join(_outputs_text(nb, i) for i in range(len(nb["cells"])))
    assert "models: base, lora, full, merged, grpo (in this kernel); retrievers: bm25, dense, hybrid" in text
    turn = next(line for line in text.splitlines() if line.startswith("answer "))
    assert "gold" in turn and "unparseable" not in turn  # the trained smoke model answers in the format
    pieces = next(line for line in text.splitlines() if "streamed pieces" in line)
    assert "passages from none" not in pieces and not pieces.startswith("0 streamed")
    assert "history: 4 messages" in text and "参考段落" in text  # the sources, rendered into the report
    # the streaming loop written out, against a server started for it: the same pieces as chat.stream_reply (the
    # panel's API backend), printed after the assert, and more than one piece (it streamed)
    streamed = re.search(r"^(\d+) pieces, the same as chat\.stream_reply's$", text, re.M)
    assert streamed and int(streamed.group(1)) > 1
    assert not server_processes()  # and stopped it


def test_10_collects_every_evaluation_into_one_table_with_figures(series):
    project, nb = series("10_report")
    out = project / "outputs" / "smoke"
    n_eval = sum(1 for _ in open(out / "data" / "questions" / "eval.jsonl", encoding="utf-8"))
    with open(out / "tables" / "10_results.csv", encoding="utf-8") as f:
        rows = {(r["model"], r["evaluation"]): r for r in csv.DictReader(f)}
    baselines = [model for model, evaluation in rows if evaluation == "baseline"]
    assert baselines[0] == "chance" and baselines[1].startswith("always ") and len(baselines) == 2
    assert (out / "tables" / "10_results.md").read_text(encoding="utf-8").count("\n") == len(rows) + 2
    rows = {key: r for key, r in rows.items() if key[1] != "baseline"}
    # one function (report.holm_families, with the profile's pre-registered comparisons) decides every family: a
    # comparison 06 or 08 shows carries the family 10 gives it, primary or exploratory
    shown = 0
    for table in ("06_debiased.csv", "08_rag_debiased.csv"):
        with open(out / "tables" / table, encoding="utf-8") as f:
            for r in csv.DictReader(f):
                for suffix in ("vs_base", "vs_start", "vs_no_rag"):
                    if r[f"family_{suffix}"]:
                        assert r[f"family_{suffix}"] == rows[r["model"], r["evaluation"]][f"family_{suffix}"], (table, r)
                        shown += r[f"family_{suffix}"] == "primary"
    assert shown >= 2  # merged vs base (06) and merged+rag bm25 vs merged (08), debiased: smoke's pre-registration
    models = ("base", "lora", "full", "merged", "grpo")
    expected = {(m, e) for m in models for e in ("letter", "generate")}
    expected |= {(m, e) for m in ("base", "merged") for e in ("api", "api+rag bm25", "api+rag dense", "api+rag hybrid")}
    expected |= {(m, e) for m in models for e in ("pride", "debiased")}  # 06's debiased readings
    expected |= {(m, f"{e}+rag bm25") for m in ("base", "merged") for e in ("letter", "pride", "debiased")}  # 08's
    expected |= {("merged", "api@llamacpp-q8_0")}  # 07 asks the merged GGUF through llama.cpp's server too
    assert set(rows) == expected
    for (model, evaluation), r in rows.items():  # generation: the first eval.generate_questions only
        assert int(r["n"]) == (_generated(n_eval) if evaluation.startswith(("generate", "api")) else n_eval)
        assert float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"])
        assert (r["consistency"] == "") == (not evaluation.startswith("debiased"))
        through_llama = "@" in evaluation  # no base row on that reading: nothing to pair with
        assert (r["p_vs_base"] == "") == (model == "base" or through_llama)
        assert (r["p_vs_no_rag"] == "") == ("+rag" not in evaluation)
        if model != "base" and not through_llama:
            assert float(r["diff_vs_base_low"]) <= float(r["diff_vs_base"]) <= float(r["diff_vs_base_high"])
            assert r["detectable_vs_base"] == "" or float(r["detectable_vs_base"]) > 0  # "": the two never disagree
    assert {r["primary"] for r in rows.values() if r["primary"]} == {"merged vs base", "grpo vs merged",
                                                                     "merged+rag bm25 vs merged"}
    assert rows["grpo", "debiased"]["primary"] == "grpo vs merged" and rows["grpo", "debiased"]["family_vs_start"] == "primary"
    assert rows["merged", "debiased"]["primary"] == "merged vs base"
    family = [(r[f"p_{x}"], r[f"p_adj_{x}"], r[f"family_{x}"]) for x in report.SUFFIXES for r in rows.values() if r[f"p_{x}"]]
    assert family and all(float(adj) >= float(p) for p, adj, _ in family)  # every p beside its Holm-adjusted p
    # two Holm families: the pre-registered comparisons among themselves, every other difference on its own
    assert rows["merged", "debiased"]["family_vs_base"] == "primary" == rows["merged", "debiased+rag bm25"]["family_vs_no_rag"]
    primary = [(float(p), float(adj)) for p, adj, name in family if name == "primary"]
    exploratory = [(float(p), float(adj)) for p, adj, name in family if name == "exploratory"]
    assert len(primary) == 3 and len(primary) + len(exploratory) == len(family)
    for members in (primary, exploratory):
        assert [adj for _, adj in members] == pytest.approx(evaluate.holm([p for p, _ in members]), rel=1e-9)
    # the pre-registered comparisons on the whole eval split, its two halves and the replication set
    with open(out / "tables" / "10_primary.csv", encoding="utf-8") as f:
        checks = [(r["comparison"], r["set"], int(r["n"])) for r in csv.DictReader(f)]
    half = (n_eval + 1) // 2, n_eval // 2
    for name in ("merged vs base", "grpo vs merged", "merged+rag bm25 vs merged"):
        got = [(s, n) for c, s, n in checks if c == name]
        assert got[0] == ("eval", n_eval) and got[3] == ("replication", tiny.TEST_EXTRA)
        assert [s for s, _ in got[1:3]] == ["eval, half 1", "eval, half 2"] and sum(n for _, n in got[1:3]) == n_eval
        assert {n for _, n in got[1:3]} <= set(half)
    text = "\n".join(_outputs_text(nb, i) for i in range(len(nb["cells"])))
    assert "left out" not in text and "SMOKE PROFILE" in text
    assert "`eval.primary_reading`: **debiased**" in text and "adjusted p = " in text  # the verdict, in words
    assert "the halves of the eval split" in text and f"the replication set, n = {tiny.TEST_EXTRA}" in text
    assert "validation (02's learning curve" in text
    assert "Every difference in the table, in words." in text and "exploratory: **" in text
    # the verdict first (its words, written for the index), then Holm by hand on the family behind it, then the table
    verdict = (out / "tables" / f"{report.VERDICT_TEXT}.md").read_text(encoding="utf-8")
    said = [_outputs_text(nb, i) for i in range(len(nb["cells"]))]
    where = [next(i for i, t in enumerate(said) if mark in t) for mark in
             (verdict, f"Holm by hand equals the table's p_adj_* in both families: the {len(primary)} pre-registered "
                       f"comparisons among themselves, the {len(exploratory)} exploratory differences on their own",
              "accuracy [95% CI]")]
    assert where == sorted(where) and len(set(where)) == 3, where
    assert where[0] < _code_cell(nb, "report.manifest_summary(cfg)")  # the verdict before the run's manifest (issue 52)
    assert verdict.startswith("- **Fine-tuning (merged against the base model)**: ")  # a finding first, in words
    assert f"adjusted among the {len(primary)} pre-registered comparisons alone" in verdict
    assert f"the table's other {len(exploratory)} paired differences are exploratory" in verdict
    assert "[unadjusted 95% CI" in verdict and "[95% CI" not in verdict  # the intervals beside adjusted decisions
    assert "  merged vs base: p = " in said[where[1]] and "  merged+rag bm25 vs merged: p = " in said[where[1]]
    index = (out / "reports" / "index.html").read_text(encoding="utf-8")
    assert index.index("<section id='verdict'>") < index.index("<strong>merged vs base</strong>") < index.index("<table")
    # each adjusted p with its family in words, the intervals labelled unadjusted, the detectable Δ as observed
    assert index.count(" (primary)</td>") == len(primary) and index.count(" (exploratory)</td>") == len(exploratory)
    assert "<th>Δ vs base [unadjusted 95% CI], p, Holm-adjusted p (family)</th>" in index
    assert "<th>detectable Δ (80% power, from the observed disagreement)</th>" in index
    for fig in ("accuracy", "loss_curves", "learning_curve", "letters", "sections", "rag_ablation", "retrieval_quality"):
        assert (out / "figures" / f"10_{fig}.png").stat().st_size > 5000, fig
    # the planted world: one row per planted effect, what was planted beside what was found. The base model's letter
    # skew, PriDe's estimate of it and retrieval of the gold passages are found; what the tiny model does not learn
    # stays in the table, marked not found
    with open(out / "tables" / planted.TABLE, encoding="utf-8") as f:
        found = {r["effect"]: r for r in csv.DictReader(f)}
    for effect in ("letter skew, plain reading", "PriDe estimates the prior", "retrieval finds the gold passage"):
        assert found[effect]["found"] == "found", (effect, found[effect])
    assert {r["found"] for r in found.values()} <= {"found", "not found", "not measured"}
    assert "SFT teaches facts (replication)" in found and "passages supply facts (eval)" in found
    assert "planted: " in text and " effects found" in text
    assert index.index("<section id='verdict'>") < index.index("What was planted, and what this run found")


def _browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (pip)")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no chromium on PATH: install the Debian package chromium (./run_all.sh test does when it can)")
    return playwright, exe


def test_index_and_report_render_in_a_real_browser(series):
    playwright, exe = _browser()
    project, _ = series("10_report")
    reports = project / "outputs" / "smoke" / "reports"
    shots = REPO / "outputs" / "tests"
    shots.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        failed = []
        page.on("requestfailed", lambda request: failed.append(request.url))
        page.goto((reports / "index.html").as_uri(), wait_until="load")
        assert not failed, f"index.html: requests that failed: {failed}"
        images = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
        assert len(images) == 7 and all(ok for _, ok in images), images
        results = (project / "outputs" / "smoke" / "tables" / "10_results.csv").read_text(encoding="utf-8").splitlines()
        assert len(results) == 1 + 35 + 2  # header, every result (test_10 names them), chance and always-X
        assert page.locator("table.results tr").count() == len(results)
        # read as a reader reads it: the readable columns, accuracy in percent with its interval, no raw names
        assert page.locator("table.results th").all_inner_texts() == list(report.READABLE_COLUMNS)
        first = page.locator("table.results tr").nth(1).locator("td").all_inner_texts()
        assert re.fullmatch(r"\d+\.\d \[\d+\.\d, \d+\.\d\]", first[3]), first
        shown = page.locator("body").inner_text().split("10_results.csv")[0]
        assert not re.search(r"ci_low|ci_high|diff_vs|p_adj|detectable_vs|invalid_rate", shown)
        assert page.locator(".smoke").is_visible()
        # the verdict in words is the first thing under the title (the smoke warning above it), the table after it
        order = page.evaluate("Array.from(document.body.children).map(e => e.id || e.className || e.tagName.toLowerCase())")
        assert order[:4] == ["h1", "smoke", "verdict", "h2"], order
        verdict = page.locator("#verdict").inner_text()
        assert "merged vs base" in verdict and "adjusted p = " in verdict and "**" not in verdict  # rendered markdown
        # three items per pre-registered comparison: in plain words, in Chinese, with its numbers; a finding first
        assert page.locator("#verdict li").count() == 9
        assert re.match(r"Fine-tuning \(merged against the base model\): (no change shown|a gain|a loss)",
                        page.locator("#verdict li").first.inner_text())
        assert page.locator("#verdict").bounding_box()["y"] < page.locator("table.results").bounding_box()["y"]
        links = page.evaluate("Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href'))")
        assert sum(link.endswith(".html") for link in links) == len(SERIES)  # every notebook's report
        broken = [link for link in links if not (reports / link).resolve().is_file()]
        assert not broken, f"broken links in index.html: {broken}"
        page.screenshot(path=shots / "index.png", full_page=True)

        page.goto((reports / "10_report.html").as_uri(), wait_until="load")
        images = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
        assert len(images) >= 6 and all(images)
        assert page.locator("table.dataframe").count() >= 3 and "SMOKE PROFILE" in page.content()
        page.screenshot(path=shots / "10_report.png", full_page=True)
        browser.close()
    # the one request a report may make: MathJax from its CDN (formulas show as TeX without a network)
    assert all("mathjax" in url.lower() for url in failed), f"10_report.html: requests that failed: {failed}"
    assert (shots / "index.png").stat().st_size > 10_000


# every step switch of the profile flipped from its smoke value, and every list (or count) that turns a step on
# emptied, all at once (issue 38)
SWITCHED_OFF = {
    "train.shuffle_options": True, "train.activation_checkpointing": True, "train.resume": False,
    "train.curve_questions": 0, "gguf.export": False, "gguf.models": [], "gguf.evaluate": [], "gguf.api_models": [],
    "eval.rotations": False, "eval.generate_questions": 0, "eval.api_models": [], "rag.models": [], "grpo.max_steps": 0,
}


def _whole_series(run, label: str):
    """Run :func:`_series`'s ``run`` to the end; the outputs folder and what each notebook printed, by number."""
    try:
        project, _ = run("10_report")
    finally:
        _report_seconds(run, label)
    out = project / "outputs" / "smoke"
    return out, {name.split("_")[0]: _said(json.loads((out / "runs" / f"{name}.ipynb").read_text(encoding="utf-8")))
                 for name in SERIES}


def test_the_series_runs_to_the_end_with_every_step_switched_off(tmp_path_factory):
    out, said = _whole_series(_series(tmp_path_factory, SWITCHED_OFF), "smoke series, every switch off")
    for name in steps.NAMES:  # each step says, where it would run, that it was skipped and which key turns it on
        step = steps.step(name)
        line = next((line for line in said[step.notebook].splitlines() if line.startswith(f"skipped: {step.what}: ")), "")
        assert any(key in line for key in SWITCHED_OFF), (name, line)
        assert not any((out / rel).exists() for rel in step.outputs), name
    assert not list((out / "models").glob("gguf/*.gguf"))
    # 10: what was off, the results there are (letter scores only), and a verdict that concludes nothing
    assert f"{len(steps.NAMES)} steps are off in this profile" in said["10"]
    assert all(key in said["10"] for key in ("gguf.export", "eval.rotations", "rag.models", "train.curve_questions"))
    with open(out / "tables" / "10_results.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["evaluation"] for r in rows} == {"letter", "baseline"}
    assert {r["model"] for r in rows if r["evaluation"] == "letter"} == {"base", "lora", "full", "merged"}
    assert "not measured in this run" in said["10"]
    assert (out / "reports" / "index.html").is_file()


def test_the_series_runs_to_the_end_without_llama_cpp(tmp_path_factory):
    """A machine where ./run_all.sh found no C++ compiler and left the gguf extra out: no kernel can import llama_cpp
    (helpers.without_llama_cpp), every setting is on. 04 and 07 skip what needs llama.cpp, saying which package is
    missing and how to get it; every other step runs; 10 lists the three and has every result but the GGUF's."""
    run = _series(tmp_path_factory, env=without_llama_cpp(tmp_path_factory.mktemp("no-llama-cpp")))
    out, said = _whole_series(run, "smoke series without llama.cpp")
    need_llama = ("gguf", "gguf_quantization", "gguf_api")
    for name in steps.NAMES:
        step = steps.step(name)
        line = next((line for line in said[step.notebook].splitlines() if line.startswith(f"skipped: {step.what}: ")), "")
        if name in need_llama:
            assert line.startswith(f"skipped: {step.what}: llama.cpp is not installed (the package llama-cpp-python"), line
            assert all(s in line for s in ("sudo apt install g++", "conda install -c conda-forge cxx-compiler",
                                           "./run_all.sh again")), line
            assert not any((out / rel).exists() for rel in step.outputs), name
        else:
            assert line == "", line  # on, and not for want of llama.cpp
    assert "no GGUF files are made: llama.cpp is not installed" in said["04"]
    assert not list((out / "models").glob("gguf/*.gguf"))
    assert "**3 steps are off in this profile**" in said["10"] and "what this environment lacks" in said["10"]
    assert said["10"].count("llama.cpp is not installed") >= 3  # the reason beside each, in 10's table
    with open(out / "tables" / "10_results.csv", encoding="utf-8") as f:
        evaluations = {r["evaluation"] for r in csv.DictReader(f)}
    assert {"letter", "generate", "api", "pride", "debiased", "api+rag bm25", "letter+rag bm25"} <= evaluations
    assert not [e for e in evaluations if "llamacpp" in e]
    assert (out / "reports" / "index.html").is_file()


def test_steps_turned_off_after_a_run_leave_none_of_its_results(series, tmp_path):
    """A copy of the whole smoke run, then the switches that skip a step (not those of training) turned off and
    the notebooks they touch run again: no table, figure or answer of the earlier run is shown as this run's."""
    project, _ = series("10_report")
    root = tmp_path / "project"
    shutil.copytree(project, root, symlinks=True)
    out = root / "outputs" / "smoke"
    written = [rel for name in steps.NAMES for rel in steps.step(name).outputs if (out / rel).is_file()]
    written += ["tables/06_replication.csv", "tables/08_replication.csv"]  # no replication of a debiased reading now
    assert len(written) >= 17 and all((out / rel).is_file() for rel in written), written  # the run with every step on
    off = {k: v for k, v in SWITCHED_OFF.items() if k not in ("train.shuffle_options", "train.activation_checkpointing",
                                                               "train.resume")}
    # the base model where the run found it: a run is keyed by its base's path, and this is the same run
    _change_profile(root, {**off, "model.base": str(project / "outputs" / "smoke" / "assets" / "tiny-qwen2")})
    said = {name.split("_")[0]: _said(_run_only(root, name)) for name in ("02_lora_sft", "04_merge", "04b_grpo",
                                                                "06_eval_direct", "07_eval_api", "08_eval_rag", "10_report")}
    assert [rel for rel in written if (out / rel).exists()] == []
    assert "removed an earlier run's tables/04_gguf_template.csv" in said["04"]
    assert "skipped: GRPO" in said["04b"] and "grpo.max_steps is 0" in said["04b"]
    with open(out / "tables" / "10_results.csv", encoding="utf-8") as f:
        assert {r["evaluation"] for r in csv.DictReader(f)} == {"letter", "baseline"}
    assert "an earlier run's answers: this profile turns the evaluation off (eval.rotations is false" in said["10"]
    assert sorted(p.name for p in (out / "figures").glob("10_*.png")) == [
        "10_accuracy.png", "10_letters.png", "10_loss_curves.png", "10_retrieval_quality.png", "10_sections.png"]


def test_the_technique_cells_are_the_fields_code_alone():
    """The cells tagged technique in 02, 03, 04b and 08 name no medqa_zh module (and not the profile, cfg) once the
    project's classes are swapped for trl's; the script they make imports the field's libraries and Python's only."""
    for notebook in technique.NOTEBOOKS:
        assert technique.cells(notebook), f"{notebook}: no cell tagged technique"
        assert technique.library_names(notebook) == [], notebook
    source = technique.script("/nowhere")
    assert technique.imports(source) <= technique.FIELD | set(sys.stdlib_module_names), technique.imports(source)


def test_the_technique_cells_alone_rebuild_the_series_results(series, tmp_path):
    """The acceptance of the trainer in the cell: 02's, 03's, 04b's and 08's technique cells, exported into one script
    with trl's classes in place of the project's and medqa_zh unimportable, read the series' files and get the
    series' results: the first logged losses, the rewards, the top-k passages (tests/technique/*.after.py)."""
    project, _ = series("08_eval_rag")
    path = tmp_path / "technique_script.py"
    path.write_text(technique.script(project / "outputs" / "smoke", root=project), encoding="utf-8")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", technique.RUNNER, str(path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, f"{path}:\n{(proc.stdout + proc.stderr)[-6000:]}"
    said = {line.split(":")[0]: line for line in proc.stdout.splitlines() if ":" in line}
    assert {"02", "03", "04b", "08"} <= set(said), proc.stdout
    print(f"\nthe technique script, in {time.perf_counter() - t0:.0f} s:\n" + "\n".join(said[k] for k in ("02", "03", "04b", "08")))


def test_notebooks_are_committed_without_outputs():
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        # the title and what it teaches, a Chinese summary, then papermill's parameters
        first, summary, parameters = nb["cells"][:3]
        assert first["cell_type"] == "markdown" and "".join(first["source"]).startswith(f"# {path.name.split('_')[0]} · "), \
            f"{path.name}: the first cell must be the title"
        text = "".join(summary["source"])
        assert summary["cell_type"] == "markdown" and text.startswith("**中文摘要**"), \
            f"{path.name}: the second cell must be the Chinese summary"
        for part in ("**本节目标**：", "**输入**：", "**输出**：", "**运行时间**："):
            assert part in text, f"{path.name}: the Chinese summary has no {part}"
        assert re.search(r"运行时间\*\*：cpu 配置（2 核 CPU，实测）[\d.]+ 分钟.*smoke 配置（实测）\d+ 秒", text), path.name
        assert "parameters" in parameters["metadata"].get("tags", []), f"{path.name}: the third cell must be the parameters cell"
        for cell in nb["cells"]:
            assert not cell.get("outputs") and not cell.get("execution_count"), f"{path.name} has outputs"
        # every notebook runs in the project's kernel (01's was python3)
        assert nb["metadata"]["kernelspec"] == {"display_name": "Python (medqa-zh)", "language": "python",
                                                "name": "medqa-zh"}, path.name


# --------------------------------------------------------------------------- 09 in JupyterLab, as a reader runs it

# headless, and nothing that reaches for the network (the machines that run the tests have none)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# JupyterLab's settings for the test: no news or update checks, no autosave (the project's copy of 09 stays as it
# was), and every cell attached to the page (no windowing), so that every prompt and output can be read
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
}


def _lab_api(lab, path: str, method: str = "GET"):
    request = urllib.request.Request(f"{lab.url}/api/{path}?token={lab.token}", method=method)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


@contextlib.contextmanager
def _jupyterlab(project: Path, home: Path):
    """JupyterLab on loopback with a random token, serving ``project``'s notebooks with ``MEDQA_ROOT=project`` (a
    notebook writes into that project's outputs/) and its config, data and runtime files in ``home``. On exit it is
    shut down with its kernels; ``lab.left`` lists what still ran with ``MEDQA_ROOT=project`` after that (killed)."""
    for name, values in LAB_SETTINGS.items():
        path = home / "config" / "lab" / "user-settings" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values), encoding="utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lab = types.SimpleNamespace(url=f"http://127.0.0.1:{port}", token=secrets.token_hex(16), left=[])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDQA_", "JUPYTER_"))}
    env.update(MEDQA_ROOT=str(project), JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"))
    log = home / "jupyterlab.log"
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(
            [str(Path(sys.prefix) / "bin" / "jupyter"), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={lab.token}",
             f"--ServerApp.root_dir={project / 'notebooks'}", "--ServerApp.allow_root=True",
             "--ServerApp.terminals_enabled=False", "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
             "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                _lab_api(lab, "status")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    f"JupyterLab did not start:\n{log.read_text(encoding='utf-8')[-3000:]}"
                time.sleep(0.5)
        yield lab
    finally:
        try:
            _lab_api(lab, "shutdown", "POST")  # the server shuts its kernels down, then exits
            proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        lab.left = processes_of(project)  # a kernel runs in a session of its own, with the server's environment
        for pid in lab.left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _chromium_env(home: Path) -> dict:
    """Chromium's environment, with the CJK font the project installs (report.packaged_cjk_font) added to what
    fontconfig finds, so that the chat's Chinese shows in the screenshot on a machine without a CJK font."""
    font = report.packaged_cjk_font()
    if font is None:
        return dict(os.environ)
    conf = home / "fonts.conf"
    conf.write_text('<?xml version="1.0"?>\n<!DOCTYPE fontconfig SYSTEM "fonts.dtd">\n<fontconfig>'
                    '<include ignore_missing="yes">/etc/fonts/fonts.conf</include>'
                    f"<dir>{font.parent}</dir><cachedir>{home / 'fontconfig'}</cachedir></fontconfig>\n",
                    encoding="utf-8")
    return {**os.environ, "FONTCONFIG_FILE": str(conf)}


def _wait_until(check, seconds: float, what):
    """``check()``'s first true value, polled; ``what`` (a string, or a function that says what was seen) fails it."""
    deadline = time.monotonic() + seconds
    while not (seen := check()):
        assert time.monotonic() < deadline, f"{what() if callable(what) else what}: not after {seconds:.0f} s"
        time.sleep(0.5)
    return seen


def test_09_chat_in_jupyterlab_in_a_real_browser(series, tmp_path):
    """A reader's session (issue 43): JupyterLab headless on loopback, 09 opened in Chromium and every cell run from
    the Run menu, then an exam question typed into the chat panel and sent with its button; the reply streams in."""
    playwright, exe = _browser()
    project, _ = series("08_eval_rag")  # 09 reads the models and indexes of 01-08
    notebook = json.loads((project / "notebooks" / "09_chat_demo.ipynb").read_text(encoding="utf-8"))
    code_cells = sum(cell["cell_type"] == "code" for cell in notebook["cells"])
    lines = (project / "outputs" / "smoke" / "data" / "questions" / "eval.jsonl").read_text(encoding="utf-8")
    q = json.loads(lines.splitlines()[1])  # not the scripted turn's question (the first)
    question = f"{q['question']}\n{prompts.format_options(q['options'])}"
    shots = REPO / "outputs" / "tests"
    shots.mkdir(parents=True, exist_ok=True)
    started = time.time()
    elsewhere, failed = [], []
    with _jupyterlab(project, tmp_path) as lab, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, env=_chromium_env(tmp_path))
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("request", lambda r: r.url.startswith((lab.url, "data:", "blob:")) or elsewhere.append(r.url))
        page.on("requestfailed", lambda r: failed.append(r.url))
        page.goto(f"{lab.url}/lab/tree/09_chat_demo.ipynb?token={lab.token}")
        kernel = _wait_until(lambda: next((s["kernel"] for s in _lab_api(lab, "sessions") if s["path"] ==
                                           "09_chat_demo.ipynb" and s["kernel"]["execution_state"] == "idle"), None),
                             120, "a kernel for 09, idle")
        assert kernel["name"] == "medqa-zh"  # 09's kernelspec
        page.locator(".jp-Notebook .jp-CodeCell").first.wait_for()
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
        prompts_shown = page.locator(".jp-CodeCell .jp-InputPrompt")
        tracebacks = page.locator(".jp-OutputArea-output", has_text="Traceback")
        # every code cell has run ([n]: in its prompt), or one failed (Run All stops there)
        _wait_until(lambda: tracebacks.count() or all(re.fullmatch(r"\[\d+\]:", s.strip())
                                                      for s in prompts_shown.all_inner_texts()),
                    300, lambda: f"Run All Cells: the prompts show {prompts_shown.all_inner_texts()}")
        assert not tracebacks.count(), f"a cell failed:\n{tracebacks.first.inner_text()[-3000:]}"
        assert prompts_shown.count() == code_cells
        _wait_until(lambda: _lab_api(lab, f"kernels/{kernel['id']}")["execution_state"] == "idle", 60, "kernel idle")
        # the panel rendered, with 09's scripted turns (a message and a reply each) in its conversation
        conversation = page.locator('.widget-box[style*="column-reverse"]')
        turns = conversation.locator(".widget-vbox > .widget-html").first.locator(".widget-html-content > div")
        scripted = turns.count()
        assert scripted >= 2 and scripted % 2 == 0, conversation.inner_text()
        conversation.scroll_into_view_if_needed()
        # every state of the panel's streaming area (the widget under the history) while the reply comes in
        conversation.evaluate("""(box) => {
            const current = box.querySelectorAll('.widget-vbox > .widget-html')[1];
            window.streamed = [];
            new MutationObserver(() => window.streamed.push(current.innerText))
                .observe(current, {subtree: true, childList: true, characterData: true});
        }""")
        page.locator(".jupyter-widgets textarea").fill(question)
        send = page.locator('button[title="发送 send"]')
        send.click()
        _wait_until(lambda: turns.count() == scripted + 2 and send.is_enabled(), 120, "the reply in the panel")
        message = turns.nth(scripted).inner_text()
        reply = turns.nth(scripted + 1).locator("div").first.inner_text().strip()  # the reply under 模型 · model
        streamed = [s for s in page.evaluate("window.streamed") if q["question"] in s]
        status = page.locator(".widget-hbox", has=send).locator(".widget-html-content").inner_text()
        # a reader sees the newest turn without scrolling: the conversation box keeps its end in view
        in_view = conversation.evaluate("""(box) => {
            const last = box.querySelector('.widget-html-content').lastElementChild.getBoundingClientRect();
            const shown = box.getBoundingClientRect();
            return last.top >= shown.top - 1 && last.bottom <= shown.bottom + 1;
        }""")
        page.locator(".jupyter-widgets textarea").scroll_into_view_if_needed()
        page.screenshot(path=shots / "09_jupyterlab.png")
        body = page.locator("body").inner_text()
        failed_cells = tracebacks.count()
        browser.close()
    assert "Error displaying widget" not in body and not failed_cells
    assert q["question"] in message and reply and reply != "…", (message, reply, status)
    assert re.fullmatch(r"\d+ pieces in [\d.]+ s", status), status
    # while it streamed, the panel showed the message and part of the reply (render_reply's "…" is no text yet)
    partial = [s.split("模型 · model")[-1].strip() for s in streamed]
    assert any(text not in ("", "…") for text in partial), f"the reply did not stream into the panel: {streamed}"
    assert in_view, "the newest reply is out of the conversation box's view: it did not scroll to it"
    assert not elsewhere, f"requests that left the machine: {elsewhere}"  # ipywidgets' code comes from the server
    assert not failed, f"requests that failed: {failed}"
    assert not lab.left, f"processes left running after JupyterLab stopped: {lab.left}"
    # the kernel wrote into this project's outputs/ (MEDQA_ROOT): config.setup's manifest
    assert (project / "outputs" / "smoke" / "manifest.json").stat().st_mtime >= started
    assert (shots / "09_jupyterlab.png").stat().st_size > 10_000
