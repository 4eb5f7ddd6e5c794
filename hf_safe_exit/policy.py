"""What ``model.generate(..., early_exit=...)`` accepts.

The argument is a small protocol, :class:`EarlyExitPolicy`: an object with a
``bind(model)`` method returning a *bound* policy, i.e. one that knows, for the
model at hand,

* ``measure`` -- a :class:`~hf_safe_exit.confidence.ConfidenceMeasure`,
* ``min_exit_layer`` -- the first (1-based) decoder layer allowed to exit,
* ``exit_layers`` (optional) -- the only layers where the confidence is checked (``None``: every layer),
* ``threshold_at(step, max_new_tokens)`` -- the exit threshold λ_t for the token at ``step`` (a float, or a float32
  tensor of one λ_t per batch row: :class:`~hf_safe_exit.decoding.row_thresholds.RowThresholds`).

A row exits after a checked layer i >= ``min_exit_layer`` when ``confidence > λ_t``
(strict, as in CALM and Jazbec et al. 2024, so that λ = 1 never exits: ``generate`` then runs HF's own loop,
bit for bit, see :attr:`EarlyExit.is_full_model`).
:class:`EarlyExit` is an :class:`~hf_safe_exit.EarlyExitConfig` at a threshold; ``RiskControlled``
(``hf_safe_exit.risk``) resolves, for a model, to an :class:`EarlyExit` whose threshold was chosen with a
statistical guarantee.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Protocol, runtime_checkable

import torch

from .confidence import ConfidenceMeasure, LayerView, get_measure
from .config import SCHEDULES, EarlyExitConfig, InvalidConfigError, check_exit_layers

__all__ = ["EarlyExitPolicy", "BoundPolicy", "EarlyExit", "ForcedExit", "decaying_threshold", "check_exit_layers",
           "SCHEDULES"]

_SETTINGS = frozenset(f.name for f in fields(EarlyExitConfig))


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
    """Anything ``generate(early_exit=...)`` binds to a model: it returns a :class:`BoundPolicy`."""

    def bind(self, model) -> "BoundPolicy": ...


@runtime_checkable
class BoundPolicy(Protocol):
    measure: ConfidenceMeasure
    min_exit_layer: int

    def threshold_at(self, step: int, max_new_tokens: int) -> float: ...


def _check_forced_layer(layer: int, model) -> None:
    num_layers = model.config.num_decoder_layers
    if not isinstance(layer, int) or not 1 <= layer <= num_layers:
        raise InvalidConfigError(f"ForcedExit({layer!r}) is outside the decoder: this model has {num_layers} decoder "
                                 f"layers, so use an integer in [1, {num_layers}] (1-based).")


@dataclass(frozen=True, init=False)
class EarlyExit:
    """An :class:`~hf_safe_exit.config.EarlyExitConfig` at threshold λ: the policy ``generate(early_exit=...)`` runs.

    ``EarlyExit(0.9, config=EarlyExitConfig(measure="softmax"))``, or the settings as keywords:
    ``EarlyExit(threshold=0.9, measure="softmax")`` (the same object). The settings are read through the
    policy too (``policy.measure``, ``policy.min_exit_layer``, ...: :class:`~hf_safe_exit.config.EarlyExitConfig`
    documents them).

    Args:
        threshold: λ in [0, 1]. 1 never exits (the full model: ``generate`` runs HF's own loop); 0 exits wherever
            the confidence is > 0.
        config: the early-exit configuration (default ``EarlyExitConfig()``).
        certificate: the :class:`~hf_safe_exit.risk.RiskCertificate` of the threshold when risk control chose it;
            ``None`` for a threshold chosen by hand.
    """

    threshold: float
    config: EarlyExitConfig
    # the guarantee this threshold carries, when risk control bound it (read back from generate's output)
    certificate: object | None = field(default=None, compare=False, repr=False)

    def __init__(self, threshold: float = 0.9, config: EarlyExitConfig | None = None, *, certificate=None,
                 **settings):
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 <= threshold <= 1.0:
            raise InvalidConfigError(f"threshold={threshold!r} is outside [0, 1]: use 1.0 for the full model, "
                                     "smaller values to exit earlier.")
        unknown = sorted(set(settings) - _SETTINGS)
        if unknown:
            raise TypeError(f"EarlyExit got unexpected keyword arguments {unknown}: the early-exit settings are "
                            f"{sorted(_SETTINGS)}.")
        if config is None:
            config = EarlyExitConfig(**settings)
        elif settings:
            raise TypeError("pass the early-exit settings either in config= or as keywords, not both.")
        elif not isinstance(config, EarlyExitConfig):
            raise TypeError(f"config must be an hf_safe_exit.EarlyExitConfig, got {type(config).__name__}.")
        object.__setattr__(self, "threshold", float(threshold))
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "certificate", certificate)

    def __getattr__(self, name: str):
        # the settings are the configuration's: policy.measure is policy.config.measure (one place defines them)
        if name in _SETTINGS and "config" in self.__dict__:
            return getattr(self.__dict__["config"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def measure_name(self) -> str:
        return self.config.measure_name

    @property
    def is_full_model(self) -> bool:
        """True when no token can exit early and every token is predicted by the model's own last layer (λ >= 1,
        and no PoE product at the last layer): ``generate`` then runs HF's own loop, bit for bit
        (:mod:`hf_safe_exit.decoding.full_model`)."""
        poe = self.config.anytime
        poe_last = poe is not None and poe.prediction and poe.final_layer == "poe"
        return self.threshold >= 1.0 and not poe_last

    def bind(self, model) -> "EarlyExit":
        """This policy for ``model``: its layers checked against the decoder, the measure resolved and bound."""
        config = self.config
        config.check_model(model)
        measure = get_measure(config.measure, model, config.anytime).bind(model)
        return replace(self, config=replace(config, measure=measure))

    def threshold_at(self, step: int, max_new_tokens: int) -> float:
        if self.config.schedule == "decaying":
            return decaying_threshold(self.threshold, step, max_new_tokens, self.config.decay_tau)
        return self.threshold


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
            _check_forced_layer(layers, model)
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
