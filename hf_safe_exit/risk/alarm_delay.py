"""How long the monitor's test takes to alarm under a shift: the closed form behind ``expected_samples_to_alarm``.

Kelly (1956) growth rate and Wald's identity applied to the wealth of
:class:`~hf_safe_exit.risk.sequential_test.SequentialRiskTest` (see that module for the test itself).
"""

from __future__ import annotations

import math

import numpy as np

from .sequential_test import BET_CAP, MIXTURE_WEIGHT, SequentialRiskTest

__all__ = ["expected_samples_to_alarm"]


def expected_samples_to_alarm(values, eps: float, alpha: float, *, weights=None, loss_range=(0.0, 1.0)) -> float:
    """Wald's closed-form approximation of E[τ], the expected number of losses to the alarm of a fresh test, for
    losses drawn i.i.d. from the discrete distribution (``values``, ``weights``):

        E[τ] ≈ log(1/(w α)) / g*,   g* = max_{λ ∈ [0, c/ε']} E[log(1 + λ (X' − ε'))]   (scaled units),

    g* being the Kelly (1956) growth rate of the best constant bet either bettor may place. The mixture's wealth
    is at least w K^cum, so the alarm fires at the latest when K^cum reaches 1/(w α); E[log K^cum_τ] = g*·E[τ]
    for the Kelly bet (Wald's identity) gives the formula, an approximate upper bound: the discounted bettor can
    only make the alarm earlier, and on a fresh stream it bets as the cumulative one does at first. ``inf`` when
    the mean is ≤ eps (H₀ holds: the alarm fires with probability ≤ α). It ignores the overshoot of log K_τ over
    the threshold (which makes τ shorter) and the cost of learning the bet from the data (aGRAPA's bet differs
    from the Kelly bet, early bets most: which makes τ longer). It does not describe a test that has already run
    long before the shift (``benchmarks/monitor_validity.py`` measures that).
    """
    from scipy.optimize import brentq  # noqa: PLC0415 (scipy loads in about a second: not at import time)

    test = SequentialRiskTest(eps, alpha, loss_range=loss_range)  # checks eps, alpha and the range as the test does
    (a, b), eps, alpha = test.loss_range, test.eps, test.alpha
    x = (np.clip(np.asarray(test.check_losses(values), dtype=np.float64), a, b) - a) / (b - a)
    if x.size == 0:
        raise ValueError("values is empty: give the losses the stream draws from.")
    w = np.full(x.size, 1.0 / x.size) if weights is None else _normalised(weights, x.size)
    e = (eps - a) / (b - a)
    d = x - e
    if float(w @ d) <= 0.0:
        return math.inf
    cap = BET_CAP / e

    def slope(lam):  # d/dλ E[log(1 + λ d)], decreasing in λ (the growth rate is concave)
        return float(w @ (d / (1.0 + lam * d)))

    lam = cap if slope(cap) >= 0.0 else brentq(slope, 0.0, cap, xtol=1e-14, rtol=1e-12)
    return math.log(1.0 / (MIXTURE_WEIGHT * alpha)) / float(w @ np.log1p(lam * d))


def _normalised(weights, size: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (size,):
        raise ValueError(f"weights has shape {w.shape}: give one weight per value, shape ({size},).")
    if not np.all(np.isfinite(w)) or np.any(w < 0.0) or not w.sum() > 0.0:
        raise ValueError("weights must be finite, >= 0 and not all 0 (they are normalised to sum to 1).")
    return w / w.sum()
