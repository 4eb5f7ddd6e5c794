"""``RiskController``: choose the threshold λ̂ from calibration losses, with a distribution-free guarantee.

An estimator in the style of MAPIE's controllers: set the request (ε, δ, method, ...), ``fit`` it on a loss matrix
(or ``fit_table`` on a :class:`~hf_safe_exit.risk.LossTable`), then read ``threshold`` (λ̂) and ``certificate``.
It knows nothing of models or files: :class:`~hf_safe_exit.risk.Calibration` ties a fit to the model and the
early-exit configuration its losses were collected with, and stores it.

Guarantees (Jazbec, Timans et al. 2024, "Fast yet Safe", Sec. 3), for the chosen risk R(λ):
``crc``: E[R_test(λ̂)] ≤ ε (Angelopoulos et al. 2022); ``ucb``: P(R(λ̂) ≤ ε) ≥ 1 − δ (Bates et al. 2021;
Waudby-Smith & Ramdas 2024 for ``bound="wsr"``); ``ltt``: the same, by fixed-sequence testing (Angelopoulos et
al. 2021); ``naive``: none.
"""

from __future__ import annotations

import warnings


from .bounds import check_level, hoeffding_bentkus_ucb
from .certificate import RiskCertificate, guarantee_text, infeasible_message
from .loss_table import DEFAULT_LOSS_BOUNDS, RISKS, LossTable
from .selection import BOUNDS, MONOTONIZE, check_method_and_delta, select

__all__ = ["RiskController"]


class RiskController:
    """Pick λ̂ from ``losses[k, j]`` (example j decoded at threshold ``thresholds[k]``; λ = 1 must be on the grid).

    Args:
        eps: target risk ε in (0, 1).
        delta: failure probability δ in (0, 1); required by ``ucb``/``ltt``, refused by ``crc``/``naive``.
        method: ``"crc"`` (in expectation), ``"ucb"`` or ``"ltt"`` (with probability 1 − δ), ``"naive"``.
        bound: the upper confidence bound of ``method="ucb"``: ``"wsr"`` (default), ``"hoeffding"``,
            ``"hoeffding_bentkus"``.
        risk: ``"performance_gap"`` (unrestricted, default), ``"performance_gap_bounded"``, ``"consistency"``.
        monotonize: ``None`` or ``"per_example"`` (see :mod:`hf_safe_exit.risk.selection`).

    Fitted attributes: ``threshold`` (λ̂; 1 when no λ < 1 qualifies, with a warning) and ``certificate``.
    """

    def __init__(self, eps: float, delta: float | None = None, method: str = "crc", bound: str = "wsr",
                 risk: str = "performance_gap", monotonize: str | None = None):
        self.eps = check_level(eps, "eps")
        self.delta = check_method_and_delta(method, delta)
        if bound not in BOUNDS:
            raise ValueError(f"bound={bound!r} is unknown: use one of {BOUNDS}.")
        if risk not in RISKS:
            raise ValueError(f"risk={risk!r} is unknown: use one of {RISKS}.")
        if monotonize not in MONOTONIZE:
            raise ValueError(f"monotonize={monotonize!r} is unknown: use None or 'per_example'.")
        self.method, self.bound, self.risk, self.monotonize = method, bound, risk, monotonize
        self.threshold: float | None = None
        self.certificate: RiskCertificate | None = None

    def get_params(self) -> dict:
        """The request: what a stored calibration records and a refit must repeat."""
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

    def fit_table(self, table: LossTable, *, about: dict | None = None) -> "RiskController":
        """:meth:`fit` on ``table``'s losses for ``risk`` and their bounds."""
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



