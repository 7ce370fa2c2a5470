"""``profiles/base.yaml`` is the only home of a default: code reads settings without a fallback of its own.

A static check over the library, the benchmarks and the notebooks' code cells. A *settings read* is
``cfg[K]``, ``cfg.get(K, ...)`` or ``cfg.path(K)`` with ``K`` a literal dotted key, and, in ``train.py``,
``s[K]`` / ``s.get(K)`` / ``run.settings[K]`` on the ``train`` section. Each must name a key the base
has; none may carry a default (``.get(K, D)``, ``.setdefault(K, D)``), nor a literal fallback
(``read or 50``) where the base gives the key a value: the fallback would be a second default. A literal
fallback is allowed for a key whose base value is null, since there the base says what null means
(``train.max_steps: null``: the epochs decide) and the code spells that meaning.
"""
import ast
import json

import pytest
import yaml

from helpers import REPO

MISSING = object()


def _base() -> dict:
    return yaml.safe_load((REPO / "profiles" / "base.yaml").read_text(encoding="utf-8"))


def _lookup(values: dict, dotted: str):
    node = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def _owner(node) -> str | None:
    """``cfg``, ``s`` or ``settings`` (``run.settings``): whose settings an expression reads, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and node.attr == "settings":
        return "settings"
    return None


SECTIONS = {"cfg": ""}                       # the whole profile
TRAIN_SECTIONS = {"s": "train.", "settings": "train."}  # train.py's settings(cfg, mode) dict


def _read(node, prefixes: dict):
    """(key, default node or None, kind) when ``node`` reads a setting by a literal key, else None."""
    if isinstance(node, ast.Subscript) and _owner(node.value) in prefixes:
        key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            return prefixes[_owner(node.value)] + key.value, None, "read"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _owner(node.func.value) in prefixes \
            and node.func.attr in ("get", "path", "setdefault") and node.args:
        key = node.args[0]
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            default = node.args[1] if len(node.args) > 1 else None
            return prefixes[_owner(node.func.value)] + key.value, default, node.func.attr
    return None


def violations(source: str, where: str, base: dict, train_section: bool = False) -> list[str]:
    """What in ``source`` reads a setting the base lacks, or gives one a default of its own."""
    prefixes = {**SECTIONS, **(TRAIN_SECTIONS if train_section else {}),
                **({"self": ""} if where.endswith("config.py") else {})}  # config.Config reads itself
    found = []
    for node in ast.walk(ast.parse(source)):
        read = _read(node, prefixes)
        if read:
            key, default, kind = read
            line = f"{where}:{node.lineno}"
            value = _lookup(base, key)
            if value is MISSING:
                found.append(f"{line}: reads {key!r}, which profiles/base.yaml lacks")
            elif default is not None or kind == "setdefault":
                found.append(f"{line}: reads {key!r} with a default of its own (base.yaml says {value!r})")
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            first = _read(node.values[0], prefixes)
            fallback = node.values[-1]
            if first and isinstance(fallback, (ast.Constant, ast.Dict, ast.List)):
                value = _lookup(base, first[0])
                if value is not MISSING and value is not None:
                    found.append(f"{where}:{node.lineno}: {first[0]!r} falls back to a literal "
                                 f"(base.yaml says {value!r})")
    return found


def _sources():
    for path in sorted([*(REPO / "lib" / "medqa_zh").glob("*.py"), *(REPO / "bench").glob("*.py")]):
        yield path.relative_to(REPO), path.read_text(encoding="utf-8"), path.name == "train.py"
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        yield path.relative_to(REPO), "\n".join(line for line in code.splitlines() if not line.startswith(("%", "!"))), False


def test_code_reads_only_settings_the_base_names_and_never_with_a_default_of_its_own():
    base = _base()
    found = [v for where, source, train in _sources() for v in violations(source, str(where), base, train)]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize("code, expected", [
    ('s.setdefault("shuffle_options", False)', "with a default of its own"),       # what train.py did (base: true)
    ('eval_steps = s.get("eval_steps") or 50', "falls back to a literal"),         # base: 100
    ('x = s.get("max_grad_norm", 1.0)', "with a default of its own"),
    ('x = cfg.get("model.device", "auto")', "with a default of its own"),          # equal to the base: still a second home
    ('x = cfg["eval.no_such_knob"]', "which profiles/base.yaml lacks"),
    ('x = s["no_such_knob"]', "which profiles/base.yaml lacks"),
])
def test_the_check_finds_a_second_default_and_an_unknown_key(code, expected):
    found = violations(code, "snippet", _base(), train_section=True)
    assert len(found) == 1 and expected in found[0], found


def test_a_null_in_the_base_may_be_spelled_out_in_code():
    assert violations('x = s["max_steps"] or -1', "snippet", _base(), train_section=True) == []


def test_the_check_fails_on_the_train_module_before_this_change():
    """The code this test was written against: its fallbacks are what the check is for."""
    import subprocess

    old = subprocess.run(["git", "show", "4f30231:lib/medqa_zh/train.py"], cwd=REPO, capture_output=True, text=True)
    if old.returncode:
        pytest.skip("the repository's history is not here (a shallow or exported copy)")
    found = violations(old.stdout, "train.py@4f30231", _base(), train_section=True)
    assert any("'train.shuffle_options'" in v for v in found) and any("'train.eval_steps'" in v for v in found)
