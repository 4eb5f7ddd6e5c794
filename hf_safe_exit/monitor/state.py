"""A :class:`~hf_safe_exit.monitor.RiskMonitor`'s state as a small JSON file, so that a restarted service keeps its
evidence.

The file holds the test's state (:meth:`SequentialRiskTest.to_dict`, continued bit for bit after loading), the
counters, the sampling generator's state (a restarted monitor draws the same later sampling decisions) and the alarm.
It is written whole (:func:`hf_safe_exit.atomic.atomic_write`) with the digest of its content
(:mod:`hf_safe_exit.digest`). Reading refuses, naming the file: anything malformed or edited
(:class:`~hf_safe_exit.errors.CorruptFileError`), and a state for another ε, α or risk than the monitor loading it
asks for (:class:`MonitorStateMismatchError`): evidence about one hypothesis is no evidence about another.
"""

from __future__ import annotations

import numbers
import os

import numpy as np

from ..atomic import atomic_write
from ..digest import check_digest, with_digest
from ..errors import CorruptFileError, StateMismatchError, WouldOverwriteError, read_json_object

__all__ = ["FORMAT", "FORMAT_VERSION", "MonitorStateMismatchError", "write_state", "read_state", "check_request",
           "generator_from_state"]

FORMAT = "hf_safe_exit.risk_monitor"
FORMAT_VERSION = 1
_WHAT = "a RiskMonitor state file"
_FIX = "Save it again with monitor.save(path, overwrite=True), or start a fresh RiskMonitor"
_COUNTS = ("calls", "rows_seen", "rows_sampled")
_KEYS = {"format", "format_version", "hf_safe_exit_version", "risk", "eps", "alpha", "sample_rate", "fallback",
         *_COUNTS, "threshold", "rng", "test", "alarm"}


class MonitorStateMismatchError(StateMismatchError):
    """A saved monitor state is about another hypothesis (ε, α, risk) or another λ̂ than the monitor using it."""


def write_state(path, content: dict, *, overwrite: bool = False) -> str:
    """Write ``content`` (with its digest) to ``path`` as JSON, whole; an existing file is kept unless ``overwrite``."""
    import json

    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"'{path}' is a folder: pass the path of the JSON file to write.")
    if os.path.exists(path) and not overwrite:
        raise WouldOverwriteError(f"'{path}' exists (a monitor state): pass overwrite=True to replace it, or save "
                                  "elsewhere.")
    with atomic_write(path, encoding="utf-8") as fh:
        json.dump(with_digest({"format": FORMAT, "format_version": FORMAT_VERSION, **content}), fh, indent=1,
                  allow_nan=False)
        fh.write("\n")
    return path


def _corrupt(path, problem: str) -> CorruptFileError:
    return CorruptFileError.about(path, f"not a usable RiskMonitor state: {problem}", _FIX)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)


def read_state(path) -> dict:
    """The content of a monitor state file, its form checked (the test's state is checked by its ``from_dict``)."""
    data = read_json_object(path, what=_WHAT, fix=_FIX)
    check_digest(data, path, _WHAT, _FIX)
    if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise _corrupt(path, f"format {data.get('format')!r} version {data.get('format_version')!r}, expected "
                             f"{FORMAT!r} version {FORMAT_VERSION}")
    missing, extra = sorted(_KEYS - set(data)), sorted(set(data) - _KEYS - {"digest"})
    if missing or extra:
        raise _corrupt(path, f"missing fields {missing}, unknown fields {extra}")
    for key in _COUNTS:
        if isinstance(data[key], bool) or not isinstance(data[key], int) or data[key] < 0:
            raise _corrupt(path, f"{key}={data[key]!r} is not a count")
    if data["rows_sampled"] > data["rows_seen"]:
        raise _corrupt(path, f"rows_sampled={data['rows_sampled']} exceeds rows_seen={data['rows_seen']}")
    for key in ("eps", "alpha", "sample_rate"):
        if not _is_real(data[key]):
            raise _corrupt(path, f"{key}={data[key]!r} is not a number")
    threshold = data["threshold"]
    if threshold is not None and not (_is_real(threshold) and 0.0 <= threshold <= 1.0):
        raise _corrupt(path, f"threshold={threshold!r} is not a λ in [0, 1] (or null)")
    if not isinstance(data["test"], dict) or not (data["alarm"] is None or isinstance(data["alarm"], dict)):
        raise _corrupt(path, "test must be an object and alarm an object or null")
    return data


def check_request(data: dict, path, *, eps: float, alpha: float, risk: str) -> None:
    """Raise :class:`MonitorStateMismatchError` naming ``path`` unless the saved state tests the same hypothesis."""
    saved = {"risk": data["risk"], "eps": data["eps"], "alpha": data["alpha"]}
    asked = {"risk": risk, "eps": eps, "alpha": alpha}
    differ = [f"{k}={saved[k]!r} (this monitor: {asked[k]!r})" for k in saved if saved[k] != asked[k]]
    if differ:
        raise MonitorStateMismatchError.about(
            path, f"this state was saved by a monitor of another hypothesis: {', '.join(differ)}",
            "Load it with the same risk, eps and alpha, or start a fresh RiskMonitor (its evidence does not carry "
            "over)")


def generator_from_state(state, path) -> np.random.Generator:
    """The numpy generator whose ``bit_generator.state`` was saved (PCG64, numpy's default)."""
    generator = np.random.default_rng()
    try:
        if not isinstance(state, dict) or state.get("bit_generator") != "PCG64":
            raise ValueError("expected a PCG64 state")
        generator.bit_generator.state = state
    except (ValueError, TypeError, KeyError) as err:
        raise _corrupt(path, f"rng is not a generator state ({err})") from None
    return generator
