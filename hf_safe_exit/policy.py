"""What ``model.generate(..., early_exit=...)`` accepts.

The argument is a small protocol, :class:`EarlyExitPolicy`: an object with a
``bind(model)`` method returning a *bound* policy, i.e. one that knows, for the
model at hand,

* ``measure`` -- a :class:`~hf_safe_exit.confidence.ConfidenceMeasure`,
* ``min_exit_layer`` -- the first (1-based) decoder layer allowed to exit,
* ``exit_layers`` (optional) -- the only layers where the confidence is checked (``None``: every layer),
* ``threshold_at(step, max_new_tokens)`` -- the exit threshold λ_t for the token at ``step``.

A row exits after a checked layer i >= ``min_exit_layer`` when ``confidence > λ_t``
(strict, as in CALM and Jazbec et al. 2024, so that λ = 1 never exits: ``generate`` then runs HF's own loop,
bit for bit, see :attr:`EarlyExit.is_full_model`).
:class:`EarlyExit` is the plain fixed-threshold policy; ``RiskControlled``
(``hf_safe_exit.risk``) binds to an :class:`EarlyExit` whose threshold was chosen
with a statistical guarantee.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol, runtime_checkable

import torch

from .confidence import DEFAULT_MEASURE, ConfidenceMeasure, LayerView, check_measure, get_measure, measure_name
from .decoding.poe import PoEConfig, resolve_anytime

__all__ = ["EarlyExitPolicy", "BoundPolicy", "EarlyExit", "ForcedExit", "decaying_threshold", "check_exit_layers",
           "SCHEDULES"]

SCHEDULES = ("constant", "decaying")


def decaying_threshold(base: float, step: int, max_new_tokens: int, tau: float = 4.0) -> float:
    """CALM's position-decaying threshold (Schuster et al. 2022, Eq. 4).

    λ_t = clip(0.9·λ + 0.1·exp(−τ·t/N), 0, 1), with t the 0-based position and N the
    maximum number of new tokens. This is the paper's form; the t5x reference code
    multiplies the exponential term by λ as well (0.9·λ + 0.1·λ·exp(−τt/N)). With
    λ = 1 the schedule stays at 1 for every t, so λ = 1 remains the full model.
    """
    if base >= 1.0:
        return 1.0
    value = 0.9 * base + 0.1 * math.exp(-tau * step / max(max_new_tokens, 1))
    return min(max(value, 0.0), 1.0)


@runtime_checkable
class EarlyExitPolicy(Protocol):
    """Anything ``generate(early_exit=...)`` accepts: it binds to a model and returns a :class:`BoundPolicy`."""

    def bind(self, model) -> "BoundPolicy": ...


@runtime_checkable
class BoundPolicy(Protocol):
    measure: ConfidenceMeasure
    min_exit_layer: int

    def threshold_at(self, step: int, max_new_tokens: int) -> float: ...


def _check_min_exit_layer(min_exit_layer: int, model) -> None:
    num_layers = model.config.num_decoder_layers
    if not isinstance(min_exit_layer, int) or not 1 <= min_exit_layer <= num_layers:
        raise ValueError(
            f"min_exit_layer={min_exit_layer!r} is outside the decoder: this model has {num_layers} decoder "
            f"layers, so use an integer in [1, {num_layers}] (1-based; {num_layers} means never exit early)."
        )


def check_exit_layers(exit_layers) -> tuple[int, ...] | None:
    """``exit_layers`` validated: ``None`` (check every layer), or the sorted tuple of its distinct 1-based layers."""
    if exit_layers is None:
        return None
    layers = None if isinstance(exit_layers, (str, bytes)) or not hasattr(exit_layers, "__iter__") \
        else list(exit_layers)
    if not layers or len(set(layers)) != len(layers) or any(
            isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in layers):
        raise ValueError(f"exit_layers={exit_layers!r} must be distinct positive integers (1-based decoder layers "
                         "where the confidence is checked), e.g. (3, 6, 9), or None to check every layer.")
    return tuple(sorted(int(v) for v in layers))


def _check_exit_layers_fit(exit_layers: tuple[int, ...] | None, min_exit_layer: int, model) -> None:
    if exit_layers is None:
        return
    num_layers = model.config.num_decoder_layers
    outside = [v for v in exit_layers if v > num_layers]
    if outside:
        raise ValueError(f"exit_layers={exit_layers!r}: {outside} lie outside the decoder, which has {num_layers} "
                         f"layers; use layers in [1, {num_layers - 1}] (the last layer always ends a token).")
    early = [v for v in exit_layers if v < min_exit_layer]
    if early:
        raise ValueError(f"exit_layers={exit_layers!r}: {early} lie below min_exit_layer={min_exit_layer}, where no "
                         "token may exit; drop them or lower min_exit_layer.")


@dataclass(frozen=True)
class EarlyExit:
    """Exit a token at the first checked layer ``i >= min_exit_layer`` whose confidence exceeds the threshold.

    Args:
        threshold: λ in [0, 1]. 1 never exits (the full model); 0 exits wherever confidence > 0.
        measure: ``"auto"`` (default: ``"meta"`` if the model has a trained meta head, else
            ``confidence.HEAD_FREE_DEFAULT``, ``"softmax"`` with ``anytime``; chosen by measurement, see
            :mod:`hf_safe_exit.confidence`),
            ``"softmax"``, ``"softmax_shortlist"``, ``"saturation"``, ``"meta"`` or a ``ConfidenceMeasure``.
        schedule: ``"constant"`` (λ_t = λ) or ``"decaying"`` (:func:`decaying_threshold`).
        decay_tau: τ of the decaying schedule (CALM uses 4).
        min_exit_layer: first 1-based decoder layer allowed to exit.
        exit_layers: ``None`` (default: the confidence is checked after every layer from ``min_exit_layer`` on),
            or the 1-based layers where it is checked, e.g. ``(3, 6, 9)``: a token can exit only there, and the
            measure is computed only there, which is what makes a costly measure (``"softmax"`` projects onto
            the vocabulary at every check) pay less. Risk control calibrates the policy with these exits
            (``collect(..., exit_layers=...)``), so λ̂ holds for them and only for them.
        anytime: ``None`` (default: each layer predicts with its own logits), ``"poe"`` or a
            :class:`~hf_safe_exit.decoding.poe.PoEConfig`: Product-of-Experts anytime predictions
            (Jazbec et al. 2023), the normalised product of the ReLU'd logits of layers 1..l, used as the
            prediction and/or as the logits the confidence measure sees. Stored resolved (a PoEConfig).
        certificate: the :class:`~hf_safe_exit.risk.RiskCertificate` of the threshold, set by
            ``RiskControlled.bind``; ``None`` for a threshold chosen by hand.
    """

    threshold: float = 0.9
    measure: str | ConfidenceMeasure = DEFAULT_MEASURE
    schedule: str = "constant"
    decay_tau: float = 4.0
    min_exit_layer: int = 1
    anytime: str | PoEConfig | None = None
    exit_layers: tuple[int, ...] | None = None
    # the guarantee this threshold carries, when a RiskControlled bound it (read back from generate's output)
    certificate: object | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not (
            0.0 <= float(self.threshold) <= 1.0
        ):
            raise ValueError(f"threshold={self.threshold!r} is outside [0, 1]: use 1.0 for the full model, "
                             "smaller values to exit earlier.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is unknown: use one of {SCHEDULES}.")
        if not self.decay_tau > 0:
            raise ValueError(f"decay_tau={self.decay_tau!r} must be > 0.")
        check_measure(self.measure)  # raises on an unknown name
        object.__setattr__(self, "anytime", resolve_anytime(self.anytime))
        object.__setattr__(self, "exit_layers", check_exit_layers(self.exit_layers))

    @property
    def measure_name(self) -> str:
        return measure_name(self.measure)

    @property
    def is_full_model(self) -> bool:
        """True when no token can exit early and every token is predicted by the model's own last layer (λ >= 1,
        and no PoE product at the last layer): ``generate`` then runs HF's own loop, bit for bit
        (:mod:`hf_safe_exit.decoding.full_model`)."""
        poe_last = self.anytime is not None and self.anytime.prediction and self.anytime.final_layer == "poe"
        return float(self.threshold) >= 1.0 and not poe_last

    def bind(self, model) -> "EarlyExit":
        _check_min_exit_layer(self.min_exit_layer, model)
        _check_exit_layers_fit(self.exit_layers, self.min_exit_layer, model)
        if self.anytime is not None:
            self.anytime.layer_weights(model.config.num_decoder_layers)  # raises on a wrong number of weights
        return replace(self, measure=get_measure(self.measure, model, self.anytime).bind(model))

    def threshold_at(self, step: int, max_new_tokens: int) -> float:
        if self.schedule == "decaying":
            return decaying_threshold(float(self.threshold), step, max_new_tokens, self.decay_tau)
        return float(self.threshold)


class _ForcedLayerMeasure(ConfidenceMeasure):
    name = "forced"
    needs_logits = False

    def __init__(self, layer_of: Callable[[int, torch.Tensor], torch.Tensor]):
        self.layer_of = layer_of

    def __call__(self, view: LayerView) -> torch.Tensor:
        target = self.layer_of(view.step, view.rows).to(view.rows.device)
        return (view.layer >= target).to(torch.float32)


class _TableLookup:
    """``(step, rows) -> table[rows, step]`` (the last column past the end), the table copied once to the rows'
    device so that a lookup on a GPU makes no host round trip."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, step: int, rows: torch.Tensor) -> torch.Tensor:
        if self.table.device != rows.device:
            self.table = self.table.to(rows.device)
        return self.table[rows, min(step, self.table.shape[1] - 1)]


@dataclass(frozen=True)
class ForcedExit:
    """Exit every token at a prescribed layer: for oracles, ablations and tests.

    ``layers`` is an int (same layer everywhere), a LongTensor ``(batch, max_new_tokens)``
    of 1-based exit layers, or a callable ``(step, rows) -> LongTensor(len(rows))``.
    """

    layers: int | torch.Tensor | Callable[[int, torch.Tensor], torch.Tensor]
    min_exit_layer: int = 1
    measure: ConfidenceMeasure = field(init=False, default=None)

    def bind(self, model) -> "ForcedExit":
        layers = self.layers
        if isinstance(layers, int):
            _check_min_exit_layer(layers, model)
            # made on the rows' device: a host tensor copied to a GPU is one synchronisation per checked layer
            fn = lambda step, rows: torch.full((len(rows),), layers, dtype=torch.long, device=rows.device)  # noqa: E731
        elif isinstance(layers, torch.Tensor):
            fn = _TableLookup(layers.long())
        else:
            fn = layers
        bound = ForcedExit(self.layers, self.min_exit_layer)
        object.__setattr__(bound, "measure", _ForcedLayerMeasure(fn))
        return bound

    def threshold_at(self, step: int, max_new_tokens: int) -> float:
        return 0.5
