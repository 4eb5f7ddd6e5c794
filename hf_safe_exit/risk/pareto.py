"""Pareto Testing: pick one early-exit configuration among many with a family-wise risk guarantee.

Laufer-Goldshtein, Fisch, Barzilay, Jaakkola (2023), *Efficiently Controlling Multiple Risks with Pareto
Testing*, ICLR, Algorithm 1, with one risk and one cost. Convention: ``losses[g, j]`` is the loss of
calibration example ``j`` decoded with configuration ``g`` (a measure, a schedule, exit layers, a λ, ...),
in ``loss_range`` = [a, b]; ``costs[g]`` (or ``costs[g, j]``) what configuration ``g`` costs (e.g. the fraction
of decoder blocks run). The procedure (:func:`pareto_test`):

1. split the n examples at random into an optimisation part D_opt and a testing part D_test
   (:func:`split_examples`);
2. on D_opt estimate each configuration's risk R̂_opt(g) and cost Ĉ_opt(g) and keep the Pareto front
   (:func:`pareto_front`), ordered by R̂_opt ascending (for the Hoeffding–Bentkus p-value this is the order of
   the p-values one would compute on D_opt, the paper's order: the most promising configuration first);
3. on D_test compute a valid p-value p(g) of H₀(g): R(g) > ε for each front configuration and run
   fixed-sequence testing along that order: reject while p(g) ≤ δ, stop at the first p(g) > δ;
4. among the rejected configurations return the cheapest by Ĉ_opt (ties: lower R̂_opt, then lower index; on
   the front equal costs mean equal risks, so the index decides).

Fixed-sequence testing with an order fixed before D_test is looked at controls the family-wise error rate at
δ (LTT, Angelopoulos et al. 2021, Sec. 3), and D_opt is independent of D_test, so whatever rule then picks
among the rejected nulls, P(R(chosen) > ε) ≤ δ. Nothing rejected → ``None``: decode at λ = 1 (the full model).

Imports scipy only through :mod:`.bounds`, inside the functions that need it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .bounds import check_level, hoeffding_bentkus_pvalue, hoeffding_bentkus_ucb, wsr_ucb

__all__ = ["P_VALUES", "ParetoResult", "pareto_front", "split_examples", "wsr_pvalue", "pareto_test", "select_pareto"]

P_VALUES = ("hoeffding_bentkus", "wsr")
_TOL = 1e-12  # losses may sit on the range's ends up to float rounding, as in selection.prepare_losses


@dataclass(frozen=True)
class ParetoResult:
    """The outcome of :func:`pareto_test`.

    ``front`` holds configuration indices in testing order; ``front_risk``/``front_cost`` their D_opt
    estimates and ``p_values`` their D_test p-values, aligned with ``front``; the first ``num_rejected``
    were rejected. ``risk_bound`` is the chosen configuration's upper confidence bound on D_test at δ with the
    same concentration inequality (loss units; ``None`` when nothing was chosen). It is reported, not
    guaranteed: the guarantee is P(R(chosen) > ε) ≤ δ, since the choice itself used D_test.
    """

    index: int | None
    front: np.ndarray
    front_risk: np.ndarray
    front_cost: np.ndarray
    p_values: np.ndarray
    num_rejected: int
    n_opt: int
    n_test: int
    risk_bound: float | None
    eps: float
    delta: float
    p_value: str
    num_configurations: int

    @property
    def front_size(self) -> int:
        return int(self.front.size)

    @property
    def feasible(self) -> bool:
        """True iff a configuration was certified (else decode with the full model)."""
        return self.index is not None


def pareto_front(risks, costs) -> np.ndarray:
    """Indices (ascending) of the non-dominated configurations: g is dominated when another h has
    R(h) ≤ R(g) and C(h) ≤ C(g) with one inequality strict. Configurations equal in both are all kept.

    One sort, O(G log G): after ordering by (risk, cost), g survives iff its cost is the lowest of its risk
    group and strictly below every cost at a strictly lower risk.
    """
    r, c = _front_inputs(risks, costs)
    order = np.lexsort((c, r))
    r_s, c_s = r[order], c[order]
    group_start = np.searchsorted(r_s, r_s, side="left")
    running_min = np.minimum.accumulate(c_s)
    lower_risk_min = np.where(group_start > 0, running_min[np.maximum(group_start - 1, 0)], np.inf)
    keep = (c_s == c_s[group_start]) & (c_s < lower_risk_min)
    return np.sort(order[keep])


def _front_inputs(risks, costs):
    r = np.asarray(risks, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    if r.ndim != 1 or r.shape != c.shape or r.size == 0:
        raise ValueError(f"risks and costs must be non-empty 1-D arrays of the same length (one per configuration); "
                         f"got shapes {r.shape} and {c.shape}.")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(c))):
        raise ValueError("risks or costs contain NaN or infinite values: drop or fix those configurations.")
    return r, c


def split_examples(n: int, opt_fraction: float = 0.5, seed=None) -> tuple[np.ndarray, np.ndarray]:
    """The random split of examples 0..n−1 into (D_opt, D_test) indices, each sorted.

    Contract (tests rely on it): ``perm = np.random.default_rng(seed).permutation(n)``; D_opt = the first
    n_opt = min(max(round(opt_fraction · n), 1), n − 1) entries of ``perm``, D_test the rest.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n={n!r} must be an integer >= 2: each split part needs an example.")
    _check_number(opt_fraction, "opt_fraction", 0.0, 1.0, fix="the share of examples used to find the front, e.g. 0.5")
    n_opt = min(max(int(round(opt_fraction * n)), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:n_opt]), np.sort(perm[n_opt:])


def _wsr_shift(eps: float, lower: float) -> float:
    """c = max(a, min(0, ε)): the smallest shift that leaves the null mean ε − c ≥ 0 (see :func:`wsr_pvalue`)."""
    return max(lower, min(0.0, eps))


def wsr_pvalue(losses, eps: float, delta: float, loss_range=(0.0, 1.0)) -> np.ndarray:
    """Betting p-value of H₀: R > ε per row of ``losses`` (..., n) [WSR: Waudby-Smith & Ramdas 2023, Sec. 4;
    the hedged capital of :func:`~hf_safe_exit.risk.bounds.wsr_ucb`]:

        p = min(1, 1 / max_{t ≤ n} K_t),   K_t = ∏_{i ≤ t} (1 − ν_i (y_i − ε')),

    with y = (x − c)/(b − c), ε' = (ε − c)/(b − c), c = max(a, min(0, ε)), and the predictable bets
    ν_i = min(1, sqrt(2 log(1/δ) / (n σ̂²_{i−1}))) of ``wsr_ucb`` (μ̂_i = (½ + Σ_{j≤i} y_j)/(i + 1),
    σ̂²_i = (¼ + Σ_{j≤i} (y_j − μ̂_j)²)/(i + 1), σ̂²_0 = ¼). Since y ≤ 1 and ε' ≥ 0 every factor is ≥ 0, and
    under H₀ K_t is a nonnegative supermartingale, so P(p ≤ α) ≤ α for every α (Ville's inequality).

    The shift c keeps the signed gap in [−1, 1] at ε > 0 unchanged (c = 0, as ``wsr_ucb`` does): mapping it to
    [0, 1] would halve the largest bet. Then ``p ≤ δ`` iff ``bounds.wsr_rejects(x, δ, ε, upper=b)``.
    """
    lower, upper = _check_range(loss_range)
    eps = _check_number(eps, "eps", lower, upper, fix="the risk level must lie inside loss_range")
    delta = check_level(delta, "delta")
    c = _wsr_shift(eps, lower)
    # losses may exceed b by float rounding (_TOL): clipped so that no factor turns negative
    y = np.minimum((np.asarray(losses, dtype=np.float64) - c) / (upper - c), 1.0)
    mu = (eps - c) / (upper - c)
    n = y.shape[-1]
    t = np.arange(1, n + 1, dtype=np.float64)
    mu_hat = (np.cumsum(y, axis=-1) + 0.5) / (t + 1.0)
    sigma2 = (np.cumsum((y - mu_hat) ** 2, axis=-1) + 0.25) / (t + 1.0)
    sigma2_prev = np.concatenate([np.full(y.shape[:-1] + (1,), 0.25), sigma2[..., :-1]], axis=-1)
    nu = np.minimum(np.sqrt(2.0 * math.log(1.0 / delta) / (n * sigma2_prev)), 1.0)
    with np.errstate(divide="ignore"):  # a factor of exactly 0 (y = 1 at ε' = 0 with ν = 1): capital 0
        log_capital = np.cumsum(np.log1p(-nu * (y - mu)), axis=-1)
    return np.minimum(1.0, np.exp(-np.maximum(np.max(log_capital, axis=-1), 0.0)))


def _front_pvalues(losses, eps: float, delta: float, p_value: str, loss_range=(0.0, 1.0), *,
                  binary: bool = False) -> np.ndarray:
    """p-values of H₀: R > ε for each row of ``losses`` (rows × n_test).

    ``"hoeffding_bentkus"`` [LTT, Sec. 3; RCPS, Sec. 3.1] maps losses and ε to [0, 1], x' = (x − a)/(b − a):
    for the signed gap in [−1, 1] the width doubles, so the margin ε − R̂ halves in the mapped units and the
    Hoeffding exponent −2n(ε' − R̂')² falls by 4: it takes about four times the examples of a [0, 1] loss.
    ``binary=True`` (every loss 0 or 1, range [0, 1]: the caller checks the whole table) uses the exact
    binomial tail, as LTT does here (``selection.ltt_pvalues``). ``"wsr"``: :func:`wsr_pvalue`.
    """
    if p_value == "wsr":
        return wsr_pvalue(losses, eps, delta, loss_range)
    lower, upper = loss_range
    arr = np.asarray(losses, dtype=np.float64)
    n = arr.shape[-1]
    scaled_risk = (arr.mean(axis=-1) - lower) / (upper - lower)
    count = np.count_nonzero(arr, axis=-1) if binary else None
    scaled_eps = (eps - lower) / (upper - lower)
    return np.asarray(hoeffding_bentkus_pvalue(scaled_risk, n, scaled_eps, count=count, binary=binary),
                      dtype=np.float64)


def _fixed_sequence_rejections(p_values, delta: float) -> int:
    """How many nulls fixed-sequence testing rejects: the length of the leading run with p ≤ δ."""
    passed = np.asarray(p_values, dtype=np.float64) <= delta
    return int(np.argmin(passed)) if not passed.all() else int(passed.size)


def pareto_test(losses, costs, eps, delta, *, opt_fraction=0.5, p_value="hoeffding_bentkus", seed=None,
                loss_range=(0.0, 1.0)) -> ParetoResult:
    """Pareto Testing (Laufer-Goldshtein et al. 2023, Algorithm 1; steps in the module docstring).

    Guarantee: P(R(chosen) > ε) ≤ δ over the draw of the calibration examples (i.i.d. with the test inputs),
    for any number of configurations and any dependence between them; ``index=None`` (decode with the full
    model) when no null is rejected. ``costs`` is (G,) per configuration or (G, n) per example (then
    estimated on D_opt). ``seed`` fixes the split (:func:`split_examples`).
    """
    arr, cost, eps, delta, loss_range = _check_inputs(losses, costs, eps, delta, opt_fraction, p_value, loss_range)
    opt, test = split_examples(arr.shape[1], opt_fraction, seed)
    risk_opt = _row_means(arr, opt)
    cost_opt = cost if cost.ndim == 1 else _row_means(cost, opt)
    front = _testing_order(risk_opt, cost_opt)
    test_losses = arr[front][:, test]
    binary = loss_range == (0.0, 1.0) and _all_binary(test_losses) and _all_binary(arr)
    pvals = _front_pvalues(test_losses, eps, delta, p_value, loss_range, binary=binary)
    k = _fixed_sequence_rejections(pvals, delta)
    pos = _cheapest(risk_opt[front[:k]], cost_opt[front[:k]], front[:k]) if k else None
    bound = None if pos is None else _chosen_bound(test_losses[pos], eps, delta, p_value, loss_range, binary)
    return ParetoResult(index=None if pos is None else int(front[pos]), front=front, front_risk=risk_opt[front],
                        front_cost=cost_opt[front], p_values=pvals, num_rejected=k, n_opt=opt.size,
                        n_test=test.size, risk_bound=bound, eps=eps, delta=delta, p_value=p_value,
                        num_configurations=arr.shape[0])


def _row_means(arr, columns) -> np.ndarray:
    """Mean of each row over ``columns``, summed in float64 (a bool table is counted without a copy)."""
    if arr.dtype == bool:
        mask = np.zeros(arr.shape[1], dtype=bool)
        mask[columns] = True
        return np.count_nonzero(arr & mask, axis=1) / columns.size
    return np.take(arr, columns, axis=1).sum(axis=1, dtype=np.float64) / columns.size


def _all_binary(arr) -> bool:
    """Every entry 0 or 1 (checked on the front's rows first: a table with real losses fails fast there)."""
    return arr.dtype == bool or not np.any((arr != 0) & (arr != 1))


def _testing_order(risks, costs) -> np.ndarray:
    """The Pareto front of (risks, costs) in testing order: R̂ ascending (so C ascending the other way along the
    front, the safest first), index breaking exact ties."""
    front = pareto_front(risks, costs)
    return front[np.lexsort((front, np.asarray(risks, dtype=np.float64)[front]))]


def _cheapest(risks, costs, indices) -> int:
    """Position of the lowest cost; ties go to the lower risk, then the lower configuration index."""
    return int(np.lexsort((indices, risks, costs))[0])


def _chosen_bound(row, eps, delta, p_value, loss_range, binary) -> float:
    """UCB at δ on D_test of the chosen row with its p-value's inequality: HB mapped to [0, 1], or WSR on the
    p-value's shifted scale (searched in [c, b], so ``c`` means "at most c")."""
    lower, upper = loss_range
    arr = np.asarray(row, dtype=np.float64)[None, :]
    if p_value == "hoeffding_bentkus":
        count = np.count_nonzero(arr, axis=-1) if binary else None
        return float(hoeffding_bentkus_ucb(arr.mean(axis=-1), arr.shape[-1], delta, lower, upper, count=count,
                                           binary=binary)[0])
    c = _wsr_shift(eps, lower)
    return float(c + wsr_ucb(arr - c, delta, upper=upper - c)[0])


def select_pareto(losses, costs, eps, delta, *, opt_fraction=0.5, p_value="hoeffding_bentkus", seed=None,
                  loss_range=(0.0, 1.0)) -> int | None:
    """The configuration Pareto Testing certifies (a row of ``losses``), or ``None``: decode at λ = 1.

    ``pareto_test(...).index``; P(R(chosen) > ε) ≤ δ (Laufer-Goldshtein et al. 2023, Algorithm 1).
    """
    return pareto_test(losses, costs, eps, delta, opt_fraction=opt_fraction, p_value=p_value, seed=seed,
                       loss_range=loss_range).index


def _check_range(loss_range) -> tuple[float, float]:
    try:
        lower, upper = (float(v) for v in loss_range)
    except (TypeError, ValueError):
        raise ValueError(f"loss_range={loss_range!r} must be a pair (a, b) of numbers, e.g. (-1.0, 1.0) "
                         "for the performance gap.") from None
    if not (math.isfinite(lower) and math.isfinite(upper) and lower < upper):
        raise ValueError(f"loss_range={loss_range!r} must be finite with a < b.")
    return lower, upper


def _check_number(value, name: str, low: float, high: float, fix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not low < float(value) < high:
        raise ValueError(f"{name}={value!r} must be a number strictly between {low:g} and {high:g}: {fix}.")
    return float(value)


def _check_losses(losses, loss_range):
    arr = np.asarray(losses)
    if not (arr.dtype == bool or np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"losses must be a numeric (configurations, examples) array, got dtype {arr.dtype}.")
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 2:
        raise ValueError(f"losses must have shape (configurations, examples) with at least 2 examples (one for "
                         f"each split part), got shape {arr.shape}: losses[g, j] is configuration g on example j.")
    low, high = arr.min(), arr.max()  # NaN propagates into both, an infinity into one: one pass, no mask
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError("losses contain NaN or infinite values: drop or fix those examples before calibrating.")
    lower, upper = loss_range
    if low < lower - _TOL or high > upper + _TOL:
        raise ValueError(f"losses lie in [{low:.6g}, {high:.6g}], outside loss_range=({lower:g}, "
                         f"{upper:g}): pass the losses' true range as loss_range or fix the losses.")
    return arr


def _check_costs(costs, shape):
    cost = np.asarray(costs, dtype=np.float64)
    if cost.shape not in (shape[:1], shape):
        raise ValueError(f"costs must have shape ({shape[0]},) (per configuration) or {shape} (per example, like "
                         f"losses), got shape {cost.shape}.")
    if not np.all(np.isfinite(cost)):
        raise ValueError("costs contain NaN or infinite values: every configuration needs a finite cost.")
    return cost


def _check_inputs(losses, costs, eps, delta, opt_fraction, p_value, loss_range):
    loss_range = _check_range(loss_range)
    arr = _check_losses(losses, loss_range)
    cost = _check_costs(costs, arr.shape)
    eps = _check_number(eps, "eps", *loss_range, fix="the risk level must lie inside loss_range")
    delta = check_level(delta, "delta")
    _check_number(opt_fraction, "opt_fraction", 0.0, 1.0, fix="the share of examples used to find the front, e.g. 0.5")
    if p_value not in P_VALUES:
        raise ValueError(f"p_value={p_value!r} is unknown: use one of {P_VALUES}.")
    return arr, cost, eps, delta, loss_range
