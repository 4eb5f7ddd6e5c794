"""One writer per collect state folder: a lock file that names the run holding it.

Two ``collect`` runs on one ``--output`` used to race: started a second apart the second died on a missing cells
file, further apart both "succeeded" and the last one won. The main process of a run now creates
``<state>/lock`` exclusively (``O_CREAT | O_EXCL``: atomic on a local file system) and writes its pid, host and
start time into it; another run finds it and stops with :class:`RunInProgressError` naming the holder. A lock left
by a run that died (its pid no longer alive on this host) is taken over; a lock of another host cannot be checked
and is reported with the way to remove it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..errors import RunInProgressError

__all__ = ["LOCK_FILENAME", "acquire_lock", "release_lock"]

LOCK_FILENAME = "lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _holder(lock: Path) -> dict | None:
    try:
        data = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # being written this instant, or garbage: treated as held below
    return data if isinstance(data, dict) else None


def acquire_lock(state_path: Path) -> Path:
    """Take ``state_path`` for this process; returns the lock file. Raises :class:`RunInProgressError` (one line,
    naming the running holder) when another live run holds it."""
    state_path.mkdir(parents=True, exist_ok=True)
    lock = state_path / LOCK_FILENAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _holder(lock)
            same_host = holder is not None and holder.get("host") == me["host"]
            if same_host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                lock.unlink(missing_ok=True)  # left by a run that died: take it over
                continue
            who = "another run" if holder is None else (f"pid {holder.get('pid')} on {holder.get('host')}, started "
                                                        f"{holder.get('started')}")
            raise RunInProgressError(
                f"'{state_path}' is being written by another collect run ({who}): wait for it to finish, or write to "
                f"another --output; if no such run exists, delete '{lock}'.") from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(me, fh)
        return lock
    raise RunInProgressError(f"'{state_path}' keeps being taken by other collect runs: write to another --output.")


def release_lock(lock: Path) -> None:
    """Remove ``lock`` if this process holds it (the folder may already be gone with the finished run's state)."""
    holder = _holder(lock) if lock.exists() else None
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)
