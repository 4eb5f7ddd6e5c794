"""Concentration bounds and p-values used to pick a risk-controlling exit threshold.

Every function here works on numbers with a declared range and is vectorised over
leading axes where that is useful for simulations. Conventions:

* ``r_hat`` is an empirical mean risk over ``n`` calibration examples;
* an upper confidence bound (UCB) ``R⁺`` at level ``δ`` satisfies ``P(R > R⁺) ≤ δ``
  for the true mean ``R``;
* a p-value for the null ``H: R > α`` is small when the data say ``R ≤ α``.

References
----------
* [RCPS] Bates, Angelopoulos, Lei, Malik, Jordan (2021). *Distribution-free,
  risk-controlling prediction sets.* J. ACM. Sec. 3.1 (Hoeffding,
  Hoeffding–Bentkus and Waudby-Smith–Ramdas bounds).
* [LTT] Angelopoulos, Bates, Candès, Jordan, Lei (2021). *Learn then test.*
  Sec. 3 (Hoeffding–Bentkus p-value).
* [WSR] Waudby-Smith & Ramdas (2023). *Estimating means of bounded random
  variables by betting.* JRSS-B. Sec. 4 (hedged capital process).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "binomial_count", "check_level", "hoeffding_ucb", "hoeffding_bentkus_pvalue", "hoeffding_bentkus_ucb", "wsr_ucb",
    "wsr_rejects",
]

# Relative slack when rounding n·R̂ up to an integer count: n·R̂ is a floating-point sum, and
# ⌈100·0.07⌉ evaluates to 8 although 7 losses of 1 out of 100 give the count 7.
_COUNT_RTOL = 1e-9
_BISECT_ITERS = 50  # bisection on [0, 1]: 2**-50 ≈ 1e-15


def check_level(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name}={value!r} must be a number strictly between 0 and 1.")
    return float(value)


def _check_n(n) -> int:
    if isinstance(n, bool) or int(n) != n or int(n) < 1:
        raise ValueError(f"n={n!r} must be a positive integer (the number of calibration examples).")
    return int(n)


def binomial_count(n_times_r_hat):
    """⌈n·R̂⌉, the binomial count in the Bentkus term, robust to floating-point round-off.

    For binary losses pass the integer number of ones instead (see
    :func:`hoeffding_bentkus_pvalue`'s ``count``); for real-valued losses the sum is
    rounded up unless it lies within a relative 1e-9 of an integer below it.
    """
    s = np.asarray(n_times_r_hat, dtype=np.float64)
    return np.ceil(s - _COUNT_RTOL * np.maximum(1.0, np.abs(s))).astype(np.int64)


def hoeffding_ucb(r_hat, n: int, delta: float, lower: float = 0.0, upper: float = 1.0):
    """Hoeffding upper confidence bound [RCPS, Sec. 3.1; Hoeffding 1963, Thm 2].

        R⁺ = R̂ + (b − a) · sqrt(log(1/δ) / (2n))

    Range: losses in [a, b] = [``lower``, ``upper``]; it needs the *full* width b − a
    (2 for the signed performance gap in [−1, 1]). Vectorised over ``r_hat``.
    """
    n, delta = _check_n(n), check_level(delta, "delta")
    if not upper > lower:
        raise ValueError(f"loss bounds ({lower}, {upper}) must satisfy lower < upper.")
    return np.asarray(r_hat, dtype=np.float64) + (upper - lower) * math.sqrt(math.log(1.0 / delta) / (2.0 * n))


def hoeffding_bentkus_pvalue(r_hat, n: int, alpha, *, count=None, binary: bool = False):
    """Hoeffding–Bentkus p-value for the null ``H: R > α`` [LTT, Sec. 3; RCPS, Sec. 3.1].

        p = min( exp(−n · h₁(min(R̂, α), α)),  e · P(Binom(n, α) ≤ ⌈n R̂⌉) ),
        h₁(a, b) = a log(a/b) + (1 − a) log((1 − a)/(1 − b))   (Bernoulli KL divergence).

    Range: losses in [0, 1] (map other ranges first, as :func:`hoeffding_bentkus_ucb` does).
    ``count`` overrides ⌈n R̂⌉ (give the integer number of ones for binary losses). With
    ``binary=True`` the losses are Bernoulli, n R̂ is exactly Binom(n, R) and the exact
    binomial tail ``P(Binom(n, α) ≤ k)`` is returned (no factor e, no Hoeffding term).
    Vectorised over ``r_hat`` and ``alpha`` (broadcast).
    """
    # scipy.stats takes about a second to import: loaded by the first bound that needs it, not at import time
    from scipy.special import rel_entr
    from scipy.stats import binom

    n = _check_n(n)
    r = np.asarray(r_hat, dtype=np.float64)
    a = np.asarray(alpha, dtype=np.float64)
    k = binomial_count(n * r) if count is None else np.asarray(count)
    tail = binom.cdf(k, n, a)
    if binary:
        return tail
    hoeffding = np.exp(-n * (rel_entr(np.minimum(r, a), a) + rel_entr(1.0 - np.minimum(r, a), 1.0 - a)))
    return np.minimum(np.minimum(hoeffding, math.e * tail), 1.0)


def hoeffding_bentkus_ucb(r_hat, n: int, delta: float, lower: float = 0.0, upper: float = 1.0, *,
                          count=None, binary: bool = False):
    """Hoeffding–Bentkus upper confidence bound [RCPS, Sec. 3.1]: inverts the p-value,

        R⁺ = sup{ R ∈ [0, 1] : p_HB(R̂, n, R) > δ }   (found by bisection; p is non-increasing in R).

    Range: the HB inequality needs losses in [0, 1]. For losses in [a, b] the mean is mapped
    to R̂' = (R̂ − a)/(b − a), the bound computed there and mapped back, a + (b − a)·R⁺'.
    Vectorised over ``r_hat``.
    """
    delta = check_level(delta, "delta")
    n = _check_n(n)
    if not upper > lower:
        raise ValueError(f"loss bounds ({lower}, {upper}) must satisfy lower < upper.")
    scaled = (np.asarray(r_hat, dtype=np.float64) - lower) / (upper - lower)
    if count is None:
        count = binomial_count(n * scaled)
    lo, hi = np.zeros_like(scaled), np.ones_like(scaled)
    for _ in range(_BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        keep = hoeffding_bentkus_pvalue(scaled, n, mid, count=count, binary=binary) > delta
        lo, hi = np.where(keep, mid, lo), np.where(keep, hi, mid)
    return lower + (upper - lower) * hi


def wsr_ucb(losses, delta: float, upper: float = 1.0):
    """Waudby-Smith–Ramdas betting upper confidence bound [WSR, Sec. 4 (hedged capital); RCPS, Sec. 3.1].

    For a candidate mean μ the capital after t bets against ``H: R ≥ μ`` is

        K_t(μ) = ∏_{i ≤ t} (1 − ν_i (x_i − μ)),

    with the predictable bet ν_i = min(1, sqrt(2 log(1/δ) / (n σ̂²_{i−1}))), the running
    estimates μ̂_i = (½ + Σ_{j≤i} x_j)/(i + 1), σ̂²_i = (¼ + Σ_{j≤i} (x_j − μ̂_j)²)/(i + 1), σ̂²_0 = ¼
    (the choice of the RCPS reference implementation). Under ``H`` K_t is a nonnegative
    supermartingale, so by Ville's inequality

        R⁺ = inf{ μ ∈ [0, B] : max_t K_t(μ) ≥ 1/δ }   (bisection; K_t is increasing in μ).

    Range: only the *upper* bound B (``upper``) matters, since 1 − ν(x − μ) ≥ 0 whenever
    x ≤ B and 0 ≤ μ (losses are divided by B, so ν ≤ 1/B). Signed losses, e.g. the
    unrestricted performance gap in [−1, 1], are used unchanged. The bound is searched in
    [0, B]: 0 means "R⁺ ≤ 0" (every μ > 0 rejected), B means no μ < B was rejected.
    ``losses`` has shape (..., n); the result has shape (...).
    """
    x, nu, target = _wsr_setup(losses, delta, upper)
    lo, hi = np.zeros(x.shape[:-1]), np.ones(x.shape[:-1])
    for _ in range(_BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        rejected = _wsr_log_capital(x, nu, mid) >= target
        lo, hi = np.where(rejected, lo, mid), np.where(rejected, mid, hi)
    return upper * hi


def _wsr_setup(losses, delta, upper):
    """Scaled losses x/B, the predictable bets ν_i and the rejection level log(1/δ) of :func:`wsr_ucb`."""
    delta = check_level(delta, "delta")
    if not upper > 0:
        raise ValueError(f"upper={upper!r} must be > 0 for the betting bound (it is the losses' upper bound B).")
    x = np.asarray(losses, dtype=np.float64) / upper
    n = x.shape[-1]
    if n < 1:
        raise ValueError("wsr_ucb needs at least one loss.")
    if not np.all(x <= 1.0 + 1e-12):
        raise ValueError(f"wsr_ucb needs losses <= upper={upper!r} (and no NaN): pass the losses' true upper bound.")
    t = np.arange(1, n + 1, dtype=np.float64)
    mu_hat = (np.cumsum(x, axis=-1) + 0.5) / (t + 1.0)
    sigma2 = (np.cumsum((x - mu_hat) ** 2, axis=-1) + 0.25) / (t + 1.0)
    sigma2_prev = np.concatenate([np.full(x.shape[:-1] + (1,), 0.25), sigma2[..., :-1]], axis=-1)
    nu = np.minimum(np.sqrt(2.0 * math.log(1.0 / delta) / (n * sigma2_prev)), 1.0)
    return x, nu, math.log(1.0 / delta)


def _wsr_log_capital(x, nu, mu):
    """log max_t K_t(μ) for scaled losses x (..., n) and candidate means μ (...)."""
    with np.errstate(divide="ignore"):
        return np.max(np.cumsum(np.log1p(-nu * (x - np.asarray(mu)[..., None])), axis=-1), axis=-1)


def wsr_rejects(losses, delta: float, mu, upper: float = 1.0):
    """The betting test behind :func:`wsr_ucb`: True where max_t K_t(μ) ≥ 1/δ, i.e. ``H: R ≥ μ`` is rejected.

    Since K_t is increasing in μ, ``wsr_rejects(x, δ, ε)`` equals ``wsr_ucb(x, δ) < ε`` up to the
    bisection tolerance, at the cost of a single capital evaluation (used by simulations).
    """
    x, nu, target = _wsr_setup(losses, delta, upper)
    return _wsr_log_capital(x, nu, np.broadcast_to(np.asarray(mu, dtype=np.float64) / upper, x.shape[:-1])) >= target
