"""Product-of-Experts anytime exits (Jazbec, Allingham, Zhang, Nalisnick, NeurIPS 2023).

"Towards Anytime Classification in Early-Exit Architectures by Enforcing Conditional
Monotonicity" observes that an early-exit network's prediction for a *given* input need not
improve with depth (no conditional monotonicity) and proposes a post-hoc fix, *Product
Anytime* (PA): treat every exit as an expert and predict at exit l with the normalised
product of the experts seen so far,

    p_l(y) = (1 / Z_l) · ∏_{i ≤ l} a(z_i(y)) ^ w_i ,     a = ReLU (or softplus),

where z_i are the logits of exit i and w_i > 0 are per-exit weights. With ReLU every expert
can veto a class (a(z) = 0 for z ≤ 0), so the support of p_l can only shrink with l and the
distribution becomes gradually confident. When the product vanishes for *every* class
(Z_l = 0, possible only with ReLU) the prediction falls back to the plain softmax of exit l.

Weights: the authors' code (``anytime_product`` in their repository, used with
``weights = arange(1, L + 1) / L``) weights exit i by w_i = i / L, favouring the later,
more accurate exits; that is the default here (``weights="linear"``). ``"uniform"``
(w_i = 1) and an explicit sequence of L weights are available.

For a T5 decoder every decoder layer is an exit (read out through the shared head, CALM
style), so for the token being decoded the "experts" are the logits of layers 1..l.

Numerics: the product is computed in log space, s_l = Σ_{i ≤ l} w_i · log a(z_i), which
equals log ∏ a(z_i)^{w_i} exactly in real arithmetic and neither overflows nor underflows
for deep decoders (a(z)^{w} over 24 layers of logits ~ 50 would reach 1e20). A vetoed class
has s_l = −inf. :func:`poe_log_probs` returns log p_l with vetoed classes set to the most
negative finite value of the dtype (not −inf), so that logits processors that mask the few
supported classes (e.g. ``min_new_tokens`` on EOS) cannot produce a NaN softmax; exp of it
is exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["PoEConfig", "PoEState", "poe_weights", "poe_log_probs", "poe_distribution", "resolve_anytime",
           "ACTIVATIONS", "FINAL_LAYER"]

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


def _log_activation(logits: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.log(torch.clamp(logits, min=0.0))  # log 0 = -inf: the veto
    return torch.log(F.softplus(logits))


def _normalise(score: torch.Tensor, fallback_logits: torch.Tensor) -> torch.Tensor:
    """log p from the unnormalised log-product ``score``; rows where every class is vetoed fall back."""
    vanished = torch.isneginf(score).all(dim=-1, keepdim=True)
    safe = torch.where(vanished, torch.zeros_like(score), score)
    logp = safe - torch.logsumexp(safe, dim=-1, keepdim=True)
    logp = torch.where(vanished, torch.log_softmax(fallback_logits.to(score.dtype), dim=-1), logp)
    return torch.nan_to_num(logp, neginf=torch.finfo(logp.dtype).min)


class PoEState:
    """The running log-product s_l = Σ_{i ≤ l} w_i log a(z_i) of every row of a batch for one decoding step."""

    def __init__(self, config: PoEConfig, num_layers: int, batch: int, dtype: torch.dtype, device: torch.device):
        self.config = config
        self.weights = config.layer_weights(num_layers).tolist()
        self.batch, self.dtype, self.device = batch, dtype, device
        self.score: torch.Tensor | None = None  # (batch, vocab), allocated at the first update

    def update(self, layer: int, rows: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        """Fold in the logits of (1-based) ``layer`` for ``rows`` (None = all); return their log p_layer.

        Layers must come in order and a row must be updated at every layer up to the one it exits at
        (rows only ever leave the deciding set), as the decoder does.
        """
        if self.score is None:
            self.score = torch.zeros((self.batch, logits.shape[-1]), dtype=self.dtype, device=self.device)
        logits = logits.to(self.dtype)
        term = self.weights[layer - 1] * _log_activation(logits, self.config.activation)
        if rows is None:
            self.score = self.score + term
            score = self.score
        else:
            score = self.score[rows] + term
            self.score[rows] = score
        return _normalise(score, logits)


def poe_log_probs(layer_logits: torch.Tensor, weights: str | Sequence[float] = "linear",
                  activation: str = "relu") -> torch.Tensor:
    """log p_l for every exit l at once.

    Args:
        layer_logits: ``(L, ..., vocab)`` logits of exits 1..L.
    Returns:
        ``(L, ..., vocab)`` log-probabilities of the PoE distribution at each exit (vetoed classes at the dtype's
        most negative finite value; a row whose product vanished holds the log-softmax of that exit's logits).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is unknown: use one of {ACTIVATIONS}.")
    dtype = torch.promote_types(layer_logits.dtype, torch.float32)
    z = layer_logits.to(dtype)
    w = poe_weights(z.shape[0], weights).to(dtype=dtype, device=z.device)
    w = w.view(-1, *([1] * (z.dim() - 1)))
    score = torch.cumsum(w * _log_activation(z, activation), dim=0)
    return _normalise(score, z)


def poe_distribution(layer_logits: torch.Tensor, weights: str | Sequence[float] = "linear",
                     activation: str = "relu") -> torch.Tensor:
    """``exp(poe_log_probs(...))``: the PoE probabilities at every exit, ``(L, ..., vocab)``."""
    return poe_log_probs(layer_logits, weights, activation).exp()
