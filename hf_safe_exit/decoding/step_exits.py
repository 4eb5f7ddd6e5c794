"""Where each row of one decoding step exits, with what confidence, and the logits of its exit: :class:`StepExits`."""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["StepExits", "can_exit", "step_threshold", "thresholds_of"]


def can_exit(threshold: float | torch.Tensor) -> bool:
    """Whether any row may exit early at a step with ``threshold``: a row exits when its confidence is > its
    threshold, so a float >= 1 never exits. Per-row thresholds (a tensor) are taken to let some row exit without
    reading them back (a host round trip on a GPU): a policy whose rows all stay gives the float 1.0 instead
    (``BoundRowThresholds.threshold_at``); rows at 1 in a tensor only cost their confidences."""
    return True if isinstance(threshold, torch.Tensor) else threshold < 1.0


def step_threshold(value, batch: int) -> float | torch.Tensor:
    """A policy's λ_t for one step as the step takes it: a float, or a float32 tensor of one λ_t per batch row."""
    if not isinstance(value, torch.Tensor):
        return float(value)
    if value.shape != (batch,) or value.dtype != torch.float32:
        raise ValueError(f"a policy's per-row thresholds must be a float32 tensor of shape ({batch},), one per batch "
                         f"row; got {value.dtype} of shape {tuple(value.shape)}: give one threshold per row.")
    return value


def thresholds_of(threshold: float | torch.Tensor, rows: torch.Tensor | None) -> float | torch.Tensor:
    """The thresholds of the batch rows ``rows`` (None: every row, in batch order), to compare with their
    confidences: a float is every row's. Per-row thresholds are float32, the dtype a float threshold is compared in
    with a float32 confidence, so both decide alike (:class:`~hf_safe_exit.decoding.row_thresholds.RowThresholds`)."""
    if rows is None or not isinstance(threshold, torch.Tensor):
        return threshold
    return threshold.index_select(0, rows)


class StepExits:
    """Where each row of one step exits, with what confidence, and its logits.

    Logits an exit already has (the measure's or the PoE read-out's) are set at once; the other exits are read out
    together after the last block: one projection onto the vocabulary per step, not one per exit layer.
    """

    def __init__(self, batch: int, dtype: torch.dtype, device: torch.device):
        self.batch, self.dtype, self.device = batch, dtype, device
        self.exit_layer = torch.zeros(batch, dtype=torch.long, device=device)
        self.confidence = torch.full((batch,), float("nan"), device=device)
        self.logits: torch.Tensor | None = None
        self.pending_rows: list[torch.Tensor | None] = []  # batch indices (None: the whole batch, in batch order)
        self.pending_normed: list[torch.Tensor] = []  # their final-normed states

    def set_layer(self, rows: torch.Tensor, layer: int, conf: torch.Tensor | None) -> None:
        self.exit_layer[rows] = layer
        if conf is not None:
            self.confidence[rows] = conf

    def set_logits(self, rows: torch.Tensor, logits: torch.Tensor) -> None:
        if self.logits is None:
            self.logits = torch.zeros((self.batch, logits.shape[-1]), dtype=self.dtype, device=self.device)
        self.logits[rows] = logits.to(self.dtype)

    def defer(self, rows: torch.Tensor | None, normed: torch.Tensor) -> None:
        self.pending_rows.append(rows)
        self.pending_normed.append(normed)

    def read_out(self, project: Callable[[torch.Tensor], torch.Tensor], vocab_size: int) -> torch.Tensor:
        """The ``(batch, vocab)`` logits of every row's exit, the deferred ones projected by ``project`` in one call
        (zeros for rows that ran no block)."""
        if self.pending_rows:
            rows, normed = self.pending_rows, self.pending_normed
            normed = normed[0] if len(normed) == 1 else torch.cat(normed)
            in_order = len(rows) == 1 and rows[0] is None  # the whole batch exited at the last layer
            order = None if in_order else rows[0] if len(rows) == 1 else torch.cat(rows)
            if self.logits is None and normed.shape[0] == self.batch:
                # Every row is pending (each row exits once per step, so `order` is a permutation of the batch):
                # put the small normed states into batch order and project them as one batch, HF's own read-out
                # call, rather than scattering a (batch, vocab) result into a zeroed one.
                if order is not None:
                    normed = normed.index_copy(0, order, normed)
                self.logits = project(normed).to(self.dtype)
            else:
                row_logits = project(normed).to(self.dtype)
                if self.logits is None:
                    self.logits = torch.zeros((self.batch, row_logits.shape[-1]), dtype=self.dtype,
                                              device=self.device)
                self.logits[order] = row_logits
        if self.logits is None:  # every row was already done: nothing to read out
            self.logits = torch.zeros((self.batch, vocab_size), dtype=self.dtype, device=self.device)
        return self.logits
