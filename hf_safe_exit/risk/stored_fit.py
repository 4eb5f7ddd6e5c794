"""An unfitted ``RiskControlled`` bound to a model: fitted on the calibration the model stores (cached).

``RiskControlled(eps).bind(model)`` finds the calibration ``model`` stores for its task
(:mod:`hf_safe_exit.risk.store`). With the task's loss table it fits any (ε, δ, method, ...), once per model,
table and request (later binds reuse the fit). With only the task's ``risk_control.json``, the request must be
the one that file was fitted for; anything else needs the table, and the error says so.
"""

from __future__ import annotations

from collections import OrderedDict

from ..confidence import ConfidenceMeasure, measure_name
from .loss_table import LossTable
from .provenance import check_fingerprint
from .store import HOW_TO_CALIBRATE, MissingCalibrationError, StoredCalibration, clear_store_cache, find_stored

__all__ = ["clear_cache", "fit_from_stored", "find_calibration"]

_FIT_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 64
# what a stored risk_control.json must have been fitted with to serve a request that has no loss table
_FIT_PARAMS = ("eps", "delta", "method", "bound", "risk", "monotonize")
_SETTINGS = ("measure", "schedule", "min_exit_layer", "decay_tau", "anytime", "exit_layers")


def clear_cache() -> None:
    """Forget cached fits, loaded tables and downloaded files (tests; after rewriting a table in place)."""
    _FIT_CACHE.clear()
    clear_store_cache()


def fit_from_stored(rc, model, fingerprint: str):
    """``rc``'s request fitted on the calibration ``model`` (fingerprint ``fingerprint``) stores for ``rc.task``.

    Returns a fitted object of ``rc``'s class; ``rc`` itself is left unfitted. Raises
    :class:`~hf_safe_exit.errors.MissingFingerprintError` / ``ModelMismatchError`` when the stored table is not
    this model's (see :mod:`hf_safe_exit.risk.provenance`), :class:`MissingCalibrationError` when nothing fits.
    """
    stored = find_stored(model, rc.task)
    if stored.table is None:
        return _stored_fit(rc, stored)
    check_fingerprint(stored.table.metadata.get("model_fingerprint"), fingerprint, rc.allow_missing_fingerprint,
                      f"The loss table at {stored.table_path}", other_fix=HOW_TO_CALIBRATE)
    params = rc.get_params()
    key = (fingerprint, stored.table.digest(), *(
        (k, params[k] if not isinstance(params[k], ConfidenceMeasure) else ("instance", id(params[k])))
        for k in sorted(params)))
    hit = _FIT_CACHE.get(key)
    if hit is None:
        params["task"] = stored.task if rc.task is None else rc.task
        hit = type(rc)(**params).fit_table(stored.table)
        _FIT_CACHE[key] = hit
        while len(_FIT_CACHE) > _CACHE_SIZE:
            _FIT_CACHE.popitem(last=False)
    _FIT_CACHE.move_to_end(key)
    return hit


def _stored_fit(rc, stored: StoredCalibration):
    fitted = type(rc).from_dict(stored.controlled_json, stored.controlled_path,
                                allow_missing_fingerprint=rc.allow_missing_fingerprint)
    asked, has = rc.get_params(), fitted.get_params()
    # the early-exit settings as the file records them: measure names and PoE settings as dicts
    asked.update(measure=None if rc.measure is None else measure_name(rc.measure),
                 anytime=None if rc.anytime is None else rc.anytime.to_dict(),
                 exit_layers=None if rc.exit_layers is None else list(rc.exit_layers))
    has.update({k: fitted._calibration.get(k) for k in _SETTINGS})
    differ = [k for k in _FIT_PARAMS if asked[k] != has[k]]
    differ += [k for k in _SETTINGS if asked[k] is not None and asked[k] != has[k]]
    if differ:
        want = ", ".join(f"{k}={asked[k]!r}" for k in differ)
        have = ", ".join(f"{k}={has[k]!r}" for k in differ)
        raise MissingCalibrationError(
            f"{stored.controlled_path} holds λ̂ fitted with {have}, and this request asks for {want}; fitting "
            f"another request needs the task's loss table ({stored.task!r}: calibration/{stored.task}/"
            "early_exit_calibration.npz), which this model does not store. Ask for the stored setting, or "
            + HOW_TO_CALIBRATE[0].lower() + HOW_TO_CALIBRATE[1:])
    return fitted


def find_calibration(model, task: str | None = None) -> tuple[LossTable, str]:
    """The stored loss table of ``model`` for ``task`` (default: its primary task) and where it came from.

    See :func:`hf_safe_exit.risk.store.find_stored` for where it looks; raises
    :class:`MissingCalibrationError` naming the fix (or the tasks stored) when there is none.
    """
    stored = find_stored(model, task)
    if stored.table is None:
        raise MissingCalibrationError(f"{stored.controlled_path} stores λ̂ for task {stored.task!r} but not its loss "
                                      "table, which is needed to fit another ε. " + HOW_TO_CALIBRATE)
    return stored.table, stored.table_path
