"""Small builders shared by the tests."""
import json
import os
from pathlib import Path

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


def server_processes() -> list[int]:
    """Pids of transformers-backend servers started by medqa_zh.serve, whoever started them."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"_transformers_main" in cmdline and int(proc.name) != os.getpid():
                pids.append(int(proc.name))
    return pids
