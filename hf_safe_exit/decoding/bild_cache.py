"""BiLD's decoder side: one model's cache, kept right-aligned with left padding and croppable per row.

Rows accept different numbers of drafted tokens, so after a rollback their lengths differ.
Each model's self-attention cache is kept **right-aligned with left padding**: row ``r``'s
cached tokens sit in the last ``len_r`` columns, and the columns before them are masked out
through ``decoder_attention_mask``. T5's decoder position information is the *relative*
position bias (key position minus query position), so a masked left pad changes neither the
attention weights nor the position biases among the real tokens. Up to floating-point
rounding, the result equals an unpadded forward (checked against a fresh forward in the tests).

* Cropping row ``r`` by ``k_r`` tokens: crop every row by ``min_r k_r`` (``Cache.crop``), shift
  each row with more to drop right by the difference (a ``gather`` along the time axis, so
  the dropped tail wraps into masked left slots), then trim the padding columns that all
  rows share.
* A forward must feed every row the same number of new columns ``K``. A row with fewer
  pending tokens has its last cached tokens cropped and fed again (the same K/V, recomputed).
  A row shorter than ``K`` gets masked placeholder columns in front.
* Drafting runs in lockstep. A row that has stopped drafting waits for the others; while it
  waits it re-feeds its last token, one column per step. The large model then verifies all
  rows in a single pass. Finished rows leave the batch (``batch_select_indices``).

After each verification both caches hold exactly the kept prefix of every row, minus any
tokens not yet fed. The large model's replacement or fallback token is one of those: it is
fed at the next call.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutput

from ..compat import cache_kwargs
from .early_exit_loop import new_decoder_cache

__all__ = ["BiLDDecoder", "common_prefix"]


class BiLDDecoder:
    """One model's decoder side during BiLD: encoder states, a left-padded cache and what it holds.

    ``tokens[r]`` is the list of decoder tokens whose K/V are in row ``r`` of the cache. They sit in
    the last ``len(tokens[r])`` columns; the ``width - len(tokens[r])`` columns before them are masked.
    """

    def __init__(self, model, encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor | None, pad_id: int):
        self.model = model
        self.encoder_hidden = encoder_hidden
        self.encoder_mask = encoder_mask
        self.pad_id = pad_id
        self.cache = new_decoder_cache(model)
        self.tokens: list[list[int]] = [[] for _ in range(encoder_hidden.shape[0])]
        self.width = 0
        self.calls = 0

    # -- cache surgery ---------------------------------------------------------------------
    def _self_layers(self):
        return [layer for layer in self.cache.self_attention_cache.layers if getattr(layer, "is_initialized", False)]

    def truncate(self, keep: list[int]) -> None:
        """Keep only the first ``keep[r]`` cached tokens of each row ``r``."""
        remove = [len(t) - k for t, k in zip(self.tokens, keep)]
        if any(r < 0 for r in remove):
            raise AssertionError("cannot keep more tokens than are cached")
        if self.width == 0 or not any(remove):
            self.tokens = [t[:k] for t, k in zip(self.tokens, keep)]
            return
        low = min(remove)
        if low:
            self.cache.crop(-low)
            self.width -= low
        extra = torch.tensor([r - low for r in remove], device=self.encoder_hidden.device)
        if bool(extra.any()):
            cols = torch.arange(self.width, device=extra.device)
            src = (cols[None, :] - extra[:, None]) % self.width  # new[t] = old[t - extra]
            for layer in self._self_layers():
                index = src[:, None, :, None].expand_as(layer.keys)
                layer.keys = layer.keys.gather(2, index)
                layer.values = layer.values.gather(2, index)
        self.tokens = [t[:k] for t, k in zip(self.tokens, keep)]
        self._trim_left()

    def _trim_left(self) -> None:
        if not self.tokens:
            return
        common = self.width - max(len(t) for t in self.tokens)
        if common > 0:
            for layer in self._self_layers():
                layer.keys = layer.keys[:, :, common:, :]
                layer.values = layer.values[:, :, common:, :]
            self.width -= common

    def select_rows(self, index: list[int]) -> None:
        """Keep only the given rows (finished rows leave the batch)."""
        idx = torch.tensor(index, dtype=torch.long, device=self.encoder_hidden.device)
        if self.width > 0:
            self.cache.batch_select_indices(idx)
        self.encoder_hidden = self.encoder_hidden[idx]
        if self.encoder_mask is not None:
            self.encoder_mask = self.encoder_mask[idx]
        self.tokens = [self.tokens[i] for i in index]
        self._trim_left()

    def row_cache(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per decoder layer, (keys, values) of row ``row``'s real cached tokens, shape (heads, len, d_kv)."""
        n = len(self.tokens[row])
        return [(layer.keys[row, :, self.width - n:, :], layer.values[row, :, self.width - n:, :])
                for layer in self._self_layers()]

    # -- forward -----------------------------------------------------------------------------
    def forward(self, seqs: list[list[int]], n_out: list[int]) -> list[torch.Tensor]:
        """Bring every row's cache to ``seqs[r]`` and return the float32 logits at its last ``n_out[r]`` positions.

        The cache must hold a prefix-compatible history: the longest common prefix of what is
        cached and ``seqs[r]`` is kept, and the rest is fed.
        """
        keep = [common_prefix(t, s) for t, s in zip(self.tokens, seqs)]
        need = [max(len(s) - k, n) for s, k, n in zip(seqs, keep, n_out)]
        width_new = max(need)
        if width_new == 0:
            empty = torch.empty((0, self.model.config.vocab_size), device=self.encoder_hidden.device)
            return [empty for _ in seqs]
        keep = [max(len(s) - width_new, 0) for s in seqs]
        self.truncate(keep)
        device = self.encoder_hidden.device
        batch = len(seqs)
        block = torch.full((batch, width_new), self.pad_id, dtype=torch.long, device=device)
        total = self.width + width_new
        mask = torch.zeros((batch, total), dtype=torch.long, device=device)
        for r, (s, k) in enumerate(zip(seqs, keep)):
            new = s[k:]
            block[r, width_new - len(new):] = torch.tensor(new, dtype=torch.long, device=device)
            mask[r, total - len(s):] = 1
        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=self.encoder_hidden),
            attention_mask=self.encoder_mask,
            decoder_input_ids=block,
            decoder_attention_mask=None if bool(mask.all()) else mask,
            **cache_kwargs(self.cache, self.model),  # `cache` on transformers >= 5.24, `past_key_values` before
            use_cache=True,
            return_dict=True,
        )
        self.calls += 1
        self.width = total
        self.tokens = [list(s) for s in seqs]
        logits = out.logits.to(dtype=torch.float32)
        return [logits[r, width_new - n:] for r, n in enumerate(n_out)]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
