"""Cutting a CALM-trained decoder down to its first layers, as a model of its own.

A decoder trained with the CALM loss (every exit read out through the shared ``final_layer_norm`` and LM head)
already *is* a family of shallower models: keeping its first ``n`` blocks gives a model whose last layer is the
old exit ``n``, with identical outputs. That is the starting point for a shallower model when the top layers of a
deeper one add nothing that generalises (see ``scripts/train_default_model.py --keep-decoder-layers``).
"""

from __future__ import annotations

from torch import nn

__all__ = ["keep_first_decoder_layers"]


def keep_first_decoder_layers(model, num_layers: int):
    """Drop every decoder block above ``num_layers``, in place; returns ``model``.

    Guarantees: the result is a plain ``T5ForConditionalGeneration`` (``save_pretrained`` writes a config with
    ``num_decoder_layers = num_layers``, ``from_pretrained`` of it needs no extra code), and its logits equal those
    of the original model's exit ``num_layers`` (``hf_safe_exit.decoding.readout.exit_logits``). The dropped blocks'
    parameters are freed with them; the encoder, the shared embedding/head and the final layer norm are kept.
    """
    decoder = model.get_decoder()
    total = len(decoder.block)
    if not isinstance(num_layers, int) or not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must be an int in 1..{total} (the decoder's layer count), got {num_layers!r}")
    decoder.block = nn.ModuleList(list(decoder.block[:num_layers]))
    decoder.config.num_layers = num_layers
    model.config.num_decoder_layers = num_layers
    return model
