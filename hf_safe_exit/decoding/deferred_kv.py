"""Deferred, batched state propagation: a skipped layer's keys and values are computed when a later token reads them.

CALM's state propagation (Schuster et al. 2022, Sec. 4.2) gives a token that exited after layer k, at every skipped
layer j > k, the self-attention keys and values ``W_j^{K,V} LN_j(h_k)`` of its exit state ``h_k``. Computed at once,
that is one product per skipped layer per step, which on a CPU at batch 1 reads the layer's K/V weights each time.
But only a later token that runs layer j reads them.

The rule, per layer and step: when some row of the batch runs layer j at this position, the keys and values of
*every* row at j are computed in that layer's product (the weights are read for those rows anyway; the rows that
already exited contribute their exit state, as eager fills do). When no row runs j (every row exited below it, or
finished), the position is left **pending** at j for the whole batch. So the positions pending at a layer are always
one contiguous range, from the first step no row ran it up to now: :class:`DeferredFills` keeps, per layer, where that
range starts, and each position's states (one ``(batch, positions, d_model)`` buffer). The next time some row runs
layer j, the pending range is computed in the **same** product as the new position
(``[batch · (pending + 1) × d] × [d × heads·d_kv]``, the weights read once) and written as one slice
(:meth:`~hf_safe_exit.decoding.kv_buffer.PreallocatedLayer.write_range`). Positions no later token reads at j are
never computed, unless the cache is handed back to the caller: :meth:`DeferredFills.fill_all` completes it first
(``generate(..., use_cache=False)`` hands none back, as HF's).

The same keys and values are computed from the same states, so outputs equal the eager fills up to matmul rounding
(a product over more rows sums in another order); at λ = 1 no position is ever pending and the step is the eager
one. A pending slot holds :data:`~hf_safe_exit.decoding.kv_buffer.PENDING_VALUE` until filled, and is never read
before: a layer's range is filled before any row runs it (``tests/test_deferred_kv.py`` poisons pending slots with
NaN and checks every fill finds its slots pending). Memory: the states buffer holds ``batch × capacity × d_model``
values (capacity ≥ 64 positions, doubled when full, so at most twice the positions decoded; in the wider of the
states' dtypes: float32 for a float16 T5 whose ``wo`` stays float32): about ``1 / (2 · num_layers)`` of the
self-attention cache's size when ``heads · d_kv = d_model`` and the dtypes agree, up to 2× that after a doubling
and 4× with float32 states beside a float16 cache; plus one int per layer.
"""

from __future__ import annotations

import torch

from .kv_buffer import project_kv

__all__ = ["DeferredFills"]


class DeferredFills:
    """Where each layer's pending range of positions starts, and the states those positions' K/V come from."""

    def __init__(self, blocks, cache_layers, batch: int, head_dim: int):
        self.blocks, self.layers = blocks, cache_layers
        self.batch, self.head_dim = batch, head_dim
        self.first_pending: list[int | None] = [None] * len(blocks)  # per layer; None: nothing pending there
        self.states: torch.Tensor | None = None  # (batch, capacity, d_model), grown by doubling
        self.pending_at: int | None = None  # the last position marked pending at some layer

    def mark_pending(self, idx: int, position: int) -> None:
        """No row ran layer ``idx`` at ``position``: its K/V there are pending for every row."""
        if self.first_pending[idx] is None:
            self.first_pending[idx] = position
        self.pending_at = position

    def keep(self, position: int, x: torch.Tensor) -> None:
        """After the step that decoded ``position``: keep every row's state ``x`` ``(batch, 1, d)`` (an exited row's
        is its exit state), what a pending K/V of this position is computed from. Only a position pending at some
        layer is kept: a pending range holds no other (a step where every layer ran adds nothing to keep)."""
        if self.pending_at != position:
            return
        buffer, states = self.states, x[:, 0]
        if buffer is None or position >= buffer.shape[1] or buffer.dtype != torch.promote_types(buffer.dtype,
                                                                                                states.dtype):
            dtype = states.dtype if buffer is None else torch.promote_types(buffer.dtype, states.dtype)
            size = max(position + 1, 64 if buffer is None else 2 * buffer.shape[1])
            grown = states.new_zeros((self.batch, size, states.shape[-1]), dtype=dtype)
            if buffer is not None:
                grown[:, : buffer.shape[1]].copy_(buffer)
            self.states = buffer = grown
        buffer[:, position].copy_(states)

    def take(self, idx: int, position: int) -> tuple[int, torch.Tensor] | None:
        """The range pending at layer ``idx`` before ``position`` as ``(start, states (batch, position − start, d))``,
        now no longer pending: the caller computes its K/V (in its own product, :meth:`StepDecoder.fill_kv`) and
        writes them. None when nothing is pending there."""
        start = self.first_pending[idx]
        if start is None or start >= position:
            return None
        self.first_pending[idx] = None
        return start, self.states[:, start:position]

    def fill_all(self, length: int) -> None:
        """Fill every layer's pending range up to ``length`` positions, one product per layer (before the cache
        leaves the loop)."""
        for idx, block in enumerate(self.blocks):
            taken = self.take(idx, length)
            if taken is not None:
                start, states = taken
                layer = block.layer[0]
                self.layers[idx].write_range(start, *project_kv(layer.SelfAttention, layer.layer_norm(states),
                                                                self.head_dim))
