"""Choosing the exit threshold λ̂ from a calibration loss matrix.

Convention: ``losses[k, j]`` is the loss of calibration example ``j`` when decoding with
threshold ``lambdas[k]``. ``lambdas`` may come in any order (they are sorted here) but
must lie in [0, 1], be distinct and contain λ = 1 (never exit early: the full model).

Every method scans the grid from λ = 1 towards smaller λ and stops at the *first*
violation of its condition, returning the last λ that passed: every λ' ≥ λ̂ on the grid
satisfies the condition. λ = 1 is tested too; when it fails, or when no λ < 1 passes,
the result is λ̂ = 1 with ``feasible=False`` (the caller warns).

======== =============================================== ===========================
method   condition at λ                                  guarantee
======== =============================================== ===========================
naive    R̂(λ) ≤ ε                                        none (for comparison)
crc      n/(n+1)·R̂(λ) + B/(n+1) ≤ ε                      E[R_test(λ̂)] ≤ ε
ucb      R̂⁺_δ(λ) < ε  (Hoeffding / HB / WSR)              P(R(λ̂) ≤ ε) ≥ 1 − δ
ltt      p_HB(λ) ≤ δ for the null R(λ) > ε (fixed seq.)  P(R(λ̂) ≤ ε) ≥ 1 − δ
======== =============================================== ===========================

``monotonize="per_example"`` replaces each example's loss by its running maximum from
λ = 1 downward, L̃_j(λ) = max_{λ' ≥ λ} L_j(λ'), which makes every example's loss
non-increasing in λ, the assumption of the CRC theorem (Angelopoulos et al. 2022, Thm 1),
without relying on the weaker marginal monotonicity of early-exit models. Cost: the
monotonized loss is never smaller, so λ̂ is never smaller (less speed-up); for the signed
performance gap it is ≥ 0 everywhere (the λ = 1 row is 0), which removes the advantage of
the unrestricted loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bounds import check_level, hoeffding_bentkus_pvalue, hoeffding_bentkus_ucb, hoeffding_ucb, wsr_ucb

__all__ = [
    "Selection", "METHODS", "BOUNDS", "MONOTONIZE", "prepare_losses", "passes", "first_violation_scan",
    "select_naive", "select_crc", "select_ucb", "select_ltt", "select", "crc_statistic", "ltt_pvalues",
]

METHODS = ("naive", "crc", "ucb", "ltt")
BOUNDS = ("wsr", "hoeffding", "hoeffding_bentkus")
MONOTONIZE = (None, "per_example")
_TOL = 1e-12


@dataclass(frozen=True)
class Selection:
    """The outcome of a selection. Grid arrays are in *descending* λ order (λ = 1 first).

    ``statistic`` is what the method compares: R̂ (naive), the CRC-adjusted risk (crc),
    the UCB (ucb) or the p-value (ltt); ``passed`` marks where the condition held.
    """

    threshold: float  # λ̂
    index: int  # position of λ̂ in the caller's original ``lambdas``
    feasible: bool  # True iff λ̂ < 1
    lambdas: np.ndarray
    empirical_risk: np.ndarray
    statistic: np.ndarray
    passed: np.ndarray
    n: int

    @property
    def position(self) -> int:
        """Position of λ̂ in the descending grid."""
        return int(np.flatnonzero(self.lambdas == self.threshold)[0])


def _check_bounds(loss_bounds) -> tuple[float, float]:
    try:
        lower, upper = (float(v) for v in loss_bounds)
    except (TypeError, ValueError):
        raise ValueError(f"loss_bounds={loss_bounds!r} must be a pair (lower, upper) of numbers.") from None
    if not (np.isfinite(lower) and np.isfinite(upper) and lower < upper):
        raise ValueError(f"loss_bounds={loss_bounds!r} must be finite with lower < upper.")
    return lower, upper


def prepare_losses(lambdas, losses, loss_bounds=(0.0, 1.0), monotonize=None):
    """Validate and sort: returns (λ descending (K,), losses (K, n) in that order, order, bounds).

    Raises ``ValueError`` for a grid outside [0, 1], duplicated λ, a grid without λ = 1, a
    shape mismatch, empty or non-finite losses, or losses outside ``loss_bounds``.
    """
    lower, upper = _check_bounds(loss_bounds)
    lam = np.asarray(lambdas, dtype=np.float64)
    if lam.ndim != 1 or lam.size == 0:
        raise ValueError(f"lambdas must be a non-empty 1-D array of thresholds, got shape {lam.shape}.")
    if not np.all(np.isfinite(lam)) or lam.min() < 0.0 or lam.max() > 1.0 + _TOL:
        raise ValueError("lambdas must be finite thresholds in [0, 1] (1 = never exit early).")
    if not np.any(np.abs(lam - 1.0) <= _TOL):
        raise ValueError("The grid must contain λ = 1 (the full model, always the fallback): "
                         "add 1.0 to lambdas and the full model's losses as its row.")
    if np.unique(lam).size != lam.size:
        raise ValueError("lambdas contains duplicates: give each threshold once.")
    arr = np.asarray(losses, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != lam.size:
        raise ValueError(f"losses must have shape (len(lambdas), n) = ({lam.size}, n) with losses[k, j] the loss "
                         f"of example j at lambdas[k]; got shape {arr.shape}. Transpose it if it is (n, K).")
    if arr.shape[1] == 0:
        raise ValueError("losses is empty: calibration needs at least one example.")
    if not np.all(np.isfinite(arr)):
        raise ValueError("losses contains NaN or infinite values: drop or fix those examples before calibrating.")
    if arr.min() < lower - _TOL or arr.max() > upper + _TOL:
        raise ValueError(f"losses lie in [{arr.min():.6g}, {arr.max():.6g}], outside the declared bounds "
                         f"[{lower:g}, {upper:g}]: pass the correct loss_bounds=(lower, upper) or clip/fix the losses.")
    if monotonize not in MONOTONIZE:
        raise ValueError(f"monotonize={monotonize!r} is unknown: use None or 'per_example'.")
    order = np.argsort(-lam, kind="stable")
    lam_sorted, arr_sorted = lam[order], arr[order]
    lam_sorted[0] = 1.0
    if monotonize == "per_example":
        arr_sorted = np.maximum.accumulate(arr_sorted, axis=0)
    return lam_sorted, arr_sorted, order, (lower, upper)


def passes(method: str, statistic, eps: float, delta: float | None) -> np.ndarray:
    """Where each λ's ``statistic`` passes ``method``'s test (the table in the module docstring): R̂ ≤ ε (naive),
    the CRC-adjusted risk ≤ ε (crc), the UCB < ε (ucb), the p-value ≤ δ (ltt)."""
    stat = np.asarray(statistic, dtype=np.float64)
    if method == "ucb":
        return stat < eps
    if method == "ltt":
        return stat <= delta
    return stat <= eps


def first_violation_scan(passed) -> np.ndarray:
    """Index (in descending-λ order) of the last λ before the first failure; −1 if λ = 1 fails.

    Works on the last axis, so ``passed`` may be (..., K) for batched simulations.
    """
    ok = np.asarray(passed, dtype=bool)
    all_ok = np.cumprod(ok, axis=-1).astype(bool)
    return all_ok.sum(axis=-1) - 1


def _finish(lam, order, risk, statistic, passed, n) -> Selection:
    last = int(first_violation_scan(passed))
    pos = max(last, 0)
    return Selection(threshold=float(lam[pos]), index=int(order[pos]), feasible=bool(last >= 1), lambdas=lam,
                     empirical_risk=risk, statistic=statistic, passed=np.asarray(passed, dtype=bool), n=n)


def _check_eps(eps) -> float:
    return check_level(eps, "eps")


def select_naive(lambdas, losses, eps, *, loss_bounds=(0.0, 1.0), monotonize=None) -> Selection:
    """Smallest λ with R̂(λ') ≤ ε for all λ' ≥ λ. No guarantee: a baseline."""
    eps = _check_eps(eps)
    lam, arr, order, _ = prepare_losses(lambdas, losses, loss_bounds, monotonize)
    risk = arr.mean(axis=1)
    return _finish(lam, order, risk, risk, passes("naive", risk, eps, None), arr.shape[1])


def crc_statistic(risk, n: int, upper: float):
    """The CRC-adjusted risk n/(n+1)·R̂(λ) + B/(n+1) (Angelopoulos et al. 2022, Eq. (4), B = loss upper bound)."""
    return (n / (n + 1.0)) * np.asarray(risk) + upper / (n + 1.0)


def select_crc(lambdas, losses, eps, *, loss_bounds=(0.0, 1.0), monotonize=None) -> Selection:
    """Conformal risk control (Angelopoulos et al. 2022, Eq. (4), Thm 1):

        λ̂ = smallest λ with n/(n+1)·R̂_n(λ') + B/(n+1) ≤ ε for every λ' ≥ λ,

    B the *upper* bound of the loss (1 for the signed gap in [−1, 1]). Guarantees
    E[R_test(λ̂)] ≤ ε when each example's loss is non-increasing in λ (see ``monotonize``).
    No early exit is possible unless ε ≥ B/(n+1).
    """
    eps = _check_eps(eps)
    lam, arr, order, (_, upper) = prepare_losses(lambdas, losses, loss_bounds, monotonize)
    n = arr.shape[1]
    risk = arr.mean(axis=1)
    stat = crc_statistic(risk, n, upper)
    return _finish(lam, order, risk, stat, passes("crc", stat, eps, None), n)


def _binary_counts(arr):
    """Integer counts of ones per row when every loss is 0 or 1, else None."""
    if np.all((arr == 0.0) | (arr == 1.0)):
        return np.count_nonzero(arr, axis=-1)
    return None


def ucb_bound(arr, delta, bound, lower, upper):
    """R̂⁺ per row of ``arr`` (..., n) with the named bound and its required range handling."""
    n = arr.shape[-1]
    if bound == "wsr":
        return wsr_ucb(arr, delta, upper=upper)
    risk = arr.mean(axis=-1)
    if bound == "hoeffding":
        return hoeffding_ucb(risk, n, delta, lower, upper)
    if bound == "hoeffding_bentkus":
        counts = _binary_counts(arr) if (lower, upper) == (0.0, 1.0) else None
        return hoeffding_bentkus_ucb(risk, n, delta, lower, upper, count=counts, binary=counts is not None)
    raise ValueError(f"bound={bound!r} is unknown: use one of {BOUNDS}.")


def select_ucb(lambdas, losses, eps, delta, *, bound="wsr", loss_bounds=(0.0, 1.0), monotonize=None) -> Selection:
    """Upper-confidence-bound calibration (RCPS, Bates et al. 2021, Thm 1, "UCB calibration";
    Jazbec, Timans et al. 2024, Sec. 3):

        λ̂ = smallest λ with R̂⁺_δ(λ') < ε for every λ' ≥ λ,

    which gives P(R(λ̂) ≤ ε) ≥ 1 − δ when the true risk is non-increasing in λ. ``bound`` is
    ``"wsr"`` (betting, the paper's choice; uses only the upper bound of the loss),
    ``"hoeffding"`` (full width) or ``"hoeffding_bentkus"`` (mapped to [0, 1]; exact
    binomial tail when every loss is 0 or 1).
    """
    eps, delta = _check_eps(eps), check_level(delta, "delta")
    if bound not in BOUNDS:
        raise ValueError(f"bound={bound!r} is unknown: use one of {BOUNDS}.")
    lam, arr, order, (lower, upper) = prepare_losses(lambdas, losses, loss_bounds, monotonize)
    ucb = np.asarray(ucb_bound(arr, delta, bound, lower, upper), dtype=np.float64)
    return _finish(lam, order, arr.mean(axis=1), ucb, passes("ucb", ucb, eps, delta), arr.shape[1])


def ltt_pvalues(arr, eps, lower, upper):
    """Hoeffding–Bentkus p-values of the nulls R(λ) > ε, losses mapped to [0, 1] (ε likewise)."""
    n = arr.shape[-1]
    scaled_eps = (eps - lower) / (upper - lower)
    counts = _binary_counts(arr) if (lower, upper) == (0.0, 1.0) else None
    scaled_risk = (arr.mean(axis=-1) - lower) / (upper - lower)
    if not 0.0 < scaled_eps < 1.0:
        return np.where(scaled_eps >= 1.0, 0.0, 1.0) * np.ones_like(scaled_risk)
    return hoeffding_bentkus_pvalue(scaled_risk, n, scaled_eps, count=counts, binary=counts is not None)


def select_ltt(lambdas, losses, eps, delta, *, loss_bounds=(0.0, 1.0), monotonize=None) -> Selection:
    """Learn then Test (Angelopoulos et al. 2021, Sec. 3; CALM's calibration, Schuster et al. 2022):
    Hoeffding–Bentkus p-values p(λ) for the nulls H_λ: R(λ) > ε, tested by fixed-sequence
    testing from λ = 1 downward at level δ (reject while p(λ) ≤ δ); λ̂ is the last rejected
    null. Controls the family-wise error, hence P(R(λ̂) ≤ ε) ≥ 1 − δ, without any
    monotonicity assumption. Losses in [a, b] are mapped to [0, 1] (ε too); with 0/1
    losses the exact binomial tail replaces the HB p-value.
    """
    eps, delta = _check_eps(eps), check_level(delta, "delta")
    lam, arr, order, (lower, upper) = prepare_losses(lambdas, losses, loss_bounds, monotonize)
    pvals = np.asarray(ltt_pvalues(arr, eps, lower, upper), dtype=np.float64)
    return _finish(lam, order, arr.mean(axis=1), pvals, passes("ltt", pvals, eps, delta), arr.shape[1])


def check_method_and_delta(method, delta):
    """Validate ``method`` and its δ: given, in (0, 1), exactly for ``ucb`` and ``ltt``. Returns δ (or None)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown: use one of {METHODS}.")
    if method in ("ucb", "ltt"):
        if delta is None:
            raise ValueError(f"method={method!r} controls the risk with probability 1 − delta: pass delta "
                             "(e.g. delta=0.1), or use method='crc' for a guarantee in expectation.")
        return check_level(delta, "delta")
    if delta is not None:
        raise ValueError(f"delta={delta!r} was given but method={method!r} has no δ "
                         f"({'it controls the risk in expectation' if method == 'crc' else 'it gives no guarantee'}): "
                         "drop delta, or use method='ucb' or 'ltt' for a high-probability guarantee.")
    return None


def select(method, lambdas, losses, eps, delta=None, *, bound="wsr", loss_bounds=(0.0, 1.0),
           monotonize=None) -> Selection:
    """Dispatch to ``select_<method>``; ``delta`` must be given exactly for ``ucb`` and ``ltt``."""
    delta = check_method_and_delta(method, delta)
    if method in ("ucb", "ltt"):
        fn = select_ucb if method == "ucb" else select_ltt
        kw = {"bound": bound} if method == "ucb" else {}
        return fn(lambdas, losses, eps, delta, loss_bounds=loss_bounds, monotonize=monotonize, **kw)
    fn = select_crc if method == "crc" else select_naive
    return fn(lambdas, losses, eps, loss_bounds=loss_bounds, monotonize=monotonize)
