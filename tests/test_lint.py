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


def test_ruff_finds_nothing_in_the_technique_script(tmp_path):
    """The technique cells of 02, 03, 04b and 08 with their before and after pieces, as the one script
    tests/technique.py makes of them: no undefined name, no unused import."""
    sys.path.insert(0, str(REPO / "tests"))
    import technique

    path = tmp_path / "technique_script.py"
    path.write_text(technique.script("/nowhere"), encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--isolated", "--line-length", "120",
                          "--select", "F,B,E7,E9", "--ignore", "F811",  # two notebooks' cells import one module each
                          "--output-format", "concise", str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, f"ruff check of the exported script:\n{out.stdout}{out.stderr}"


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
    "grpo": ("medqa_zh.evaluate", "medqa_zh.serve", "medqa_zh.results"),  # trains; scoring the eval split is 06-08's
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
        banned = MUST_NOT_IMPORT.get(path.stem, ()) + (() if path.stem in ("train", "grpo") else ("trl",))
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


# --------------------------------------------------------------------------- no private names of a dependency

DEPENDENCIES = ("transformers", "trl", "peft", "llama_cpp", "vllm")  # their private names change without notice
# private names of other libraries, each kept for a reason: the standard library's documented ones; torch's only
# test of native bf16 on a CPU (models.cpu_supports_bf16, which falls back to False); matplotlib's font cache, which a
# test clears as matplotlib's own addfont does
OTHER_PRIVATE = {"_exit", "_getframe", "_asdict", "_replace", "_fields", "_make", "_is_mkldnn_bf16_supported",
                 "_findfont_cached"}


def _project_sources() -> dict[str, str]:
    """Every Python source of the project: the library, the benchmarks, the scripts, the tests, and the notebooks'
    code cells (one source per notebook)."""
    import json

    sources = {str(p.relative_to(REPO)): p.read_text(encoding="utf-8")
               for folder in ("lib", "bench", "scripts", "tests") for p in sorted((REPO / folder).rglob("*.py"))}
    for nb in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        sources[str(nb.relative_to(REPO))] = "\n".join(line for cell in code for line in cell.splitlines()
                                                       if not line.lstrip().startswith(("%", "!")))
    return sources


def _defined(tree) -> set[str]:
    """The names a source defines itself: functions, classes, arguments, assigned names and attributes."""
    import ast

    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name)
              and node.value.id in ("self", "cls")):  # its own object's; `Other._x = ...` patches someone else's
            names.add(node.attr)
        elif isinstance(node, ast.alias) and node.asname:
            names.add(node.asname)
    return names


def private_uses(sources: dict[str, str]) -> list[str]:
    """``file:line: name`` for every private name (one leading underscore, not a dunder) the sources use that the
    project does not define itself: an attribute (``model._foo``), a ``getattr``/``setattr``/``hasattr`` string, an
    import from a private module or of a private name of a dependency, or a private method overridden in a subclass
    of a dependency's class."""
    import ast

    private = lambda name: name.startswith("_") and not name.startswith("__")  # noqa: E731
    trees = {path: ast.parse(text) for path, text in sources.items()}
    own = set().union(*(_defined(tree) for tree in trees.values())) | OTHER_PRIVATE
    found = []
    for path, tree in trees.items():
        theirs = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                  and (node.module or "").split(".")[0] in DEPENDENCIES for a in node.names}
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ClassDef) and any(isinstance(b, ast.Name) and b.id in theirs for b in node.bases):
                found += [f"{path}:{f.lineno}: {f.name}" for f in node.body
                          if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and private(f.name)]
            if isinstance(node, ast.Attribute) and private(node.attr) and node.attr not in own:
                names = [node.attr]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) > 1
                  and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
                  and private(node.args[1].value) and node.args[1].value not in own):
                names = [node.args[1].value]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for module in modules:
                    if module.split(".")[0] in DEPENDENCIES:
                        names += [part for part in module.split(".") if private(part)]
                        if isinstance(node, ast.ImportFrom):
                            names += [a.name for a in node.names if private(a.name)]
            found += [f"{path}:{node.lineno}: {name}" for name in names]
    return sorted(found, key=lambda f: (f.split(":")[0], int(f.split(":")[1])))


def test_no_code_touches_a_private_name_of_a_dependency():
    assert private_uses(_project_sources()) == [], ("private names of dependencies (they change without notice; "
                                                    "use a public, documented API)")


def test_the_private_name_check_finds_what_it_is_for():
    caught = private_uses({"a.py": "from transformers.cli.serving.utils import BaseHandler\n"
                                   "BaseHandler._build_generation_config = None\n"
                                   "x = llm._model.token_get_text(3)\n"
                                   "getattr(trainer, '_signature_columns')\n"
                                   "from llama_cpp import _internals\n"
                                   "from vllm._C import ops\n",
                           "b.py": "class Mine:\n    _kept = 1\n\n\nMine()._kept\nimport os\nos._exit(0)\n",
                           "c.py": "from transformers import Trainer\n\n\nclass T(Trainer):\n"
                                   "    def _get_train_sampler(self):\n        pass\n\n    def _mine(self):\n"
                                   "        pass\n\n\nclass Own:\n    def _free(self):\n        pass\n"})
    assert caught == ["a.py:2: _build_generation_config", "a.py:3: _model", "a.py:4: _signature_columns",
                      "a.py:5: _internals", "a.py:6: _C", "c.py:5: _get_train_sampler", "c.py:8: _mine"]


def test_the_library_imports_without_the_notebook_stack_or_a_chinese_segmenter():
    """A script that only trains or serves (or a GPU machine without them) needs neither IPython nor jieba: every
    module but the chat widget imports, the banner prints, and BM25's bigram terms work; jieba's terms say what is
    missing."""
    modules = sorted(p.stem for p in (REPO / "lib" / "medqa_zh").glob("*.py") if p.stem not in ("__init__", "chat"))
    code = ("import importlib, sys\n"
            "for name in ('IPython', 'ipywidgets', 'jieba'):\n    sys.modules[name] = None  # import fails\n"
            "for m in sys.argv[1:]:\n    importlib.import_module('medqa_zh.' + m)\n"
            "from medqa_zh import config, rag\nconfig.banner(config.load('smoke'))\n"
            "print(rag.tokenize('胃溃疡', 'bigram'))\n"
            "try:\n    rag.tokenize('胃溃疡', 'jieba')\nexcept ImportError as e:\n    print('jieba:', e)\n"
            "try:\n    import medqa_zh.chat\nexcept ImportError:\n    print('chat needs the notebook stack')\n")
    out = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "['胃溃', '溃疡']" in out.stdout and "jieba:" in out.stdout and "profile: smoke" in out.stderr
    assert "chat needs the notebook stack" in out.stdout  # the check can fail: it blocks what it says
