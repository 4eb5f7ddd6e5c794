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

from typing import Sequence

import torch
import torch.nn.functional as F

from ..anytime import ACTIVATIONS, FINAL_LAYER, PoEConfig, poe_weights, resolve_anytime

__all__ = ["PoEConfig", "PoEState", "poe_weights", "poe_log_probs", "poe_distribution", "resolve_anytime",
           "ACTIVATIONS", "FINAL_LAYER"]


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
