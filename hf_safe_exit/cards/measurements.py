"""The numbers a card shows, each tied to what it measures.

Three kinds, never mixed:

* :class:`AtThreshold` -- what the **shipped λ̂** does on the examples of its own loss table (the
  calibration examples), early exit and the full model on the same examples in the same collect run:
  quality, generated tokens, decoder layers per generated token, time per generated token. In-sample
  (these are the examples λ̂ was chosen on): it shows what the threshold does, it does not test it.
* :class:`Procedure` -- the **calibration procedure** on repeated random splits (``hf-safe-exit
  evaluate``): every split calibrates its own λ̂ on n_cal examples and is tested on the other n_test.
  Its numbers are means over splits (mean λ̂ included), not numbers of the shipped λ̂.
* :class:`HeldOut` -- the shipped λ̂ measured by the caller on held-out examples (``test_results`` as a
  dict of numbers, ``efficiency``).

:func:`gather` builds them from the caller's inputs and refuses an evaluation or loss table that belongs
to another calibration. No number that is not one reaches a card: an evaluation with a NaN, an infinity or
a value out of range is refused (:func:`~hf_safe_exit.calibration.evaluate.validate_evaluation`), so are
held-out numbers that are not finite, and a loss table's extras that hold such values are left out of the
card, which says so (:attr:`AtThreshold.unmeasured`).
"""

from __future__ import annotations

import math
import numbers
import os
import platform
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..calibration.evaluate import read_evaluation, validate_evaluation
from ..calibration.grid import BATCHED_TIMING
from ..config import EarlyExitConfig
from ..errors import InconsistentCalibrationError
from .vocabulary import rows_description

__all__ = ["AtThreshold", "Procedure", "HeldOut", "Measurements", "gather", "at_threshold", "table_mismatch",
           "describe_hardware", "HELD_OUT_KEYS", "EFFICIENCY_KEYS"]

HELD_OUT_KEYS = ("test_risk", "test_risk_std", "n_test", "split", "task_loss", "full_task_loss")
EFFICIENCY_KEYS = ("mean_exit_layer", "num_decoder_layers", "layer_fraction", "speedup", "batch_size", "hardware")
PER_TOKEN = "per generated token"  # evaluate's speedup_basis when it divided wall time by generated tokens


@dataclass
class AtThreshold:
    """The shipped λ̂ and the full model (λ = 1) on the same ``n`` calibration examples, from the loss table."""

    threshold: float  # λ̂
    n: int
    rows: str
    risk: float  # mean loss of the certificate's risk at λ̂ (= the calibration risk)
    score: float | None = None  # mean task score (1 − task loss) with early exit at λ̂
    full_score: float | None = None  # the same examples, full model
    tokens: int | None = None  # tokens generated over the n examples
    full_tokens: int | None = None
    layers_per_token: float | None = None
    num_layers: int | None = None
    ms_per_token: float | None = None
    full_ms_per_token: float | None = None
    speedup: float | None = None  # (full time per token) / (time per token at λ̂)
    batch_size: int | None = None
    max_new_tokens: int | None = None
    max_input_length: int | None = None
    unmeasured: tuple = ()  # the table's extras left out: they hold values that are not finite numbers (>= 0)


@dataclass
class Procedure:
    """The calibration procedure on ``repeats`` random splits of the same examples (an ``evaluate`` row)."""

    method: str
    eps: float
    delta: float | None
    repeats: int
    n_cal: int
    n_test: int
    threshold_mean: float  # mean λ̂ over the splits
    test_risk: float
    test_risk_std: float | None = None
    violation_rate: float | None = None
    mean_exit_layer: float | None = None
    num_layers: int | None = None
    layer_fraction: float | None = None
    speedup: float | None = None  # only when measured per generated token
    speedup_basis: str | None = None


@dataclass
class HeldOut:
    """The shipped λ̂ measured by the caller on held-out examples."""

    test_risk: float | None = None
    test_risk_std: float | None = None
    n_test: int | None = None
    split: str | None = None
    task_loss: float | None = None
    full_task_loss: float | None = None
    mean_exit_layer: float | None = None
    num_decoder_layers: int | None = None
    layer_fraction: float | None = None
    speedup: float | None = None
    batch_size: int | None = None


@dataclass
class Measurements:
    at_threshold: AtThreshold | None = None
    procedure: Procedure | None = None
    held_out: HeldOut | None = None
    hardware: str | None = None
    evaluation: dict | None = None  # the evaluation JSON the procedure came from (written beside the calibration)


def describe_hardware() -> str:
    """A short description of this machine (for the speed-up's hardware line)."""
    import torch

    if torch.cuda.is_available():
        dev = f"GPU {torch.cuda.get_device_name(0)}"
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        cpu = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        dev = f"CPU {cpu}, {torch.get_num_threads()} torch thread(s)"
    return f"{dev}, torch {torch.__version__}"


def _lambda_index(lambdas: np.ndarray, value: float) -> int | None:
    hits = np.flatnonzero(np.isclose(lambdas, value, rtol=0, atol=1e-9))
    return int(hits[0]) if hits.size else None


def table_mismatch(table, controlled) -> str | None:
    """Why ``table`` is not the loss table ``controlled`` was fitted on (None when refitting reproduces λ̂).

    Checked: the number of examples, the model fingerprint and task (where both record one), λ̂ on the
    table's grid, and a refit of the same request on the table giving the same λ̂ and calibration risk.
    """
    c = controlled.certificate
    if table.n != c.n:
        return f"it holds {table.n} examples, the calibration {c.n}"
    for key, mine in (("model_fingerprint", c.model_fingerprint), ("task", c.task)):
        theirs = table.metadata.get(key)
        if mine is not None and theirs is not None and mine != theirs:
            return f"its {key} is {theirs!r}, the calibration's {mine!r}"
    differs = _config_differs(table.metadata, controlled)
    if differs:
        return differs
    if c.risk not in table.losses or _lambda_index(table.lambdas, c.threshold) is None:
        return f"it has no {c.risk!r} losses at λ̂ = {c.threshold:g}"
    params = {k: v for k, v in controlled.get_params().items() if k in ("eps", "delta", "method", "bound", "risk",
                                                                          "monotonize")}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an infeasible refit warns; only its λ̂ matters here
            refit = type(controlled)(**params).fit_table(table).certificate
    except ValueError as err:
        return f"refitting on it fails ({err})"
    if not math.isclose(refit.threshold, c.threshold, abs_tol=1e-12) or \
            not math.isclose(refit.empirical_risk, c.empirical_risk, rel_tol=1e-9, abs_tol=1e-12):
        return f"refitting on it gives λ̂ = {refit.threshold:g}, not {c.threshold:g}"
    return None


def _measured(table, key: str, unmeasured: list) -> np.ndarray | None:
    """``extras[key]`` as floats when every value is a finite number (>= 0 but for ``task_loss``); else None, and
    ``key`` goes into ``unmeasured`` when the table has it (collect failed to measure it)."""
    if key not in table.extras:
        return None
    try:
        values = np.asarray(table.extras[key], dtype=np.float64)
    except (TypeError, ValueError):
        values = np.array([np.nan])
    good = np.isfinite(values) & ((values >= 0) if key != "task_loss" else True)
    if good.all():
        return values
    unmeasured.append(key)
    return None


def _count(value) -> int | None:
    """``value`` when it is a whole number >= 1, else None (a NaN or a text is not a count to print)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1
    return int(value) if ok else None


def at_threshold(table, controlled, rows: str | None = None) -> AtThreshold:
    """What the shipped λ̂ does on ``table``'s examples, against the full model on the same examples.

    Only finite numbers: an extra that holds NaN, an infinity or a negative count or time is left out and named
    in :attr:`AtThreshold.unmeasured`; a speed-up needs a positive time and token count on both sides.
    """
    c = controlled.certificate
    lam = table.lambdas
    k, full = _lambda_index(lam, c.threshold), int(np.argmin(np.abs(lam - 1.0)))
    meta, unmeasured = table.metadata, []
    task_loss, tokens, layers, wall = (_measured(table, key, unmeasured) for key in
                                       ("task_loss", "num_tokens", "mean_exit_layer", "wall_time"))
    if wall is not None and meta.get("timing") == BATCHED_TIMING:  # thresholds decoded as rows of one batch:
        wall = None  # the times per threshold are apportioned, not measured, so no speed-up is shown
        unmeasured.append("wall_time")
    out = AtThreshold(threshold=c.threshold, n=table.n, rows=rows or rows_description(c.task, meta),
                      risk=float(table.losses[c.risk][k].mean()), num_layers=_count(meta.get("num_decoder_layers")),
                      batch_size=_count(meta.get("batch_size")), max_new_tokens=_count(meta.get("max_new_tokens")),
                      max_input_length=_count(meta.get("max_input_length")), unmeasured=tuple(unmeasured))
    if task_loss is not None:
        out.score, out.full_score = (float(1.0 - np.mean(task_loss[i])) for i in (k, full))
    if layers is not None:
        # per generated token: each example's mean exit layer weighted by the tokens it generated
        out.layers_per_token = float((layers[k] * tokens[k]).sum() / tokens[k].sum()) if tokens is not None \
            and tokens[k].sum() > 0 else float(layers[k].mean())
    if tokens is not None:
        out.tokens, out.full_tokens = int(round(tokens[k].sum())), int(round(tokens[full].sum()))
        if wall is not None and out.tokens > 0 and out.full_tokens > 0 and wall[k] > 0 and wall[full] > 0:
            out.ms_per_token, out.full_ms_per_token = 1e3 * wall[k] / out.tokens, 1e3 * wall[full] / out.full_tokens
            out.speedup = out.full_ms_per_token / out.ms_per_token
    return out


def _config_differs(recorded: Mapping, controlled) -> str | None:
    """Why the early-exit configuration ``recorded`` (a table's or an evaluation's metadata) is not the one the
    calibration holds for (None when it is, or when either records none)."""
    mine = controlled.calibration.config
    if mine is None or not isinstance(recorded, Mapping) or recorded.get("measure") is None:
        return None
    try:  # a setting recorded as None (an evaluation lists every key) is one its table left at the default
        theirs = EarlyExitConfig.from_dict({k: v for k, v in recorded.items() if v is not None}, strict=False).to_dict()
    except ValueError as err:
        return f"its early-exit configuration is not valid ({err})"
    diff = {k: v for k, v in theirs.items() if v != mine.to_dict().get(k)}
    return None if not diff else f"its early-exit configuration differs ({diff}, the calibration's {mine.to_dict()})"


def _check_evaluation(evaluation: Mapping, controlled, where) -> None:
    """Refuse an evaluation of other examples, another model, task, configuration or risk than the calibration's."""
    c = controlled.certificate
    settings, meta = evaluation.get("settings", {}), evaluation.get("metadata", {})
    pairs = (("examples", settings.get("n"), c.n), ("model fingerprint", meta.get("model_fingerprint"),
                                                     c.model_fingerprint),
             ("task", meta.get("task"), c.task), ("risk", settings.get("risk"), c.risk),
             ("confidence measure", meta.get("measure"), c.measure))
    for what, theirs, mine in pairs:
        if theirs is not None and mine is not None and theirs != mine:
            raise InconsistentCalibrationError.about(
                where, f"the evaluation is of another calibration: its {what} is {theirs!r}, the calibration's "
                f"{mine!r}", "Evaluate the loss table this calibration was fitted on (`hf-safe-exit evaluate "
                "--results <that .npz>`), or leave the evaluation out")
    differs = _config_differs(meta, controlled)
    if differs:
        raise InconsistentCalibrationError.about(
            where, f"the evaluation is of another calibration: {differs}", "Evaluate the loss table this "
            "calibration was fitted on (`hf-safe-exit evaluate --results <that .npz>`), or leave the evaluation out")


def _check_evaluated_table(evaluation: Mapping, table, where) -> None:
    """Refuse an evaluation made from another loss table than ``table`` (the one the card shows, else the one stored
    beside the evaluation file), by the table digest the evaluation records (none recorded: an older evaluation,
    checked by its settings and metadata only)."""
    recorded = evaluation.get("table_digest")
    if recorded is None:
        return
    source = "the loss table the card shows"
    if table is None and where is not None:
        from ..risk.loss_table import CALIBRATION_FILENAME, LossTable

        beside = os.path.join(os.path.dirname(os.fspath(where)), CALIBRATION_FILENAME)
        if not os.path.isfile(beside):
            return
        table, source = LossTable.load(beside), f"the loss table beside it ({beside})"
    if table is not None and table.digest() != recorded:
        raise InconsistentCalibrationError.about(
            where, f"the evaluation was made from another loss table than {source}: it records table digest "
            f"{recorded!r}, that table's is {table.digest()!r}", "Evaluate the loss table this calibration was fitted "
            "on (`hf-safe-exit evaluate --results <that .npz>`), or leave the evaluation out")


def _procedure(evaluation: Mapping, controlled, where) -> Procedure:
    c = controlled.certificate
    rows = [r for r in evaluation.get("results", []) if r.get("method") == c.method
            and math.isclose(float(r["eps"]), c.eps, rel_tol=1e-9)
            and (c.delta is None or r.get("delta") is None or math.isclose(float(r["delta"]), c.delta, rel_tol=1e-9))]
    if not rows:
        raise InconsistentCalibrationError.about(
            where, f"the evaluation has no result for method={c.method!r}, eps={c.eps:g}",
            "Evaluate with that method and ε (`hf-safe-exit evaluate --methods ... --eps ...`), or pass "
            "test_results as a dict of numbers")
    r, s = rows[0], evaluation.get("settings", {})
    basis = evaluation.get("speedup_basis")
    return Procedure(method=c.method, eps=c.eps, delta=r.get("delta"), repeats=int(s["repeats"]),
                     n_cal=int(s["n_cal"]), n_test=int(s["n_test"]), threshold_mean=float(r["lambda_hat_mean"]),
                     test_risk=float(r["test_risk_mean"]), test_risk_std=r.get("test_risk_std"),
                     violation_rate=r.get("violation_rate"), mean_exit_layer=r.get("mean_exit_layer"),
                     num_layers=evaluation.get("metadata", {}).get("num_decoder_layers"),
                     layer_fraction=r.get("layer_fraction"),
                     speedup=r.get("speedup") if basis == PER_TOKEN else None, speedup_basis=basis)


def _held_out(test_results: Mapping | None, efficiency: Mapping | None) -> HeldOut | None:
    if test_results is None and efficiency is None:
        return None
    values: dict[str, Any] = {}
    if test_results is not None:
        unknown = set(test_results) - set(HELD_OUT_KEYS)
        if unknown:
            raise ValueError(f"test_results has unknown keys {sorted(unknown)}: use {HELD_OUT_KEYS} (the shipped λ̂ "
                             "on held-out examples), or pass the JSON written by `hf-safe-exit evaluate`.")
        if "test_risk" not in test_results:
            raise ValueError("test_results needs at least 'test_risk' (the mean risk on held-out examples).")
        values.update(test_results)
    if efficiency is not None:
        unknown = set(efficiency) - set(EFFICIENCY_KEYS)
        if unknown:
            raise ValueError(f"efficiency has unknown keys {sorted(unknown)}: use {EFFICIENCY_KEYS}.")
        values.update({k: v for k, v in efficiency.items() if k != "hardware"})
    for k, v in values.items():
        _check_held_out(k, v)
    return HeldOut(**values)


# the held-out values a card prints, and what each may be (None: any finite number)
_COUNTS = ("n_test", "num_decoder_layers", "batch_size")
_HELD_OUT_RANGES = {"test_risk_std": (lambda v: v >= 0, ">= 0"), "mean_exit_layer": (lambda v: v >= 0, ">= 0"),
                    "layer_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"), "speedup": (lambda v: v > 0, "> 0")}


def _check_held_out(key: str, value) -> None:
    """Refuse a held-out value a card could not state as a number: NaN, an infinity, text, a negative time."""
    if value is None or (key == "split" and isinstance(value, str)):
        return
    if key in _COUNTS:
        if _count(value) is None:
            raise ValueError(f"{key}={value!r} is not a whole number >= 1.")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise ValueError(f"{key}={value!r} is not a finite number: a card states only measured numbers.")
    test, words = _HELD_OUT_RANGES.get(key, (lambda v: True, ""))
    if not test(value):
        raise ValueError(f"{key}={value!r} is out of range: it must be {words}.")


def gather(controlled, *, test_results=None, efficiency: Mapping | None = None, table=None, table_path=None,
           hardware: str | None = None, rows: str | None = None) -> Measurements:
    """The card's numbers: ``table`` gives :class:`AtThreshold`, an evaluation :class:`Procedure`, dicts :class:`HeldOut`.

    ``test_results`` is the evaluation written by ``hf-safe-exit evaluate`` (a dict, or the path of its JSON
    file), or a dict of :data:`HELD_OUT_KEYS`. An evaluation or table of another calibration is refused with
    an :class:`~hf_safe_exit.errors.InconsistentCalibrationError` naming it; so is an evaluation whose
    ``table_digest`` is not that of ``table`` (or, with no ``table``, of the loss table stored beside the
    evaluation file).
    """
    out = Measurements()
    if isinstance(test_results, (str, os.PathLike)):
        where = os.fspath(test_results)
        test_results = read_evaluation(where)  # shape and values checked, naming the file
    else:
        where = None
        if isinstance(test_results, Mapping) and "results" in test_results:
            validate_evaluation(test_results)  # the same checks for an evaluation given as a dict
    if test_results is not None and "results" in test_results:
        _check_evaluation(test_results, controlled, where)
        out.procedure, out.evaluation = _procedure(test_results, controlled, where), dict(test_results)
        test_results = None
    out.held_out = _held_out(test_results, efficiency)
    if table is not None:
        reason = table_mismatch(table, controlled)
        if reason is not None:
            raise InconsistentCalibrationError.about(
                table_path, f"the loss table is not the one this calibration was fitted on: {reason}",
                "Pass the table the calibration was fitted on, or none")
        out.at_threshold = at_threshold(table, controlled, rows)
    if out.evaluation is not None:  # once the table is known to be the calibration's: the evaluation must be of it
        _check_evaluated_table(out.evaluation, table, where)
    hw = (efficiency or {}).get("hardware") if hardware is None else hardware
    if hw is None and table is not None:  # where the table's times were measured, as far as collect recorded it
        meta = table.metadata
        torch_version = (meta.get("versions") or {}).get("torch")
        hw = meta.get("hardware") or (f"{str(meta['device']).upper()}" + (f", torch {torch_version}" if torch_version
                                                                           else "") + " (the loss table records no more)"
                                      if meta.get("device") else None)
    out.hardware = describe_hardware() if hw == "auto" else hw
    return out
