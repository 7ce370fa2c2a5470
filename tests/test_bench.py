"""The benchmarks still run (on the tiny model, a few seconds); their numbers are not checked here."""
import json
import os
import re
import subprocess
import sys

import pytest

from helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # a hang fails with its stack; at least 5x the longest such test measured with both cores busy


def test_train_throughput_compares_padded_and_packed_batches_through_the_trainer(tiny_assets, tmp_path):
    """The bench builds a random-init model of a config's shape (here the tiny model's) and trains it through
    medqa_zh.train, each variant in its own run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDQA_")}
    out = subprocess.run(
        [sys.executable, REPO / "bench" / "train_throughput.py", "--profile", "smoke", "--config",
         tiny_assets["model"] / "config.json", "--tokenizer", tiny_assets["model"], "--steps", "1",
         "--variants", "padded,packed+budget", "--work", tmp_path / "work"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.stdout.splitlines() if line.startswith("| ")]
    header, *table = rows
    assert [(r[0], r[1]) for r in table] == [("lora", "padded"), ("lora", "packed+budget"), ("full", "padded"),
                                             ("full", "packed+budget")]
    assert all(float(r[header.index("tokens/s")]) > 0 and r[header.index("MFU")].endswith("%") for r in table)
    assert "1 packed row" in table[1][header.index("micro-batches a step")]
    assert "lora, packed+budget vs padded: tokens/s x" in out.stdout and "LoRA vs full, padded: tokens/s x" in out.stdout
    assert (tmp_path / "work" / "random-model" / "config.json").is_file()  # built, not downloaded


def test_train_profile_accounts_for_a_step_by_kind_of_work(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDQA_")}
    out = subprocess.run([sys.executable, REPO / "bench" / "train_profile.py", "--profile", "smoke", "--steps", "1",
                          "--work", tmp_path / "work", "train.lora.dropout=0.1"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    ops = next(line for line in out.stdout.splitlines() if line.startswith("aten operators per step: "))
    assert int(ops.split(": ")[1]) > 100
    rows = {line.split("|")[1].strip(): line for line in out.stdout.splitlines() if line.startswith("| ")}
    assert {"matmul", "dropout", "optimizer"} <= set(rows)  # LoRA's dropout shows as its own kind of work
    shares = [float(line.split("|")[3].strip().rstrip("%")) for k, line in rows.items() if k not in ("kind", "---")]
    assert sum(shares) == pytest.approx(100, abs=0.5)


def test_eval_throughput_compares_every_method_on_the_same_questions(tiny_assets):
    questions = tiny_assets["medqa"] / "questions" / "Mainland" / "test.jsonl"
    out = subprocess.run(
        [sys.executable, REPO / "bench" / "eval_throughput.py", tiny_assets["model"], questions, "--start", "0",
         "--n", "6", "--dtype", "float32", "--concurrency", "1", "2", "--calibration-start", "10", "--calibration", "4"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.stdout.splitlines() if line.startswith("| ")}
    methods = ("letter", "rotations-whole", "rotations-shared", "pride", "generate", "original", "api-c1", "api-c2")
    assert set(rows) >= set(methods)
    assert all(int(rows[m][2]) == 6 for m in methods)  # the same questions for every method
    assert "letter scoring vs the original workflow's method: " in out.stdout
    assert "rotations-shared: 5 rotations take " in out.stdout
    difference = float(out.stdout.split("largest log-probability difference ")[1].split(";")[0])
    assert difference < 1e-3  # float32: the shared prefix changes no score
    cyclic = float(out.stdout.split("every rotation (cyclic, shared prefix): ")[1].split("x")[0])
    pride = float(out.stdout.split("PriDe, prior from 4 calibration questions + one pass each: ")[1].split("x")[0])
    assert cyclic > 0 and pride >= 1.0  # a ratio to one plain pass, measured: PriDe is that pass plus its calibration
    assert "same option" in out.stdout


def test_rag_latency_measures_every_retriever(tiny_assets):
    medqa = tiny_assets["medqa"]
    out = subprocess.run(
        [sys.executable, REPO / "bench" / "rag_latency.py", medqa / "textbooks" / "zh_paragraph",
         medqa / "questions" / "Mainland" / "test.jsonl", "--embedder", tiny_assets["encoder"], "--start", "0",
         "--queries", "20", "--max-chars", "120", "--overlap", "20"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    steps = [line.split("|")[1].strip() for line in out.stdout.splitlines() if line.startswith("| ")]
    for step in ("bm25-bigram: build", "bm25-jieba: query", "dense: load from cache", "dense: query (embed + search)",
                 "hybrid: query"):
        assert step in steps, steps
    assert any(s.startswith("rank-bm25 on") for s in steps) and "same top passage" in out.stdout


def test_loss_head_compares_the_three_losses_on_the_same_batch(tiny_assets):
    questions = tiny_assets["medqa"] / "questions" / "Mainland" / "test.jsonl"
    out = subprocess.run(
        [sys.executable, REPO / "bench" / "loss_head.py", tiny_assets["model"], questions, "--batch", "4", "--steps", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split("|")[2].strip(): line.split("|") for line in out.stdout.splitlines() if line.startswith("| 4 ")}
    assert set(rows) == {"all", "union", "rows"}
    assert len({rows[m][6].strip() for m in rows}) == 1  # the same loss three ways
    assert int(rows["rows"][5].replace(",", "")) < int(rows["union"][5].replace(",", ""))  # fewer logits
    assert "union vs rows: logits x" in out.stdout


def test_recipes_trains_each_variant_and_tests_it_against_the_base(tmp_path):
    import shutil

    project = tmp_path / "project"  # a project of its own: the study writes splits and models
    shutil.copytree(REPO / "profiles", project / "profiles")
    shutil.copy(REPO / "pyproject.toml", project / "pyproject.toml")
    out = tmp_path / "recipes"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDQA_")}
    command = [sys.executable, REPO / "bench" / "recipes.py", "--profile", "smoke", "--questions", "8",
               "--variants", "reference,shuffle+text", "--out", out]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**env, "MEDQA_ROOT": str(project)})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|") for line in done.stdout.splitlines() if line.startswith("| ")}
    assert set(rows) == {"variant", "base", "reference", "shuffle+text"}  # the base is always scored
    assert (out / "recipes.md").read_text(encoding="utf-8").strip() == "\n".join(
        line for line in done.stdout.splitlines() if line.startswith("|")).strip()
    header = [c.strip() for c in rows["variant"]]
    p = header.index("McNemar p (debiased vs base)")
    assert rows["base"][p].strip() == "—" and 0 <= float(rows["reference"][p]) <= 1
    assert int(rows["shuffle+text"][header.index("n")]) == 8
    assert rows["reference"][header.index("Δ debiased vs base [95% CI]")].strip().count("%") == 3
    # it chooses a recipe, so it scores validation questions, never eval ones
    from medqa_zh import results as cached

    split = lambda role: [json.loads(line)["id"] for line in  # noqa: E731
                          (project / "outputs" / "smoke" / "data" / "questions" / f"{role}.jsonl").read_text().splitlines()]
    scored = [r["id"] for r in cached.read(out / "reference-rotations.jsonl")]
    assert scored == split("validation")[:8] and not set(scored) & set(split("eval"))
    shuffled = json.loads((out / "shuffle+text" / "run.json").read_text(encoding="utf-8"))
    assert shuffled["settings"]["shuffle_options"] is True and shuffled["settings"]["completion"] == "letter_text"
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**env, "MEDQA_ROOT": str(project)})
    assert again.stdout.count("done earlier, kept") == 3  # finished variants are not run again


def test_the_lm_eval_task_asks_and_reads_as_the_api_evaluation_does(tiny_assets, tmp_path):
    """lm-evaluation-harness is not installed here: its hooks are checked directly, and compare.py on a
    made-up samples file (the executed check against a server is in the README and issue 14's note)."""
    import importlib.util

    from medqa_zh import answers, data, prompts

    spec = importlib.util.spec_from_file_location("lm_eval_utils", REPO / "bench" / "lm_eval" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    path = tiny_assets["medqa"] / "questions" / "Mainland" / "test.jsonl"
    questions, _ = data.read_questions(path)
    docs = utils.load(path=str(path))["test"]
    assert len(docs) == len(questions)
    for doc, q in zip(docs, questions, strict=True):
        assert utils.doc_to_text(doc) == prompts.format_user(q.question, q.options)
        assert json.loads(doc["options"]) == q.options and doc["answer_idx"] == q.answer_idx
    doc, q = docs[0], questions[0]
    assert utils.process_results(doc, [f"答案：{q.answer_idx}"]) == {"acc": 1.0, "unparseable": 0.0}
    assert utils.process_results(doc, ["我不知道"]) == {"acc": 0.0, "unparseable": 1.0}
    with pytest.raises(ValueError, match="--metadata"):
        utils.load()

    # compare.py: the harness's samples against the project's results for the same questions
    out_dir = tmp_path / "lm_eval" / "model"
    out_dir.mkdir(parents=True)
    texts = ["答案：A", "答案：B"]
    (out_dir / "samples_medqa_zh_2026.jsonl").write_text("".join(
        json.dumps({"doc": docs[i], "resps": [[t]]}, ensure_ascii=False) + "\n" for i, t in enumerate(texts)), "utf-8")
    ours = tmp_path / "api.jsonl"
    ours.write_text("".join(json.dumps({"id": docs[i]["id"], "gold": docs[i]["answer_idx"], "text": t if i == 0 else "答案：C",
                                        "pred": answers.extract_letter(t if i == 0 else "答案：C")}, ensure_ascii=False) + "\n"
                            for i, t in enumerate(texts)), "utf-8")
    run = subprocess.run([sys.executable, REPO / "bench" / "lm_eval" / "compare.py", tmp_path / "lm_eval", ours],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "questions in both: 2" in run.stdout and "same raw text: 1/2" in run.stdout and "same letter: 1/2" in run.stdout


def test_train_scaling_compares_one_and_two_processes_on_the_same_global_batch(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDQA_")}
    out = subprocess.run([sys.executable, REPO / "bench" / "train_scaling.py", "--profile", "smoke", "--steps", "3",
                          "--per-device", "2", "--work", tmp_path / "work"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.stdout.splitlines() if line.startswith("| ")]
    header, *runs = rows
    table = [dict(zip(header, r, strict=True)) for r in runs]
    assert [(r["processes"], r["per device x accumulation"], r["parallelism"]) for r in table] == \
        [("1", "2 x 2", "NO"), ("2", "2 x 1", "MULTI_CPU")]
    assert "2 vs 1 process(es): examples/s x" in out.stdout
    assert (tmp_path / "work" / "outputs" / "smoke" / "models" / "lora" / "run.json").is_file()  # its own project


def test_serve_load_runs_clients_against_a_server_it_starts_and_reports_it_alive(tiny_assets):
    out = subprocess.run(
        [sys.executable, REPO / "bench" / "serve_load.py", tiny_assets["model"], "--clients", "6", "--seconds", "3",
         "--max-tokens", "4", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-2000:]
    tally = json.loads(out.stdout.strip().splitlines()[-1])
    assert tally["answered"] > 6 and tally["failed"] == {} and tally["alive"]
    assert "server alive at the end: yes" in out.stdout


def test_serve_load_compares_the_server_with_a_baseline_commit_side_by_side(tiny_assets):
    # the baseline is this very commit: the bench's mechanics (the old module from git, its own process), not a speed
    out = subprocess.run(
        [sys.executable, REPO / "bench" / "serve_load.py", tiny_assets["model"], "--clients", "4", "--seconds", "2",
         "--max-tokens", "2", "--dtype", "float32", "--baseline", "HEAD", "--rounds", "1"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-2000:]
    assert "current: " in out.stdout and "baseline HEAD: " in out.stdout and "peak memory" in out.stdout
    ratios = out.stdout.split("current / baseline (mean of the rounds): ")[1]
    assert "requests/s x" in ratios and "peak GiB x" in ratios


def test_gguf_serving_compares_the_transformers_server_with_every_gguf(tiny_assets, tmp_path):
    from medqa_zh import export

    gguf = tmp_path / "gguf"
    export.convert(tiny_assets["model"], gguf / "tiny-f16.gguf")
    for q in ("q8_0", "Q4_K_M"):
        export.quantize(gguf / "tiny-f16.gguf", gguf / f"tiny-{q}.gguf", q)
    questions = tiny_assets["medqa"] / "questions" / "Mainland" / "test.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDQA_")}
    out = subprocess.run(
        [sys.executable, REPO / "bench" / "gguf_serving.py", "--profile", "smoke", "--model", "tiny", "--model-dir",
         tiny_assets["model"], "--gguf-dir", gguf, "--questions-file", questions, "--questions", "6", "--concurrency", "1", "2"],
        capture_output=True, text=True, timeout=600, env={**env, "MEDQA_ROOT": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    table, _, paired = out.stdout.partition("against the transformers server")
    lines = [line.split() for line in table.splitlines() if line.strip().startswith(("transformers", "llamacpp"))]
    assert [(r[0], r[1], r[2]) for r in lines] == [(s, p, c) for s, p in (("transformers", "float32"), ("llamacpp", "f16"),
                                                  ("llamacpp", "q8_0"), ("llamacpp", "Q4_K_M")) for c in ("1", "2")]
    assert all(float(r[3]) > 0 and float(r[5]) > 0 for r in lines)  # questions/s, peak memory
    assert len([line for line in paired.splitlines() if line.strip().startswith(("transformers", "llamacpp"))]) == 4


def test_grpo_step_times_the_answer_arm_through_the_projects_own_grpo_run(tmp_path):
    """The bench places the start model where 04 leaves the merged one, trains GRPO's answer arm through
    grpo.prepare() and grpo.train_run(), and prints each step's time, its generate time and trl's token counts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDQA_")}
    out = subprocess.run([sys.executable, REPO / "bench" / "grpo_step.py", "--profile", "smoke", "--steps", "2",
                          "--work", tmp_path / "work", "grpo.num_generations=2", "grpo.per_device_train_batch_size=4",
                          "grpo.max_completion_length=4"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "arm answer" in out.stdout and "2 prompts x 2 generations = 4 completions a step" in out.stdout
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    assert measured["completions_per_step"] == 4 and [s["step"] for s in measured["steps"]] == [1, 2]
    for step in measured["steps"]:
        assert 0 < step["generate"] < step["seconds"]  # generating is a part of the step, timed inside it
        assert 1 <= step["length"] <= 4 and step["tokens"] > 4 * step["length"]  # the prompts are trained on too
    assert measured["median_step_seconds"] == measured["steps"][1]["seconds"]  # the warm-up step is left out
    assert measured["peak_memory_gib"] > 0
    for line in ("median step (steps 2-2): ", "median generate: ", "generated tokens/s: ", "trained tokens/s: ",
                 "peak memory: "):
        assert line in out.stdout
    work = tmp_path / "work" / "outputs" / "smoke" / "models"
    assert (work / "merged").is_symlink() and (work / "grpo" / "run.json").is_file()  # its own project, not outputs/


def test_planted_learnability_prints_both_readings_per_group_before_and_after_training():
    """bench/planted_learnability.py: the smoke world's base model pretrained as the asset build does, fine-tuned,
    and each eval group read two ways (letter, answer line), before and after."""
    out = subprocess.run([sys.executable, REPO / "bench" / "planted_learnability.py", "--epochs", "2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "pretrained (letter skew)" in lines[0]
    assert lines[1].startswith("base: trained (n=") and lines[2].startswith("epoch 2 (lora, lr 0.005, letter_text")
    for line in lines[1:3]:
        assert line.count("answer line ") == 3 and "passage (n=" in line and "unknown (n=" in line


def test_binding_direction_trains_both_directions_side_by_side_and_learns_the_forward_one():
    """bench/binding_direction.py: the forward lookup (letter -> its option's text) and the reverse one (text -> its
    letter) trained side by side; within 300 steps the forward one is learned (its accuracy far above chance), which
    shows the bench trains at all: what it reports of the reverse one is measured, not asserted here."""
    out = subprocess.run([sys.executable, REPO / "bench" / "binding_direction.py", "--steps", "300", "--every", "300",
                          "--threads", "1"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    head, last = out.stdout.splitlines()[0], out.stdout.splitlines()[-1]
    assert "first-query accuracy on 256 held-out sequences (chance 0.20)" in head
    found = re.match(r"step +300 +forward \(letter -> text\): ([\d.]+) +reverse \(text -> letter\): ([\d.]+)", last)
    assert found and float(found.group(1)) >= 0.8, last
