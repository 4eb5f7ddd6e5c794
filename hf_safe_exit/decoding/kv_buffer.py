"""A self-attention cache layer that appends in place instead of re-concatenating the whole cache.

HF's ``DynamicLayer.update`` does ``torch.cat([keys, new])``: every step of every layer copies the whole
self-attention cache into a fresh allocation, so a decoding step costs O(length) in copies and allocator
traffic, and more so the longer the output (on one CPU thread at batch 8, 256 input tokens and 128 new tokens
these copies were ~10% of a step). :class:`PreallocatedLayer` writes the new positions into a buffer sized
once for the generation (the early-exit loop asks for prompt + min(max_new_tokens, 512) positions; a longer
generation doubles it, an amortised O(1) per append) and hands out views of its filled prefix. Up to 512 new
tokens the buffer holds at most ``max_length`` positions, what HF's own cache reaches on a full-length output.

It *is* a ``DynamicLayer``: ``keys`` / ``values`` always hold exactly the cached positions (views of the
buffer), so everything HF does with a cache layer (``crop``, ``batch_select_indices``, ``reorder_cache``,
offloading, reading ``keys`` after ``generate``) keeps working; an operation that replaces ``keys`` with
another tensor simply makes the next ``update`` start a new buffer from it. The values stored are the same
tensors ``torch.cat`` would build, so attention over them is bit-identical.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer, EncoderDecoderCache

__all__ = ["PENDING_VALUE", "PreallocatedLayer", "install_kv_buffers", "project_kv", "split_heads"]

# What a slot whose keys and values are pending (no row ran its layer yet: deferred_kv) holds until it is written;
# tests set it to NaN, so that a read before the write shows.
PENDING_VALUE = 0.0


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``(batch, positions, heads · d_kv)`` to the cache's layout ``(batch, heads, positions, d_kv)`` (a view)."""
    return x.view(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)


def project_kv(attention, states: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A T5 attention module's keys and values of ``states`` ``(batch, positions, d)``, in the cache's layout."""
    return split_heads(attention.k(states), head_dim), split_heads(attention.v(states), head_dim)


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose appends write into a buffer of ``capacity`` positions (grown ×2 when full)."""

    def __init__(self, capacity: int):
        super().__init__()
        if capacity < 1:
            raise ValueError(f"PreallocatedLayer needs a capacity >= 1, got {capacity}.")
        self.capacity = int(capacity)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def _owns(self, tensor: torch.Tensor, buffer: torch.Tensor | None) -> bool:
        # `tensor` is still a prefix view of `buffer` (not replaced by crop-to-copy, index_select, .to(), ...)
        return (buffer is not None and tensor.dim() == 4 and tensor.data_ptr() == buffer.data_ptr()
                and tensor.shape[:2] == buffer.shape[:2] and tensor.shape[3] == buffer.shape[3]
                and tensor.stride() == buffer.stride())

    def _grow(self, old: torch.Tensor, new: torch.Tensor, length: int) -> torch.Tensor:
        capacity = max(self.capacity, length)
        if self._key_buffer is not None:  # a second growth in one generation: amortise by doubling
            capacity = max(capacity, 2 * self._key_buffer.shape[2])
        buffer = new.new_empty((new.shape[0], new.shape[1], capacity, new.shape[3]))
        if old.dim() == 4 and old.shape[2] > 0:
            buffer[:, :, : old.shape[2]].copy_(old)
        return buffer

    def _reserve(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[int, int]:
        """Make room for ``key_states.shape[2]`` more positions (shaped and typed like ``key_states``); returns the
        new positions' ``(start, stop)`` in the buffers."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.keys.shape[2] if self.keys.dim() == 4 else 0
        stop = start + key_states.shape[2]
        owned = self._owns(self.keys, self._key_buffer) and self._owns(self.values, self._value_buffer)
        if not owned or stop > self._key_buffer.shape[2] or key_states.dtype != self._key_buffer.dtype:
            key_buffer = self._grow(self.keys, key_states, stop)
            self._value_buffer = self._grow(self.values, value_states, stop)
            self._key_buffer = key_buffer
        return start, stop

    def _extend(self, stop: int):
        self.keys = self._key_buffer[:, :, :stop]
        self.values = self._value_buffer[:, :, :stop]
        return self.keys, self.values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start, stop = self._reserve(key_states, value_states)
        self._key_buffer[:, :, start:stop].copy_(key_states)
        self._value_buffer[:, :, start:stop].copy_(value_states)
        return self._extend(stop)

    def append_pending(self, template: torch.Tensor) -> None:
        """Append one position whose keys and values are pending for every row (:data:`PENDING_VALUE` until
        :meth:`write_range` fills them). ``template`` ``(batch, heads, 1, d_kv)`` gives only the shape and dtype (an
        expanded view is enough): nothing is computed or copied but the fill."""
        start, stop = self._reserve(template, template)
        self._key_buffer[:, :, start:stop].fill_(PENDING_VALUE)
        self._value_buffer[:, :, start:stop].fill_(PENDING_VALUE)
        self._extend(stop)

    def write_range(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``keys`` / ``values`` ``(batch, heads, m, d_kv)`` at the cached positions ``start .. start + m − 1``
        of every row, in place (pending positions: deferred state propagation, :mod:`.deferred_kv`)."""
        stop = start + keys.shape[2]
        self.keys[:, :, start:stop].copy_(keys)
        self.values[:, :, start:stop].copy_(values)

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


def install_kv_buffers(cache: EncoderDecoderCache, num_layers: int, capacity: int) -> None:
    """Give an *empty* cache ``num_layers`` :class:`PreallocatedLayer` self-attention layers of ``capacity``.

    A cache that already holds positions is left alone (its layers keep working as they are).
    """
    self_cache = cache.self_attention_cache
    if self_cache.get_seq_length() != 0 or getattr(self_cache, "offloading", False):
        return
    self_cache.layers = [PreallocatedLayer(capacity) for _ in range(num_layers)]
