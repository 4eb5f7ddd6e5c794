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
from .lock import LOCK_FILENAME

__all__ = ["CELL_KEYS", "open_state", "read_cells", "repair_torn_tail"]

CELL_KEYS = ("k", "lambda", "batch", "ids", "predictions", "seconds")
_FRESH_FIX = "Rerun with --fresh (fresh=True) to discard the partial results, or choose another --output"


def _is_cell(obj) -> bool:
    return isinstance(obj, dict) and all(k in obj for k in CELL_KEYS)


def _cell_problem(cell: dict) -> str | None:
    """What is wrong with a cell that has the keys of one (None: nothing): its types and its per-row lists."""
    ints = all(isinstance(cell[k], int) and not isinstance(cell[k], bool) and cell[k] >= 0 for k in ("k", "batch"))
    rows = cell["ids"]
    if not ints or not isinstance(rows, list) or not rows or not isinstance(cell["seconds"], (int, float)):
        return "its k, batch, ids or seconds have the wrong type"
    per_row = {k: v for k, v in cell.items() if k not in ("k", "lambda", "batch", "seconds")}
    short = sorted(k for k, v in per_row.items() if not isinstance(v, list) or len(v) != len(rows))
    if short:
        return f"{short} do not hold one value per example of its batch ({len(rows)})"
    if not all(isinstance(p, str) for p in cell["predictions"]):
        return "its predictions are not all texts"
    return None


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
    keys: set | None = None
    for file in sorted(state_dir.glob("cells-*.jsonl")):
        if not file.is_file():
            raise CorruptFileError.about(file, "not a file of finished cells (a folder or a special file)", _FRESH_FIX)
        with open(file, encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                try:
                    cell = json.loads(line)
                    if not _is_cell(cell):
                        raise ValueError(f"not an object with the keys {', '.join(CELL_KEYS)}")
                    problem = _cell_problem(cell)
                    if problem:
                        raise ValueError(problem)
                    if keys is not None and set(cell) != keys:  # every cell of a run records the same costs
                        raise ValueError(f"its keys {sorted(set(cell) ^ keys)} differ from the other cells'")
                    keys = set(cell)
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

    ``state``: accelerate's ``PartialState``; every process calls this, the main one writes (and holds the folder's
    lock, :mod:`.lock`, taken before this is called). ``fresh`` discards the folder's content first. Raises :class:`StateMismatchError` if the folder holds a run with other settings.
    """
    if state.is_main_process:
        if fresh and state_path.exists():  # everything but this run's lock
            for child in state_path.iterdir():
                if child.name == LOCK_FILENAME:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        state_path.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    # every process checks (and raises) alike, so that none is left waiting at a barrier
    config_file = state_path / "config.json"
    if not config_file.exists() and any(state_path.glob("cells-*.jsonl")):
        # finished cells without the settings they were decoded with cannot be shown to belong to this run
        raise StateMismatchError(
            f"the partial results in '{state_path}' have no config.json, so nothing shows they were collected with "
            "this run's settings: rerun with --fresh (fresh=True) to discard them, or choose another --output.")
    if config_file.exists():
        stored = read_json_object(config_file, what="the settings of a partial collect run", fix=_FRESH_FIX)
        diff = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
        if diff:
            raise StateMismatchError(
                f"the partial results in '{state_path}' were collected with other settings ({', '.join(diff)}): "
                "rerun with --fresh (fresh=True) to discard them, or choose another --output.")
    if state.is_main_process:
        for file in state_path.glob("cells-*.jsonl"):
            if file.is_file():  # anything else is refused, naming it, when the cells are read
                repair_torn_tail(file)
    state.wait_for_everyone()
    if state.is_main_process and not config_file.exists():
        config_file.write_text(json.dumps(config, indent=1, sort_keys=True))
    return read_cells(state_path)
