"""Files written whole: to a temporary name beside the target, then renamed onto it (``os.replace``, atomic on one
file system), so that a reader, or a run killed mid-write, never sees half a file where a whole one was."""

from __future__ import annotations

import contextlib
import os

__all__ = ["atomic_write"]


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", **open_kwargs):
    """``with atomic_write(path) as fh: ...``: ``fh`` writes ``<path>.tmp``, which replaces ``path`` only when the
    block ends without an exception (else it is removed and ``path`` is left as it was)."""
    tmp = f"{os.fspath(path)}.tmp"
    try:
        with open(tmp, mode, **open_kwargs) as fh:
            yield fh
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
