"""``RiskCertificate``: what a risk-controlled threshold guarantees, for which model, data and decoding.

Its JSON form (the ``certificate`` of a ``risk_control.json``) is checked field by field when read
(:func:`check_certificate_fields`): every number typed and in range, the method's δ, bound and p-value as the method
has them, before anything computes with them. Whether the numbers agree with each other is
:mod:`hf_safe_exit.risk.integrity`'s check.

``method="pareto"`` (Pareto Testing, Laufer-Goldshtein et al., ICLR 2023, Algorithm 1) certifies one configuration of
a :class:`~hf_safe_exit.risk.ConfigurationTable`; its certificate also records the split (``n_opt``, ``n_test``,
``opt_fraction``, ``seed``), the cost minimised, the front in testing order with its estimates and p-values, how
many nulls were rejected, and the configuration chosen. Only a Pareto certificate has these fields (they are left
out of the others' JSON form).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields

from .configuration_table import check_setting
from .loss_table import MAX_TOKENS, RISKS, check_task_name
from .pareto import P_VALUES
from .provenance import is_fingerprint
from .selection import BOUNDS, METHODS, MONOTONIZE, check_method_and_delta

__all__ = ["RiskCertificate", "CERTIFIED_METHODS", "PARETO", "PARETO_FIELDS", "check_certificate_fields",
           "guarantee_text", "infeasible_message", "is_length", "is_task_name"]

PARETO = "pareto"
CERTIFIED_METHODS = (*METHODS, PARETO)  # what a RiskController fits: the scalar-λ methods and Pareto Testing


@dataclass(frozen=True)
class RiskCertificate:
    """What was guaranteed, for which model and data. Grid lists are in ascending λ order.

    ``risk_bound`` is the quantity compared with ε at λ̂: R̂ (naive), n/(n+1)·R̂ + B/(n+1)
    (crc), the UCB (ucb), or the Hoeffding–Bentkus UCB at level δ (ltt, whose test itself
    uses ``p_value`` ≤ δ). ``feasible`` is False when no λ < 1 qualified (then λ̂ = 1).

    For ``pareto``, ``empirical_risk`` and ``risk_bound`` are the decoded configuration's mean loss and its upper
    confidence bound (the p-value's inequality) on the testing part D_test, ``p_value`` its p-value (both None when no
    null was rejected); the bound is reported, the guarantee is P(R(chosen) > ε) ≤ δ (Laufer-Goldshtein et al.,
    ICLR 2023). ``feasible`` is False when nothing below the full model was certified (then threshold 1).

    ``max_new_tokens`` / ``max_input_length``: the lengths the calibration decoded with (None if its
    losses did not record them). The guarantee is for outputs made the same way, so ``generate`` uses
    them by default and warns when a call departs from them.
    """

    eps: float
    delta: float | None
    method: str
    bound: str | None
    risk: str
    monotonize: str | None
    n: int
    threshold: float  # λ̂
    empirical_risk: float
    risk_bound: float
    p_value: float | None
    feasible: bool
    guarantee: str
    loss_bounds: tuple[float, float]
    grid: list[float] = field(default_factory=list)
    grid_empirical_risk: list[float] = field(default_factory=list)
    grid_statistic: list[float] = field(default_factory=list)
    model_fingerprint: str | None = None
    task: str | None = None
    measure: str | None = None
    max_new_tokens: int | None = None
    max_input_length: int | None = None
    # method "pareto" only (None otherwise): the configuration decoded (its settings with "threshold", and its row of
    # the table: the default full-model row when nothing was certified), the split, the cost minimised, the front in
    # testing order (row indices, risk and cost estimated on D_opt, p-values on D_test) and how many were rejected
    configuration: dict | None = None
    configuration_index: int | None = None
    num_configurations: int | None = None
    n_opt: int | None = None
    n_test: int | None = None
    opt_fraction: float | None = None
    seed: int | None = None
    cost: str | None = None
    front: list | None = None
    front_risk: list | None = None
    front_cost: list | None = None
    front_p_value: list | None = None
    num_rejected: int | None = None

    @property
    def front_size(self) -> int | None:
        """How many configurations the Pareto front held (method "pareto"; None otherwise)."""
        return None if self.front is None else len(self.front)

    def to_dict(self) -> dict:
        """The JSON form; λ̂ keeps the key ``lambda_hat`` that every stored calibration has (the file format). The
        Pareto fields are written by Pareto certificates only."""
        data = asdict(self)
        data["lambda_hat"] = data.pop("threshold")
        if self.method != PARETO:
            for key in PARETO_FIELDS:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RiskCertificate":
        """The certificate of a JSON form, after :func:`check_certificate_fields` (``ValueError`` naming the first
        field that is missing, unknown, mistyped or out of range)."""
        check_certificate_fields(data)
        data = dict(data)
        data["threshold"] = data.pop("lambda_hat")
        data["loss_bounds"] = tuple(float(v) for v in data["loss_bounds"])
        return cls(**data)


# ------------------------------------------------------------------------------------------ the JSON form's fields
def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite(value) -> bool:
    return _real(value) and math.isfinite(value)


def _numbers(value, each) -> bool:
    return isinstance(value, (list, tuple)) and all(each(v) for v in value)


def is_length(value) -> bool:
    """Whether ``value`` can be a recorded length (``max_new_tokens``, ``max_input_length``): a whole number in
    [1, ``MAX_TOKENS``]."""
    return _real(value) and math.isfinite(value) and float(value).is_integer() and 1 <= value <= MAX_TOKENS


def is_task_name(value) -> bool:
    """Whether ``value`` can name a task (:func:`~hf_safe_exit.risk.loss_table.check_task_name`)."""
    try:
        return check_task_name(value) is not None
    except ValueError:
        return False


def _optional(check):
    return lambda value: value is None or check(value)


def _count(least: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= least


def _setting(value) -> bool:
    try:
        return check_setting(value) == value
    except (TypeError, ValueError):
        return False


# field (as the JSON form names it) -> (its check, what it must be); the certificate's every field, in one place
_FIELD_CHECKS = {
    "eps": (lambda v: _finite(v) and 0 < v < 1, "a number in (0, 1)"),
    "delta": (_optional(lambda v: _finite(v) and 0 < v < 1), "null or a number in (0, 1)"),
    "method": (lambda v: isinstance(v, str) and v in CERTIFIED_METHODS, f"one of {list(CERTIFIED_METHODS)}"),
    "bound": (_optional(lambda v: isinstance(v, str) and v in BOUNDS), f"null or one of {list(BOUNDS)}"),
    "risk": (lambda v: isinstance(v, str) and v in RISKS, f"one of {list(RISKS)}"),
    "monotonize": (lambda v: v is None or isinstance(v, str) and v in MONOTONIZE, f"one of {list(MONOTONIZE)}"),
    "n": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
          "a positive integer (the number of calibration examples)"),
    "lambda_hat": (lambda v: _finite(v) and 0 <= v <= 1, "a threshold in [0, 1]"),
    "empirical_risk": (_finite, "a finite number"),
    "risk_bound": (_optional(lambda v: _real(v) and not math.isnan(v)), "a number (null: Pareto certified nothing)"),
    "p_value": (_optional(lambda v: _finite(v) and 0 <= v <= 1), "null or a probability in [0, 1]"),
    "feasible": (lambda v: isinstance(v, bool), "true or false"),
    "guarantee": (lambda v: isinstance(v, str), "a string"),
    "loss_bounds": (lambda v: _numbers(v, _finite) and len(v) == 2 and v[0] < v[1],
                    "two finite numbers [lower, upper] with lower < upper"),
    "grid": (lambda v: _numbers(v, lambda x: _finite(x) and 0 <= x <= 1), "a list of thresholds in [0, 1]"),
    "grid_empirical_risk": (lambda v: _numbers(v, _finite), "a list of finite numbers"),
    "grid_statistic": (lambda v: _numbers(v, lambda x: _real(x) and not math.isnan(x)), "a list of numbers"),
    "model_fingerprint": (_optional(is_fingerprint), "null or a model fingerprint (lowercase hex digits)"),
    "task": (_optional(is_task_name), "null or a task name"),
    "measure": (_optional(lambda v: isinstance(v, str)), "null or a measure's name"),
    "max_new_tokens": (_optional(is_length), f"null or a whole number in [1, {MAX_TOKENS}]"),
    "max_input_length": (_optional(is_length), f"null or a whole number in [1, {MAX_TOKENS}]"),
    # the Pareto fields, checked for a Pareto certificate (a null one is refused there)
    "configuration": (_setting, "a configuration: an EarlyExitConfig's settings (a built-in measure) and its "
                      "'threshold' in [0, 1], as ConfigurationTable.settings holds them"),
    "configuration_index": (_count(0), "a row index (an integer >= 0)"),
    "num_configurations": (_count(1), "a whole number >= 1"),
    "n_opt": (_count(1), "a whole number >= 1"),
    "n_test": (_count(1), "a whole number >= 1"),
    "opt_fraction": (lambda v: _finite(v) and 0 < v < 1, "a number in (0, 1)"),
    "seed": (_count(0), "a whole number >= 0 (the split's seed)"),
    "cost": (lambda v: isinstance(v, str) and bool(v), "the name of a cost"),
    "front": (lambda v: _numbers(v, _count(0)) and len(v) >= 1 and len(set(v)) == len(v),
              "a non-empty list of distinct row indices"),
    "front_risk": (lambda v: _numbers(v, _finite), "a list of finite numbers"),
    "front_cost": (lambda v: _numbers(v, _finite), "a list of finite numbers"),
    "front_p_value": (lambda v: _numbers(v, lambda x: _finite(x) and 0 <= x <= 1), "a list of probabilities"),
    "num_rejected": (_count(0), "a whole number >= 0"),
}
PARETO_FIELDS = ("configuration", "configuration_index", "num_configurations", "n_opt", "n_test", "opt_fraction",
                 "seed", "cost", "front", "front_risk", "front_cost", "front_p_value", "num_rejected")
# written since the first format; the lengths came later (a certificate without them takes its calibration's)
_LATER_FIELDS = ("max_new_tokens", "max_input_length")


def check_certificate_fields(data) -> None:
    """Raise ``ValueError`` (one line: the field, its value, what it must be) unless ``data``, a certificate's JSON
    form, has every field a certificate has (the lengths may be absent), none else, each of its type and in its range,
    and the method's own δ, bound and p-value: δ for ucb and ltt only, the bound a UCB's for ucb, Hoeffding–Bentkus
    for ltt and none otherwise, a p-value for ltt only (what :class:`~hf_safe_exit.risk.RiskController` writes)."""
    if not isinstance(data, dict):
        raise ValueError(f"a certificate must be a JSON object, not {type(data).__name__}")
    names = {"lambda_hat" if f.name == "threshold" else f.name for f in fields(RiskCertificate)}
    pareto = data.get("method") == PARETO
    missing = sorted(names - set(data) - set(_LATER_FIELDS) - (set() if pareto else set(PARETO_FIELDS)))
    unknown = sorted(set(data) - names)
    if missing or unknown:
        raise ValueError(f"no {missing}" if missing else f"{unknown} are not fields of a certificate")
    scalar_pareto = [k for k in PARETO_FIELDS if not pareto and data.get(k) is not None]
    if scalar_pareto:
        raise ValueError(f"{scalar_pareto} are recorded by method 'pareto' only, not {data.get('method')!r}")
    for key, (check, must) in _FIELD_CHECKS.items():
        if key in data and (data[key] is not None or key not in PARETO_FIELDS) and not check(data[key]):
            raise ValueError(f"{key}={data[key]!r} must be {must}")
    method = data["method"]
    if pareto:
        return _check_pareto_fields(data)
    if data["risk_bound"] is None:
        raise ValueError(f"risk_bound=None: method {method!r} records the bound it compared with ε")
    check_method_and_delta(method, data["delta"])
    bound = {"ltt": "hoeffding_bentkus", "crc": None, "naive": None}.get(method, data["bound"])
    if data["bound"] != bound or (method == "ucb" and bound is None):
        raise ValueError(f"bound={data['bound']!r} is not the bound of method {method!r} "
                         f"({'one of ' + str(list(BOUNDS)) if method == 'ucb' else bound!r})")
    if (data["p_value"] is None) != (method != "ltt"):
        raise ValueError(f"p_value={data['p_value']!r}: only method 'ltt' tests a p-value, and it records one")


def _check_pareto_fields(data: dict) -> None:
    """A Pareto certificate: δ given, the p-value's name as its bound, no monotonisation, no λ grid, the front's lists
    aligned, the split's parts summing to n, and a p-value and bound exactly when a null was rejected."""
    if data["delta"] is None:
        raise ValueError("delta=None: method 'pareto' controls the risk with probability 1 − delta and records it")
    if data["bound"] not in P_VALUES:
        raise ValueError(f"bound={data['bound']!r} is not a p-value of method 'pareto' (one of {list(P_VALUES)})")
    if data["monotonize"] is not None or data["grid"] or data["grid_empirical_risk"] or data["grid_statistic"]:
        raise ValueError("method 'pareto' has no monotonize and no λ grid (grid lists empty)")
    size = len(data["front"])
    aligned = all(len(data[k]) == size for k in ("front_risk", "front_cost", "front_p_value"))
    if not aligned or data["num_rejected"] > size:
        raise ValueError(f"the front's lists must have one entry per front configuration ({size}) and num_rejected="
                         f"{data['num_rejected']!r} at most that many")
    if data["n_opt"] + data["n_test"] != data["n"]:
        raise ValueError(f"n_opt={data['n_opt']!r} + n_test={data['n_test']!r} must be n={data['n']!r}")
    if max(data["front"]) >= data["num_configurations"] or data["configuration_index"] >= data["num_configurations"]:
        raise ValueError(f"a row index lies outside the num_configurations={data['num_configurations']!r} rows")
    if (data["p_value"] is None) != (data["num_rejected"] == 0) or \
            (data["risk_bound"] is None) != (data["num_rejected"] == 0):
        raise ValueError(f"p_value={data['p_value']!r} / risk_bound={data['risk_bound']!r}: method 'pareto' records "
                         "the chosen configuration's p-value and bound exactly when it rejected a null")


def guarantee_text(method: str, eps: float, delta: float | None, risk: str) -> str:
    """The guarantee of ``method`` at (ε, δ) in words, as a certificate states it."""
    if method == PARETO:
        return f"P({risk} risk of the chosen configuration ≤ {eps:g}) ≥ {1 - delta:g}"
    if method == "crc":
        return f"E[{risk}(λ̂) on a new example] ≤ {eps:g}"
    if method in ("ucb", "ltt"):
        return f"P({risk} risk at λ̂ ≤ {eps:g}) ≥ {1 - delta:g}"
    return "none (naive empirical risk, for comparison only)"


def infeasible_message(method: str, eps: float, delta: float | None, sel, upper: float) -> str:
    """Why no λ < 1 passed the test of ``sel`` (a :class:`~hf_safe_exit.risk.selection.Selection`), and what λ̂ = 1
    means for decoding. ``upper``: the upper bound B of the losses (CRC's minimum ε is B/(n+1))."""
    compared = "its p-value" if method == "ltt" else "its risk bound"
    limit = f"δ = {delta:g}" if method == "ltt" else f"ε = {eps:g}"
    if not sel.passed[0]:  # the largest threshold, λ = 1 (the full model), already fails
        why = (f"n={sel.n} calibration examples are too few for this test: even at λ = 1, the full model, where the "
               f"empirical risk is {sel.empirical_risk[0]:.3g}, {compared} is {sel.statistic[0]:.3g} > {limit}; "
               "so no λ < 1 can pass either")
    else:
        why = (f"no λ < 1 passes the test with n={sel.n} calibration examples: at the largest, λ = "
               f"{sel.lambdas[1]:g}, the empirical risk is {sel.empirical_risk[1]:.3g} and {compared} "
               f"{sel.statistic[1]:.3g} > {limit}")
    crc = f" (CRC needs eps ≥ B/(n+1) = {upper / (sel.n + 1):.3g})" if method == "crc" else ""
    return (f"RiskControlled({method}, eps={eps:g}{'' if delta is None else f', delta={delta:g}'}): {why}. So "
            "λ̂ = 1: the model decodes at λ = 1, running every decoder layer for every token (it never exits early: "
            f"the full model's output, no speed-up). Raise eps (or delta), or calibrate on more examples{crc}.")
