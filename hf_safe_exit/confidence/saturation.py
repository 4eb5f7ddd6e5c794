"""Hidden-state saturation (CALM, Schuster et al. 2022, Eq. 6): cosine of consecutive layers' states."""

from __future__ import annotations

import torch

from .base import ConfidenceMeasure, LayerView


class SaturationConfidence(ConfidenceMeasure):
    """Confidence = cos(h_i, h_{i-1}) of the raw block outputs; 0 at the first layer.

    Clamped to [-1, 1] so that floating-point round-off can never push it above a
    threshold of 1 (λ = 1 must stay exactly the full model).
    """

    name = "saturation"
    needs_logits = False

    def __call__(self, view: LayerView) -> torch.Tensor:
        if view.layer <= 1:
            return torch.zeros(view.hidden.shape[0], device=view.hidden.device, dtype=torch.float32)
        dtype = torch.promote_types(view.hidden.dtype, torch.float32)
        cos = torch.nn.functional.cosine_similarity(view.hidden.to(dtype), view.prev_hidden.to(dtype), dim=-1)
        return cos.clamp(-1.0, 1.0)
