"""The benchmarks still run (on the tiny model, a few seconds); their numbers are not checked here."""
import subprocess
import sys

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow


def test_train_throughput_prints_a_table_with_ratios(tiny_assets):
    out = subprocess.run(
        [sys.executable, REPO / "bench" / "train_throughput.py", tiny_assets["model"], "--batch", "2", "--seq", "16",
         "--steps", "1", "--configs", "lora-fp32,lora-bf16"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| lora-")]
    assert [r.split("|")[1].strip() for r in rows] == ["lora-fp32", "lora-bf16"]
    assert "bf16 vs fp32 speed, LoRA: " in out.stdout


def test_eval_throughput_compares_every_method_on_the_same_questions(tiny_assets):
    questions = tiny_assets["medqa"] / "questions" / "Mainland" / "test.jsonl"
    out = subprocess.run(
        [sys.executable, REPO / "bench" / "eval_throughput.py", tiny_assets["model"], questions, "--start", "0",
         "--n", "6", "--dtype", "float32", "--concurrency", "1", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.stdout.splitlines() if line.startswith("| ")}
    methods = ("letter", "rotations-whole", "rotations-shared", "generate", "seed", "api-c1", "api-c2", "api-cb-c1",
               "api-cb-c2")
    assert set(rows) >= set(methods)
    assert all(int(rows[m][2]) == 6 for m in methods)  # the same questions for every method
    assert "letter scoring vs the seed's method: " in out.stdout
    assert "rotations-shared: 5 rotations take " in out.stdout
    difference = float(out.stdout.split("largest log-probability difference ")[1].split(";")[0])
    assert difference < 1e-3  # float32: the shared prefix changes no score


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
