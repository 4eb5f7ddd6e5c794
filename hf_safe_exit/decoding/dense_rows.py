"""Early-exit steps that run every decoder block on the whole batch, for devices where a row costs nothing.

On a GPU, decoding a few rows is launch-bound: a block over 8 rows costs what it costs over 1, while every change
of the set of deciding rows costs host round trips (``nonzero``, the row list of the attention plan) and a dozen
small gather/scatter kernels per layer. :meth:`StepDecoder.step` pays those to save arithmetic, which is what a
CPU needs; :func:`dense_step` instead runs each block on every row and keeps the rows that already exited at their
exit state with ``torch.where``:

* a row that exited after layer i keeps ``x = h_i``; the skipped layers' K/V of every row still come from
  ``LayerNorm_j(x)`` (:meth:`StepDecoder.fill_kv`), so CALM's state propagation is unchanged; once no row
  decides, the remaining layers' K/V are left pending until a later step reads them (:mod:`.deferred_kv`);
* a deciding row's arithmetic is the same as in :meth:`StepDecoder.step` (the same block, run on the whole
  batch as at λ = 1, where the two are the same code);
* the exit states are kept in one ``(batch, d_model)`` tensor and read out by one projection onto the vocabulary
  after the last block, in batch order;
* the host learns one thing per checked layer (does any row still decide?), to stop running blocks once every row
  exited; nothing else is read back.
* float16: T5's overflow clamp (``_clamp_fp16``) looks at the whole batch, so a row that already exited can lower
  the clamp limit of the deciding rows, from the float16 maximum to 1000 below it.

The confidence measure sees every row of the batch (``view.rows`` is the whole batch); the verdicts of rows that
already exited, or whose sequence is finished, are ignored.
"""

from __future__ import annotations

import torch

from .step_exits import can_exit

__all__ = ["DENSE_ROWS", "dense_step"]

# Per device type: run dense steps there? A CPU pays per row (weight reads and attention grow with the rows), a GPU
# pays per kernel launch and per host round trip. Tests set "cpu" to True to check dense steps against references.
DENSE_ROWS: dict[str, bool] = {"cpu": False}


def dense_step(dec, tokens: torch.Tensor, *, step: int, threshold: float | torch.Tensor, measure,
               min_exit_layer: int, done: torch.Tensor | None, exit_layers: frozenset[int] | None = None):
    """One token for every row of the batch, as :meth:`StepDecoder.step` (same arguments except ``poe``, which
    dense steps do not support, and same returns; ``threshold`` a float or one per row), with every block run on
    the whole batch."""
    batch, device = tokens.shape[0], tokens.device
    x = dec.decoder.dropout(dec.decoder.embed_tokens(tokens))  # (b, 1, d): every row's state
    position_bias = dec.position_bias(x.dtype)
    rows = torch.arange(batch, device=device)
    exit_layer = torch.zeros(batch, dtype=torch.long, device=device)
    confidence = torch.full((batch,), float("nan"), device=device)
    exit_normed: torch.Tensor | None = None  # (b, d) final-normed exit states
    deciding = None if done is None else ~done  # None: every row decides
    # no host check here: the loop stops before every sequence is finished, and a step with all rows done would
    # still be right (blocks run for nothing, zero logits, exit layers 0)
    may_exit, stopped = can_exit(threshold), False
    position = dec.cache.self_attention_cache.get_seq_length(0)
    for idx in range(dec.num_layers):
        layer = idx + 1
        if stopped:
            dec.skip_kv(idx, x)  # no row decides: the remaining layers' K/V (state propagation), or pending
            continue
        normed_all, keys, values = dec.fill_kv(idx, x)
        h = dec.run_block(idx, x, normed_all, keys, values, position_bias, None)
        prev = x
        x = h if deciding is None else torch.where(deciding[:, None, None], h, x)
        if layer == dec.num_layers:
            exiting, conf = deciding, None  # every deciding row exits
        elif may_exit and layer >= min_exit_layer and (exit_layers is None or layer in exit_layers):
            final_normed = dec.decoder.final_layer_norm(h[:, 0])
            conf = dec.confidence(measure, layer=layer, step=step, rows=rows, hidden=h[:, 0], prev_hidden=prev[:, 0],
                                  normed=final_normed, cached={}, batch=batch)
            exiting = conf > threshold if deciding is None else (conf > threshold) & deciding
        else:
            continue
        if layer == dec.num_layers:
            final_normed = dec.decoder.final_layer_norm(h[:, 0])
        if exiting is None:  # the whole batch reaches the last layer together (e.g. λ = 1)
            exit_layer.fill_(layer)
            exit_normed = final_normed
            continue
        exit_layer = torch.where(exiting, layer, exit_layer)
        if conf is not None:
            confidence = torch.where(exiting, conf, confidence)
        exit_normed = torch.where(exiting[:, None], final_normed,
                                  torch.zeros_like(final_normed) if exit_normed is None else exit_normed)
        deciding = ~exiting if deciding is None else deciding & ~exiting
        if layer < dec.num_layers:
            stopped = not bool(deciding.any())  # the one host round trip of a checked layer
    dec.finish_step(position, x)
    if exit_normed is None:  # every row was already done: nothing to read out
        return (torch.zeros((batch, dec.model.config.vocab_size), dtype=dec.logits_dtype, device=device),
                exit_layer, confidence)
    return dec.logits(exit_normed).to(dec.logits_dtype), exit_layer, confidence
