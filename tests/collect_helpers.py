"""Interrupting ``collect`` the way a kill would: the test fixture replaces the cell decoder, not a public hook."""

from __future__ import annotations

import contextlib

from hf_safe_exit.calibration import runner


@contextlib.contextmanager
def interrupted_after(cells: int):
    """Within the block, ``collect`` raises ``KeyboardInterrupt`` when it starts decoding cell ``cells + 1`` (the
    first ``cells`` cells are finished and appended to the state; collect's untimed warm-up call is not a cell)."""
    real, calls = runner.decode_cell, [0]

    def decode(*args, **kwargs):
        calls[0] += 1
        if calls[0] > cells + 1:
            raise KeyboardInterrupt(f"interrupted after {cells} cells")
        return real(*args, **kwargs)

    runner.decode_cell = decode
    try:
        yield
    finally:
        runner.decode_cell = real
