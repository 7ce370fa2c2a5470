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
