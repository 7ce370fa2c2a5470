"""ruff over the library, the benchmarks, the tests and the notebooks' code cells ([tool.ruff] in pyproject.toml)."""
import subprocess
import sys

import pytest

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


def _imports(path) -> set[str]:
    """Every module ``path`` imports, at its top or inside a function (``from . import x``: ``medqa_zh.x``)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import a, b / from .a import b
                found |= {f"medqa_zh.{node.module}"} if node.module else {f"medqa_zh.{a.name}" for a in node.names}
            else:
                found.add(node.module)
    return {name for name in found if name}


# what a module must not import (itself or its packages), as docs/ARCHITECTURE.md says
MUST_NOT_IMPORT = {
    "runs": ("torch", "transformers", "peft", "trl", "medqa_zh."),  # reading finished runs costs no model stack
    "children": ("medqa_zh.",),
    "train": ("medqa_zh.serve",),
    "serve": ("medqa_zh.evaluate", "medqa_zh.answers", "medqa_zh.results", "trl"),  # serving does not score answers
    "serve_child": ("medqa_zh.",),  # runs in the server's process: nothing of the notebook side
    "files": ("medqa_zh.",),
    "export": ("medqa_zh.train", "medqa_zh.serve"),  # makes and checks files; serving them is serve's
    "dashboards": ("medqa_zh.train", "medqa_zh.results", "medqa_zh.evaluate"),  # shows numbers; makes none
}


def test_each_module_keeps_out_of_what_it_must_not_import():
    lib = REPO / "lib" / "medqa_zh"
    wrong = []
    for path in sorted(lib.glob("*.py")):
        imports = _imports(path)
        banned = MUST_NOT_IMPORT.get(path.stem, ()) + (() if path.stem == "train" else ("trl",))
        wrong += [f"{path.stem} imports {name}" for name in sorted(imports)
                  if any(name == b or name.startswith(b if b.endswith(".") else b + ".") for b in banned)]
    assert wrong == []


def test_the_import_check_sees_what_the_train_module_imported_before_it_had_its_own_children(tmp_path):
    """The check can fail: train.py as it was (it imported serve for its child-process helper)."""
    old = subprocess.run(["git", "show", "4f30231:lib/medqa_zh/train.py"], cwd=REPO, capture_output=True, text=True)
    if old.returncode:
        pytest.skip("the repository's history is not here (a shallow or exported copy)")
    (tmp_path / "train.py").write_text(old.stdout, encoding="utf-8")
    assert "medqa_zh.serve" in _imports(tmp_path / "train.py")


def test_the_report_notebook_loads_neither_the_trainer_nor_torch():
    import json

    cells = json.loads((REPO / "notebooks" / "10_report.ipynb").read_text(encoding="utf-8"))["cells"]
    imports = [line for c in cells if c["cell_type"] == "code" for line in "".join(c["source"]).splitlines()
               if line.startswith(("import ", "from "))]
    assert imports and not [line for line in imports if "train" in line.split() or "torch" in line]
    probe = "\n".join(imports) + "\nimport sys\nprint(sorted({'torch', 'trl', 'medqa_zh.train'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"notebook 10's imports load {out.stdout.strip()}"
