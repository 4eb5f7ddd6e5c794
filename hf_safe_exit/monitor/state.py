"""A :class:`~hf_safe_exit.monitor.RiskMonitor`'s state as a small JSON file, so that a restarted service keeps its
evidence.

The file holds the test's state (:meth:`SequentialRiskTest.to_dict`, continued bit for bit after loading), the
counters, the sampling settings and the generator's state (a restarted monitor draws the same later sampling
decisions), the alarm, and what the evidence is about: λ̂ and the digest of its calibration
(:func:`calibration_digest`). It is written whole (:func:`hf_safe_exit.atomic.atomic_write`) with the digest of its
content (:mod:`hf_safe_exit.digest`). Reading refuses, naming the file: anything malformed, edited or inconsistent
(:class:`~hf_safe_exit.errors.CorruptFileError`: the alarm must be the test's, the counters must add up), and a state
for another ε, α, risk, sampling or fallback than the monitor loading it has (:class:`MonitorStateMismatchError`):
evidence about one hypothesis is no evidence about another, and a monitor that samples otherwise is another monitor.
"""

from __future__ import annotations

import numbers
import os

import numpy as np

from ..atomic import atomic_write
from ..digest import check_digest, content_digest, with_digest
from ..errors import CorruptFileError, StateMismatchError, WouldOverwriteError, read_json_object

__all__ = ["FORMAT", "FORMAT_VERSION", "MonitorStateMismatchError", "write_state", "read_state", "check_request",
           "check_evidence", "generator_from_state", "calibration_digest"]

FORMAT = "hf_safe_exit.risk_monitor"
FORMAT_VERSION = 2  # 2: the sampling mode, the losses fed by record() and the calibration's digest
_WHAT = "a RiskMonitor state file"
_FIX = "Save it again with monitor.save(path, overwrite=True), or start a fresh RiskMonitor"
_COUNTS = ("calls", "rows_seen", "rows_sampled", "recorded")
_KEYS = {"format", "format_version", "hf_safe_exit_version", "risk", "eps", "alpha", "sample_rate", "sample",
         "fallback", *_COUNTS, "threshold", "calibration", "rng", "test", "alarm"}
_SETTINGS = ("risk", "eps", "alpha", "sample_rate", "sample", "fallback")


class MonitorStateMismatchError(StateMismatchError):
    """A saved monitor state is about another hypothesis (ε, α, risk), sampling, fallback, λ̂ or calibration than the
    monitor using it."""


def calibration_digest(calibration) -> str:
    """The content digest (:func:`hf_safe_exit.digest.content_digest`) of what a calibration's guarantee is about: λ̂,
    its certificate (ε, δ, method, n, the grid's statistics, model, task, lengths), the request and the early-exit
    configuration. Not the library version, so that an upgrade keeps the evidence; a recalibration on other data
    changes it even when λ̂ stays the same."""
    return content_digest({
        "threshold": calibration.threshold, "certificate": calibration.certificate.to_dict(),
        "request": calibration.request, "config": None if calibration.config is None else calibration.config.to_dict(),
        "model_fingerprint": calibration.model_fingerprint, "dtype": calibration.dtype,
        "meta_head_fingerprint": calibration.meta_head_fingerprint, "task": calibration.task,
        "lengths": calibration.generation_settings})


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
    if data.get("format") == FORMAT and data.get("format_version") == 1:
        raise _corrupt(path, "format version 1 records neither the sampling mode nor the calibration the evidence is "
                             "about, so it cannot be continued safely; start a fresh RiskMonitor")
    if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise _corrupt(path, f"format {data.get('format')!r} version {data.get('format_version')!r}, expected "
                             f"{FORMAT!r} version {FORMAT_VERSION}")
    missing, extra = sorted(_KEYS - set(data)), sorted(set(data) - _KEYS - {"digest"})
    if missing or extra:
        raise _corrupt(path, f"missing fields {missing}, unknown fields {extra}")
    for key in _COUNTS:
        if isinstance(data[key], bool) or not isinstance(data[key], int) or data[key] < 0:
            raise _corrupt(path, f"{key}={data[key]!r} is not a count")
    for fewer, more in (("rows_sampled", "rows_seen"), ("calls", "rows_seen")):  # every call has at least one row
        if data[fewer] > data[more]:
            raise _corrupt(path, f"{fewer}={data[fewer]} exceeds {more}={data[more]}")
    if not isinstance(data["sample"], str) or not isinstance(data["fallback"], bool):
        raise _corrupt(path, f"sample={data['sample']!r} must be a string and fallback={data['fallback']!r} a bool")
    digest = data["calibration"]
    if (digest is None) != (data["threshold"] is None) or not (digest is None or _is_digest(digest)):
        raise _corrupt(path, f"calibration={digest!r} must be the hex digest of the calibration of threshold="
                             f"{data['threshold']!r} (both null before the first call)")
    for key in ("eps", "alpha", "sample_rate"):
        if not _is_real(data[key]):
            raise _corrupt(path, f"{key}={data[key]!r} is not a number")
    threshold = data["threshold"]
    if threshold is not None and not (_is_real(threshold) and 0.0 <= threshold <= 1.0):
        raise _corrupt(path, f"threshold={threshold!r} is not a λ in [0, 1] (or null)")
    if not isinstance(data["test"], dict) or not (data["alarm"] is None or isinstance(data["alarm"], dict)):
        raise _corrupt(path, "test must be an object and alarm an object or null")
    return data


def _is_digest(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def check_request(data: dict, path, *, risk: str, eps: float, alpha: float, sample_rate: float, sample: str,
                  fallback: bool) -> None:
    """Raise :class:`MonitorStateMismatchError` naming ``path`` and the fields unless the saved state has the loading
    monitor's settings: the same hypothesis, sampled the same way (a restarted monitor that sampled otherwise would
    not continue the same sampling process), with the same fallback."""
    asked = {"risk": risk, "eps": eps, "alpha": alpha, "sample_rate": sample_rate, "sample": sample,
             "fallback": fallback}
    differ = [f"{k}={data[k]!r} (this monitor: {asked[k]!r})" for k in _SETTINGS if data[k] != asked[k]]
    if differ:
        raise MonitorStateMismatchError.about(
            path, f"this state was saved by a monitor with other settings: {', '.join(differ)}",
            "Load it with the settings it was saved with (RiskMonitor.load(path, policy, tokenizer=..., risk=..., "
            "eps=..., alpha=..., sample_rate=..., sample=..., fallback=...)), or start a fresh RiskMonitor (its "
            "evidence does not carry over)")


def check_evidence(data: dict, path, test, alarm, loss_range) -> None:
    """Raise :class:`~hf_safe_exit.errors.CorruptFileError` naming ``path`` unless the saved ``test`` (a
    :class:`~hf_safe_exit.risk.SequentialRiskTest`) and ``alarm`` (a :class:`~hf_safe_exit.monitor.RiskAlarm` or
    None) agree with the file's fields: the test's ε, α and loss range; the alarm is the test's (the same loss, ε, α,
    an e-value at 1/α, no later than the calls seen); and the test was fed exactly the losses the counters say (a
    consistency monitor: one per sampled row, plus those fed by ``record()``; a performance-gap monitor: those
    fed by ``record()``)."""
    if (test.eps, test.alpha, test.loss_range) != (data["eps"], data["alpha"], tuple(loss_range)):
        raise _corrupt(path, "its test's eps, alpha or loss range disagree with the monitor's fields (edited or mixed "
                             "up)")
    if alarm is None:
        if test.alarmed:
            raise _corrupt(path, f"its test fired at loss {test.alarm_index} but the file records no alarm")
    elif (alarm.sample_index, alarm.eps, alarm.alpha) != (test.alarm_index, test.eps, test.alpha) or not (
            alarm.e_value >= (1.0 - 1e-9) / test.alpha and 1 <= alarm.calls_seen <= data["calls"]):
        raise _corrupt(path, f"its alarm (loss {alarm.sample_index}, eps={alarm.eps!r}, alpha={alarm.alpha!r}, e-value "
                             f"{alarm.e_value!r}, after {alarm.calls_seen} calls) is not its test's (loss "
                             f"{test.alarm_index}, eps={test.eps!r}, alpha={test.alpha!r}, {data['calls']} calls)")
    fed = data["recorded"] + (data["rows_sampled"] if data["risk"] == "consistency" else 0)
    if test.n != fed:
        raise _corrupt(path, f"its test holds n={test.n} losses but the counters account for {fed} (rows_sampled="
                             f"{data['rows_sampled']}, recorded={data['recorded']}, risk {data['risk']!r})")


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
