"""Softmax response: top-1 minus top-2 probability (CALM's ``softmax_diff``, Schuster et al. 2022, Eq. 5)."""

from __future__ import annotations

import torch

from .base import ConfidenceMeasure, LayerView


def softmax_margin(logits: torch.Tensor) -> torch.Tensor:
    """``p_(1) - p_(2)`` of ``softmax(logits)`` along the last axis, computed in float32 or wider."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    top2 = torch.softmax(logits.to(dtype), dim=-1).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


class SoftmaxConfidence(ConfidenceMeasure):
    """Confidence = difference between the two largest intermediate softmax probabilities."""

    name = "softmax"
    needs_logits = True

    def __call__(self, view: LayerView) -> torch.Tensor:
        return softmax_margin(view.logits)
