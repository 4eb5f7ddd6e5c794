"""``RiskController``: choose the threshold λ̂ from calibration losses, with a distribution-free guarantee.

An estimator in the style of MAPIE's controllers: set the request (ε, δ, method, ...), ``fit`` it on a loss matrix
(or ``fit_table`` on a :class:`~hf_safe_exit.risk.LossTable`), then read ``threshold`` (λ̂) and ``certificate``.
It knows nothing of models or files: :class:`~hf_safe_exit.risk.Calibration` ties a fit to the model and the
early-exit configuration its losses were collected with, and stores it.

Guarantees (Jazbec, Timans et al. 2024, "Fast yet Safe", Sec. 3), for the chosen risk R(λ):
``crc``: E[R_test(λ̂)] ≤ ε (Angelopoulos et al. 2022); ``ucb``: P(R(λ̂) ≤ ε) ≥ 1 − δ (Bates et al. 2021;
Waudby-Smith & Ramdas 2024 for ``bound="wsr"``); ``ltt``: the same, by fixed-sequence testing (Angelopoulos et
al. 2021); ``naive``: none. ``pareto`` (Pareto Testing, Laufer-Goldshtein et al., ICLR 2023, Algorithm 1) chooses a
whole configuration (settings and λ) of a :class:`~hf_safe_exit.risk.ConfigurationTable`: P(R(chosen) > ε) ≤ δ
(:mod:`hf_safe_exit.risk.pareto_fit`).
"""

from __future__ import annotations

import numbers
import warnings

from .bounds import check_level, hoeffding_bentkus_ucb
from .certificate import CERTIFIED_METHODS, PARETO, RiskCertificate, guarantee_text, infeasible_message
from .configuration_table import ConfigurationTable
from .loss_table import DEFAULT_LOSS_BOUNDS, RISKS, LossTable
from .pareto import P_VALUES
from .pareto_fit import DEFAULT_COST, fit_pareto
from .selection import BOUNDS, MONOTONIZE, check_method_and_delta, select

__all__ = ["RiskController"]


class RiskController:
    """Pick λ̂ from ``losses[k, j]`` (example j decoded at threshold ``thresholds[k]``; λ = 1 must be on the grid).

    Args:
        eps: target risk ε in (0, 1).
        delta: failure probability δ in (0, 1); required by ``ucb``/``ltt``, refused by ``crc``/``naive``.
        method: ``"crc"`` (in expectation), ``"ucb"`` or ``"ltt"`` (with probability 1 − δ), ``"naive"``; or
            ``"pareto"`` (with probability 1 − δ, over the configurations of a ``ConfigurationTable``).
        bound: the upper confidence bound of ``method="ucb"``: ``"wsr"`` (default), ``"hoeffding"``,
            ``"hoeffding_bentkus"``.
        risk: ``"performance_gap"`` (unrestricted, default), ``"performance_gap_bounded"``, ``"consistency"``.
        monotonize: ``None`` or ``"per_example"`` (see :mod:`hf_safe_exit.risk.selection`).
        p_value, opt_fraction, seed: ``method="pareto"`` only: the p-value (``"hoeffding_bentkus"``, default, or
            ``"wsr"``), the share of examples that finds the front (default 0.5), the split's seed (default 0: the
            split is part of the request, so that a stored fit can be recomputed).

    Fitted attributes: ``threshold`` (λ̂; 1 when no λ < 1 qualifies, with a warning) and ``certificate``; with
    ``pareto`` also ``index`` (the chosen row of the table) and ``config`` (its :class:`~hf_safe_exit.EarlyExitConfig`).
    """

    def __init__(self, eps: float, delta: float | None = None, method: str = "crc", bound: str = "wsr",
                 risk: str = "performance_gap", monotonize: str | None = None, *, p_value: str | None = None,
                 opt_fraction: float | None = None, seed: int | None = None):
        self.eps = check_level(eps, "eps")
        if method not in CERTIFIED_METHODS:
            raise ValueError(f"method={method!r} is unknown: use one of {CERTIFIED_METHODS}.")
        if method == PARETO:
            self.delta, (p_value, opt_fraction, seed) = _pareto_request(delta, bound, monotonize, p_value,
                                                                        opt_fraction, seed)
        else:
            self.delta = check_method_and_delta(method, delta)
            given = [k for k, v in (("p_value", p_value), ("opt_fraction", opt_fraction), ("seed", seed)) if v is not None]
            if given:
                raise ValueError(f"{', '.join(given)} configure Pareto Testing (method='pareto'), not method={method!r}: "
                                 "drop them, or use method='pareto' on a ConfigurationTable.")
        self.p_value, self.opt_fraction, self.seed = p_value, opt_fraction, seed
        if bound not in BOUNDS:
            raise ValueError(f"bound={bound!r} is unknown: use one of {BOUNDS}.")
        if risk not in RISKS:
            raise ValueError(f"risk={risk!r} is unknown: use one of {RISKS}.")
        if monotonize not in MONOTONIZE:
            raise ValueError(f"monotonize={monotonize!r} is unknown: use None or 'per_example'.")
        self.method, self.bound, self.risk, self.monotonize = method, bound, risk, monotonize
        self.threshold: float | None = None
        self.certificate: RiskCertificate | None = None
        self.index: int | None = None
        self.config = None

    def get_params(self) -> dict:
        """The request: what a stored calibration records and a refit must repeat (for ``pareto``: its p-value,
        split share and seed in place of ``bound``)."""
        if self.method == PARETO:
            return {"eps": self.eps, "delta": self.delta, "method": self.method, "risk": self.risk,
                    "monotonize": self.monotonize, "p_value": self.p_value, "opt_fraction": self.opt_fraction,
                    "seed": self.seed}
        return {"eps": self.eps, "delta": self.delta, "method": self.method, "bound": self.bound, "risk": self.risk,
                "monotonize": self.monotonize}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items() if v is not None)
        fitted = "" if self.threshold is None else f", threshold={self.threshold:.4g}"
        return f"RiskController({params}{fitted})"

    def fit(self, thresholds, losses, loss_bounds=None, *, about: dict | None = None) -> "RiskController":
        """Choose λ̂ from a loss matrix. ``loss_bounds`` defaults to the range of ``risk`` ((−1, 1) for the
        unrestricted gap, (0, 1) otherwise). ``about``: what the losses were collected on, copied into the
        certificate (``model_fingerprint``, ``task``, ``measure``, ``max_new_tokens``, ``max_input_length``)."""
        if self.method == PARETO:
            raise ValueError("method='pareto' chooses among configurations: fit it on a ConfigurationTable with "
                             "fit_table(table, cost=...), not on one λ grid's losses.")
        about = dict(about or {})
        bounds = tuple(loss_bounds) if loss_bounds is not None else DEFAULT_LOSS_BOUNDS[self.risk]
        sel = select(self.method, thresholds, losses, self.eps, self.delta, bound=self.bound, loss_bounds=bounds,
                     monotonize=self.monotonize)
        pos = sel.position
        empirical, statistic = float(sel.empirical_risk[pos]), float(sel.statistic[pos])
        p_value, risk_bound = None, statistic
        if self.method == "ltt":  # LTT tests p-values; its risk bound is the Hoeffding–Bentkus UCB at δ
            p_value, risk_bound = statistic, float(hoeffding_bentkus_ucb(empirical, sel.n, self.delta, *bounds))
        ascending = slice(None, None, -1)
        self.certificate = RiskCertificate(
            eps=self.eps, delta=self.delta, method=self.method, bound={"ucb": self.bound, "ltt": "hoeffding_bentkus"}
            .get(self.method), risk=self.risk, monotonize=self.monotonize, n=sel.n, threshold=sel.threshold,
            empirical_risk=empirical, risk_bound=risk_bound, p_value=p_value, feasible=sel.feasible,
            guarantee=guarantee_text(self.method, self.eps, self.delta, self.risk), loss_bounds=bounds,
            grid=sel.lambdas[ascending].tolist(), grid_empirical_risk=sel.empirical_risk[ascending].tolist(),
            grid_statistic=sel.statistic[ascending].tolist(), model_fingerprint=about.get("model_fingerprint"),
            task=about.get("task"), measure=about.get("measure"), max_new_tokens=about.get("max_new_tokens"),
            max_input_length=about.get("max_input_length"))
        self.threshold = float(sel.threshold)
        if not sel.feasible:
            warnings.warn(infeasible_message(self.method, self.eps, self.delta, sel, bounds[1]), UserWarning,
                          stacklevel=3)
        return self

    def fit_table(self, table, *, cost: str | None = None, about: dict | None = None) -> "RiskController":
        """:meth:`fit` on a :class:`LossTable`'s losses for ``risk`` and their bounds; for ``method="pareto"``, Pareto
        Testing on a :class:`~hf_safe_exit.risk.ConfigurationTable`, minimising its cost ``cost`` (default
        ``"layer_fraction"``), which sets ``index`` and ``config`` too."""
        if self.method == PARETO:
            fit = fit_pareto(table, eps=self.eps, delta=self.delta, risk=self.risk, p_value=self.p_value,
                             opt_fraction=self.opt_fraction, seed=self.seed,
                             cost=DEFAULT_COST if cost is None else cost, about=about)
            self.threshold, self.certificate, self.index, self.config = fit.threshold, fit.certificate, fit.index, \
                fit.config
            return self
        if isinstance(table, ConfigurationTable):
            raise ValueError(f"This is a multi-configuration table: method={self.method!r} calibrates λ for one "
                             "configuration. Use method='pareto' (it chooses the configuration too), or that "
                             "configuration's 1-D λ table.")
        if cost is not None:
            raise ValueError(f"cost={cost!r} is what method='pareto' minimises; method={self.method!r} has none: "
                             "drop it.")
        if not isinstance(table, LossTable):
            raise ValueError(f"fit_table expects a LossTable, got {type(table).__name__}; use fit(thresholds, "
                             "losses) for a raw matrix.")
        if self.risk not in table.losses:
            raise ValueError(f"This loss table has no {self.risk!r} losses (it has {sorted(table.losses)}): pick one "
                             "of those with risk=..., or rebuild the table with them.")
        return self.fit(table.lambdas, table.losses[self.risk], table.bounds[self.risk], about=about)

    def predict(self) -> float:
        """λ̂ (MAPIE's fit-then-predict): the threshold to decode with."""
        if self.threshold is None:
            raise ValueError("This RiskController is not fitted: call fit(thresholds, losses) or fit_table(table).")
        return self.threshold


def _pareto_request(delta, bound, monotonize, p_value, opt_fraction, seed):
    """δ and (p_value, opt_fraction, seed) of a ``method="pareto"`` request, checked, with their defaults."""
    if delta is None:
        raise ValueError("method='pareto' controls the risk with probability 1 − delta: pass delta (e.g. delta=0.1).")
    if bound != "wsr":
        raise ValueError(f"bound={bound!r} is the UCB of method='ucb'; Pareto Testing's test is chosen with "
                         f"p_value=, one of {P_VALUES}: drop bound.")
    if monotonize is not None:
        raise ValueError(f"monotonize={monotonize!r} orders losses along one λ grid; method='pareto' tests "
                         "configurations in the order of its front: drop monotonize.")
    p_value = "hoeffding_bentkus" if p_value is None else p_value
    if p_value not in P_VALUES:
        raise ValueError(f"p_value={p_value!r} is unknown: use one of {P_VALUES}.")
    opt_fraction = 0.5 if opt_fraction is None else opt_fraction
    if isinstance(opt_fraction, bool) or not isinstance(opt_fraction, numbers.Real) or not 0 < opt_fraction < 1:
        raise ValueError(f"opt_fraction={opt_fraction!r} must be a number strictly between 0 and 1: the share of "
                         "examples that finds the Pareto front, e.g. 0.5.")
    seed = 0 if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a whole number >= 0: it fixes the split, so that the fit can be "
                         "recomputed from the stored table.")
    return check_level(delta, "delta"), (p_value, float(opt_fraction), int(seed))
