"""The Product-of-Experts anytime setting of the early-exit configuration: :class:`PoEConfig`.

A setting, not a decoding step: the configuration (:mod:`hf_safe_exit.config`) holds it, and the decoding loop
(:mod:`hf_safe_exit.decoding.poe`, which documents the method: Jazbec, Allingham, Zhang, Nalisnick, NeurIPS 2023)
reads it. It lives apart from the loop so that the configuration imports no decoding code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["PoEConfig", "resolve_anytime", "poe_weights", "ACTIVATIONS", "WEIGHT_SCHEMES", "FINAL_LAYER"]

ACTIVATIONS = ("relu", "softplus")
WEIGHT_SCHEMES = ("linear", "uniform")
FINAL_LAYER = ("model", "poe")


@dataclass(frozen=True)
class PoEConfig:
    """Product-of-Experts anytime predictions for early-exit decoding.

    Args:
        activation: ``"relu"`` (the paper's choice: experts can veto classes) or ``"softplus"``
            (strictly positive, never vetoes, never falls back).
        weights: ``"linear"`` (w_i = i / L, the authors' code; default), ``"uniform"`` (w_i = 1) or a
            sequence of L positive floats, one per decoder layer.
        prediction: use the PoE distribution as the token prediction (the logits handed to the
            logits processors, argmax / sampling, ``output_logits``). Default True.
        confidence: hand the PoE log-probabilities to the confidence measure as the layer's logits,
            so that ``measure="softmax"`` is the top-1 − top-2 margin of the PoE distribution.
            Measures that do not read logits (saturation, meta) are unaffected. Default True.
        final_layer: what a token that reaches the last decoder layer L gets. ``"model"`` (default):
            the model's own logits at L, so that threshold 1 is exactly the full model, the reference
            every risk guarantee of this library is stated against. ``"poe"``: the product over all
            L layers, as in the paper (then threshold 1 is the PoE model, not the plain one).
    """

    activation: str = "relu"
    weights: str | Sequence[float] = "linear"
    prediction: bool = True
    confidence: bool = True
    final_layer: str = "model"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"PoEConfig(activation={self.activation!r}) is unknown: use one of {ACTIVATIONS}.")
        if isinstance(self.weights, str):
            if self.weights not in WEIGHT_SCHEMES:
                raise ValueError(f"PoEConfig(weights={self.weights!r}) is unknown: use one of {WEIGHT_SCHEMES} "
                                 "or a sequence of one positive weight per decoder layer.")
        else:
            weights = tuple(float(w) for w in self.weights)
            if not weights or not all(w > 0 and w < float("inf") for w in weights):
                raise ValueError(f"PoEConfig(weights=...) must be positive and finite, got {self.weights!r}.")
            object.__setattr__(self, "weights", weights)
        if self.final_layer not in FINAL_LAYER:
            raise ValueError(f"PoEConfig(final_layer={self.final_layer!r}) is unknown: use one of {FINAL_LAYER}.")
        if not (self.prediction or self.confidence):
            raise ValueError("PoEConfig(prediction=False, confidence=False) would change nothing: use anytime=None.")

    def layer_weights(self, num_layers: int) -> torch.Tensor:
        return poe_weights(num_layers, self.weights)

    def to_dict(self) -> dict:
        w = self.weights if isinstance(self.weights, str) else list(self.weights)
        return {"activation": self.activation, "weights": w, "prediction": self.prediction,
                "confidence": self.confidence, "final_layer": self.final_layer}


def resolve_anytime(anytime) -> PoEConfig | None:
    """``None`` / ``"poe"`` / a :class:`PoEConfig` / a dict of its fields -> ``PoEConfig`` or ``None``."""
    if anytime is None or isinstance(anytime, PoEConfig):
        return anytime
    if isinstance(anytime, str):
        if anytime == "poe":
            return PoEConfig()
        raise ValueError(f"anytime={anytime!r} is unknown: use None, 'poe' or hf_safe_exit.PoEConfig(...).")
    if isinstance(anytime, dict):
        return PoEConfig(**anytime)
    raise TypeError(f"anytime must be None, 'poe', a PoEConfig or a dict, got {type(anytime).__name__}.")


def poe_weights(num_layers: int, weights: str | Sequence[float] = "linear") -> torch.Tensor:
    """Per-layer weights w_1..w_L as a float64 tensor: ``linear`` i/L, ``uniform`` 1, or the given sequence."""
    if weights == "linear":
        return torch.arange(1, num_layers + 1, dtype=torch.float64) / num_layers
    if weights == "uniform":
        return torch.ones(num_layers, dtype=torch.float64)
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    if w.shape != (num_layers,):
        raise ValueError(f"PoE weights has {w.numel()} entries but the decoder has {num_layers} layers.")
    return w
