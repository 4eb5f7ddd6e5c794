"""What a :class:`~hf_safe_exit.monitor.RiskMonitor` is asked to watch, checked: the policy, the sampling, the risk and
its level ε, and what :meth:`~hf_safe_exit.monitor.RiskMonitor.record` is given; each refused in one line naming the
value and the fix.

The ε tested is the policy's own when the monitor watches the risk the policy controls; a policy calibrated on another
risk (the performance gap, which needs labels) is watched only at an ε the user states (a separate promise).
"""

from __future__ import annotations

import numbers

from ..risk.controlled import RiskControlled

__all__ = ["MONITORED_RISKS", "SAMPLING", "check_policy", "check_level", "check_settings", "monitored_eps",
           "check_texts", "check_references"]

#: the risk a monitor tests -> the range of its per-example loss
MONITORED_RISKS = {"consistency": (0.0, 1.0), "performance_gap": (-1.0, 1.0), "performance_gap_bounded": (0.0, 1.0)}
#: what ``sample_rate`` applies to: each row independently, or each call (all its rows together)
SAMPLING = ("row", "call")


def check_policy(policy) -> RiskControlled:
    """``policy`` if it is a :class:`~hf_safe_exit.RiskControlled` (fitted or not), else a ``TypeError``."""
    if not isinstance(policy, RiskControlled):
        raise TypeError(f"RiskMonitor watches a risk-controlled policy, got {type(policy).__name__}: pass "
                        "hf_safe_exit.RiskControlled(eps, ...) (fitted or not), which says the risk and ε to watch.")
    return policy


def check_level(name: str, value) -> float:
    """``value`` as a float if it is a number in (0, 1), else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value < 1.0:
        raise ValueError(f"{name}={value!r} must be a number in (0, 1).")
    return float(value)


def check_settings(sample_rate, sample, risk, fallback, seed) -> None:
    """Raise a one-line ``ValueError`` for the first setting out of its domain."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) or not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate={sample_rate!r} must be in (0, 1]: the probability that a row (sample='call': a "
                         "call) is also decoded by the full model (e.g. 0.05).")
    if sample not in SAMPLING:
        raise ValueError(f"sample={sample!r} is unknown: use 'row' (each row with probability sample_rate) or 'call' "
                         "(all rows of a call together, with probability sample_rate).")
    if risk not in MONITORED_RISKS:
        raise ValueError(f"risk={risk!r} is unknown: use one of {sorted(MONITORED_RISKS)}.")
    if not isinstance(fallback, bool):
        raise ValueError(f"fallback={fallback!r} must be True or False.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
        raise ValueError(f"seed={seed!r} must be an integer >= 0 or None.")


def monitored_eps(policy: RiskControlled, risk: str, eps) -> float:
    """The ε a monitor of ``risk`` tests: ``eps`` if given, else the policy's when it controls that same risk."""
    if eps is not None:
        return check_level("eps", eps)
    if policy.risk == risk:
        return float(policy.eps)
    if risk == "consistency":
        raise ValueError(
            f"the policy controls risk={policy.risk!r}, which needs labels, but the shadow decodes measure consistency "
            "l(y_lambda, y_1): calibrate with RiskControlled(..., risk='consistency'), or pass eps= for the "
            "consistency level you accept, or monitor with risk='performance_gap' and feed labels with record().")
    raise ValueError(f"the policy controls risk={policy.risk!r} at eps={policy.eps}, not {risk!r}: pass eps= for the "
                     f"{risk} level you accept, or monitor risk={policy.risk!r}.")


def check_texts(name: str, values, n: int | None = None) -> list[str]:
    """``values`` as a list if it is a list or tuple of strings (of ``n`` entries, if given), else a one-line error."""
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise TypeError(f"{name} must be a list of strings (decoded texts), got {type(values).__name__}.")
    if n is not None and len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} predictions: pass one per prediction.")
    return list(values)


def check_references(references, n: int, risk: str) -> list:
    """One reference per prediction, in a list or tuple (a string is one text, not a list of references)."""
    if not isinstance(references, (list, tuple)):
        raise TypeError(f"a {risk} monitor needs references as a list with one reference per prediction ({n}), got "
                        f"{type(references).__name__}.")
    if len(references) != n:
        raise ValueError(f"a {risk} monitor needs one reference per prediction ({n}), got {len(references)}.")
    return list(references)
