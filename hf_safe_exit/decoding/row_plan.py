"""Which batch slices of the K/V caches attention runs on when only some rows of the batch still decide."""

from __future__ import annotations

import torch

# Cost model for covering a gap of rows that are not deciding by one attention call instead of starting a new
# call after the gap: a row costs reading its K/V (single-query attention is memory-bound), a call costs a fixed
# overhead, expressed here as the bytes of K/V it is worth on each device type. CPU, one thread (t5-small heads):
# HF's sdpa wrapper costs ~45 µs per call and ~70 µs per row at 1 MiB of K/V per row, i.e. a call is worth
# ~0.5 MiB. On a GPU a call (several kernel launches) is worth far more than any gap: segments always merge.
_CALL_COST_BYTES = {"cpu": 512 * 1024}
_CALL_COST_BYTES_DEFAULT = 64 * 1024 * 1024


class _RowPlan:
    """How attention runs for a strict subset of deciding rows without copying the cache.

    ``rows`` (sorted batch indices) is split into maximal runs of consecutive indices; two runs are merged
    into one segment when the rows in the gap between them cost less to attend (wasted compute) than an
    extra call (see ``_CALL_COST_BYTES``). Each segment is ``(lo, hi, start, stop, keep)``: the batch slice
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
