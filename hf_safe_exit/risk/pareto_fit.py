"""Fitting ``method="pareto"``: one configuration of a :class:`~hf_safe_exit.risk.ConfigurationTable`, certified.

:func:`fit_pareto` runs :func:`~hf_safe_exit.risk.pareto_test` (Laufer-Goldshtein, Fisch, Barzilay, Jaakkola, ICLR
2023, Algorithm 1) on the table's losses for one risk and one of its costs, and returns the configuration to decode
with its :class:`~hf_safe_exit.risk.RiskCertificate`. Guarantee: P(R(chosen) > ε) ≤ δ over the draw of the
calibration examples, for any number of configurations. Nothing certified (no null rejected), or only the full
model: the table's default row (its first at threshold 1) with ``feasible=False`` and a warning, as the scalar
methods do at λ̂ = 1.

The split is :func:`~hf_safe_exit.risk.pareto.split_examples` with the request's ``seed``, so that a stored
certificate can be recomputed from its table (:mod:`hf_safe_exit.risk.integrity`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..config import EarlyExitConfig
from .certificate import PARETO, RiskCertificate, guarantee_text
from .configuration_table import ConfigurationTable
from .loss_table import LossTable
from .pareto import ParetoResult, pareto_test, split_examples

__all__ = ["ParetoFit", "fit_pareto", "pareto_infeasible_message", "DEFAULT_COST"]

DEFAULT_COST = "layer_fraction"  # the fraction of decoder blocks run: what early exit saves


@dataclass(frozen=True)
class ParetoFit:
    """The configuration Pareto Testing chose: its row ``index`` in the table, ``threshold`` (λ), ``config`` and
    ``certificate``; ``result`` is what :func:`~hf_safe_exit.risk.pareto_test` returned."""

    index: int
    threshold: float
    config: EarlyExitConfig
    certificate: RiskCertificate
    result: ParetoResult


def _check_table(table, risk: str, cost: str) -> None:
    if isinstance(table, LossTable):
        raise ValueError("method='pareto' chooses among configurations: it fits a ConfigurationTable, and this is a "
                         "1-D λ table of one configuration. Stack the tables of several configurations with "
                         "ConfigurationTable.from_tables([table, ...]) (one table: from_tables([table])), or use a "
                         "scalar method (crc, ucb, ltt) on it.")
    if not isinstance(table, ConfigurationTable):
        raise TypeError(f"method='pareto' fits a ConfigurationTable, got {type(table).__name__}.")
    if risk not in table.losses:
        raise ValueError(f"This table has no {risk!r} losses (it has {sorted(table.losses)}): pick one of those with "
                         "risk=..., or rebuild the table with them.")
    if not isinstance(cost, str) or cost not in table.costs:
        raise ValueError(f"cost={cost!r} is not a cost of this table (it has {sorted(table.costs)}): pass one of them "
                         "as fit_table(table, cost=...).")


def fit_pareto(table: ConfigurationTable, *, eps: float, delta: float, risk: str, p_value: str, opt_fraction: float,
               seed: int, cost: str = DEFAULT_COST, about: dict | None = None) -> ParetoFit:
    """Pareto Testing on ``table`` for ``risk`` and ``cost`` (see the module docstring). ``about``: what the losses
    were collected on (``model_fingerprint``, ``task``, ``max_new_tokens``, ``max_input_length``), copied into the
    certificate. Warns (``UserWarning``) when nothing below the full model is certified."""
    _check_table(table, risk, cost)
    about = dict(about or {})
    losses, bounds = table.losses[risk], table.bounds[risk]
    result = pareto_test(losses, table.costs[cost], eps, delta, opt_fraction=opt_fraction, p_value=p_value,
                         seed=seed, loss_range=bounds)
    index = result.index if result.index is not None else table.full_model_index
    threshold = float(table.settings[index]["threshold"])
    feasible = result.index is not None and threshold < 1.0
    test = split_examples(table.n, opt_fraction, seed)[1]
    chosen = None if result.index is None else int((result.front == result.index).nonzero()[0][0])
    config = table.config(index)
    certificate = RiskCertificate(
        eps=result.eps, delta=result.delta, method=PARETO, bound=p_value, risk=risk, monotonize=None, n=table.n,
        threshold=threshold, empirical_risk=float(losses[index, test].mean()), risk_bound=result.risk_bound,
        p_value=None if chosen is None else float(result.p_values[chosen]), feasible=feasible,
        guarantee=guarantee_text(PARETO, result.eps, result.delta, risk), loss_bounds=bounds,
        model_fingerprint=about.get("model_fingerprint"), task=about.get("task"), measure=config.measure_name,
        max_new_tokens=about.get("max_new_tokens"), max_input_length=about.get("max_input_length"),
        configuration=dict(table.settings[index]), configuration_index=int(index),
        num_configurations=table.num_configurations, n_opt=result.n_opt, n_test=result.n_test,
        opt_fraction=float(opt_fraction), seed=int(seed), cost=cost, front=[int(g) for g in result.front],
        front_risk=[float(v) for v in result.front_risk], front_cost=[float(v) for v in result.front_cost],
        front_p_value=[float(v) for v in result.p_values], num_rejected=int(result.num_rejected))
    if not feasible:
        warnings.warn(pareto_infeasible_message(result, table), UserWarning, stacklevel=3)
    return ParetoFit(int(index), threshold, config, certificate, result)


def pareto_infeasible_message(result: ParetoResult, table: ConfigurationTable) -> str:
    """Why Pareto Testing certified nothing below the full model, and what λ = 1 means for decoding."""
    if result.num_rejected:  # what was rejected is the full model alone: the cheapest rejected is λ = 1
        why = ("only the full model (threshold 1) passed the test: the next configuration of the front (row "
               f"{int(result.front[result.num_rejected])}) has p-value {result.p_values[result.num_rejected]:.3g} > "
               f"δ" if result.num_rejected < result.front_size else "only full-model rows passed the test")
    else:
        why = (f"the first configuration of the front (row {int(result.front[0])}, estimated risk "
               f"{result.front_risk[0]:.3g} on the n_opt={result.n_opt} optimisation examples) has p-value "
               f"{result.p_values[0]:.3g} > δ on the n_test={result.n_test} test examples, so fixed-sequence "
               "testing stops before certifying any")
    return (f"RiskControlled(pareto, eps={result.eps:g}, delta={result.delta:g}, p_value={result.p_value}): among the "
            f"{table.num_configurations} configurations (a front of {result.front_size}), {why}. So λ̂ = 1: the model "
            "decodes at λ = 1, running every decoder layer for every token (it never exits early: the full model's "
            "output, no speed-up). Raise eps (or delta), or calibrate on more examples.")
