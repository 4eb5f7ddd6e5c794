"""collect's resumable state folder (``<output>.partial/``): the run's settings and its finished cells.

A *cell* is one batch of examples decoded at one threshold λ. ``config.json`` holds the settings that
change the results; ``cells-<process>-of-<processes>.jsonl`` holds one JSON line per finished cell, appended
as it finishes. A run killed while appending leaves a torn last line: :func:`open_state` drops it before
the run appends again (else the next cell would be glued to the fragment and lost on every resume). A
folder whose files are not collect's raises :class:`~hf_safe_exit.errors.CalibrationFileError` naming the
file; settings that differ raise :class:`~hf_safe_exit.errors.StateMismatchError`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import CorruptFileError, StateMismatchError, read_json_object

__all__ = ["CELL_KEYS", "open_state", "read_cells", "repair_torn_tail"]

CELL_KEYS = ("k", "lambda", "batch", "ids", "predictions", "seconds")
_FRESH_FIX = "Rerun with --fresh (fresh=True) to discard the partial results, or choose another --output"


def _is_cell(obj) -> bool:
    return isinstance(obj, dict) and all(k in obj for k in CELL_KEYS)


def repair_torn_tail(file: Path) -> None:
    """End ``file`` at its last complete line; a last line that is a whole cell and lacks only its newline gets one."""
    data = file.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        whole = _is_cell(json.loads(data[start:]))
    except (json.JSONDecodeError, UnicodeDecodeError):
        whole = False
    if whole:
        with open(file, "ab") as fh:
            fh.write(b"\n")
    else:
        with open(file, "r+b") as fh:
            fh.truncate(start)


def read_cells(state_dir: Path) -> dict[tuple[int, int], dict]:
    """All finished cells in ``state_dir``, keyed by (λ index, batch), whatever the number of processes.

    A torn last line (no newline: a write that was cut off) is skipped; any other line that is not a cell raises
    :class:`~hf_safe_exit.errors.CorruptFileError` naming the file and line.
    """
    cells: dict[tuple[int, int], dict] = {}
    for file in sorted(state_dir.glob("cells-*.jsonl")):
        with open(file, encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                try:
                    cell = json.loads(line)
                    if not _is_cell(cell):
                        raise ValueError(f"not an object with the keys {', '.join(CELL_KEYS)}")
                    key = (int(cell["k"]), int(cell["batch"]))
                except (json.JSONDecodeError, TypeError, ValueError) as err:
                    if not line.endswith("\n"):
                        continue  # torn last line of a process still writing, or killed
                    raise CorruptFileError.about(file, f"line {number} is not a finished cell of collect "
                                                 f"({type(err).__name__}: {err})", _FRESH_FIX) from None
                cells.setdefault(key, cell)
    return cells


def open_state(state_path: Path, config: dict, state, fresh: bool) -> dict[tuple[int, int], dict]:
    """Prepare ``state_path`` for this run (``config``: its settings) and return the cells finished before.

    ``state``: accelerate's ``PartialState``; every process calls this, the main one writes. ``fresh`` discards the
    folder first. Raises :class:`StateMismatchError` if the folder holds a run with other settings.
    """
    if state.is_main_process:
        if fresh and state_path.exists():
            shutil.rmtree(state_path)
        state_path.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    # every process checks (and raises) alike, so that none is left waiting at a barrier
    config_file = state_path / "config.json"
    if config_file.exists():
        stored = read_json_object(config_file, what="the settings of a partial collect run", fix=_FRESH_FIX)
        diff = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
        if diff:
            raise StateMismatchError(
                f"the partial results in '{state_path}' were collected with other settings ({', '.join(diff)}): "
                "rerun with --fresh (fresh=True) to discard them, or choose another --output.")
    if state.is_main_process:
        for file in state_path.glob("cells-*.jsonl"):
            repair_torn_tail(file)
    state.wait_for_everyone()
    if state.is_main_process and not config_file.exists():
        config_file.write_text(json.dumps(config, indent=1, sort_keys=True))
    return read_cells(state_path)
