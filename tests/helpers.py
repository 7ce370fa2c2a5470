"""Small builders shared by the tests."""
import contextlib
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def row(**changes):
    """A valid MedQA row (synthetic), with fields changed or removed (value None removes)."""
    r = {
        "question": "【测试】下列哪项正确？（　　）",
        "options": {"A": "甲", "B": "乙", "C": "丙", "D": "丁", "E": "戊"},
        "answer": "乙",
        "meta_info": "测试",
        "answer_idx": "B",
    }
    for k, v in changes.items():
        if v is None:
            r.pop(k)
        else:
            r[k] = v
    return r


def write_jsonl(path: Path, rows) -> Path:
    """Rows may be dicts (dumped as JSON) or raw strings (written as they are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _pids(file: str, wanted) -> list[int]:
    """Pids of the other processes whose ``/proc/<pid>/<file>`` (its NUL-separated fields) ``wanted`` accepts."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                fields = (proc / file).read_bytes().split(b"\0")
            except OSError:
                continue
            if wanted(fields):
                pids.append(int(proc.name))
    return pids


def server_processes() -> list[int]:
    """Pids of transformers- and llamacpp-backend servers started by medqa_zh.serve, whoever started them."""
    return _pids("cmdline", lambda args: b"medqa_zh.serve_child" in b" ".join(args))


def processes_of(root) -> list[int]:
    """Pids of every process that runs with ``MEDQA_ROOT=root``: a launcher and the processes it started
    (torch's launcher starts each in a session of its own, out of reach of a kill of the launcher's group)."""
    return _pids("environ", lambda env: f"MEDQA_ROOT={root}".encode() in env)


@contextlib.contextmanager
def at_root(root):
    """Run with ``root`` as the project root and no MEDQA_* settings from the shell (outside a test's own monkeypatch)."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MEDQA_DIR", "MEDQA_BASE_MODEL", "MEDQA_EMBEDDER", "MEDQA_PROFILE", "MEDQA_ROOT"):
            mp.delenv(var, raising=False)
        mp.setenv("MEDQA_ROOT", str(root))
        yield


class Crash(Exception):
    """What :func:`crash_at` raises."""


def crash_at(step: int):
    """A trainer callback that crashes the run at the end of optimizer step ``step``, before its log."""
    from transformers import TrainerCallback

    class CrashAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Crash(f"simulated crash at step {step}")

    return CrashAt()


def logged(folder, key: str) -> list[tuple[int, float]]:
    """(step, value) of ``key`` in a run folder's train_log.jsonl."""
    from medqa_zh import runs

    return [(r["step"], r[key]) for r in runs.read_log(folder) if key in r]


def trackio_points(rows: list[dict], tag: str) -> list[tuple[int, float]]:
    """(step, value) of ``tag`` in a trackio run's rows (``dashboards.read_trackio``)."""
    return [(r["step"], r[tag]) for r in rows if tag in r]


def same_points(seen, expected):
    """The same steps, and the same values to float32's precision (an event file's)."""
    assert [s for s, _ in seen] == [s for s, _ in expected]
    assert [v for _, v in seen] == pytest.approx([v for _, v in expected], rel=1e-6)


# the documented way to stop an import: None in sys.modules (`import llama_cpp` then raises ModuleNotFoundError,
# importlib.util.find_spec("llama_cpp") returns None), as in an environment without llama-cpp-python
HIDE_LLAMA_CPP = 'import sys\nsys.modules["llama_cpp"] = None  # tests/helpers.py: as without llama-cpp-python\n'


def without_llama_cpp(folder: Path) -> dict:
    """The environment variables under which every Python process (a notebook's kernel, its children) finds no
    ``llama_cpp``, as on a machine where ``./run_all.sh`` left the gguf extra out (no C++ compiler), though it is
    installed here: a ``sitecustomize.py`` in ``folder``, first on PYTHONPATH, that stops the import."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(HIDE_LLAMA_CPP, encoding="utf-8")
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)}


def client_port(response) -> int:
    """The local port an httpx response came through: the same port, the same keep-alive connection."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


# a chat request as the servers' tests send it, to the served name "m"
OK = {"model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}
GOOD = json.dumps(OK)


def nested(depth: int) -> bytes:
    """``OK`` with ``metadata`` nested ``depth`` lists deep (json.dumps itself cannot write 10,000 levels)."""
    return GOOD.replace('"model"', f'"metadata": {"[" * depth}{"]" * depth}, "model"', 1).encode()


HOSTILE = [  # (what, raw body, param): each one was a 500 (or a reset connection) on at least one backend
    ("JSON nested 10,000 deep", nested(10_000), None),
    ("JSON nested 65 deep", nested(64), "metadata" + "[0]" * 63),
    ("a seed of 5,000 digits", GOOD.replace("{", '{"seed": ' + "9" * 5000 + ", ", 1).encode(), "seed"),
    ("a seed of 21 digits", GOOD.replace("{", '{"seed": -' + "9" * 21 + ", ", 1).encode(), "seed"),
    ("an integer of 5,000 digits in a list", GOOD.replace("{", '{"stop": [' + "1" * 5000 + "], ", 1).encode(), "stop[0]"),
    ("a logit_bias key of 5,000 digits", json.dumps({**OK, "logit_bias": {"7" * 5000: 1}}).encode(), "logit_bias"),
    ("a lone surrogate in a message", json.dumps({**OK, "messages": [{"role": "user", "content": "\ud800"}]}).encode(),
     "messages[0].content"),
    ("a lone surrogate in a text part",
     json.dumps({**OK, "messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfffb"}]}]}).encode(),
     "messages[0].content[0].text"),
    ("a lone surrogate in a key", json.dumps({**OK, "metadata": {"\ud83d": "x"}}).encode(), "metadata"),
    ("NaN", GOOD.replace("{", '{"temperature": NaN, ', 1).encode(), "temperature"),
    ("Infinity", GOOD.replace("{", '{"top_p": -Infinity, ', 1).encode(), "top_p"),
    ("bytes that are not UTF-8", b'{"messages": [{"role": "user", "content": "\xff"}]}', None),
]
