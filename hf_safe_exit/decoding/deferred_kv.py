"""Deferred, batched state propagation: a skipped layer's keys and values are computed when a later token reads them.

CALM's state propagation (Schuster et al. 2022, Sec. 4.2) gives a token that exited after layer k, at every skipped
layer j > k, the self-attention keys and values ``W_j^{K,V} LN_j(h_k)`` of its exit state ``h_k``. Computed at once
(as :meth:`StepDecoder.fill_kv` did for every row at every layer), that is one matrix-vector product per skipped
layer per token, which on a CPU at batch 1 reads the layer's K/V weights each time. But only a later token *of the
same row that runs layer j* reads them. :class:`DeferredFills` therefore keeps each position's state (one
``(batch, positions, d_model)`` buffer) and, per layer and row, the positions still pending there; just before rows
run layer j, the pending positions of those rows at j (:meth:`DeferredFills.take`) are computed in **one** product
with the rows' own keys and values of the new position (``[(pending + rows) × d] × [d × heads·d_kv]`` for keys and
for values: the weights read once, as for the new position alone) and written into the cache
(:meth:`~hf_safe_exit.decoding.kv_buffer.PreallocatedLayer.write`). Positions no later token reads at j are never
computed, unless the cache is handed back to the caller: :meth:`DeferredFills.fill_all` completes it first.

The same keys and values are computed from the same states, so outputs equal the eager fills up to matmul rounding
(a product over other rows sums in another order). A pending slot holds zeros until filled, and is never read
before: the rows that read layer j are filled first (``tests/test_deferred_kv.py`` poisons pending slots with NaN
and counts every fill). Memory: the states buffer holds ``batch × positions × d_model`` values, ``1 / (2 ·
num_layers)`` of the self-attention cache's size when ``heads · d_kv = d_model``; the pending lists hold at most
one int per (layer, row, position).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["DeferredFills", "Pending"]


class Pending(NamedTuple):
    """Positions whose keys and values are pending at one layer: batch rows, positions, and their states (n, d)."""

    rows: torch.Tensor
    positions: torch.Tensor
    states: torch.Tensor


class DeferredFills:
    """The positions whose keys and values are pending at each layer, per row, and the states they come from."""

    def __init__(self, blocks, cache_layers, batch: int, head_dim: int):
        self.blocks, self.layers = blocks, cache_layers
        self.batch, self.head_dim = batch, head_dim
        self.pending: list[list[list[int]]] = [[[] for _ in range(batch)] for _ in blocks]
        self.states: torch.Tensor | None = None  # (batch, capacity, d_model), grown by doubling

    def keep(self, position: int, x: torch.Tensor, exit_layers: list[int]) -> None:
        """After the step that decoded ``position``: keep every row's state ``x`` ``(batch, 1, d)`` (an exited row's
        is its exit state) and mark the position pending for row ``r`` at the layers after ``exit_layers[r]``
        (1-based; 0 for a row that ran no block: every layer)."""
        self._store(position, x[:, 0])
        for row, exit_layer in enumerate(exit_layers):
            for idx in range(exit_layer, len(self.blocks)):
                self.pending[idx][row].append(position)

    def _store(self, position: int, states: torch.Tensor) -> None:
        buffer = self.states
        if buffer is None or position >= buffer.shape[1] or buffer.dtype != torch.promote_types(buffer.dtype,
                                                                                                states.dtype):
            dtype = states.dtype if buffer is None else torch.promote_types(buffer.dtype, states.dtype)
            size = max(position + 1, 64 if buffer is None else 2 * buffer.shape[1])
            grown = states.new_zeros((self.batch, size, states.shape[-1]), dtype=dtype)
            if buffer is not None:
                grown[:, : buffer.shape[1]].copy_(buffer)
            self.states = buffer = grown
        buffer[:, position].copy_(states)

    def take(self, idx: int, rows: list[int] | None) -> Pending | None:
        """The positions pending at layer ``idx`` for ``rows`` (None: every row) with their states, now no longer
        pending: the caller computes their keys and values (in its own product, :meth:`StepDecoder.fill_kv`) and
        :meth:`write` s them. None when there are none."""
        pending = self.pending[idx]
        row_ids: list[int] = []
        positions: list[int] = []
        for row in range(self.batch) if rows is None else rows:
            if pending[row]:
                row_ids.extend([row] * len(pending[row]))
                positions.extend(pending[row])
                pending[row] = []
        if not row_ids:
            return None
        device = self.states.device
        row_index = torch.tensor(row_ids, device=device)
        position_index = torch.tensor(positions, device=device)
        return Pending(row_index, position_index, self.states[row_index, position_index])

    def write(self, idx: int, taken: Pending, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write the keys and values ``(n, heads·d_kv)`` of the positions :meth:`take` gave into layer ``idx``."""
        n = taken.rows.shape[0]
        self.layers[idx].write(taken.rows, taken.positions, keys.view(n, -1, self.head_dim),
                               values.view(n, -1, self.head_dim))

    def fill_all(self) -> None:
        """Fill every pending position of every row at every layer, one product per layer (before the cache leaves
        the loop)."""
        for idx, block in enumerate(self.blocks):
            taken = self.take(idx, None)
            if taken is not None:
                layer = block.layer[0]
                normed = layer.layer_norm(taken.states)
                self.write(idx, taken, layer.SelfAttention.k(normed), layer.SelfAttention.v(normed))
