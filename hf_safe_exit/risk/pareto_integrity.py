"""Integrity of a stored Pareto calibration (``method="pareto"``): its certificate re-derived, alone and from its table.

A Pareto certificate (Laufer-Goldshtein et al., ICLR 2023, Algorithm 1; :mod:`hf_safe_exit.risk.pareto_fit`) records
the front in testing order with its D_opt estimates and D_test p-values. From the file alone
(:func:`certificate_problem`): the split sizes follow from n, ``opt_fraction`` and the seed; the front is a Pareto
front of its estimates, ordered by estimated risk; fixed-sequence testing of its p-values at δ rejects
``num_rejected`` nulls; the configuration decoded is the cheapest rejected one (else the full model at threshold 1);
λ̂, ``feasible``, the measure and the guarantee follow. With the :class:`~hf_safe_exit.risk.ConfigurationTable`
stored beside it (:func:`refit_problem`), the whole certificate is recomputed and compared.

These functions return what is wrong (``None``: nothing); :mod:`hf_safe_exit.risk.integrity` turns it into the
refusal that names the file.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np

from ..config import EarlyExitConfig
from .certificate import RiskCertificate, guarantee_text
from .configuration_table import ConfigurationTable
from .controller import RiskController
from .pareto import pareto_front, split_examples

__all__ = ["calibration_problem", "certificate_problem", "refit_problem"]

_TOLERANCE = 1e-12


def _close(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    number = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (a, b))
    return a == b or (number and math.isclose(a, b, rel_tol=_TOLERANCE, abs_tol=_TOLERANCE))


def _rejected(p_values, delta: float) -> int:
    """Fixed-sequence testing: the length of the leading run of p-values ≤ δ."""
    passed = [p <= delta for p in p_values]
    return passed.index(False) if False in passed else len(passed)


def certificate_problem(cert: RiskCertificate) -> str | None:
    """What a Pareto certificate states that its own fields contradict (see the module docstring), or None."""
    def stated(what: str, value, recomputed) -> str:
        return (f"its certificate states {what} = {value!r}, but its own front statistics give {recomputed!r}: the "
                "file was edited")

    n_opt = int(split_examples(cert.n, cert.opt_fraction, cert.seed)[0].size)
    if cert.n_opt != n_opt:
        return stated("n_opt", cert.n_opt, n_opt)
    risk, cost, front = (np.asarray(v, dtype=np.float64) for v in (cert.front_risk, cert.front_cost, cert.front))
    if pareto_front(risk, cost).size != risk.size:
        return "its certificate's front holds a configuration another one dominates: the file was edited"
    if not np.array_equal(np.lexsort((front, risk)), np.arange(risk.size)):
        return "its certificate's front is not in the testing order (estimated risk ascending): the file was edited"
    k = _rejected(cert.front_p_value, cert.delta)
    if cert.num_rejected != k:
        return stated("num_rejected", cert.num_rejected, k)
    if k:  # the cheapest rejected; ties to the lower estimated risk, then the lower row (pareto._cheapest)
        pos = int(np.lexsort((front[:k], risk[:k], cost[:k]))[0])
        if cert.configuration_index != int(front[pos]):
            return stated("the configuration chosen (row)", cert.configuration_index, int(front[pos]))
        if not _close(cert.p_value, cert.front_p_value[pos]):
            return stated("the p-value of the configuration chosen", cert.p_value, cert.front_p_value[pos])
    elif cert.configuration["threshold"] != 1.0:
        return stated("the threshold decoded when nothing is certified", cert.configuration["threshold"], 1.0)
    lower, upper = cert.loss_bounds
    outside = [r for r in [cert.empirical_risk, *cert.front_risk] if not lower - _TOLERANCE <= r <= upper + _TOLERANCE]
    if outside:
        return (f"its certificate's risk {outside[0]!r} lies outside its loss bounds {list(cert.loss_bounds)}: the file "
                "was edited")
    derived = {"λ̂": (cert.threshold, cert.configuration["threshold"]),
               "feasible": (cert.feasible, bool(k) and cert.configuration["threshold"] < 1.0),
               "the measure": (cert.measure, cert.configuration["measure"]),
               "the guarantee": (cert.guarantee, guarantee_text(cert.method, cert.eps, cert.delta, cert.risk))}
    for what, (value, recomputed) in derived.items():
        if not _close(value, recomputed):
            return stated(what, value, recomputed)
    return None


def calibration_problem(params: dict, calibration: dict, cert: RiskCertificate) -> tuple[str, object, object] | None:
    """``(what, stored, certified)`` where a Pareto file's request or settings differ from its certificate's: the
    p-value, split share and seed, and the early-exit configuration (the certificate's, its threshold aside)."""
    for key, certified in (("p_value", cert.bound), ("opt_fraction", cert.opt_fraction), ("seed", cert.seed)):
        if key in params and not _close(params[key], certified):
            return f"params.{key}", params[key], certified
    stored = EarlyExitConfig.from_dict(calibration, strict=False).to_dict()
    chosen = {k: v for k, v in cert.configuration.items() if k != "threshold"}
    if stored != chosen:
        return "its early-exit configuration", stored, chosen
    return None


def refit_problem(request: dict, certificate: dict, table: ConfigurationTable) -> tuple[str, object, object] | None:
    """``(what, refit, stored)`` for the first field of the stored ``certificate`` (JSON form) that refitting
    ``request`` on ``table`` (the configuration table stored beside it) does not give, or None. Raises
    ``ValueError`` when the request cannot be refitted on it (another risk or cost than the table's)."""
    if not isinstance(table, ConfigurationTable):
        raise ValueError(f"a Pareto calibration is refitted on a ConfigurationTable, not a {type(table).__name__}")
    meta = table.metadata
    about = {"model_fingerprint": meta.get("model_fingerprint"), "task": meta.get("task"),
             **{k: int(meta[k]) for k in ("max_new_tokens", "max_input_length") if meta.get(k) is not None}}
    with warnings.catch_warnings():  # nothing certified warns at fit time; here only the numbers matter
        warnings.simplefilter("ignore", UserWarning)
        refit = RiskController(**request).fit_table(table, cost=certificate.get("cost"), about=about)
    for key, value in refit.certificate.to_dict().items():
        if key in ("max_new_tokens", "max_input_length") and certificate.get(key) is None:
            continue  # what the calibration section holds (checked against the table by integrity.check_refit)
        if not _close(value, certificate.get(key)):
            return f"its certificate's {key}", value, certificate.get(key)
    return None
