"""Resolve the ``gpu`` extra with pip, as a GPU user's ``pip install -e '.[gpu,dev]'`` would, and
compare it with the recorded set in ``requirements/gpu-linux-py311.txt``.

vLLM pins torch exactly and caps transformers and fastapi; an unpinned ``vllm`` lets pip take the
newest transformers and backtrack to an old vLLM that was never tested with it. The ``gpu`` extra
therefore pins one vLLM release, and this file records what pip resolves around it (Python 3.11,
Linux x86_64). ``run_all.sh`` installs with it as constraints on CUDA machines, so every GPU user
gets the same set; ``tests/test_gpu.py`` checks, offline, that pyproject.toml still admits it.

    python scripts/lock_gpu.py            # resolve now (PyPI, ~1.5 GB of wheels, a few minutes) and compare
    python scripts/lock_gpu.py --write    # record the new resolution

Exit status 1 when a key package (vLLM, torch, transformers, trl, peft, accelerate, fastapi,
sentence-transformers) resolves differently from the record; other differences are listed.
pip's own configuration (a local index, constraints) is ignored, so the answer is PyPI's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "gpu-linux-py311.txt"
KEY = ("vllm", "torch", "transformers", "trl", "peft", "accelerate", "fastapi", "sentence-transformers")
HEADER = """\
# What `pip install -e '.[gpu,dev]'` resolves to on Python 3.11, Linux x86_64 (written by
# scripts/lock_gpu.py --write; check it again with scripts/lock_gpu.py). run_all.sh installs with
# this file as constraints on CUDA machines. torch 2.14.0 here is a CUDA 13 build: NVIDIA driver >= 580.
"""


def normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """name -> version of the recorded set."""
    pins = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise ValueError(f"{path}:{number}: expected NAME==VERSION, got {line!r}")
        pins[normalize(name)] = version.strip()
    return pins


def resolve() -> dict[str, str]:
    """name -> version that pip resolves for this project with the gpu and dev extras, now."""
    if sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64" or sys.platform != "linux":
        sys.exit(f"the record is for Python 3.11 on Linux x86_64; this is Python {platform.python_version()} on "
                 f"{sys.platform} {platform.machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
        for var in ("PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
            env.pop(var, None)
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), f"{ROOT}[gpu,dev]"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env)
        installs = json.loads(report.read_text(encoding="utf-8"))["install"]
    return {normalize(i["metadata"]["name"]): i["metadata"]["version"] for i in installs
            if normalize(i["metadata"]["name"]) != "medqa-zh"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help=f"record the resolution in {LOCK.relative_to(ROOT)}")
    a = p.parse_args(argv)
    now = resolve()
    if a.write:
        LOCK.parent.mkdir(exist_ok=True)
        LOCK.write_text(HEADER + "".join(f"{name}=={now[name]}\n" for name in sorted(now)), encoding="utf-8")
        print(f"wrote {len(now)} pins to {LOCK}")
        return 0
    recorded = read_lock()
    changed = {n for n in set(now) | set(recorded) if now.get(n) != recorded.get(n)}
    for name in sorted(changed):
        mark = "KEY " if name in KEY else "    "
        print(f"{mark}{name}: recorded {recorded.get(name, '-')}, resolves now to {now.get(name, '-')}")
    key = sorted(changed & set(KEY))
    print(f"{len(now)} packages; {len(changed)} differ from the record" + (f", key ones: {', '.join(key)}" if key else ""))
    return 1 if key else 0


if __name__ == "__main__":
    sys.exit(main())
