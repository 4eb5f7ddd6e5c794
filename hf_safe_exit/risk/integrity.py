"""Integrity of a stored calibration (``risk_control.json``): complete, self-consistent, and reproducible.

A calibration is only as trustworthy as its file. Before one is used it must

* match its digest, when it records one (every file :meth:`~hf_safe_exit.risk.Calibration.to_dict` writes does: see
  :mod:`hf_safe_exit.digest`): a file edited after it was written is refused whatever the edit
  (:class:`~hf_safe_exit.errors.CorruptFileError`). The checks below are what protects a file without one (written
  before digests, or by hand), and a forger who recomputes the digest;
* be complete: the fields ``RiskControlled.to_dict`` writes, each of its type and in its range (the certificate's:
  :func:`~hf_safe_exit.risk.certificate.check_certificate_fields`; fingerprints hex digits, the dtype a torch
  dtype's name, the task a task name) (:class:`~hf_safe_exit.errors.CorruptFileError` otherwise);
* agree with itself: λ̂ (``lambda_``) equals its certificate's ``lambda_hat`` and is a point of the
  certificate's grid, the certificate was fitted with the file's (ε, δ, method, risk, monotonize) and
  for the file's model, task, measure and lengths (the two copies of each equal, a missing one reading as null;
  ``params.task`` null, as older files write it, or the task), its empirical risks lie within its loss bounds, and
  ``feasible`` says whether λ̂ < 1;
* where the loss table is stored beside it (``early_exit_calibration.npz`` in the same folder): be what
  refitting that table gives (same λ̂, n and model), with the settings the table's losses were collected
  with (task, measure, schedule, minimum exit layer, decay τ, PoE, lengths; those the table records).

A file that fails the last two was edited by hand or mixed up with another calibration:
:class:`~hf_safe_exit.errors.InconsistentCalibrationError`, naming the file and both values.

A ``method="pareto"`` calibration (Laufer-Goldshtein et al., ICLR 2023) is checked the same way, its certificate's
front in place of a λ grid and the configuration table (``early_exit_configurations.npz``) in place of the loss table:
see :mod:`hf_safe_exit.risk.pareto_integrity`.
"""

from __future__ import annotations

import math
import numbers

from .. import __version__
from ..config import EarlyExitConfig, config_fields
from ..digest import check_digest
from ..errors import CorruptFileError, InconsistentCalibrationError
from .bounds import hoeffding_bentkus_ucb
from .certificate import PARETO, RiskCertificate, guarantee_text, is_length, is_task_name
from .controller import RiskController
from .loss_table import MAX_TOKENS, LossTable
from .pareto_integrity import calibration_problem, certificate_problem, refit_problem
from .provenance import is_dtype_name, is_fingerprint
from .selection import crc_statistic, first_violation_scan, passes, select

__all__ = ["FORMAT_VERSION", "RECALIBRATE", "REQUEST_KEYS", "check_calibration_dict", "check_calibration_digest",
           "check_refit"]

FORMAT_VERSION = 1
# a RiskController's request, under "params" (the last three: method "pareto" only)
REQUEST_KEYS = ("eps", "delta", "method", "bound", "risk", "monotonize", "p_value", "opt_fraction", "seed")
_PARETO_REQUEST = ("delta", "p_value", "opt_fraction", "seed")  # what a Pareto file must record: the split's too
RECALIBRATE = ("Recalibrate: `hf-safe-exit calibrate --results <table>.npz --eps ... --model <model> --store-in-model` "
               "(or RiskControlled(...).fit_table(table).save_pretrained(dir)); never edit risk_control.json by hand")
_CORRUPT_FIX = ("Write it again with `hf-safe-exit calibrate` or RiskControlled.save_pretrained, or delete it (a model "
                "folder's calibration/<task>/early_exit_calibration.npz alone is enough for RiskControlled(eps))")
_TOLERANCE = 1e-12
_FORMAT_1_SETTINGS = ("measure", "schedule", "min_exit_layer", "decay_tau")  # the settings of the first format
# what a calibration section holds besides the early-exit settings
_CALIBRATION_KEYS = ("model_fingerprint", "dtype", "meta_head_fingerprint", "task", "max_new_tokens",
                     "max_input_length")


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _close(a, b) -> bool:
    return a == b or (_number(a) and _number(b) and math.isclose(a, b, rel_tol=_TOLERANCE, abs_tol=_TOLERANCE))


def _check_settings(calibration: dict, path) -> None:
    """The early-exit (or BiLD) settings that ``bind`` needs are there and typed."""
    if calibration.get("strategy") == "bild":
        policy = calibration.get("policy")
        if not isinstance(policy, dict) or not _number(policy.get("fallback")) or not _number(
                policy.get("max_draft_len")):
            raise CorruptFileError.about(path, "a BiLD calibration whose 'calibration.policy' lacks a numeric "
                                         "'fallback' or 'max_draft_len'", _CORRUPT_FIX)
        return
    # every format-1 file lists these; a setting added since may be absent (it then takes its default, the behaviour
    # before it existed), so a missing one of these means a truncated or hand-made file
    missing = [name for name in _FORMAT_1_SETTINGS if name not in calibration]
    unknown = sorted(set(calibration) - set(config_fields()) - set(_CALIBRATION_KEYS))
    if missing or unknown:
        problem = f"{missing} are missing" if missing else f"{unknown} are not settings of hf_safe_exit {__version__}"
        raise CorruptFileError.about(path, f"its early-exit settings are wrong: {problem}", _CORRUPT_FIX)
    if calibration.get("measure") is None:  # a fit on raw losses that named no configuration (refused when used)
        return
    try:
        config = EarlyExitConfig.from_dict(calibration, strict=False)  # the one validation of the early-exit settings
    except (TypeError, ValueError) as err:
        raise CorruptFileError.about(path, f"its early-exit settings are not valid: {err}", _CORRUPT_FIX) from None
    if config.measure_name == "auto":
        raise InconsistentCalibrationError.about(path, "its measure is 'auto', which a calibration resolves before it "
                                                 "is written", _CORRUPT_FIX)


def _check_certificate(cert: RiskCertificate, where) -> None:
    """A certificate must state what its own grid statistics give: the method's test (``selection.passes``) scanned
    from λ = 1 down selects its λ̂; the empirical risk and bound at λ̂ are the grid's there; CRC's statistics are
    n/(n+1)·R̂ + B/(n+1) of its risks, naive's the risks; LTT's bound is the Hoeffding–Bentkus UCB at δ; the
    guarantee is the method's text. A forged λ̂, bound or text is refused even with no loss table beside the file
    (the statistics themselves are checked against the losses only by a refit, :func:`check_refit`). A Pareto
    certificate is checked on its front instead (:func:`~hf_safe_exit.risk.pareto_integrity.certificate_problem`)."""
    if cert.method == PARETO:
        problem = certificate_problem(cert)
        if problem is not None:
            raise InconsistentCalibrationError.about(where, problem, RECALIBRATE)
        return
    grid, stat, risk = list(cert.grid), list(cert.grid_statistic), list(cert.grid_empirical_risk)
    if not grid or not (len(grid) == len(stat) == len(risk)) or not _close(grid[-1], 1.0) or any(
            not _number(v) or math.isnan(v) for v in grid + stat + risk) or any(a >= b for a, b in zip(grid, grid[1:])):
        raise CorruptFileError.about(where, "its certificate's grid is missing, unordered, without λ = 1, or not "
                                     "numbers, so its λ̂ cannot be checked", _CORRUPT_FIX)

    def forged(what: str, stated, recomputed):
        return InconsistentCalibrationError.about(
            where, f"its certificate states {what} = {stated!r}, but its own grid statistics give {recomputed!r}: the "
            "file was edited", RECALIBRATE)

    last = int(first_violation_scan(passes(cert.method, stat[::-1], cert.eps, cert.delta)))
    selected = grid[::-1][max(last, 0)]
    if not _close(selected, cert.threshold):
        raise forged("λ̂", cert.threshold, selected)
    pos = grid.index(selected)
    lower, upper = cert.loss_bounds
    outside = [r for r in risk if not lower - _TOLERANCE <= r <= upper + _TOLERANCE]
    if outside:  # a mean of losses in [lower, upper] lies in it
        raise InconsistentCalibrationError.about(
            where, f"its certificate's empirical risk {outside[0]!r} lies outside its loss bounds "
            f"{list(cert.loss_bounds)}: the file was edited", RECALIBRATE)
    expected = {"crc": [float(v) for v in crc_statistic(risk, cert.n, upper)], "naive": risk}.get(cert.method)
    if expected is not None and not all(_close(a, b) for a, b in zip(stat, expected)):
        raise forged(f"the {cert.method} statistics", stat, expected)
    if not _close(cert.empirical_risk, risk[pos]):
        raise forged("the empirical risk at λ̂", cert.empirical_risk, risk[pos])
    if cert.method == "ltt":
        bound = float(hoeffding_bentkus_ucb(cert.empirical_risk, cert.n, cert.delta, *cert.loss_bounds))
        if not _close(cert.p_value, stat[pos]):
            raise forged("the p-value at λ̂", cert.p_value, stat[pos])
    else:
        bound = stat[pos]
    if not _close(cert.risk_bound, bound):
        raise forged("the risk bound at λ̂", cert.risk_bound, bound)
    text = guarantee_text(cert.method, cert.eps, cert.delta, cert.risk)
    if cert.guarantee != text:
        raise forged("the guarantee", cert.guarantee, text)


def check_calibration_dict(data, path=None, *, digest: bool = True) -> RiskCertificate:
    """Check the content of a ``risk_control.json`` (see the module docstring); returns its certificate.

    The certificate's ``max_new_tokens``/``max_input_length`` are taken from ``calibration`` when the
    certificate predates those fields. Raises ``CorruptFileError`` or ``InconsistentCalibrationError``
    naming ``path`` (or "risk_control.json" when the dict came from elsewhere). The digest is checked last
    (``digest=False``: by the caller, after further checks), so that an edit the content checks can name is named.
    """
    where = path if path is not None else "risk_control.json"
    if not isinstance(data, dict):
        raise CorruptFileError.about(where, f"a calibration must be a JSON object, got {type(data).__name__}",
                                     _CORRUPT_FIX)
    version = data.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise CorruptFileError.about(where, f"format_version {version!r} is not a format number (an integer)",
                                     _CORRUPT_FIX)
    if version > FORMAT_VERSION:
        raise CorruptFileError.about(where, f"format {version!r} is newer than this hf_safe_exit reads "
                                     f"({FORMAT_VERSION})", "Upgrade hf_safe_exit to read it")
    missing = [k for k in ("params", "lambda_", "calibration", "certificate") if k not in data]
    if missing:
        raise CorruptFileError.about(where, f"not a complete calibration: no {', '.join(map(repr, missing))}",
                                     _CORRUPT_FIX)
    params, calibration, lam = data["params"], data["calibration"], data["lambda_"]
    if not isinstance(params, dict) or not isinstance(calibration, dict) or not isinstance(data["certificate"], dict):
        raise CorruptFileError.about(where, "'params', 'calibration' and 'certificate' must be JSON objects",
                                     _CORRUPT_FIX)
    if not _number(lam) or math.isnan(lam) or not 0.0 <= lam <= 1.0:
        raise CorruptFileError.about(where, f"lambda_={lam!r} is not a threshold in [0, 1]", _CORRUPT_FIX)
    _check_request(params, where)
    _check_settings(calibration, where)
    _check_provenance_fields(calibration, where)
    try:
        cert = RiskCertificate.from_dict(data["certificate"])
    except (TypeError, KeyError, ValueError) as err:
        raise CorruptFileError.about(where, f"its certificate is incomplete or malformed ({err})", _CORRUPT_FIX) from None
    lengths = {k: calibration[k] for k in ("max_new_tokens", "max_input_length")
               if getattr(cert, k) is None and calibration.get(k) is not None}
    if lengths:  # a certificate written before it recorded the lengths: they live in "calibration"
        cert = RiskCertificate.from_dict({**cert.to_dict(), **lengths})

    def inconsistent(what: str, stored, certified):
        return InconsistentCalibrationError.about(
            where, f"{what} is {stored!r} but its certificate says {certified!r}: the file was edited or mixed up "
            "with another calibration", RECALIBRATE)

    if not _close(lam, cert.threshold):
        raise inconsistent("lambda_ (λ̂)", lam, cert.threshold)
    if cert.grid and not any(_close(lam, g) for g in cert.grid):
        raise InconsistentCalibrationError.about(where, f"lambda_ = {lam!r} is not a threshold of its certificate's "
                                                 f"grid ({len(cert.grid)} thresholds): the file was edited", RECALIBRATE)
    _check_certificate(cert, where)
    if cert.feasible != (lam < 1.0):
        raise inconsistent("feasible (λ̂ < 1)", lam < 1.0, cert.feasible)
    for key in ("eps", "delta", "method", "risk", "monotonize"):
        if key in params and not _close(params[key], getattr(cert, key)):
            raise inconsistent(f"params.{key}", params[key], getattr(cert, key))
    if cert.method == "ucb" and "bound" in params and params["bound"] != cert.bound:
        raise inconsistent("params.bound", params["bound"], cert.bound)
    differ = calibration_problem(params, calibration, cert) if cert.method == PARETO else None
    if differ is not None:
        raise inconsistent(*differ)
    # what the guarantee is for is recorded twice, and every file written records both copies (null where unknown):
    # copies that differ, or one left out, mean an edit (a null fingerprint, task or measure changes what is checked)
    for key in ("model_fingerprint", "task", "measure"):
        if calibration.get(key) != data["certificate"].get(key):
            raise inconsistent(f"calibration.{key}", calibration.get(key), data["certificate"].get(key))
    for key in ("max_new_tokens", "max_input_length"):  # older certificates lack these: only two values can differ
        if calibration.get(key) is not None and getattr(cert, key) is not None and calibration[key] != getattr(cert, key):
            raise inconsistent(f"calibration.{key}", calibration[key], getattr(cert, key))
    if params.get("task") not in (None, calibration.get("task")):  # older files wrote the request's task= (None)
        raise InconsistentCalibrationError.about(
            where, f"params.task is {params['task']!r} but calibration.task is {calibration.get('task')!r}: the file "
            "was edited or mixed up with another calibration", RECALIBRATE)
    if digest:
        check_calibration_digest(data, where)
    return cert


def check_calibration_digest(data: dict, path) -> None:
    """Raise ``CorruptFileError`` naming ``path`` if ``data`` records a digest that its content does not give."""
    check_digest(data, path, "the calibration", RECALIBRATE)


def _check_request(params: dict, where) -> None:
    """``params`` is a :class:`~hf_safe_exit.risk.RiskController` request (and its task; files written before the
    configuration object also list the early-exit settings there)."""
    unknown = sorted(set(params) - set(REQUEST_KEYS) - {"task", *config_fields()})
    if unknown:
        raise CorruptFileError.about(where, f"its params are not those of a RiskControlled (unknown {unknown})",
                                     _CORRUPT_FIX)
    try:
        RiskController(**{k: params[k] for k in REQUEST_KEYS if k in params})
    except (TypeError, ValueError) as err:
        raise CorruptFileError.about(where, f"its params are not a valid request ({err})", _CORRUPT_FIX) from None
    missing = [k for k in _PARETO_REQUEST if k not in params] if params.get("method") == PARETO else []
    if missing:  # a default would stand in for them: another split, a fit that no longer reproduces the file's
        raise CorruptFileError.about(where, f"a Pareto calibration records its request and split, and its params have "
                                     f"no {missing}", _CORRUPT_FIX)


def _check_provenance_fields(calibration: dict, where) -> None:
    """The model fingerprint, dtype, meta head fingerprint, task and lengths of a calibration section are of their
    form. The dtype and the meta head's fingerprint are left out by files written before them, and never written as
    null; a model fingerprint and a task may be null (a calibration that does not know them, refused where used)."""
    checks = {"model_fingerprint": (is_fingerprint, "a model fingerprint (lowercase hex digits)"),
              "meta_head_fingerprint": (is_fingerprint, "a meta head fingerprint (lowercase hex digits)"),
              "dtype": (is_dtype_name, "the name of a floating-point torch dtype ('float32', 'bfloat16', ...) or "
                        "'mixed'"),
              "task": (is_task_name, "a task name"),
              "max_new_tokens": (is_length, f"a whole number in [1, {MAX_TOKENS}]"),
              "max_input_length": (is_length, f"a whole number in [1, {MAX_TOKENS}]")}
    never_null = ("dtype", "meta_head_fingerprint")
    for key, (check, must) in checks.items():
        value = calibration.get(key)
        if key in calibration and (value is not None or key in never_null) and not check(value):
            raise CorruptFileError.about(where, f"calibration.{key}={value!r} is not {must}", _CORRUPT_FIX)


# what a calibration decodes with that a loss table's metadata records besides the early-exit configuration: λ̂ is
# only valid with what the losses were collected with (an edited min_exit_layer, or a measure edited in both places
# of the json, passes every check of the json alone). Older tables lack some: only the keys a table records count.
_SETTINGS = ("task", "dtype", "meta_head_fingerprint", "max_new_tokens", "max_input_length")
_BILD_SETTINGS = ("task", "dtype", "policy", "max_new_tokens", "max_input_length")  # BiLD's has no exit settings
_LATER_KEYS = ("dtype", "meta_head_fingerprint")  # recorded since the full-weight fingerprint: older files lack them


def _table_differs(path, table_path, key, stored, recorded) -> InconsistentCalibrationError:
    return InconsistentCalibrationError.about(
        path, f"its calibration.{key} is {stored!r}, but the loss table stored beside it ('{table_path}') was collected "
        f"with {key}={recorded!r}: λ̂ holds only for the settings its losses were collected with, so one of the two "
        "files was edited or replaced", RECALIBRATE)


def check_refit(data: dict, path, table: LossTable, table_path) -> None:
    """Raise ``InconsistentCalibrationError`` unless refitting ``table`` (stored beside ``path``) gives ``data``'s λ̂.

    ``data`` must have passed :func:`check_calibration_dict`. Compares the model fingerprint, the decoding
    settings the table records (``_SETTINGS``), the number of examples, λ̂, and the certificate's grid, statistics,
    empirical risks and loss bounds (those at λ̂ are tied to these by :func:`check_calibration_dict`).
    """
    params, cert = data["params"], data["certificate"]
    risk = params.get("risk", "performance_gap")

    def differs(what: str, refit, stored):
        return InconsistentCalibrationError.about(
            path, f"{what} is {stored!r}, but refitting the loss table stored beside it ('{table_path}') with its own "
            f"settings gives {refit!r}: one of the two files was edited or replaced", RECALIBRATE)

    if risk not in table.losses:
        raise differs("its risk", f"no {risk!r} losses (only {sorted(table.losses)})", risk)
    table_fp, stored_fp = table.metadata.get("model_fingerprint"), data["calibration"].get("model_fingerprint")
    if table_fp != stored_fp:
        raise differs("its model fingerprint", table_fp, stored_fp)
    calibration = data["calibration"]
    bild = calibration.get("strategy") == "bild"
    for key in _BILD_SETTINGS if bild else _SETTINGS:
        if key in _LATER_KEYS and key not in calibration:
            continue  # a file written before it recorded them (refused at use if that matters: see provenance)
        if key in table.metadata and not _close(calibration.get(key), table.metadata.get(key)):
            raise _table_differs(path, table_path, key, calibration.get(key), table.metadata.get(key))
    if not bild and table.metadata.get("measure") is not None:  # the table records its early-exit configuration
        # a table leaves out settings at their default (anytime, exit_layers): read both through the one format
        try:
            recorded = EarlyExitConfig.from_dict(table.metadata, strict=False).to_dict()
        except ValueError as err:  # e.g. a measure name no built-in measure answers to
            raise CorruptFileError.about(table_path, f"the early-exit settings it records cannot be used ({err})",
                                         RECALIBRATE) from None
        stored = EarlyExitConfig.from_dict(calibration, strict=False).to_dict() if calibration.get("measure") is not \
            None else {}
        for key, value in recorded.items():
            if not _close(stored.get(key), value):
                raise _table_differs(path, table_path, key, stored.get(key), value)
    if table.n != cert.get("n"):
        raise differs("its number of calibration examples n", table.n, cert.get("n"))
    if params.get("method") == PARETO:  # the whole certificate, from the configuration table
        try:
            problem = refit_problem({k: params[k] for k in REQUEST_KEYS if k in params}, cert, table)
        except (TypeError, ValueError) as err:
            raise CorruptFileError.about(path, f"its params cannot be refitted ({err})", _CORRUPT_FIX) from None
        if problem is not None:
            raise differs(*problem)
        return
    try:
        sel = select(params["method"], table.lambdas, table.losses[risk], params["eps"], params.get("delta"),
                     bound=params.get("bound", "wsr"), loss_bounds=table.bounds[risk],
                     monotonize=params.get("monotonize"))
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptFileError.about(path, f"its params cannot be refitted ({err})", _CORRUPT_FIX) from None
    if not _close(sel.threshold, data["lambda_"]):
        raise differs("λ̂ (lambda_)", sel.threshold, data["lambda_"])
    # with the losses at hand every number of the certificate is recomputed, not only λ̂: a statistic at a threshold
    # the scan never reached cannot be checked from the file alone (see _check_certificate), but it can be here
    ascending = slice(None, None, -1)
    for key, refit in (("grid", sel.lambdas[ascending]), ("grid_statistic", sel.statistic[ascending]),
                       ("grid_empirical_risk", sel.empirical_risk[ascending]), ("loss_bounds", table.bounds[risk])):
        stored = cert.get(key)
        if not isinstance(stored, (list, tuple)) or len(stored) != len(refit):
            raise differs(f"its certificate's {key}", f"{len(refit)} values", stored)
        wrong = [i for i, (a, b) in enumerate(zip(refit, stored)) if not _close(float(a), b)]
        if wrong:
            raise differs(f"its certificate's {key}[{wrong[0]}]", float(refit[wrong[0]]), stored[wrong[0]])
