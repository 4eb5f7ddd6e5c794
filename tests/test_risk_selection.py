"""Threshold selection against brute-force loops over the grid, ordering, monotonization and validation."""

import numpy as np
import pytest
from scipy.stats import binom

from hf_safe_exit.risk.bounds import hoeffding_bentkus_pvalue, wsr_ucb
from hf_safe_exit.risk.selection import select, select_crc, select_ltt, select_naive, select_ucb


def _random_matrix(seed, K=15, n=120, lower=-1.0, upper=1.0):
    """Signed, non-monotone losses that shrink towards 0 as λ → 1; row λ = 1 is 0."""
    rng = np.random.default_rng(seed)
    lam = np.linspace(0.0, 1.0, K)
    scale = (1.0 - lam)[:, None]
    losses = np.clip(rng.normal(0.08, 0.35, size=(K, n)) * scale + rng.normal(0, 0.02, size=(K, n)) * scale,
                     lower, upper)
    losses[-1] = 0.0
    perm = rng.permutation(K)  # the caller's grid need not be sorted
    return lam[perm], losses[perm]


def _brute_force_scan(lambdas, ok_of_lambda):
    """Loop from λ = 1 down; stop at the first λ whose condition fails."""
    best = 1.0
    for lam in sorted(lambdas, reverse=True):
        if not ok_of_lambda(lam):
            break
        best = lam
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("eps", [0.02, 0.05, 0.1, 0.2])
def test_crc_matches_brute_force_loop(seed, eps):
    lam, losses = _random_matrix(seed)
    n = losses.shape[1]

    def ok(l):
        row = losses[list(lam).index(l)]
        return (n / (n + 1)) * (sum(row) / n) + 1.0 / (n + 1) <= eps

    assert select_crc(lam, losses, eps, loss_bounds=(-1, 1)).threshold == _brute_force_scan(lam, ok)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bound", ["wsr", "hoeffding", "hoeffding_bentkus"])
def test_ucb_matches_brute_force_loop(seed, bound):
    lam, losses = _random_matrix(seed, n=300)
    n, eps, delta = losses.shape[1], 0.1, 0.1

    def ucb(row):
        if bound == "wsr":
            return wsr_ucb(row, delta, upper=1.0)
        if bound == "hoeffding":
            return row.mean() + 2.0 * np.sqrt(np.log(1 / delta) / (2 * n))
        # HB on [0, 1]: invert the p-value on a fine grid
        grid = np.linspace(0, 1, 200001)
        p = hoeffding_bentkus_pvalue((row.mean() + 1) / 2, n, grid[1:-1])
        return 2 * grid[1:-1][np.flatnonzero(p > delta).max()] - 1

    def ok(l):
        return ucb(losses[list(lam).index(l)]) < eps

    got = select_ucb(lam, losses, eps, delta, bound=bound, loss_bounds=(-1, 1))
    assert got.threshold == _brute_force_scan(lam, ok)


@pytest.mark.parametrize("seed", range(4))
def test_ltt_matches_fixed_sequence_loop(seed):
    lam, losses = _random_matrix(seed, n=400, lower=0.0)
    losses = np.maximum(losses, 0.0)
    eps, delta, n = 0.08, 0.1, losses.shape[1]
    p = {l: hoeffding_bentkus_pvalue(losses[i].mean(), n, eps) for i, l in enumerate(lam)}
    got = select_ltt(lam, losses, eps, delta, loss_bounds=(0, 1))
    assert got.threshold == _brute_force_scan(lam, lambda l: p[l] <= delta)


def test_ltt_binary_losses_use_exact_binomial_tail_with_integer_counts():
    lam = np.array([1.0, 0.5, 0.0])
    losses = np.zeros((3, 100))
    losses[1, :3] = 1.0
    losses[2, :7] = 1.0  # mean 0.07: ⌈100·0.07⌉ would be 8 in floating point
    sel = select_ltt(lam, losses, 0.1, 0.21)
    np.testing.assert_allclose(sel.statistic, binom.cdf([0, 3, 7], 100, 0.1), rtol=1e-12)
    # P(Binom(100, .1) <= 7) = 0.206 <= 0.21 rejects at λ = 0, while the count 8 (0.321) would not
    assert binom.cdf(7, 100, 0.1) <= 0.21 < binom.cdf(8, 100, 0.1)
    assert sel.threshold == 0.0


def test_stops_at_first_violation_even_if_lower_lambdas_pass_again():
    lam = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    losses = np.zeros((5, 50))
    losses[2] = 0.5  # violation at λ = 0.5; λ = 0.25 and 0 are harmless again
    for fn in (select_naive, select_crc):
        assert fn(lam, losses, 0.1).threshold == 0.75
    assert select_ucb(lam, losses, 0.3, 0.1, bound="hoeffding").threshold == 0.75
    assert select_ltt(lam, losses, 0.1, 0.1).threshold == 0.75


def test_grid_order_does_not_matter_and_index_maps_back():
    lam, losses = _random_matrix(11)
    order = np.argsort(lam)
    a = select_crc(lam, losses, 0.1, loss_bounds=(-1, 1))
    b = select_crc(lam[order], losses[order], 0.1, loss_bounds=(-1, 1))
    assert a.threshold == b.threshold
    assert lam[a.index] == a.threshold and lam[order][b.index] == b.threshold
    assert np.all(np.diff(a.lambdas) < 0) and a.lambdas[0] == 1.0


def test_crc_needs_eps_above_B_over_n_plus_1():
    lam = np.array([0.0, 1.0])
    losses = np.zeros((2, 9))  # B/(n+1) = 0.1
    assert not select_crc(lam, losses, 0.09).feasible
    assert select_crc(lam, losses, 0.09).threshold == 1.0
    assert select_crc(lam, losses, 0.1).threshold == 0.0


def test_monotonize_per_example_is_running_max_from_lambda_one():
    lam, losses = _random_matrix(5)
    order = np.argsort(-lam)
    running = losses[order].copy()
    for k in range(1, len(lam)):  # loop version of the running maximum
        for j in range(losses.shape[1]):
            running[k, j] = max(running[k - 1, j], running[k, j])
    for eps in (0.03, 0.08, 0.15):
        mono = select_crc(lam, losses, eps, loss_bounds=(-1, 1), monotonize="per_example")
        ref = select_crc(lam[order], running, eps, loss_bounds=(-1, 1))
        plain = select_crc(lam, losses, eps, loss_bounds=(-1, 1))
        assert mono.threshold == ref.threshold
        assert mono.threshold >= plain.threshold  # the price of the assumption-free option
    assert np.all(running >= 0)  # the λ = 1 row is 0, so monotonized gaps are never negative


def _negative_gap_curve(seed=0, K=21, n=2000):
    """A realistic curve: exiting early often *helps* (negative gap) and sometimes hurts."""
    rng = np.random.default_rng(seed)
    lam = np.linspace(0, 1, K)
    harm = (1 - lam)[:, None] ** 2
    hurt = rng.random((K, n)) < 0.45 * harm
    help_ = rng.random((K, n)) < 0.35 * harm
    losses = np.where(hurt, rng.uniform(0.2, 1.0, (K, n)), 0.0) - np.where(help_, rng.uniform(0.2, 1.0, (K, n)), 0.0)
    losses[-1] = 0.0
    return lam, losses


@pytest.mark.parametrize("eps", [0.02, 0.05, 0.1, 0.15])
def test_unrestricted_gap_no_larger_than_zero_bounded_and_wsr_no_larger_than_ltt(eps):
    lam, gap = _negative_gap_curve()
    assert (gap < 0).mean() > 0.05
    bounded = np.maximum(gap, 0.0)
    for method, kw in (("crc", {}), ("ucb", {"delta": 0.1})):
        unrestricted = select(method, lam, gap, eps, loss_bounds=(-1, 1), **kw).threshold
        zero_bounded = select(method, lam, bounded, eps, loss_bounds=(0, 1), **kw).threshold
        assert unrestricted <= zero_bounded
    wsr = select("ucb", lam, gap, eps, 0.1, bound="wsr", loss_bounds=(-1, 1)).threshold
    ltt = select("ltt", lam, bounded, eps, 0.1, loss_bounds=(0, 1)).threshold
    assert wsr <= ltt
    if eps >= 0.05:  # and strictly more efficient once there is room to exit
        assert wsr < ltt


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("lam,losses,match", [
    (np.array([0.0, 0.5]), np.zeros((2, 5)), "λ = 1"),
    (np.array([0.0, 0.5, 1.0]), np.zeros((2, 5)), "shape"),
    (np.array([0.0, 0.5, 1.0]), np.zeros((3, 0)), "empty"),
    (np.array([0.0, 0.5, 1.0]), np.array([[0.1] * 4 + [np.nan]] * 3), "NaN"),
    (np.array([0.0, 0.5, 1.0]), np.full((3, 5), 1.5), "outside the declared bounds"),
    (np.array([0.0, 0.5, 1.0]), np.full((3, 5), -0.5), "outside the declared bounds"),
    (np.array([0.5, 0.5, 1.0]), np.zeros((3, 5)), "duplicates"),
    (np.array([-0.5, 0.5, 1.0]), np.zeros((3, 5)), r"\[0, 1\]"),
])
def test_selection_rejects_bad_inputs(lam, losses, match):
    with pytest.raises(ValueError, match=match):
        select_crc(lam, losses, 0.1)


@pytest.mark.parametrize("eps", [0.0, 1.0, -0.2, 2.0])
def test_selection_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        select_crc([0.0, 1.0], np.zeros((2, 5)), eps)


def test_select_delta_rules():
    lam, losses = [0.0, 1.0], np.zeros((2, 5))
    with pytest.raises(ValueError, match="drop delta"):
        select("crc", lam, losses, 0.1, 0.1)
    with pytest.raises(ValueError, match="pass delta"):
        select("ucb", lam, losses, 0.1)
    with pytest.raises(ValueError, match="pass delta"):
        select("ltt", lam, losses, 0.1)
    with pytest.raises(ValueError, match="delta"):
        select("ucb", lam, losses, 0.1, 1.0)
    with pytest.raises(ValueError, match="unknown"):
        select("magic", lam, losses, 0.1)
    with pytest.raises(ValueError, match="monotonize"):
        select("crc", lam, losses, 0.1, monotonize="global")
