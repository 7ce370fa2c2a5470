"""files: a crash while writing leaves the old version or none, never a torn one."""
import os

import pytest

from medqa_zh import files


def test_a_crash_while_writing_leaves_the_old_file_and_no_temporary(tmp_path):
    path = files.write_text(tmp_path / "a" / "index.json", "old")
    with pytest.raises(RuntimeError), files.replacing(path) as tmp:
        tmp.write_text("half of the ne")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and [p.name for p in path.parent.iterdir()] == ["index.json"]
    files.write_text(path, "new")
    assert path.read_text() == "new" and [p.name for p in path.parent.iterdir()] == ["index.json"]


def test_a_folder_is_replaced_whole_and_a_leftover_of_a_crash_is_cleared(tmp_path):
    folder = tmp_path / "index"
    folder.mkdir()
    (folder / "old-only.txt").write_text("x")
    (tmp_path / "index.tmp").mkdir()  # an earlier crash
    (tmp_path / "index.tmp" / "stale.txt").write_text("x")
    with files.replacing(folder) as tmp:
        tmp.mkdir()
        (tmp / "data.txt").write_text("y")
    assert sorted(p.name for p in folder.iterdir()) == ["data.txt"]
    assert not (tmp_path / "index.tmp").exists()


def test_move_into_moves_the_named_files_last_and_keeps_the_rest_of_the_folder(tmp_path, monkeypatch):
    src, dst = tmp_path / "out.saving", tmp_path / "out"
    src.mkdir()
    dst.mkdir()
    (dst / "train_log.jsonl").write_text("log")  # a run folder holds more than one save
    for name in ("run.json", "adapter_model.safetensors", "tokenizer.json", "adapter_config.json"):
        (src / name).write_text(name)
    order = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append(os.path.basename(a)), real(a, b)))
    files.move_into(src, dst, last=("adapter_model.safetensors", "run.json"))
    assert order[-2:] == ["adapter_model.safetensors", "run.json"] and len(order) == 4
    assert sorted(p.name for p in dst.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "run.json",
                                                     "tokenizer.json", "train_log.jsonl"]
    assert not src.exists()
