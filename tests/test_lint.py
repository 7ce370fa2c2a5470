"""ruff over the library, the benchmarks, the tests and the notebooks' code cells ([tool.ruff] in pyproject.toml)."""
import subprocess
import sys

from helpers import REPO


def test_ruff_finds_nothing():
    checked = ["lib", "bench", "tests", "notebooks"]
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *checked],
                         cwd=REPO, capture_output=True, text=True)
    assert "No module named ruff" not in out.stderr, "ruff is missing: it is in the dev extra (./run_all.sh installs it)"
    assert out.returncode == 0, f"ruff check {' '.join(checked)}:\n{out.stdout}{out.stderr}"
