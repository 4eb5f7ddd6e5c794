"""Validity by simulation (the protocol of Jazbec, Timans et al. 2024, Sec. 5).

Calibration sets are drawn i.i.d. (with replacement) from a fixed population, so the true
risk R(λ) is exactly the population mean and each split's λ̂ can be judged by R(λ̂).
Monte-Carlo tolerance, stated once: with S splits, a frequency p is estimated with standard
error sqrt(p(1 − p)/S) and a mean with std/sqrt(S); we allow 4 standard errors
(a false alarm rate below 1e-4 per check).
"""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_safe_exit.risk.loss_table import LossTable
from hf_safe_exit.risk.selection import select

BENCH = str(Path(__file__).resolve().parents[1] / "benchmarks")  # the simulations are benchmark code
sys.path.insert(0, BENCH)
try:
    from risk_simulation import SIM_METHODS, mc_tolerance, simulate, synthetic_population
finally:
    sys.path.remove(BENCH)

S = 500          # random calibration splits per ε
N_CAL = 300
DELTA = 0.1
Z = 4.0
EPSILONS = (0.02, 0.05, 0.1, 0.15)


@pytest.fixture(scope="module")
def early_exit_population():
    lam, task = synthetic_population(n_examples=20000, seed=7)
    return LossTable.from_task_losses(lam, task)


def _ternary_population(n=20000, K=21):
    """Signed losses with a closed-form risk curve: +1 w.p. a(λ), −1 w.p. b(λ), else 0.

    a(λ) = 0.3(1 − λ)^1.5, b(λ) = 0.15(1 − λ); one uniform u_j per example couples the λs
    (u < a(λ) → +1, u > 1 − b(λ) → −1), so an example's loss rises from −1 to 0 as λ grows:
    per-example losses are *not* monotone. u_j on a regular grid makes the population mean
    equal the closed form up to 1/N.
    """
    lam = np.linspace(0.0, 1.0, K)
    a, b = 0.3 * (1 - lam) ** 1.5, 0.15 * (1 - lam)
    u = (np.arange(n) + 0.5) / n
    losses = np.where(u[None, :] < a[:, None], 1.0, 0.0) - np.where(u[None, :] > 1 - b[:, None], 1.0, 0.0)
    return lam, losses, a - b


def test_ternary_population_matches_its_closed_form():
    lam, losses, risk = _ternary_population()
    np.testing.assert_allclose(losses.mean(axis=1), risk, atol=2e-4)
    per_example_increasing = np.any(np.diff(losses, axis=0) > 0, axis=0)  # loss rises somewhere as λ grows
    assert per_example_increasing.mean() > 0.1


def _check_validity(res, methods_expectation, methods_probability, eps):
    for m in methods_expectation:
        risk = res.true_risk[m]
        slack = Z * max(risk.std(), 1e-12) / math.sqrt(S)
        assert risk.mean() <= eps + slack, (m, eps, risk.mean(), slack)
    for m in methods_probability:
        rate = res.violation_rate(m)
        assert rate <= DELTA + mc_tolerance(DELTA, S, Z), (m, eps, rate)


@pytest.mark.parametrize("eps", EPSILONS)
def test_validity_unrestricted_gap_early_exit_population(early_exit_population, eps):
    table = early_exit_population
    gap = table.losses["performance_gap"]
    res = simulate(table.lambdas, gap, eps, DELTA, N_CAL, S, loss_bounds=(-1, 1), seed=int(eps * 1000))
    # the empirical risk curves really are non-monotone in λ, and the losses really signed
    assert (gap < 0).mean() > 0.05
    _check_validity(res, ["crc"], ["ucb_wsr", "ucb_hoeffding", "ucb_hoeffding_bentkus", "ltt"], eps)
    # the check has power: the naive method violates far more often than δ
    assert res.violation_rate("naive") > DELTA + mc_tolerance(DELTA, S, Z)
    # and the methods are not vacuous: WSR and CRC do exit early
    assert res.mean_lambda("ucb_wsr") < 0.95 and res.mean_lambda("crc") < 0.95


@pytest.mark.parametrize("eps", EPSILONS)
def test_validity_zero_bounded_gap_and_monotonized_crc(early_exit_population, eps):
    table = early_exit_population
    bounded = table.losses["performance_gap_bounded"]
    res = simulate(table.lambdas, bounded, eps, DELTA, N_CAL, S, loss_bounds=(0, 1),
                   methods=("crc", "ucb_wsr", "ltt"), seed=1 + int(eps * 1000))
    _check_validity(res, ["crc"], ["ucb_wsr", "ltt"], eps)
    mono = simulate(table.lambdas, table.losses["performance_gap"], eps, DELTA, N_CAL, S, loss_bounds=(-1, 1),
                    methods=("crc",), monotonize="per_example", seed=2 + int(eps * 1000),
                    true_risk=table.losses["performance_gap"].mean(axis=1))
    _check_validity(mono, ["crc"], [], eps)


@pytest.mark.parametrize("eps", (0.02, 0.05, 0.1))
def test_validity_closed_form_signed_curve(eps):
    lam, losses, risk = _ternary_population()
    res = simulate(lam, losses, eps, DELTA, N_CAL, S, loss_bounds=(-1, 1), true_risk=risk,
                   methods=("naive", "crc", "ucb_wsr", "ltt"), seed=3 + int(eps * 1000))
    _check_validity(res, ["crc"], ["ucb_wsr", "ltt"], eps)
    assert res.violation_rate("naive") > DELTA + mc_tolerance(DELTA, S, Z)


def test_simulation_agrees_with_select_split_by_split(early_exit_population):
    """The vectorised decision forms (betting test at μ = ε, p-value ≤ δ) pick the same λ̂ as select()."""
    table = early_exit_population
    gap = table.losses["performance_gap"]
    eps, splits, seed = 0.05, 12, 123
    res = simulate(table.lambdas, gap, eps, DELTA, N_CAL, splits, loss_bounds=(-1, 1), seed=seed)
    idx = np.random.default_rng(seed).integers(0, gap.shape[1], size=(splits, N_CAL))
    names = {"naive": ("naive", {}), "crc": ("crc", {}), "ltt": ("ltt", {"delta": DELTA}),
             "ucb_wsr": ("ucb", {"delta": DELTA, "bound": "wsr"}),
             "ucb_hoeffding": ("ucb", {"delta": DELTA, "bound": "hoeffding"}),
             "ucb_hoeffding_bentkus": ("ucb", {"delta": DELTA, "bound": "hoeffding_bentkus"})}
    assert set(names) == set(SIM_METHODS)
    for s in range(splits):
        cal = gap[:, idx[s]]
        for sim_name, (method, kw) in names.items():
            got = select(method, table.lambdas, cal, eps, loss_bounds=(-1, 1), **kw).threshold
            assert got == res.threshold[sim_name][s], (sim_name, s)
