"""Reading a prediction out of any decoder layer of a T5-family model.

CALM (Schuster et al., 2022, Sec. 3) reads every intermediate decoder state
through the *shared* output head. For HF T5 that head is
``decoder.final_layer_norm`` -> ``* d_model**-0.5`` (only when
``config.scale_decoder_outputs``, i.e. tied-embedding T5 v1.0) -> ``lm_head``. MT5's config has no such
attribute and its forward never scales (:func:`decoder_output_scale`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import PreTrainedModel

__all__ = ["SUPPORTED_MODEL_CLASSES", "check_supported_model", "decoder_output_scale", "intermediate_logits",
           "exit_logits"]


def _supported_classes() -> tuple[type, ...]:
    from transformers import MT5ForConditionalGeneration, T5ForConditionalGeneration

    return (T5ForConditionalGeneration, MT5ForConditionalGeneration)


SUPPORTED_MODEL_CLASSES = ("T5ForConditionalGeneration", "MT5ForConditionalGeneration")


def check_supported_model(model: object) -> PreTrainedModel:
    """Return ``model`` if it is a supported T5-family seq2seq LM, else raise ``TypeError``."""
    if not isinstance(model, _supported_classes()):
        raise TypeError(
            f"hf_safe_exit early exit supports {', '.join(SUPPORTED_MODEL_CLASSES)} "
            f"(T5 v1.0, T5 v1.1, flan-T5, mT5); got {type(model).__name__}. "
            "Load your checkpoint with T5ForConditionalGeneration.from_pretrained(...)."
        )
    return model


def decoder_output_scale(config) -> float | None:
    """The factor the model's forward multiplies the normed decoder output by before ``lm_head``, or ``None``.

    ``T5ForConditionalGeneration`` scales by ``d_model**-0.5`` iff ``config.scale_decoder_outputs`` (T5 v1.0);
    ``MT5Config`` has no such attribute and ``MT5ForConditionalGeneration`` never scales.
    """
    return config.d_model**-0.5 if getattr(config, "scale_decoder_outputs", False) else None


def intermediate_logits(model: PreTrainedModel, hidden: torch.Tensor, *, normed: bool = False) -> torch.Tensor:
    """Logits of the shared LM head applied to a decoder block's output.

    ``hidden`` is the raw output of a decoder block (``normed=False``) or already
    passed through ``decoder.final_layer_norm`` (``normed=True``; HF's last
    ``decoder_hidden_states`` entry is already normed). For the last block this
    equals ``model(...).logits`` exactly.
    """
    if not normed:
        hidden = model.decoder.final_layer_norm(hidden)
    scale = decoder_output_scale(model.config)
    if scale is not None:
        hidden = hidden * scale
    return model.lm_head(hidden)


def exit_logits(model: PreTrainedModel, outputs) -> Iterator[torch.Tensor]:
    """The logits of every decoder layer's read-out, layer 1 first, from one forward pass.

    ``outputs`` must come from a forward with ``output_hidden_states=True``. HF's
    ``decoder_hidden_states`` has L+1 entries: the embeddings, the raw outputs of blocks
    1..L-1 and the *already normed* output of the last block, whose logits are
    ``outputs.logits``. HF reads the last layer out as ``final_layer_norm`` -> dropout ->
    head; every intermediate exit goes through the same ``decoder.dropout`` (the identity
    in eval mode), so in training all exits see the same read-out (also CALM's t5x decoder).
    """
    hs = outputs.decoder_hidden_states
    if hs is None:
        raise ValueError("forward the model with output_hidden_states=True")
    for i in range(1, len(hs) - 1):
        normed = model.decoder.dropout(model.decoder.final_layer_norm(hs[i]))
        yield intermediate_logits(model, normed, normed=True)
    yield outputs.logits
