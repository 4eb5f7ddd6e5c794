"""Vectorised validity simulations for the risk-control methods (the protocol of Jazbec, Timans et al. 2024).

The engine of ``benchmarks/risk_validity.py`` and of ``tests/test_risk_validity.py``; not part of the library.

A *population* of N examples with a loss per (λ, example) plays the role of the data
distribution: calibration sets are drawn i.i.d. from it (with replacement), so the true
risk R(λ) is exactly the population mean and the guarantee of each method can be checked
against it. :func:`synthetic_population` builds an early-exit-like population (per-layer
confidences and task losses; exit at the first layer whose confidence exceeds λ), whose
per-example gaps are signed and non-monotone in λ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hf_safe_exit.risk.bounds import check_level, hoeffding_bentkus_pvalue, hoeffding_ucb, wsr_rejects
from hf_safe_exit.risk.selection import crc_statistic, first_violation_scan, ltt_pvalues

__all__ = ["synthetic_population", "simulate", "SimulationResult", "SIM_METHODS", "mc_tolerance"]

# (method, bound) pairs that simulate() understands
SIM_METHODS = ("naive", "crc", "ucb_hoeffding", "ucb_hoeffding_bentkus", "ucb_wsr", "ltt")


def synthetic_population(n_examples: int = 20000, num_lambdas: int = 21, num_layers: int = 8, seed: int = 0,
                         help_rate: float = 0.35, shortfall: float = 0.8, return_exit_layers: bool = False):
    """An early-exit-like population: returns ``(lambdas (K,), task_losses (K, N))`` in [0, 1]
    (and the 1-based exit layers (K, N) with ``return_exit_layers=True``).

    Each example has a difficulty d ~ Beta(2, 4). Layer i's confidence rises with depth
    and falls with difficulty; its task loss falls with depth towards the final layer's
    (by up to ``shortfall`` at the first layer), with noise. With probability ``help_rate`` an intermediate layer is *better* than the
    last one (negative gap). The exit layer at λ is the first whose confidence exceeds λ
    (the last layer if none): the full model at λ = 1.
    """
    rng = np.random.default_rng(seed)
    lambdas = np.linspace(0.0, 1.0, num_lambdas)
    depth = np.arange(1, num_layers + 1) / num_layers  # (L,)
    d = rng.beta(2.0, 4.0, size=(n_examples, 1))
    logit = 4.0 * depth[None, :] - 4.0 * d - 1.5 + rng.normal(0.0, 1.0, size=(n_examples, num_layers))
    conf = 1.0 / (1.0 + np.exp(-logit))
    final = np.clip(d[:, 0] + rng.normal(0.0, 0.1, n_examples), 0.0, 1.0)
    worse = (1.0 - depth)[None, :] * rng.uniform(0.0, shortfall, size=(n_examples, 1))
    helps = rng.random((n_examples, num_layers)) < help_rate * (1.0 - depth)[None, :]
    delta = np.where(helps, -rng.uniform(0.0, 0.5, (n_examples, num_layers)), worse)
    layer_loss = np.clip(final[:, None] + delta + rng.normal(0.0, 0.05, (n_examples, num_layers)), 0.0, 1.0)
    layer_loss[:, -1] = final
    exits = conf[None, :, :] > lambdas[:, None, None]  # (K, N, L)
    exits[..., -1] = True
    exit_layer = np.argmax(exits, axis=-1)  # first layer that exits
    task = np.take_along_axis(layer_loss[None].repeat(num_lambdas, 0), exit_layer[..., None], axis=-1)[..., 0]
    if return_exit_layers:
        return lambdas, task, exit_layer + 1
    return lambdas, task


@dataclass
class SimulationResult:
    """Per method: the threshold λ̂ per split (S,), the true risk at λ̂ (S,), and summaries."""

    threshold: dict
    true_risk: dict
    eps: float
    delta: float | None

    def mean_risk(self, method: str) -> float:
        return float(np.mean(self.true_risk[method]))

    def violation_rate(self, method: str) -> float:
        return float(np.mean(self.true_risk[method] > self.eps))

    def mean_lambda(self, method: str) -> float:
        return float(np.mean(self.threshold[method]))


def simulate(lambdas, population_losses, eps: float, delta: float, n_cal: int, n_splits: int,
             loss_bounds=(-1.0, 1.0), methods=SIM_METHODS, monotonize=None, seed: int = 0,
             true_risk=None) -> SimulationResult:
    """Draw ``n_splits`` calibration sets of size ``n_cal`` i.i.d. from the population and run every method.

    Vectorised over splits; each method uses the same scan-from-λ = 1, stop-at-first-violation
    rule as :mod:`hf_safe_exit.risk.selection`. ``true_risk`` defaults to the population mean.
    """
    eps = check_level(eps, "eps")
    delta = check_level(delta, "delta")
    lower, upper = (float(v) for v in loss_bounds)
    lam = np.asarray(lambdas, dtype=np.float64)
    order = np.argsort(-lam)
    lam, pop = lam[order], np.asarray(population_losses, dtype=np.float64)[order]
    risk = pop.mean(axis=1) if true_risk is None else np.asarray(true_risk)[order]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, pop.shape[1], size=(n_splits, n_cal))
    cal = np.moveaxis(pop[:, idx], 0, 1)  # (S, K, n)
    if monotonize == "per_example":
        cal = np.maximum.accumulate(cal, axis=1)
    r_hat = cal.mean(axis=-1)  # (S, K)
    lam_hat, risk_at = {}, {}
    for method in methods:
        if method == "naive":
            passed = r_hat <= eps
        elif method == "crc":
            passed = crc_statistic(r_hat, n_cal, upper) <= eps
        elif method == "ucb_hoeffding":
            passed = hoeffding_ucb(r_hat, n_cal, delta, lower, upper) < eps
        elif method == "ucb_hoeffding_bentkus":  # R⁺ < ε  ⇔  p_HB(ε) ≤ δ (p is non-increasing)
            passed = hoeffding_bentkus_pvalue((r_hat - lower) / (upper - lower), n_cal,
                                              (eps - lower) / (upper - lower)) <= delta
        elif method == "ucb_wsr":  # R⁺ < ε  ⇔  the betting test rejects μ = ε
            passed = wsr_rejects(cal, delta, eps, upper=upper)
        elif method == "ltt":
            passed = ltt_pvalues(cal, eps, lower, upper) <= delta
        else:
            raise ValueError(f"Unknown simulation method {method!r}: use {SIM_METHODS}.")
        pos = np.maximum(first_violation_scan(passed), 0)
        lam_hat[method] = lam[pos]
        risk_at[method] = risk[pos]
    return SimulationResult(lam_hat, risk_at, eps, delta)


def mc_tolerance(p: float, n_splits: int, z: float = 4.0) -> float:
    """z·sqrt(p(1 − p)/S): the Monte-Carlo slack on a frequency estimated from S splits."""
    return z * math.sqrt(p * (1.0 - p) / n_splits)
