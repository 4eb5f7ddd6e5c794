"""Which batch slices of the K/V caches attention runs on when only some rows of the batch still decide."""

from __future__ import annotations

import torch

__all__ = ["CALL_COST_BYTES", "CALL_COST_BYTES_DEFAULT", "DecidingRows", "RowPlan"]

# Cost model for covering a gap of rows that are not deciding by one attention call instead of starting a new
# call after the gap: a row costs reading its K/V (single-query attention is memory-bound), a call costs a fixed
# overhead, expressed here as the bytes of K/V it is worth on each device type. CPU, one thread (t5-small heads):
# HF's sdpa wrapper costs ~45 µs per call and ~70 µs per row at 1 MiB of K/V per row, i.e. a call is worth
# ~0.5 MiB. On a GPU a call (several kernel launches) is worth far more than any gap: segments always merge.
CALL_COST_BYTES = {"cpu": 512 * 1024}
CALL_COST_BYTES_DEFAULT = 64 * 1024 * 1024


class RowPlan:
    """How attention runs for a strict subset of deciding rows without copying the cache.

    ``rows`` (sorted batch indices) is split into maximal runs of consecutive indices; two runs are merged
    into one segment when the rows in the gap between them cost less to attend (wasted compute) than an
    extra call (see ``CALL_COST_BYTES``). Each segment is ``(lo, hi, start, stop, keep)``: the batch slice
    ``[lo, hi)`` of the cache it attends with, the slice ``[start, stop)`` of the deciding rows it serves,
    and ``keep`` (None when every row in ``[lo, hi)`` decides) the positions of those rows inside the slice.
    """

    def __init__(self, rows: list[int], row_bytes: int, call_bytes: int, device: torch.device):
        max_gap = call_bytes // max(row_bytes, 1)
        groups: list[list[int]] = [[rows[0]]]
        for r in rows[1:]:
            if r - groups[-1][-1] - 1 <= max_gap:
                groups[-1].append(r)
            else:
                groups.append([r])
        self.segments = []
        start = 0
        for g in groups:
            lo, hi = g[0], g[-1] + 1
            keep = None if hi - lo == len(g) else torch.tensor([r - lo for r in g], device=device)
            self.segments.append((lo, hi, start, start + len(g), keep))
            start += len(g)


class DecidingRows:
    """The rows of one decoding step that have not exited yet, and the attention plans over them.

    ``rows`` is None while every row of the batch decides (the common case runs without gathers), else the sorted
    batch indices of the deciding rows; their :class:`RowPlan` pair (self- and cross-attention) is made once per set.
    """

    def __init__(self, done: torch.Tensor | None, batch: int, device: torch.device):
        self.rows: torch.Tensor | None = None if done is None or not bool(done.any()) else (~done).nonzero().squeeze(1)
        self.batch, self.device = batch, device
        self.plans: tuple[RowPlan, RowPlan] | None = None
        self._all_rows: torch.Tensor | None = None  # arange(batch), made once when first needed
        self._row_list: list[int] | None = None

    @property
    def none_left(self) -> bool:
        return self.rows is not None and self.rows.numel() == 0

    def ids(self) -> torch.Tensor:
        """The deciding rows' batch indices (every row's while ``rows`` is None)."""
        if self.rows is not None:
            return self.rows
        if self._all_rows is None:
            self._all_rows = torch.arange(self.batch, device=self.device)
        return self._all_rows

    def plan(self, keys: torch.Tensor, cross_keys: torch.Tensor) -> tuple[RowPlan, RowPlan]:
        """Make and keep the self- and cross-attention plans of ``rows`` over caches shaped like ``keys`` and
        ``cross_keys`` ``(batch, heads, length, d_kv)``."""
        row_list = self.row_list()
        call_bytes = CALL_COST_BYTES.get(self.device.type, CALL_COST_BYTES_DEFAULT)
        self.plans = (RowPlan(row_list, 2 * keys[0].numel() * keys.element_size(), call_bytes, self.device),
                      RowPlan(row_list, 2 * cross_keys[0].numel() * cross_keys.element_size(), call_bytes,
                              self.device))
        return self.plans

    def row_list(self) -> list[int]:
        """The deciding rows' batch indices as a list (read back from the device once per set)."""
        if self._row_list is None:
            self._row_list = self.ids().tolist()
        return self._row_list

    def drop(self, exiting: torch.Tensor) -> None:
        """Remove the rows that ``exiting`` (a bool per deciding row) marks."""
        self.rows, self.plans, self._row_list = self.ids()[~exiting], None, None
