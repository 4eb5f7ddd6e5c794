"""The common interface of confidence measures (CALM, Schuster et al. 2022, Sec. 3.5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["LayerView", "ConfidenceMeasure"]


@dataclass
class LayerView:
    """What a confidence measure may look at after decoder layer ``layer`` for one decoding step.

    Tensors cover the ``rows`` listed: on the CPU exactly the rows of the batch still deciding at this layer; on
    other devices the decoder runs dense steps (:mod:`hf_safe_exit.decoding.dense_rows`) and lists the whole
    batch, ignoring the verdicts of rows that already exited or finished. A measure computes row by row, so
    both give each deciding row the same confidence (up to floating-point rounding).

    Attributes:
        layer: 1-based index of the decoder block just computed (``num_decoder_layers`` = full model).
        step: 0-based index of the token being generated.
        rows: batch indices (LongTensor) of the rows in this view.
        hidden: raw output of block ``layer``, shape ``(rows, d_model)``.
        prev_hidden: raw output of block ``layer - 1`` (the embedding for ``layer == 1``).
        normed: ``decoder.final_layer_norm(hidden)``.
        logits_fn: computes the intermediate logits ``(rows, vocab)`` on demand (cached).
        batch_size: rows in the whole batch (every index in ``rows`` is below it), when the caller knows it:
            a measure that keeps per-row state sizes it without reading ``rows`` back from the device.
    """

    layer: int
    step: int
    rows: torch.Tensor
    hidden: torch.Tensor
    prev_hidden: torch.Tensor
    normed: torch.Tensor
    logits_fn: Callable[[], torch.Tensor]
    batch_size: int | None = None

    @property
    def logits(self) -> torch.Tensor:
        return self.logits_fn()


class ConfidenceMeasure:
    """A per-row confidence in [0, 1] that layer ``view.layer`` already predicts the final token.

    Subclasses set ``name`` and implement ``__call__``. The decoder exits a row when
    ``confidence > threshold`` (strict), so a measure must never exceed 1.
    ``needs_logits`` tells the decoder whether the vocabulary projection is needed
    at every layer (softmax) or only at the exit layer (saturation, meta).
    """

    name: str = "base"
    needs_logits: bool = False

    def bind(self, model) -> "ConfidenceMeasure":
        """Check the measure can run on ``model`` (raise with the fix if not) and return it."""
        return self

    def __call__(self, view: LayerView) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
