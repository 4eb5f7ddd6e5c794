"""What the calibration runner decodes with at each λ, and the per-example cost it records.

:func:`~hf_safe_exit.calibration.collect` is the same loop for every decoding strategy. A
*strategy* tells it three things:

* ``policy(λ)``: the ``early_exit=`` object to decode with at threshold λ (λ = 1 must be the
  reference output: the full model, or the large model);
* ``config``: JSON-able settings that determine the outputs. They go into the resume check
  (the state's ``config.json``) and into the result file's metadata;
* ``costs(out)``: per-example cost numbers read from the ``generate`` output (``{name: one value
  per row}``), stored as ``(K, n)`` extras of the result file (int64 if all values are ints, else
  float64).

Two strategies exist:

* :class:`EarlyExitStrategy` (the default): ``EarlyExit(λ, config=...)`` for one
  :class:`~hf_safe_exit.EarlyExitConfig`; costs ``mean_exit_layer``, ``layer_fraction``, ``num_tokens``. Its
  config and metadata are the configuration's ``to_dict()`` (flat keys: ``measure``, ``schedule``, ...).
* :class:`FactoryStrategy`: any ``policy_factory(λ)`` with a JSON-able ``description``, e.g.
  :func:`hf_safe_exit.decoding.bild.bild_policy_factory` for BiLD's rollback threshold
  (λ = exp(−α_RB)). Config and metadata hold ``"policy": description`` and the metadata
  also ``"strategy": description["strategy"]``. For BiLD the costs are ``large_calls_per_token``
  (large-decoder passes that included the example / its generated tokens; 1.0 = the large model
  alone) and ``num_tokens`` (its generated tokens); the metadata also lists the ``rollbacks`` of the
  grid (``"inf"`` for λ = 0).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np

__all__ = ["EarlyExitStrategy", "FactoryStrategy", "default_bild_lambdas", "default_lambdas"]

# BiLD rollback thresholds α_RB (nats) of the default grid, from "accept every draft" down to the large model.
_BILD_ROLLBACKS = (math.inf, 8.0, 6.0, 5.0, 4.0, 3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.75, 0.5, 0.25, 0.1, 0.0)


def default_lambdas() -> np.ndarray:
    """The default grid: 20 thresholds, ascending, including λ = 0 and λ = 1.

    ``0, 0.1, ..., 0.9`` and then a denser top end ``0.92, 0.94, 0.96, 0.98, 0.99, 0.995,
    0.998, 0.999, 0.9995, 1``: the softmax-margin and saturation confidences of a trained
    model pile up close to 1, where most of the trade-off between speed and risk happens.
    """
    low = np.round(np.arange(0.0, 0.95, 0.1), 10)
    high = np.array([0.92, 0.94, 0.96, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 1.0])
    return np.concatenate([low, high])


def default_bild_lambdas() -> np.ndarray:
    """The default λ grid for BiLD, ascending: λ = exp(−α_RB) for α_RB = ∞, 8, 6, 5, 4, 3.5, ..., 0.25, 0.1, 0.

    λ = 0 accepts every draft (α_RB = ∞); λ = 1 (α_RB = 0) is the large model's greedy output except at float ties
    (see :mod:`hf_safe_exit.decoding.bild`). The
    BiLD paper's useful rollback thresholds are a few nats, i.e. small λ, so the grid is dense there.
    """
    return np.array([0.0 if math.isinf(r) else math.exp(-r) for r in _BILD_ROLLBACKS])


def _floats(values) -> list[float]:
    return [float(x) for x in values.detach().cpu().double()]


def _ints(values) -> list[int]:
    return [int(x) for x in values.detach().cpu()]


def _json_number(x: float):
    """Strict JSON has no Infinity: ∞ is written as the string "inf" (and −0.0 as 0.0)."""
    return float(x) + 0.0 if math.isfinite(x) else "inf"


def _early_exit_costs(out) -> dict[str, list]:
    """Per row: mean 1-based exit layer, executed / (layers × tokens), generated tokens."""
    exit_layers = out.exit_layers.detach().cpu()
    return {"mean_exit_layer": _floats(out.mean_exit_layer), "layer_fraction": _floats(out.layer_fraction),
            "num_tokens": [int(x) for x in (exit_layers > 0).sum(dim=1)]}


class EarlyExitStrategy:
    """``EarlyExit(λ, config=config)`` at every λ (the default); ``config``'s measure is already resolved."""

    name = "early_exit"

    def __init__(self, config):
        self.early_exit_config = config
        self.config = config.to_dict()

    def policy(self, lam: float):
        from ..policy import EarlyExit

        return EarlyExit(float(lam), config=self.early_exit_config)

    def check(self, model, tokenizer) -> None:
        """Validate the settings on ``model`` once, before any decoding."""
        self.policy(1.0).bind(model)

    def metadata(self, lambdas) -> dict:
        return {}

    def costs(self, out) -> dict[str, list]:
        return _early_exit_costs(out)


class FactoryStrategy:
    """Decode with ``policy_factory(λ)``; ``description`` (JSON-able) identifies the settings.

    Without a description, ``policy_factory(1.0).describe()`` is used when the policy has one
    (e.g. :class:`~hf_safe_exit.decoding.bild.BiLD`). The costs depend on what ``generate``
    returns: BiLD outputs give ``large_calls_per_token`` and ``num_tokens``; early-exit outputs give
    the early-exit costs.
    """

    def __init__(self, policy_factory: Callable[[float], Any], description: Mapping[str, Any] | None = None):
        if not callable(policy_factory):
            raise TypeError(f"policy_factory must be a callable λ -> early_exit policy, got {type(policy_factory)!r}.")
        self.factory = policy_factory
        if description is None:
            describe = getattr(policy_factory(1.0), "describe", None)
            if not callable(describe):
                raise ValueError("pass policy_description=... (JSON-able settings of the policies): it identifies the "
                                 "run for resuming and goes into the result file's metadata.")
            description = describe()
        from ..risk.loss_table import json_ready

        self.description = json_ready(dict(description), "policy_description")
        self.name = str(self.description.get("strategy", "custom"))
        self.config = {"policy": self.description}

    def policy(self, lam: float):
        return self.factory(float(lam))

    def check(self, model, tokenizer) -> None:
        policy = self.policy(1.0)
        if callable(getattr(policy, "check_pair", None)):  # BiLD: the small model must suit the large one
            policy.check_pair(model, tokenizer)
        elif callable(getattr(policy, "bind", None)):
            policy.bind(model)

    def metadata(self, lambdas) -> dict:
        meta: dict[str, Any] = {"strategy": self.name}
        rollbacks = [getattr(self.policy(lam), "rollback", None) for lam in lambdas]
        if all(r is not None for r in rollbacks):
            meta["rollbacks"] = [_json_number(float(r)) for r in rollbacks]
        return meta

    def costs(self, out) -> dict[str, list]:
        if getattr(out, "row_large_calls", None) is not None:  # a BiLDOutput
            return {"large_calls_per_token": _floats(out.large_calls_per_token),
                    "num_tokens": _ints(out.row_new_tokens)}
        if getattr(out, "exit_layers", None) is not None:
            return _early_exit_costs(out)
        raise TypeError(f"the policies of policy_factory produced a {type(out).__name__}, which the runner cannot read "
                        "costs from: it supports early-exit and BiLD outputs.")

