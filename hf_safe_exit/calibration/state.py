"""collect's resumable state folder (``<output>.partial/``): the run's settings and its finished cells.

A *cell* is one batch of examples decoded at one threshold λ. ``config.json`` holds the settings that
change the results; ``cells-<process>-of-<processes>.jsonl`` holds one JSON line per finished cell, appended
as it finishes, with its content digest (:mod:`hf_safe_exit.digest`). A run killed while appending leaves a
torn last line: :func:`open_state` drops it before the run appends again (else the next cell would be glued to
the fragment and lost on every resume), and the cell is decoded again. Every other line must be a cell of this
run: its digest, when it has one, that of its content (an edit made after writing is refused; one that
recomputes the digest is not caught by it), and its content that of a cell of this run (λ the run's grid at its
index ``k``, the ids those of its batch, per-row costs finite and in range, seconds finite and >= 0), whether it
has a digest or not (a cell written before digests). A folder whose files are not collect's, or a cell that is
not one of this run's, raises :class:`~hf_safe_exit.errors.CorruptFileError` naming the file (and line);
settings that differ raise :class:`~hf_safe_exit.errors.StateMismatchError`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Sequence

from ..digest import DIGEST_KEY, digest_matches
from ..errors import CorruptFileError, StateMismatchError, read_json_object
from .lock import LOCK_FILENAME

__all__ = ["CELL_KEYS", "open_state", "read_cells", "repair_torn_tail"]

CELL_KEYS = ("k", "lambda", "batch", "ids", "predictions", "seconds")
_FRESH_FIX = "Rerun with --fresh (fresh=True) to discard the partial results, or choose another --output"


def _is_cell(obj) -> bool:
    return isinstance(obj, dict) and all(k in obj for k in CELL_KEYS)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _cost_problem(name: str, values: list, depth: int | None) -> str | None:
    """What is wrong with a cell's per-row cost ``name`` (None: nothing): each a finite number in its range."""
    top = math.inf if depth is None else depth
    test, words = {
        "mean_exit_layer": (lambda v: _number(v) and 0 <= v <= top, f"numbers in [0, {top:g}] (decoder layers)"),
        "layer_fraction": (lambda v: _number(v) and 0 <= v <= 1, "numbers in [0, 1]"),
        "num_tokens": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "whole numbers >= 0"),
    }.get(name, (lambda v: _number(v) and v >= 0, "finite numbers >= 0"))  # large-model calls per token, ...
    bad = [v for v in values if not test(v)]
    return f"its {name} holds {bad[0]!r}, not one of {words}" if bad else None


def _cell_problem(cell: dict, grid: Sequence | None, batch_ids: Sequence | None, depth: int | None) -> str | None:
    """What is wrong with a cell that has the keys of one (None: nothing): its types, its per-row lists and, when the
    run's ``grid``, batches' ids and decoder ``depth`` are known, whether it is a cell of this run."""
    ints = all(isinstance(cell[k], int) and not isinstance(cell[k], bool) and cell[k] >= 0 for k in ("k", "batch"))
    rows = cell["ids"]
    if not ints or not isinstance(rows, list) or not rows or not _number(cell["seconds"]) or cell["seconds"] < 0:
        return "its k, batch, ids or seconds have the wrong type (seconds: a finite number >= 0)"
    index = cell["k"]
    if grid is not None and (index >= len(grid) or not _number(cell["lambda"]) or cell["lambda"] != grid[index]):
        return f"its λ = {cell['lambda']!r} is not the run's threshold at index k = {index}"
    if batch_ids is not None and (cell["batch"] >= len(batch_ids) or rows != list(batch_ids[cell["batch"]])):
        return f"its ids are not those of batch {cell['batch']} of this run"
    per_row = {k: v for k, v in cell.items() if k not in ("k", "lambda", "batch", "seconds", DIGEST_KEY)}
    short = sorted(k for k, v in per_row.items() if not isinstance(v, list) or len(v) != len(rows))
    if short:
        return f"{short} do not hold one value per example of its batch ({len(rows)})"
    if not all(isinstance(p, str) for p in cell["predictions"]) or \
            not all(isinstance(i, str) or (isinstance(i, int) and not isinstance(i, bool)) for i in rows):
        return "its predictions are not all texts, or its ids not all ids"
    problems = (_cost_problem(k, v, depth) for k, v in per_row.items() if k not in ("ids", "predictions"))
    return next((p for p in problems if p), None)


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


def read_cells(state_dir: Path, grid: Sequence | None = None, batch_ids: Sequence | None = None,
               depth: int | None = None) -> dict[tuple[int, int], dict]:
    """All finished cells in ``state_dir``, keyed by (λ index, batch), whatever the number of processes; each as
    written, less its digest.

    ``grid`` (the run's λ), ``batch_ids`` (each batch's example ids) and ``depth`` (its decoder layers), when given,
    are what each cell must agree with. A torn last line (no newline: a write that was cut off) is skipped; any
    other line that is not a cell (of this run) raises :class:`~hf_safe_exit.errors.CorruptFileError` naming the
    file and line.
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
                    problem = _cell_problem(cell, grid, batch_ids, depth)
                    if problem:
                        raise ValueError(problem)
                    if keys is not None and set(cell) - {DIGEST_KEY} != keys:  # every cell records the same costs
                        raise ValueError(f"its keys {sorted((set(cell) - {DIGEST_KEY}) ^ keys)} differ from the other "
                                         "cells'")
                    if not digest_matches(cell):
                        raise ValueError("its content does not match the digest it was written with: edited (or "
                                         "damaged) after it was written")
                    cell.pop(DIGEST_KEY, None)  # the line's, checked: not part of the cell
                    keys = set(cell)
                    key = (int(cell["k"]), int(cell["batch"]))
                except (json.JSONDecodeError, TypeError, ValueError) as err:
                    if not line.endswith("\n"):
                        continue  # torn last line of a process still writing, or killed
                    raise CorruptFileError.about(file, f"line {number} is not a finished cell of this collect run "
                                                 f"({type(err).__name__}: {err})", _FRESH_FIX) from None
                cells.setdefault(key, cell)
    return cells


def _same(a, b) -> bool:
    """Whether two JSON values are the same setting: numbers by value (1 is 1.0), but true is not 1 (Python's
    ``True == 1`` would let a flipped setting through)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def open_state(state_path: Path, config: dict, state, fresh: bool, *, batch_ids: Sequence | None = None,
               depth: int | None = None) -> dict[tuple[int, int], dict]:
    """Prepare ``state_path`` for this run (``config``: its settings) and return the cells finished before.

    ``state``: accelerate's ``PartialState``; every process calls this, the main one writes (and holds the folder's
    lock, :mod:`.lock`, taken before this is called). ``fresh`` discards the folder's content first. Raises
    :class:`StateMismatchError` if the folder holds a run with other settings, and
    :class:`~hf_safe_exit.errors.CorruptFileError` for a cell that is not one of this run's (:func:`read_cells`:
    checked against ``config["lambdas"]``, ``batch_ids``, each batch's example ids, and ``depth``, the decoder's
    layers).
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
        mine = json.loads(json.dumps(config))  # as this run writes it (tuples as lists)
        diff = sorted(k for k in set(stored) | set(mine) if not _same(stored.get(k), mine.get(k)))
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
    return read_cells(state_path, config.get("lambdas"), batch_ids, depth)
