"""Bounds against the issue's reference numbers and independent scipy / brute-force evaluations."""

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import binom

from hf_safe_exit.risk.bounds import (binomial_count, hoeffding_bentkus_pvalue, hoeffding_bentkus_ucb, hoeffding_ucb,
                                      wsr_ucb)


# ---------------------------------------------------------------- reference values from issue 7
@pytest.mark.parametrize("r_hat,n,alpha,expected", [
    (0.05, 100, 0.1, 0.156510),
    (0.08, 500, 0.1, 0.204114),
    (0.0, 100, 0.1, 2.65614e-5),
])
def test_hb_pvalue_reference_values(r_hat, n, alpha, expected):
    assert hoeffding_bentkus_pvalue(r_hat, n, alpha) == pytest.approx(expected, rel=5e-6)


def test_hb_pvalue_binary_reference_value():
    # 5 ones out of 100: the exact binomial tail, no factor e
    assert hoeffding_bentkus_pvalue(0.05, 100, 0.1, count=5, binary=True) == pytest.approx(0.0575769, rel=5e-6)


def test_hb_ucb_reference_value():
    assert hoeffding_bentkus_ucb(0.1, 100, 0.1) == pytest.approx(0.169390, abs=5e-7)


def test_wsr_reference_values():
    x = (np.arange(100) % 10) / 50
    assert wsr_ucb(x, 0.1) == pytest.approx(0.114954, abs=5e-7)
    signed = np.tile([-0.2, 0.0, 0.1, 0.3], 25)
    assert wsr_ucb(signed, 0.1) == pytest.approx(0.088500, abs=5e-7)


# ---------------------------------------------------------------- Hoeffding–Bentkus vs scipy
def _hb_direct(r_hat, n, alpha):
    """Independent evaluation: KL via explicit logs, binomial tail as a sum of pmf terms."""
    r = min(r_hat, alpha)
    kl = (r * math.log(r / alpha) if r > 0 else 0.0) + ((1 - r) * math.log((1 - r) / (1 - alpha)) if r < 1 else 0.0)
    k = int(round(n * r_hat)) if abs(n * r_hat - round(n * r_hat)) < 1e-9 else math.ceil(n * r_hat)
    tail = sum(binom.pmf(i, n, alpha) for i in range(k + 1))
    return min(math.exp(-n * kl), math.e * tail, 1.0)


@pytest.mark.parametrize("n", [20, 137, 1000])
def test_hb_pvalue_matches_direct_scipy(n):
    rng = np.random.default_rng(n)
    r_hats = rng.integers(0, n // 3, size=8) / n + rng.uniform(0, 0.5 / n, size=8)
    alphas = rng.uniform(0.02, 0.4, size=8)
    got = hoeffding_bentkus_pvalue(r_hats, n, alphas)
    want = [_hb_direct(r, n, a) for r, a in zip(r_hats, alphas)]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-300)


def test_binomial_count_is_exact_for_integer_counts():
    assert math.ceil(100 * 0.07) == 8  # the floating-point trap the count must avoid
    assert int(binomial_count(100 * 0.07)) == 7
    losses = np.zeros(100)
    losses[:7] = 1.0
    assert int(binomial_count(losses.sum())) == 7
    assert int(binomial_count(7.2)) == 8
    assert hoeffding_bentkus_pvalue(0.07, 100, 0.1) == pytest.approx(
        min(math.e * binom.cdf(7, 100, 0.1), _hb_direct(0.07, 100, 0.1)), rel=1e-12)


@pytest.mark.parametrize("r_hat,n,delta", [(0.1, 100, 0.1), (0.0, 50, 0.05), (0.33, 400, 0.2), (0.02, 1000, 0.01)])
def test_hb_ucb_is_root_of_direct_pvalue(r_hat, n, delta):
    root = brentq(lambda R: _hb_direct(r_hat, n, R) - delta, r_hat + 1e-12, 1 - 1e-12, xtol=1e-13)
    assert hoeffding_bentkus_ucb(r_hat, n, delta) == pytest.approx(root, abs=1e-9)


def test_hb_ucb_maps_other_ranges_through_unit_interval():
    # signed gap in [-1, 1]: R' = (R + 1)/2, bound mapped back with 2·R⁺' − 1
    got = hoeffding_bentkus_ucb(-0.1, 200, 0.1, lower=-1.0, upper=1.0)
    assert got == pytest.approx(2 * hoeffding_bentkus_ucb(0.45, 200, 0.1) - 1, abs=1e-12)


# ---------------------------------------------------------------- Hoeffding
@pytest.mark.parametrize("lower,upper", [(0.0, 1.0), (-1.0, 1.0), (0.0, 2.0)])
def test_hoeffding_ucb_inverts_hoeffding_tail(lower, upper):
    n, delta, r_hat = 300, 0.1, 0.03
    # Hoeffding: P(R̂ ≤ R − t) ≤ exp(−2 n t² / (b − a)²); solve the tail = δ for t
    t = brentq(lambda t: math.exp(-2 * n * t * t / (upper - lower) ** 2) - delta, 1e-12, 10.0, xtol=1e-14)
    assert hoeffding_ucb(r_hat, n, delta, lower, upper) == pytest.approx(r_hat + t, abs=1e-10)


# ---------------------------------------------------------------- WSR vs the betting martingale by brute force
def _wsr_brute_force(x, delta, grid):
    """Plain loops: predictable bets, capital per candidate mean, first μ on the grid whose capital hits 1/δ."""
    n = len(x)
    mus, sig2 = [], []
    total, sq = 0.0, 0.0
    for i, xi in enumerate(x, start=1):
        total += xi
        mu_i = (0.5 + total) / (i + 1)
        sq += (xi - mu_i) ** 2
        mus.append(mu_i)
        sig2.append((0.25 + sq) / (i + 1))
    bets = []
    for i in range(n):
        prev = 0.25 if i == 0 else sig2[i - 1]
        bets.append(min(1.0, math.sqrt(2 * math.log(1 / delta) / (n * prev))))
    for mu in grid:
        capital, best = 1.0, 1.0
        for xi, nu in zip(x, bets):
            capital *= 1.0 - nu * (xi - mu)
            best = max(best, capital)
        if best >= 1.0 / delta:
            return mu
    return 1.0


@pytest.mark.parametrize("seed,signed", [(0, False), (1, True), (2, True)])
def test_wsr_matches_brute_force_martingale(seed, signed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0 if signed else 0.0, 1.0, size=30) * rng.uniform(0.1, 0.6)
    grid = np.arange(0, 1.0, 1e-4)
    brute = _wsr_brute_force(list(x), 0.1, grid)
    got = wsr_ucb(x, 0.1)
    assert brute - 1e-4 <= got <= brute + 1e-12


def test_wsr_is_vectorised_and_scales_with_upper_bound():
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, size=(4, 3, 60)) * 0.3
    batched = wsr_ucb(x, 0.05)
    assert batched.shape == (4, 3)
    for idx in np.ndindex(4, 3):
        assert batched[idx] == wsr_ucb(x[idx], 0.05)
    assert wsr_ucb(2 * x[0, 0], 0.05, upper=2.0) == pytest.approx(2 * wsr_ucb(x[0, 0], 0.05), abs=1e-12)


def test_wsr_on_signed_losses_beats_rescaling_to_unit_interval():
    # "Mind the range": feeding [-1, 1] gaps unchanged keeps the margin that rescaling throws away
    signed = np.tile([-0.2, 0.0, 0.1, 0.3], 25)
    direct = wsr_ucb(signed, 0.1)
    rescaled = 2 * wsr_ucb((signed + 1) / 2, 0.1) - 1
    assert direct < rescaled


def test_wsr_limits():
    assert wsr_ucb(np.full(50, -0.5), 0.1) < 1e-9      # every μ > 0 is rejected
    assert wsr_ucb(np.ones(5), 0.1) == 1.0              # nothing below B is rejected


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bounds_reject_bad_delta(bad):
    with pytest.raises(ValueError, match="delta"):
        wsr_ucb(np.zeros(5), bad)
    with pytest.raises(ValueError, match="delta"):
        hoeffding_ucb(0.1, 10, bad)
    with pytest.raises(ValueError, match="delta"):
        hoeffding_bentkus_ucb(0.1, 10, bad)


def test_bounds_reject_bad_n_and_range():
    with pytest.raises(ValueError, match="positive integer"):
        hoeffding_ucb(0.1, 0, 0.1)
    with pytest.raises(ValueError, match="lower < upper"):
        hoeffding_ucb(0.1, 10, 0.1, lower=1.0, upper=0.0)
    with pytest.raises(ValueError, match="upper"):
        wsr_ucb(np.zeros(5), 0.1, upper=0.0)
    with pytest.raises(ValueError, match="upper"):
        wsr_ucb(np.array([0.5, 1.5]), 0.1, upper=1.0)
