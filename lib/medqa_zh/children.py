"""Child processes that never outlive the notebook that started them: servers (``serve``) and launched
training (``train``).

:func:`start` runs a command in a process group of its own (so stopping it reaches everything it
started: vLLM's engine workers, accelerate's training processes) and, on Linux, has the kernel send it
SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), so a killed kernel leaves nothing behind.
:func:`stop` stops the whole group: SIGTERM, then SIGKILL for whatever is left.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys


def _libc():
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


LIBC = _libc()


def die_with_parent():
    """Runs in the child between fork and exec: SIGTERM it when the parent dies (Linux
    ``PR_SET_PDEATHSIG``). No imports or locks here."""
    LIBC.prctl(1, signal.SIGTERM)


def start(command: list[str], **popen) -> subprocess.Popen:
    """``subprocess.Popen(command, **popen)`` in a new process group that dies with this process (Linux)."""
    return subprocess.Popen(command, start_new_session=True,
                            preexec_fn=die_with_parent if LIBC is not None else None, **popen)


def stop(process: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """Stop a running ``process``'s whole group: SIGTERM, then SIGKILL after ``timeout`` seconds; then SIGKILL
    whatever of the group outlived its leader (vLLM's engine workers can). A process already gone: nothing."""
    if process is None or process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
