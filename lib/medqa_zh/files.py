"""Files that are never half-written: a crash leaves the old version or none, never a torn one.

Every file or folder another step reads back (splits, the manifest, the results index, indexes,
embeddings, models) is written to a sibling temporary path and moved into place with one rename,
which is atomic on the same file system.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | Path):
    """Yield a temporary sibling of ``path`` to write (a file, or a folder to fill); when the block
    ends without an error it replaces ``path`` (an old folder there is removed first); after an
    error it is deleted and ``path`` is left as it was. A leftover of an earlier crash is cleared."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.is_dir() and tmp.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_table(table, path: str | Path, index: bool = False) -> Path:
    """Write a pandas DataFrame to ``path`` as CSV, atomically (``index``: keep the row labels)."""
    with replacing(path) as tmp:
        table.to_csv(tmp, index=index)
    return Path(path)


def move_into(src: str | Path, dst: str | Path, last: tuple[str, ...] = ()) -> Path:
    """Move every file of the folder ``src`` into the folder ``dst`` (one atomic rename each,
    replacing files of the same name), the names in ``last`` after all others, then remove
    ``src``. For a folder that holds more than one save (a training run's output: logs,
    checkpoints, then the weights): whoever checks for ``last`` finds the rest already there."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in src.iterdir() if p.name not in last)
    for item in files + [src / name for name in last if (src / name).exists()]:
        if item.is_dir() and (dst / item.name).is_dir():
            shutil.rmtree(dst / item.name)
        os.replace(item, dst / item.name)
    shutil.rmtree(src)
    return dst


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
