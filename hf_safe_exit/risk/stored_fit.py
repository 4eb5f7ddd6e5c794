"""An unfitted ``RiskControlled`` used with a model: fitted on the calibration the model stores (cached).

``generate(early_exit=RiskControlled(eps))`` finds the calibration ``model`` stores for its task
(:mod:`hf_safe_exit.risk.store`). With the task's loss table it fits any (ε, δ, method, ...), once per model,
table and request (later calls reuse the fit; the model's fingerprint is itself cached per weights, see
:mod:`hf_safe_exit.fingerprint`). ``method="pareto"`` fits the task's configuration table
(``early_exit_configurations.npz``; Laufer-Goldshtein et al., ICLR 2023) and the scalar methods the 1-D λ table: a
model that stores only the other kind is refused, saying which it has. With only the task's ``risk_control.json``, the
request must be the one that file was fitted for; anything else needs the table, and the error says so.
"""

from __future__ import annotations

from collections import OrderedDict

from ..errors import CorruptFileError
from ..fingerprint import model_fingerprint
from .calibration import Calibration, table_config
from .certificate import PARETO
from .configuration_table import CONFIGURATIONS_FILENAME
from .loss_table import CALIBRATION_FILENAME, LossTable
from .provenance import check_fingerprint
from .store import HOW_TO_CALIBRATE, MissingCalibrationError, StoredCalibration, clear_store_cache, find_stored

__all__ = ["check_table_settings", "clear_cache", "fit_from_stored", "find_calibration"]

_FIT_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 64


def clear_cache() -> None:
    """Forget cached fits, loaded tables and downloaded files (tests; after rewriting a table in place)."""
    _FIT_CACHE.clear()
    clear_store_cache()


def fit_from_stored(rc, model, fingerprint: str | None = None) -> Calibration:
    """``rc``'s request (a :class:`~hf_safe_exit.risk.RiskControlled`) fitted on the calibration ``model`` stores
    for ``rc.task``.

    Raises :class:`~hf_safe_exit.errors.MissingFingerprintError` / ``ModelMismatchError`` when the stored table is not
    this model's (see :mod:`hf_safe_exit.risk.provenance`), :class:`MissingCalibrationError` when nothing fits,
    :class:`~hf_safe_exit.errors.CorruptFileError` naming the table when the settings it records cannot be used.
    """
    stored = find_stored(model, rc.task)
    pareto = rc.method == PARETO
    table, table_path = (stored.configurations, stored.configurations_path) if pareto else \
        (stored.table, stored.table_path)
    if table is None:
        json_pareto = stored.controlled_json is not None and stored.controlled_json["params"].get("method") == PARETO
        if stored.controlled_json is None or json_pareto != pareto:
            raise MissingCalibrationError(_other_kind(rc, stored))
        return _stored_fit(rc, stored)
    fingerprint = fingerprint if fingerprint is not None else model_fingerprint(model)
    check_fingerprint(table.metadata.get("model_fingerprint"), fingerprint, rc.allow_missing_fingerprint,
                      f"The loss table at {table_path}", other_fix=HOW_TO_CALIBRATE)
    if not pareto:  # a configuration table's settings were checked when it was read
        check_table_settings(table, table_path, rc.config)
    request = rc.controller().get_params()
    # a config instance with a custom measure object is keyed by identity (it cannot be compared by value)
    config_key = None if rc.config is None else (rc.config.to_dict(), id(rc.config.measure))
    key = (fingerprint, table.digest(), stored.task, repr(sorted(request.items())), repr(config_key))
    hit = _FIT_CACHE.get(key)
    if hit is None:
        hit = Calibration.fit(rc.controller(), table, rc.config)
        _FIT_CACHE[key] = hit
        while len(_FIT_CACHE) > _CACHE_SIZE:
            _FIT_CACHE.popitem(last=False)
    _FIT_CACHE.move_to_end(key)
    return hit


def _other_kind(rc, stored: StoredCalibration) -> str:
    """Why ``rc`` cannot be fitted on what the model stores for its task: the other kind of table (or a calibration
    fitted with the other kind of method) only."""
    has = [p for p in (stored.table_path, stored.configurations_path, stored.controlled_path) if p is not None]
    where = f"calibration/{stored.task}/"
    if rc.method == PARETO:
        return (f"RiskControlled(method='pareto') chooses among early-exit configurations and needs the task's "
                f"multi-configuration table ({where}{CONFIGURATIONS_FILENAME}); this model stores for task "
                f"{stored.task!r} only {', '.join(has)}, which calibrate one configuration's λ. Stack the 1-D tables of "
                "several configurations with ConfigurationTable.from_tables([...]) and store it "
                "(store_calibration(model_dir, table=...)), or use a scalar method (crc, ucb, ltt).")
    return (f"RiskControlled(method={rc.method!r}) calibrates λ for one configuration from the task's 1-D λ table "
            f"({where}{CALIBRATION_FILENAME}); this model stores for task {stored.task!r} only {', '.join(has)}, for "
            "method='pareto'. Use RiskControlled(eps, delta=..., method='pareto'), or store that configuration's "
            "1-D table.")


def check_table_settings(table: LossTable, path, config=None) -> None:
    """Raise :class:`~hf_safe_exit.errors.CorruptFileError` naming ``path`` unless the early-exit configuration
    ``table`` records can be rebuilt (with ``config``, the caller's, standing in for a custom measure of its name).

    A loss table may name a measure this hf_safe_exit does not know (a custom one, recorded by name): reading it is
    fine, turning it into a policy is not, unless the caller hands that measure over."""
    if table.metadata.get("strategy") == "bild":
        return
    try:
        table_config(table.metadata, config)
    except ValueError as err:  # InvalidConfigError: e.g. a measure name no built-in or given measure answers to
        raise CorruptFileError.about(path, f"the early-exit settings it records cannot be used ({err})",
                                     "Pass the custom measure it was collected with (RiskControlled(..., config="
                                     "EarlyExitConfig(measure=<that ConfidenceMeasure>))), or " +
                                     HOW_TO_CALIBRATE[0].lower() + HOW_TO_CALIBRATE[1:]) from None


def _stored_fit(rc, stored: StoredCalibration) -> Calibration:
    fitted = Calibration.from_dict(stored.controlled_json, stored.controlled_path)
    asked, has = rc.controller().get_params(), dict(fitted.request)
    differ = [k for k in asked if asked[k] != has.get(k)]
    if rc.config is not None and (fitted.config is None or not rc.config.accepts(fitted.config)):
        differ.append("config")  # a config the request names must be the file's ("auto" takes the file's measure)
        asked["config"] = rc.config.to_dict()
        has["config"] = None if fitted.config is None else fitted.config.to_dict()
    if differ:
        want = ", ".join(f"{k}={asked[k]!r}" for k in differ)
        have = ", ".join(f"{k}={has.get(k)!r}" for k in differ)
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
