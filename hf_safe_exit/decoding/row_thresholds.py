"""One early-exit configuration at a threshold per batch row: several λ of a grid decoded as rows of one batch.

``generate(model, ..., early_exit=RowThresholds([λ_0, ..., λ_{b-1}], config))`` decodes row r exactly as
``EarlyExit(λ_r, config=config)`` decodes it, up to float rounding: row r exits after a checked layer when its
confidence is > its own λ_t (CALM, Schuster et al. 2022, Eq. 2; under the decaying schedule λ_t of Eq. 4 is
computed from λ_r). The rows of a batch already exit at different layers (``StepDecoder.step``,
``dense_step``), so a per-row threshold changes only the comparison. Per-row thresholds are float32: a float
threshold is compared with a float32 confidence in float32 (PyTorch's scalar promotion), so both forms take the
same decisions on the same confidences. "Up to float rounding": a row's arithmetic does not depend on the other
rows except through the size of the products it shares (as for any row of a mixed batch, ``tests/test_mixed_batch.py``),
so the same tokens and exits except at float near-ties.

Why: a calibration grid decodes the same examples at K thresholds. As K separate ``generate`` calls, the encoder
and the cross-attention keys/values run K times and every step pays its per-step overhead K times;
as one batch of K rows per example (:mod:`hf_safe_exit.calibration.grid`) they run once.

A row at λ = 1 never exits, but it is decoded by this loop, not by HF's (``EarlyExit(1.0)`` is HF's own
``generate`` bit for bit, :mod:`.full_model`): the calibration grid decodes λ = 1 through ``EarlyExit(1.0)``.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

from ..config import EarlyExitConfig, InvalidConfigError
from ..policy import EarlyExit, decaying_threshold

__all__ = ["RowThresholds", "BoundRowThresholds"]


class RowThresholds:
    """``config`` at ``thresholds[r]`` for batch row ``r``: an ``early_exit=`` policy for :func:`generate`.

    Args:
        thresholds: one λ in [0, 1] per row of the batch it decodes (the batch size must match).
        config: the early-exit configuration (default ``EarlyExitConfig()``), shared by every row.
    """

    def __init__(self, thresholds: Sequence[float], config: EarlyExitConfig | None = None):
        values = list(thresholds) if not isinstance(thresholds, (str, bytes)) else None
        if not values or any(isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 <= v <= 1.0
                             for v in values):
            raise InvalidConfigError(f"thresholds={thresholds!r} must be a non-empty sequence of λ in [0, 1], one per "
                                     "batch row.")
        config = EarlyExitConfig() if config is None else config
        if not isinstance(config, EarlyExitConfig):
            raise TypeError(f"config must be an hf_safe_exit.EarlyExitConfig, got {type(config).__name__}.")
        self.thresholds = tuple(float(v) for v in values)
        self.config = config

    def __repr__(self) -> str:
        return f"RowThresholds({list(self.thresholds)!r}, config={self.config!r})"

    def bind(self, model) -> "BoundRowThresholds":
        """This policy for ``model``: the configuration checked and its measure bound (as ``EarlyExit.bind``)."""
        bound = EarlyExit(1.0, config=self.config).bind(model)
        device = next(model.parameters()).device
        return BoundRowThresholds(self.thresholds, bound.config, device)


class BoundRowThresholds:
    """:class:`RowThresholds` bound to a model: what the decoding loop reads (``measure``, ``min_exit_layer``,
    ``exit_layers``, ``anytime``, ``threshold_at``)."""

    def __init__(self, thresholds: tuple[float, ...], config: EarlyExitConfig, device: torch.device):
        self.thresholds, self.config, self.device = thresholds, config, device
        self.measure = config.measure
        self.min_exit_layer = config.min_exit_layer
        self.exit_layers = config.exit_layers
        self.anytime = config.anytime
        # each distinct λ's λ_t is computed once per step, as EarlyExit computes it (in float64), then rounded
        self.levels = sorted(set(thresholds))
        self.index = torch.tensor([self.levels.index(v) for v in thresholds], device=device)
        self.constant = None if config.schedule == "decaying" else self._as_rows(self.levels)
        self.stays = min(thresholds) >= 1.0  # no row can exit, at any step (λ = 1 stays 1 under both schedules)

    @property
    def threshold(self) -> tuple[float, ...]:
        return self.thresholds

    def _as_rows(self, levels: list[float]) -> torch.Tensor:
        return torch.tensor(levels, dtype=torch.float32, device=self.device).index_select(0, self.index)

    def threshold_at(self, step: int, max_new_tokens: int) -> torch.Tensor | float:
        """λ_t of every row for the token at ``step``: a float32 tensor ``(batch,)`` (see the module's doc); the float
        1.0 when every row is at λ = 1 (the loop then checks no confidence, as for ``EarlyExit(1.0)``)."""
        if self.stays:
            return 1.0
        if self.constant is not None:
            return self.constant
        tau = self.config.decay_tau
        return self._as_rows([decaying_threshold(v, step, max_new_tokens, tau) for v in self.levels])
