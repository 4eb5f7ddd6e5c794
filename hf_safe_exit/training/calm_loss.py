"""CALM's training objective: cross-entropy at every decoder layer through the shared head.

Schuster et al. (2022, Sec. 5) train with L = sum_i w_i * L_i, where L_i is the
token-level cross-entropy of the prediction read out of decoder layer i
(``decoder.final_layer_norm`` -> optional ``d_model**-0.5`` -> ``lm_head``, the same
read-out early exit uses at inference) and w_i = i / sum_j j. Uniform and geometric
weights are offered as alternatives. Works on any ``T5ForConditionalGeneration``
(or mT5); gradients flow to the whole backbone.

Use :func:`calm_loss` inside a plain / ``accelerate`` loop, or
:class:`CALMSeq2SeqTrainer` as a drop-in ``Seq2SeqTrainer``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Seq2SeqTrainer

from ..decoding.readout import check_supported_model, exit_logits

__all__ = ["layer_weights", "per_layer_losses", "calm_loss", "CALMLossOutput", "CALMSeq2SeqTrainer", "WEIGHTINGS"]

WEIGHTINGS = ("linear", "uniform", "geometric")


def layer_weights(num_layers: int, weighting: str = "linear", *, gamma: float = 2.0) -> torch.Tensor:
    """Per-layer loss weights, normalised to sum to 1.

    ``linear`` (CALM default): w_i ∝ i for i = 1..L. ``uniform``: w_i = 1/L.
    ``geometric``: w_i ∝ gamma**(i-1) (more weight on deeper layers for gamma > 1).
    """
    if num_layers < 1:
        raise ValueError("num_layers must be >= 1")
    i = torch.arange(1, num_layers + 1, dtype=torch.float64)
    if weighting == "linear":
        w = i
    elif weighting == "uniform":
        w = torch.ones_like(i)
    elif weighting == "geometric":
        w = torch.as_tensor(gamma, dtype=torch.float64) ** (i - 1)
    else:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    return (w / w.sum()).to(torch.float32)


@dataclass
class CALMLossOutput:
    loss: torch.Tensor              # weighted sum, scalar
    layer_losses: torch.Tensor      # (L,) mean CE of each decoder layer (layer 1 first)
    weights: torch.Tensor           # (L,)
    outputs: object = None          # the model output (with hidden states)


def per_layer_losses(model, outputs, labels: torch.Tensor, *, ignore_index: int = -100,
                     label_smoothing: float = 0.0) -> torch.Tensor:
    """Token-mean cross-entropy of every decoder layer's read-out, shape ``(L,)``.

    ``outputs`` must come from a forward pass with ``output_hidden_states=True``; the read-out
    is :func:`~hf_safe_exit.decoding.readout.exit_logits`. In training mode every exit passes
    through ``decoder.dropout`` after the norm, as HF's last layer does. Without it, with
    dropout > 0, only the last exit is trained on dropped-out features (in this project's
    dropout-0.1 run it ended no better than the layer below it).
    """
    losses = [F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                              ignore_index=ignore_index, label_smoothing=label_smoothing)
              for logits in exit_logits(model, outputs)]
    return torch.stack(losses)


def calm_loss(model, batch: dict, *, weighting: str = "linear", gamma: float = 2.0,
              label_smoothing: float = 0.0, return_outputs: bool = False) -> CALMLossOutput:
    """Forward ``model`` on ``batch`` (``input_ids``, ``attention_mask``, ``labels`` with -100 padding,
    optionally ``decoder_input_ids``) and return the CALM weighted per-layer loss."""
    check_supported_model(model)
    if "labels" not in batch:
        raise ValueError("calm_loss needs 'labels' in the batch")
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "decoder_input_ids" not in inputs:
        inputs["decoder_input_ids"] = model._shift_right(labels)
    outputs = model(**inputs, output_hidden_states=True, return_dict=True, use_cache=False)
    layer = per_layer_losses(model, outputs, labels, label_smoothing=label_smoothing)
    w = layer_weights(layer.numel(), weighting, gamma=gamma).to(layer.device)
    loss = (w * layer).sum()
    return CALMLossOutput(loss=loss, layer_losses=layer.detach(), weights=w,
                          outputs=outputs if return_outputs else None)


class CALMSeq2SeqTrainer(Seq2SeqTrainer):
    """``Seq2SeqTrainer`` whose training loss is CALM's weighted per-layer loss.

    Extra keyword arguments: ``calm_weighting`` ("linear" | "uniform" | "geometric"),
    ``calm_gamma`` (geometric ratio). Evaluation/generation is unchanged.
    """

    def __init__(self, *args, calm_weighting: str = "linear", calm_gamma: float = 2.0, **kwargs):
        if calm_weighting not in WEIGHTINGS:
            raise ValueError(f"calm_weighting must be one of {WEIGHTINGS}")
        super().__init__(*args, **kwargs)
        self.calm_weighting = calm_weighting
        self.calm_gamma = calm_gamma

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model) if hasattr(self, "accelerator") else model
        labels = inputs["labels"]
        fwd = {k: v for k, v in inputs.items() if k != "labels"}
        if "decoder_input_ids" not in fwd:
            fwd["decoder_input_ids"] = unwrapped._shift_right(labels)
        outputs = model(**fwd, output_hidden_states=True, return_dict=True, use_cache=False)
        layer = per_layer_losses(unwrapped, outputs, labels)
        w = layer_weights(layer.numel(), self.calm_weighting, gamma=self.calm_gamma).to(layer.device)
        loss = (w * layer).sum()
        return (loss, outputs) if return_outputs else loss
