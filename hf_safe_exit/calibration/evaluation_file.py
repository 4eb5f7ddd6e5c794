"""An evaluation file (``hf-safe-exit evaluate --output``, :func:`~hf_safe_exit.calibration.evaluate.evaluate_table`'s
dict as JSON): the one check of its content every reader goes through, and reading and writing it.

Written with its content digest (:mod:`hf_safe_exit.digest`): an edit made after writing is refused on reading.
A file without one (written before digests, or by hand) is read as before; its content checks are what protect it
(and a forger who recomputes the digest): the shape, every value of its type and in its range, the rows those of its
settings. Which loss table it evaluated is recorded as ``table_digest`` (:meth:`LossTable.digest
<hf_safe_exit.risk.LossTable.digest>`), so that a card can refuse an evaluation of another table than the one it
shows (:func:`hf_safe_exit.cards.measurements.gather`).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Mapping

from ..atomic import atomic_write
from ..digest import check_digest, with_digest, without_digest
from ..errors import CorruptFileError, read_json_object

__all__ = ["BASES", "evaluation_problem", "validate_evaluation", "read_evaluation", "write_evaluation"]

_WHAT = "an evaluation written by `hf-safe-exit evaluate`"
_FIX = "Write one with `hf-safe-exit evaluate ... --output FILE`"
# the speed-up bases evaluate_table writes; the third: a collect that decoded its thresholds as rows of one batch
# (hf_safe_exit.calibration.grid) measured no time per threshold, so no speed-up is reported
BASES = ("per generated token", "per call (no token counts)",
         "not measured (thresholds decoded as one batch)")
_TOL = 1e-9  # a mean of values in a range can round just past its end

# the values a field can take: (test, words); the ranges of losses, task losses and layers depend on the evaluation
# (its loss bounds, its task's, its depth): see _ranges
_RANGES = {
    "open_unit": (lambda v: 0.0 < v < 1.0, "a number in (0, 1)"),
    "unit": (lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"),
    "non_negative": (lambda v: v >= 0.0, "a number >= 0"),
    "positive": (lambda v: v > 0.0, "a number > 0"),
}
# every field of a result row since the first release: (name, range, may be null)
_ROW_FIELDS = (("eps", "open_unit", False), ("delta", "open_unit", True), ("test_risk_mean", "loss", False),
               ("test_risk_std", "loss_std", False), ("violation_rate", "unit", False),
               ("lambda_hat_mean", "unit", False), ("no_exit_rate", "unit", False), ("task_loss", "task_loss", False),
               ("speedup", "positive", True), ("speedup_std", "non_negative", True))
_EARLY_EXIT_COSTS = (("mean_exit_layer", "layer", False), ("mean_exit_layer_std", "layer_std", False),
                     ("layer_fraction", "unit", False))
_BILD_COSTS = (("large_calls_per_token", "non_negative", False), ("large_calls_per_token_std", "non_negative", False))
_FULL_MODEL_FIELDS = (("task_loss", "task_loss", False), ("wall_time", "non_negative", False))
_SETTINGS = ("eps", "methods", "delta", "bound", "risk", "n", "n_cal", "n_test", "repeats", "seed", "monotonize",
             "loss_bounds")


class _Refused(Exception):
    """What is wrong with an evaluation, before the file it came from is known."""


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_count(value, least: int = 1) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least


def _non_finite(value, at: str):
    """``(where, value)`` of the first number in ``value`` that is NaN or infinite, else None."""
    if isinstance(value, Mapping):
        items = ((f"{at}.{k}" if at else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{at}[{i}]", v) for i, v in enumerate(value))
    elif _is_number(value) and not isinstance(value, numbers.Integral) and not math.isfinite(value):
        return at, value
    else:
        return None
    for where, item in items:
        found = _non_finite(item, where)
        if found:
            return found
    return None


def _bounded(lo: float, hi: float, words: str):
    return (lambda v: lo - _TOL <= v <= hi + _TOL), f"a number in {words} [{lo:g}, {hi:g}]"


def _ranges(loss_bounds, task_bounds, depth) -> dict:
    """The ranges of the fields that depend on the evaluation: a std of values in [lo, hi] is at most (hi - lo) / 2."""
    lo, hi = loss_bounds
    out = {**_RANGES, "loss": _bounded(lo, hi, "the loss range"), "loss_std": _bounded(0.0, (hi - lo) / 2, "the range of a std")}
    out["task_loss"] = _bounded(*task_bounds, "the task's loss range") if task_bounds else (lambda v: True, "a number")
    top = depth if depth is not None else math.inf
    out["layer"] = _bounded(1.0, top, "the decoder's layers") if depth else ((lambda v: v >= 1.0), "a number >= 1")
    out["layer_std"] = _bounded(0.0, (top - 1) / 2, "the range of a std") if depth else _RANGES["non_negative"]
    return out


def _check_fields(record: Mapping, at: str, fields, ranges) -> None:
    for name, kind, nullable in fields:
        if name not in record:
            raise _Refused(f"{at} has no {name!r}")
        value = record[name]
        if value is None and nullable:
            continue
        test, words = ranges[kind]
        if not _is_number(value) or not test(float(value)):
            raise _Refused(f"{at}.{name} is {value!r}, not {words}")


def _check_settings(settings) -> tuple[float, float]:
    """The settings' loss bounds, once every setting is there, of its type and in range."""
    from ..risk.loss_table import RISKS
    from ..risk.selection import BOUNDS, METHODS, MONOTONIZE

    if not isinstance(settings, Mapping):
        raise _Refused(f"'settings' is {type(settings).__name__}, not an object")
    missing = [name for name in _SETTINGS if name not in settings]
    if missing:
        raise _Refused(f"settings has no {missing[0]!r}")
    for name in ("n", "n_cal", "n_test", "repeats"):
        if not _is_count(settings[name]):
            raise _Refused(f"settings.{name} is {settings[name]!r}, not a whole number >= 1")
    if settings["n_cal"] + settings["n_test"] != settings["n"]:
        raise _Refused(f"settings.n_cal + settings.n_test = {settings['n_cal'] + settings['n_test']}, not "
                       f"settings.n = {settings['n']}")
    eps, methods = settings["eps"], settings["methods"]
    if not (isinstance(eps, (list, tuple)) and eps and all(_is_number(e) and 0.0 < e < 1.0 for e in eps)):
        raise _Refused(f"settings.eps is {eps!r}, not a non-empty list of numbers in (0, 1)")
    if not (isinstance(methods, (list, tuple)) and methods and all(isinstance(m, str) and m in METHODS for m in methods)):
        raise _Refused(f"settings.methods is {methods!r}, not a non-empty list of methods from {METHODS}")
    for name, known in (("risk", RISKS), ("bound", BOUNDS), ("monotonize", MONOTONIZE)):
        if not (settings[name] is None or isinstance(settings[name], str)) or settings[name] not in known:
            raise _Refused(f"settings.{name} is {settings[name]!r}, not one of {known}")
    if not _is_count(settings["seed"], least=0):
        raise _Refused(f"settings.seed is {settings['seed']!r}, not a whole number >= 0")
    uses_delta = any(m in ("ucb", "ltt") for m in methods)
    _check_fields(settings, "settings", (("delta", "open_unit", not uses_delta),), _RANGES)
    bounds = settings["loss_bounds"]
    if not (isinstance(bounds, (list, tuple)) and len(bounds) == 2 and all(_is_number(b) for b in bounds)
            and bounds[0] < bounds[1]):
        raise _Refused(f"settings.loss_bounds is {bounds!r}, not [lower, upper] with lower < upper")
    return float(bounds[0]), float(bounds[1])


def _check_metadata(meta) -> tuple[tuple[float, float] | None, int | None]:
    """The task's loss bounds (a registered task) and the decoder's depth, once the metadata is a table's."""
    from ..risk.loss_table import check_metadata
    from ..tasks import TASKS

    if not isinstance(meta, Mapping):
        raise _Refused(f"'metadata' is {type(meta).__name__}, not an object")
    try:
        # the checks of a loss table's metadata (settings, task, lengths, depth); null: a key the table did not record
        check_metadata({k: v for k, v in meta.items() if v is not None})
    except ValueError as err:
        raise _Refused(str(err).rstrip(".")) from None
    versions = meta.get("versions")
    if versions is not None and not (isinstance(versions, Mapping)
                                     and all(isinstance(v, str) for v in versions.values())):
        raise _Refused(f"metadata.versions is {versions!r}, not an object of version strings")
    task = TASKS.get(meta.get("task")) if isinstance(meta.get("task"), str) else None
    return (tuple(task.loss_bounds) if task else None), meta.get("num_decoder_layers")


def _check_full_model(full, costs, ranges, basis) -> None:
    if not isinstance(full, Mapping):
        raise _Refused(f"'full_model' is {type(full).__name__}, not an object")
    _check_fields(full, "full_model", _FULL_MODEL_FIELDS + (costs[0],), ranges)
    tokens = full.get("generated_tokens")
    if tokens is not None and not (_is_number(tokens) and tokens >= 0 and float(tokens).is_integer()):
        raise _Refused(f"full_model.generated_tokens is {tokens!r}, not a whole number >= 0")
    if basis is not None and basis != BASES[2] and (tokens is None) != (basis != BASES[0]):
        raise _Refused(f"full_model.generated_tokens is {tokens!r} while speedup_basis is {basis!r}: speed-ups per "
                       "generated token come with the full model's token count, and only they do")


def _check_rows(results, settings, costs, ranges, basis) -> None:
    """Each row of every field in range, and the rows those of the settings: methods × ε in order, with their δ and
    bound, rates that are fractions of the splits."""
    eps, methods, repeats = settings["eps"], settings["methods"], settings["repeats"]
    if len(results) != len(methods) * len(eps):
        raise _Refused(f"it has {len(results)} results, not one per method and ε ({len(methods)} × {len(eps)})")
    for i, row in enumerate(results):
        at, method, e = f"results[{i}]", methods[i // len(eps)], eps[i % len(eps)]
        if not isinstance(row, Mapping):
            raise _Refused(f"{at} is {type(row).__name__}, not an object")
        _check_fields(row, at, _ROW_FIELDS + costs, ranges)
        delta = settings["delta"] if method in ("ucb", "ltt") else None
        bound = settings["bound"] if method == "ucb" else ("hoeffding_bentkus" if method == "ltt" else None)
        for name, want in (("method", method), ("eps", e), ("delta", delta), ("bound", bound)):
            if row.get(name) != want or isinstance(row.get(name), bool):
                raise _Refused(f"{at}.{name} is {row.get(name)!r}, not {want!r} (the settings' methods × ε, in "
                               "order)")
        for name in ("violation_rate", "no_exit_rate"):
            splits = row[name] * repeats
            if abs(splits - round(splits)) > 1e-6:
                raise _Refused(f"{at}.{name} is {row[name]!r}, not a fraction of the {repeats} splits")
        if basis == BASES[2] and row["speedup"] is not None:
            raise _Refused(f"{at} has a speedup of {row['speedup']!r} while speedup_basis says none was measured")
        if (row["speedup"] is None) != (row["speedup_std"] is None):
            raise _Refused(f"{at} has a speedup of {row['speedup']!r} and a speedup_std of {row['speedup_std']!r}: "
                           "both are numbers, or both null")


def _check_shape(data) -> None:
    if not isinstance(data, Mapping):
        raise _Refused(f"it holds a {type(data).__name__}, not an object")
    found = _non_finite(data, "")
    if found:  # json.loads reads NaN, Infinity and 1e999 as floats: none of them is a measurement
        raise _Refused(f"{found[0]} is {found[1]!r}, not a finite number")
    results = data.get("results")
    if not isinstance(results, list) or not results:
        raise _Refused("it has no 'results' list" if not isinstance(results, list) else "its 'results' list is empty")
    loss_bounds = _check_settings(data.get("settings"))
    task_bounds, depth = _check_metadata(data.get("metadata"))
    basis = data.get("speedup_basis")
    if basis is not None and basis not in BASES:
        raise _Refused(f"speedup_basis is {basis!r}, not one of {BASES}")
    for name in ("results_file", "table_digest"):
        if name in data and not isinstance(data[name], str):
            raise _Refused(f"{name} is {data[name]!r}, not text")
    full = data.get("full_model")
    costs = _EARLY_EXIT_COSTS if isinstance(full, Mapping) and "mean_exit_layer" in full else _BILD_COSTS
    ranges = _ranges(loss_bounds, task_bounds, depth)
    _check_full_model(full, costs, ranges, basis)
    _check_rows(results, data["settings"], costs, ranges, basis)


def evaluation_problem(data) -> str | None:
    """What makes ``data`` an evaluation a reader cannot use (the digest aside), or None."""
    try:
        _check_shape(data)
    except _Refused as refused:
        return str(refused)
    return None


def validate_evaluation(data, path=None) -> dict:
    """``data`` when it is an evaluation every reader can use, else :class:`~hf_safe_exit.errors.CorruptFileError`.

    Checked: the digest it was written with, if it has one (:mod:`hf_safe_exit.digest`: an edit made after writing
    is refused; a forger who recomputes it is not caught by it); the shape :func:`evaluate_table` writes
    (``settings``, ``metadata``, ``full_model`` and one row per method and ε, in order, with every field); every
    number finite and in its range: ε and δ in (0, 1), methods, risk, bound and monotonize known, counts whole
    and positive, rates in [0, 1] and fractions of the splits, λ̂ in [0, 1], the test risk within the loss bounds,
    task losses within the task's, exit layers within the decoder, speed-ups > 0 or null, the metadata's settings
    valid (``LossTable``'s metadata check). The error names ``path`` (the file it came from; None: a dict given in
    Python).
    """
    problem = evaluation_problem(data)
    if problem is not None:
        raise CorruptFileError.about(path, f"not a usable evaluation: {problem}", _FIX)
    check_digest(data, path, "this evaluation", _FIX)  # well formed, but is it as written?
    return data


def read_evaluation(path) -> dict:
    """The evaluation stored at ``path`` (the JSON of :func:`evaluate_table`, ``hf-safe-exit evaluate --output``),
    without its digest (checked, then dropped: it is the file's, not a result).

    Raises :class:`~hf_safe_exit.errors.CorruptFileError` naming the file when it is garbage, empty, truncated,
    another JSON, edited after it was written, or an evaluation of another shape or with a value that is not a
    finite number in its range (:func:`validate_evaluation`), and ``MissingCalibrationError`` when there is no
    such file.
    """
    data = validate_evaluation(read_json_object(path, what=_WHAT, fix=_FIX), path)
    return without_digest(data)


def write_evaluation(evaluation: Mapping, path) -> str:
    """Write ``evaluation`` (checked by :func:`validate_evaluation`) to ``path`` as JSON with its digest, at once
    (a reader never sees half a file); returns the path."""
    validate_evaluation(evaluation)
    text = json.dumps(with_digest(dict(evaluation)), indent=1, allow_nan=False)  # no NaN token: there is none
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as fh:
        fh.write(text)
    return os.fspath(path)
