"""The technique cells of 02, 03, 04b and 08 exported into one script that imports only the field's libraries.

A notebook's cells tagged ``technique`` are the ones a student copies to rebuild the technique: the trainer built
from its config, dataset and reward; the chunker, the BM25 terms and index, the dense search. :func:`script` writes
them into one script, in the series' order, each notebook's cells between two library-free pieces of
``tests/technique/``:

* ``<notebook>.before.py`` defines the names the cells read (the model, the examples in training order, the
  settings, the passages), from the files the series wrote under ``OUT`` (``outputs/<profile>``);
* ``<notebook>.after.py`` compares what the cells got with what the series got (the first logged losses, the
  rewards, the top-k passages), from the same files.

Where a cell builds one of the project's classes, the script builds trl's own (:data:`SWAPS`): the project's
classes change speed and bookkeeping, not the loss, and the script holds them to it. A technique cell names no
module of ``medqa_zh`` otherwise (:func:`library_names`), and the script runs with ``medqa_zh`` unimportable.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIECES = Path(__file__).resolve().parent / "technique"
NOTEBOOKS = ("02_lora_sft", "03_full_sft", "04b_grpo", "08_eval_rag")
TAG = "technique"

# the project's class -> trl's own, which the script builds in its place
SWAPS = {
    "train.OneDeviceConfig": "trl.SFTConfig",
    "train.AnswerOnlySFTTrainer": "trl.SFTTrainer",
    "grpo.Trainer": "trl.GRPOTrainer",
}

HEADER = '''"""The technique cells of {notebooks}, exported from the notebooks with the project's classes swapped for trl's
({swaps}). Written by tests/technique.py; it imports no medqa_zh."""
import tempfile
from pathlib import Path

import trl

OUT = Path({out!r})  # the series' outputs (outputs/<profile>)
SCRATCH = Path(tempfile.mkdtemp(prefix="technique-"))  # where the script's trainers write their checkpoints
'''


def cells(notebook: str, root: Path = REPO) -> list[str]:
    """The sources of ``notebook``'s cells tagged ``technique`` (in the project at ``root``), in order."""
    nb = json.loads((Path(root) / "notebooks" / f"{notebook}.ipynb").read_text(encoding="utf-8"))
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code" and TAG in c["metadata"].get("tags", [])]


def swapped(source: str) -> str:
    for ours, theirs in SWAPS.items():
        source = source.replace(ours, theirs)
    return source


def project_modules(notebook: str) -> set[str]:
    """The names ``notebook`` imports from ``medqa_zh`` (``from medqa_zh import train, rag``)."""
    nb = json.loads((REPO / "notebooks" / f"{notebook}.ipynb").read_text(encoding="utf-8"))
    names = set()
    for c in nb["cells"]:
        if c["cell_type"] != "code":
            continue
        for node in ast.walk(ast.parse("".join(c["source"]))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "medqa_zh":
                names |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                names |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] == "medqa_zh"}
    return names


def library_names(notebook: str) -> list[str]:
    """Every use of a ``medqa_zh`` module (or ``cfg``, the loaded profile) in ``notebook``'s technique cells once
    :data:`SWAPS` is applied: ``["train.parts (cell 2)", ...]``; empty when the cells are the field's code alone."""
    modules = project_modules(notebook) | {"cfg", "medqa_zh"}
    found = []
    for i, source in enumerate(cells(notebook), start=1):
        for node in ast.walk(ast.parse(swapped(source))):
            if isinstance(node, ast.Name) and node.id in modules:
                found.append(f"{node.id} (technique cell {i})")
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                found.append(f"{node.value.id}.{node.attr} (technique cell {i})")
            elif isinstance(node, ast.ImportFrom | ast.Import):
                mods = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                found += [f"import {m} (technique cell {i})" for m in mods if m.split(".")[0] == "medqa_zh"]
    return found


def script(out: str | Path, notebooks=NOTEBOOKS, root: Path = REPO) -> str:
    """The script: each notebook's ``before`` piece, its technique cells (:data:`SWAPS` applied; the notebooks of the
    project at ``root``), its ``after``."""
    parts = [HEADER.format(notebooks=", ".join(notebooks), out=str(out),
                           swaps=", ".join(f"{a} -> {b}" for a, b in SWAPS.items()))]
    for notebook in notebooks:
        technique = cells(notebook, root)
        if not technique:
            raise ValueError(f"notebooks/{notebook}.ipynb has no cell tagged {TAG!r}")
        parts.append(f"\n# {'=' * 100}\n# {notebook}\nprint('--- {notebook}', flush=True)\n")
        parts.append((PIECES / f"{notebook}.before.py").read_text(encoding="utf-8"))
        for i, source in enumerate(technique, start=1):
            parts.append(f"\n# --- {notebook}: technique cell {i}\n{swapped(source)}\n")
        parts.append(f"\n# --- {notebook}: the series' result, compared\n")
        parts.append((PIECES / f"{notebook}.after.py").read_text(encoding="utf-8"))
    return "\n".join(parts)


# run with medqa_zh unimportable: an import of it anywhere in the script raises ImportError
RUNNER = "import runpy, sys; sys.modules['medqa_zh'] = None; runpy.run_path(sys.argv[1], run_name='__main__')"

# what the script may import: the field's libraries and Python's own
FIELD = {"torch", "transformers", "trl", "peft", "datasets", "bm25s", "jieba", "sentence_transformers", "numpy"}


def imports(source: str) -> set[str]:
    """The top-level modules ``source`` imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add((node.module or "").split(".")[0])
    return found
