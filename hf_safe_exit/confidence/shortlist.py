"""Softmax margin over a per-token shortlist of the vocabulary: ``measure="softmax_shortlist"``.

CALM's softmax response (Schuster et al. 2022, Eq. 5) is ``p_(1) - p_(2)`` of the intermediate
softmax over the whole vocabulary. Projecting onto T5's 32k-token vocabulary at every checked
layer costs about as much as three decoder blocks of flan-t5-base, so with ``measure="softmax"``
early exit can be slower than the full model. This measure pays for one full projection per
decoding step and O(K·d_model) per later layer:

* at the **first check of a step** (the first call with a new ``view.step``, i.e. layer
  ``min_exit_layer`` or the first of ``exit_layers``, where every deciding row is checked) it takes the full logits
  ``view.logits`` (which the decoder caches and reuses as the read-out if the row exits there),
  returns their full-vocabulary softmax margin — exactly ``measure="softmax"`` at that layer — and
  remembers the top-``K`` token ids of every batch row;
* at **later layers of the same step** it computes only those ``K`` rows of the LM head,
  ``z_K = (scale · final_layer_norm(h)) @ W[cand].T`` (``scale = d_model**-0.5`` when
  ``config.scale_decoder_outputs``, as in the decoder's read-out), and returns
  ``p_(1) - p_(2)`` of ``softmax(z_K)``: the margin renormalised over the shortlist.

What holds relative to the full-vocabulary margin ``m`` of the same layer (same logits ``z``):
``z_K`` are the entries of ``z`` at the shortlist ids (up to floating-point summation order), and

* if the layer's full-vocabulary argmax is in the shortlist, the shortlist margin is **>= m**
  (the top-1 is the same, the runner-up within the shortlist is no larger, and the normaliser
  sums fewer positive terms); in exact arithmetic it is strictly larger whenever ``K < vocab``
  and ``m > 0``, so it over-estimates the full margin, by more the more mass lies outside;
* if the argmax is *not* in the shortlist, there is no ordering: the value can be above or
  below ``m``.

So this is a different confidence measure, not an approximation with a guarantee. The token a
row emits is unaffected: an exiting row is read out through the full LM head at its exit layer
(its full-vocabulary argmax, which need not be in the shortlist). Thresholds tuned for
``"softmax"`` do not transfer; risk control (``hf_safe_exit.risk.RiskControlled``, CALM Sec. 3 /
Learn-then-Test) calibrates whatever measure it is given, so calibrate with
``measure="softmax_shortlist"`` itself.

State: the shortlist is kept per *batch row index* (a ``(batch, K)`` tensor sized lazily), so a
batch behaves like its rows run one at a time. It is reset whenever a view starts a new step (the
step changes, or the layer does not increase within a step, as when a bound instance is reused
by a second ``generate`` call); a view containing a row without a shortlist for the current step
is treated as a first check. ``EarlyExit.bind`` binds a fresh instance for every ``generate``
call, so concurrent calls never share state.

Limitation: with ``EarlyExit(anytime="poe")`` the first check sees the Product-of-Experts logits
(``view.logits``) while later checks see the layer's own logits over the shortlist; use
``measure="softmax"`` with PoE.
"""

from __future__ import annotations

import torch

from .base import ConfidenceMeasure, LayerView
from .softmax import softmax_margin

__all__ = ["SoftmaxShortlistConfidence", "InvalidNumCandidatesError", "DEFAULT_NUM_CANDIDATES"]

#: Default shortlist size. The per-layer cost K·d_model is negligible for any K << vocab (K = 16 on
#: flan-t5-base: 16·768 multiply-adds against ~7·768² for the projections of one decoder block, and
#: against 32128·768 for the full projection), so K is chosen for fidelity, not speed: a larger
#: shortlist is more likely to contain later layers' argmax and its normaliser misses less mass (a
#: smaller over-estimate of the full margin). 16 keeps the cost <0.1% of the full projection while
#: covering a top-16 that usually holds the later layers' argmax; K = 2 would make the margin
#: depend on two tokens only.
DEFAULT_NUM_CANDIDATES = 16


class InvalidNumCandidatesError(ValueError):
    """``num_candidates`` is not an integer in ``[2, vocab_size]``."""


def _check_num_candidates(num_candidates, vocab_size: int | None = None) -> None:
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 2:
        raise InvalidNumCandidatesError(
            f"num_candidates={num_candidates!r} is invalid: the shortlist margin needs at least two candidates, "
            f"so pass an integer >= 2, e.g. SoftmaxShortlistConfidence(num_candidates={DEFAULT_NUM_CANDIDATES})."
        )
    if vocab_size is not None and num_candidates > vocab_size:
        raise InvalidNumCandidatesError(
            f"num_candidates={num_candidates!r} exceeds this model's vocabulary of {vocab_size} tokens: "
            f"use an integer in [2, {vocab_size}] (a shortlist of the whole vocabulary is measure='softmax')."
        )


class SoftmaxShortlistConfidence(ConfidenceMeasure):
    """Softmax margin over the full vocabulary at a step's first check, over its top-K ids afterwards.

    Args:
        num_candidates: K, the shortlist size (integer in ``[2, vocab_size]``, checked again
            against the vocabulary in :meth:`bind`). Default :data:`DEFAULT_NUM_CANDIDATES`.

    Use it by name, ``EarlyExit(measure="softmax_shortlist")``, or as an instance,
    ``EarlyExit(measure=SoftmaxShortlistConfidence(num_candidates=32))``. ``bind(model)`` returns a
    new instance holding the model's LM-head weight and output scale; the instance passed in is
    never modified. See the module docstring for what the value means relative to ``"softmax"``.
    """

    name = "softmax_shortlist"
    needs_logits = False  # the full projection only at the first check of each step

    def __init__(self, num_candidates: int = DEFAULT_NUM_CANDIDATES):
        _check_num_candidates(num_candidates)
        self.num_candidates = num_candidates
        self._weight: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None
        self._scale: float | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        self._step: int | None = None
        self._last_layer: int | None = None
        self._cand_weight: torch.Tensor | None = None  # (batch, K, d_model): LM-head rows of each shortlist
        self._cand_bias: torch.Tensor | None = None  # (batch, K) when the head has a bias
        self._valid: torch.Tensor | None = None  # (batch,) bool: row has a shortlist for self._step
        self.candidates: torch.Tensor | None = None  # (batch, K) long: the current step's shortlist ids

    def bind(self, model) -> "SoftmaxShortlistConfidence":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            head = getattr(model, "lm_head", None)
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(
                f"measure='softmax_shortlist' needs a linear LM head with a (vocab, d_model) weight, but "
                f"{type(model).__name__} has {type(head).__name__}: use measure='softmax' for this model."
            )
        _check_num_candidates(self.num_candidates, weight.shape[0])
        bound = SoftmaxShortlistConfidence(self.num_candidates)
        bound._weight = weight
        bias = getattr(head, "bias", None)
        bound._bias = bias if isinstance(bias, torch.Tensor) else None
        # The decoder's read-out: lm_head(final_layer_norm(h) * d_model**-0.5) when the config scales outputs.
        bound._scale = model.config.d_model**-0.5 if getattr(model.config, "scale_decoder_outputs", False) else None
        return bound

    def _ensure_capacity(self, size: int, device: torch.device) -> None:
        k, d = self.num_candidates, self._weight.shape[1]
        old = 0 if self._valid is None else self._valid.shape[0]
        if size <= old and self._valid.device == device:
            return
        size = max(size, old)
        cand = torch.zeros((size, k), dtype=torch.long, device=device)
        cand_w = torch.zeros((size, k, d), dtype=self._weight.dtype, device=device)
        cand_b = None if self._bias is None else torch.zeros((size, k), dtype=self._bias.dtype, device=device)
        valid = torch.zeros(size, dtype=torch.bool, device=device)
        if old:
            cand[:old] = self.candidates.to(device)
            cand_w[:old] = self._cand_weight.to(device)
            if cand_b is not None:
                cand_b[:old] = self._cand_bias.to(device)
            valid[:old] = self._valid.to(device)
        self.candidates, self._cand_weight, self._cand_bias, self._valid = cand, cand_w, cand_b, valid

    @torch.no_grad()
    def __call__(self, view: LayerView) -> torch.Tensor:
        if self._weight is None:
            raise ValueError("SoftmaxShortlistConfidence used before bind(model): call measure.bind(model) "
                             "(EarlyExit does this for you) so it knows the LM head and the output scale.")
        rows = view.rows
        new_step = self._step != view.step or self._last_layer is None or view.layer <= self._last_layer
        if new_step:
            self._step = view.step
            if self._valid is not None:
                self._valid.zero_()
        self._last_layer = view.layer
        if rows.numel() == 0:
            return torch.zeros(0, device=rows.device, dtype=torch.float32)
        # the batch size when the decoder gives it: reading rows.max() back is a host synchronisation on a GPU
        self._ensure_capacity(view.batch_size or int(rows.max()) + 1, rows.device)

        if new_step or not bool(self._valid[rows].all()):
            # First check of the step: the full projection (the decoder keeps it as the read-out).
            logits = view.logits
            cand = logits.topk(self.num_candidates, dim=-1).indices
            self.candidates[rows] = cand
            self._cand_weight[rows] = self._weight[cand]
            if self._cand_bias is not None:
                self._cand_bias[rows] = self._bias[cand]
            self._valid[rows] = True
            return softmax_margin(logits)

        normed = view.normed if self._scale is None else view.normed * self._scale
        weight = self._cand_weight[rows]  # (n, K, d)
        logits_k = torch.bmm(weight, normed.to(weight.dtype).unsqueeze(-1)).squeeze(-1)  # (n, K)
        if self._cand_bias is not None:
            logits_k = logits_k + self._cand_bias[rows]
        return softmax_margin(logits_k)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_candidates={self.num_candidates})"
