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


def test_the_architecture_notes_and_the_package_docstring_name_every_module():
    import medqa_zh

    modules = sorted(p.stem for p in (REPO / "lib" / "medqa_zh").glob("*.py") if p.stem != "__init__")
    notes = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    listed = [line.split()[0] for line in medqa_zh.__doc__.splitlines()[2:] if line.strip()]
    assert [m for m in modules if f"| `{m}` |" not in notes] == [], "docs/ARCHITECTURE.md lacks these modules"
    assert sorted(listed) == modules, "lib/medqa_zh/__init__.py's module list is out of date"
