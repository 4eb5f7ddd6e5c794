"""An independent reference for early-exit decoding: the decoder without any cache.

The whole generated sequence is run at once through HF's own ``T5Block``s (causal mask, no
cache). At a position whose token exited at layer e, every block above e is the identity —
what CALM's state propagation makes the cached, layer-by-layer decoder compute.
"""

from __future__ import annotations

import torch


def read_out(model, hidden: torch.Tensor) -> torch.Tensor:
    """Shared head on a raw block output: final layer norm, d_model**-0.5 when the config says so, lm_head."""
    normed = model.decoder.final_layer_norm(hidden)
    # T5 v1.0: tied head, scaled decoder output (HF's flag for it); MT5's config has no flag and never scales
    if getattr(model.config, "scale_decoder_outputs", False):
        normed = normed * model.config.d_model**-0.5
    return model.lm_head(normed)


@torch.no_grad()
def block_outputs(model, input_ids, attention_mask, sequences, exit_layers) -> list[torch.Tensor]:
    """Per decoder layer j, the raw output of block j at every position, with exited positions held fixed.

    ``exit_layers[b, t]`` is the 1-based layer token t of row b exited at. Entry j-1 is block j's
    output (computed from the states below, where positions that exited below j kept their exit state).
    """
    dtype = next(model.parameters()).dtype
    enc = model.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    dec_in = sequences[:, :-1]
    b, t = dec_in.shape
    neg = torch.finfo(dtype).min
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    self_mask = torch.zeros(b, 1, t, t, dtype=dtype).masked_fill(~causal, neg)
    cross_mask = torch.zeros(b, 1, 1, enc.shape[1], dtype=dtype).masked_fill(attention_mask[:, None, None, :] == 0,
                                                                            neg)
    h = model.decoder.embed_tokens(dec_in)
    bias = cross_bias = None
    outputs = []
    for j, block in enumerate(model.decoder.block, start=1):
        new, bias, cross_bias = block(h, self_mask if bias is None else None, bias, enc, cross_mask, cross_bias)
        if j == 1:  # block 0 returns the bias without the mask; fold the causal mask in for later blocks
            bias = bias + self_mask
        outputs.append(new)
        h = torch.where((exit_layers >= j)[..., None], new, h)
    outputs.append(h)  # last: every position's state at its exit layer
    return outputs


def reference_exit_logits(model, input_ids, attention_mask, sequences, exit_layers) -> torch.Tensor:
    """``(batch, T, vocab)`` logits of every generated position at its exit layer."""
    return read_out(model, block_outputs(model, input_ids, attention_mask, sequences, exit_layers)[-1])


def reference_layer_logits(model, input_ids, attention_mask, sequences, exit_layers) -> torch.Tensor:
    """``(L, batch, T, vocab)`` logits of every decoder layer at every position (entries above a
    position's exit layer are not meaningful)."""
    with torch.no_grad():
        return torch.stack([read_out(model, h)
                            for h in block_outputs(model, input_ids, attention_mask, sequences, exit_layers)[:-1]])
