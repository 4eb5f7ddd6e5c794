"""The early-exit configuration: everything that decides how a token exits, except the threshold λ.

One frozen, serialisable object, :class:`EarlyExitConfig`, describes a member of the early-exit family (CALM,
Schuster et al. 2022; PoE anytime predictions, Jazbec et al. 2023): the confidence measure, the threshold
schedule and its τ, the first exit layer, the checked layers and the anytime predictions. It is validated once,
here, and written and read in one format (:meth:`EarlyExitConfig.to_dict` / :meth:`EarlyExitConfig.from_dict`),
by everything that records or reads these settings: ``collect`` and its resumable state, loss-table metadata,
calibrations and their integrity checks, policies stored on a generation config, cards, the CLI and the demo.
Adding a setting means adding a field here.

``EarlyExit(λ, config=config)`` puts it at a threshold: the policy ``generate`` takes.
:meth:`EarlyExitConfig.grid` spans several settings at once (a product of values), for a calibration that
searches over configurations as well as over λ.
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from .anytime import PoEConfig, resolve_anytime
from .confidence import AUTO, ConfidenceMeasure, check_measure, measure_name, resolve_measure

__all__ = ["EarlyExitConfig", "SCHEDULES", "InvalidConfigError", "check_exit_layers", "config_fields"]

SCHEDULES = ("constant", "decaying")


class InvalidConfigError(ValueError):
    """An early-exit setting has the wrong type or lies out of range (one line: the setting, the value, the fix)."""


def _integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_exit_layers(exit_layers) -> tuple[int, ...] | None:
    """``exit_layers`` validated: ``None`` (check every layer), or the sorted tuple of its distinct 1-based layers."""
    if exit_layers is None:
        return None
    layers = None if isinstance(exit_layers, (str, bytes, Mapping)) or not hasattr(exit_layers, "__iter__") \
        else list(exit_layers)
    if not layers or len(set(layers)) != len(layers) or any(not _integer(v) or v < 1 for v in layers):
        raise InvalidConfigError(f"exit_layers={exit_layers!r} must be distinct positive integers (1-based decoder "
                                 "layers where the confidence is checked), e.g. (3, 6, 9), or None to check every "
                                 "layer.")
    return tuple(sorted(int(v) for v in layers))


@dataclass(frozen=True)
class EarlyExitConfig:
    """How tokens exit early, λ aside. Frozen; equal configurations compare and hash equal.

    A token exits after a checked layer i >= ``min_exit_layer`` when its confidence c_i > λ_t (strict: λ = 1
    never exits). Each field's help text is in its ``metadata["help"]`` (``EarlyExitConfig.help()``).
    """

    measure: str | ConfidenceMeasure = field(default=AUTO, metadata={"help": (
        "confidence c_i: 'auto' (meta if the model has a trained meta head, else softmax_shortlist; softmax with "
        "anytime), 'softmax', 'softmax_shortlist', 'saturation', 'meta', or a ConfidenceMeasure instance")})
    schedule: str = field(default="constant", metadata={"help": (
        "'constant' (λ_t = λ) or 'decaying' (CALM Eq. 4: λ_t = clip(0.9 λ + 0.1 exp(-τ t / N), 0, 1))"),
        "cli": {"choices": SCHEDULES}})
    decay_tau: float = field(default=4.0, metadata={"help": "τ of the decaying schedule (CALM uses 4); > 0",
                                                    "cli": {"type": float}})
    min_exit_layer: int = field(default=1, metadata={"help": "first 1-based decoder layer a token may exit at",
                                                     "cli": {"type": int}})
    exit_layers: tuple[int, ...] | None = field(default=None, metadata={"help": (
        "None: check every layer from min_exit_layer on; else the only 1-based layers where the confidence is "
        "checked and a token may exit, e.g. (3, 6, 9)"), "cli": {"type": int, "nargs": "+", "metavar": "LAYER"}})
    anytime: PoEConfig | None = field(default=None, metadata={"help": (
        "None, 'poe' or a PoEConfig: Product-of-Experts anytime predictions (Jazbec et al. 2023)"),
        "cli": {"choices": ("poe",)}})

    def __post_init__(self) -> None:
        try:
            check_measure(self.measure)
        except ValueError as err:
            raise InvalidConfigError(str(err)) from None
        if self.schedule not in SCHEDULES:
            raise InvalidConfigError(f"schedule={self.schedule!r} is unknown: use one of {SCHEDULES}.")
        tau = self.decay_tau
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not math.isfinite(tau) or not tau > 0:
            raise InvalidConfigError(f"decay_tau={tau!r} must be a finite number > 0 (CALM uses 4).")
        if not _integer(self.min_exit_layer) or self.min_exit_layer < 1:
            raise InvalidConfigError(f"min_exit_layer={self.min_exit_layer!r} must be a positive integer "
                                     "(1-based decoder layer).")
        layers = check_exit_layers(self.exit_layers)
        if layers is not None and layers[0] < self.min_exit_layer:
            early = [v for v in layers if v < self.min_exit_layer]
            raise InvalidConfigError(f"exit_layers={layers!r}: {early} lie below min_exit_layer="
                                     f"{self.min_exit_layer}, where no token may exit; drop them or lower "
                                     "min_exit_layer.")
        try:
            anytime = resolve_anytime(self.anytime)
        except (TypeError, ValueError) as err:
            raise InvalidConfigError(str(err)) from None
        object.__setattr__(self, "decay_tau", float(tau))
        object.__setattr__(self, "min_exit_layer", int(self.min_exit_layer))
        object.__setattr__(self, "exit_layers", layers)
        object.__setattr__(self, "anytime", anytime)

    # ---------------------------------------------------------------- use
    @property
    def measure_name(self) -> str:
        return measure_name(self.measure)

    def resolve(self, model) -> "EarlyExitConfig":
        """The same configuration with ``measure="auto"`` replaced by what it means for ``model`` (what a
        calibration records: the losses were computed with that measure)."""
        return replace(self, measure=resolve_measure(self.measure, model, self.anytime))

    def check_model(self, model) -> None:
        """Raise :class:`InvalidConfigError` unless every layer named fits ``model``'s decoder (and PoE's weights)."""
        num_layers = int(model.config.num_decoder_layers)
        if self.min_exit_layer > num_layers:
            raise InvalidConfigError(
                f"min_exit_layer={self.min_exit_layer} is outside the decoder: this model has {num_layers} decoder "
                f"layers, so use an integer in [1, {num_layers}] (1-based; {num_layers} means never exit early).")
        outside = [v for v in self.exit_layers or () if v > num_layers]
        if outside:
            raise InvalidConfigError(
                f"exit_layers={self.exit_layers!r}: {outside} lie outside the decoder, which has {num_layers} "
                f"layers; use layers in [1, {num_layers - 1}] (the last layer always ends a token).")
        if self.anytime is not None:
            self.anytime.layer_weights(num_layers)  # raises on a wrong number of weights

    def accepts(self, recorded: "EarlyExitConfig") -> bool:
        """Whether a calibration recorded with ``recorded`` serves a request for this configuration: every setting
        equal, except that ``measure="auto"`` asks for whatever measure the calibration resolved it to."""
        mine = self.to_dict()
        if self.measure_name == AUTO:
            mine["measure"] = recorded.measure_name
        return mine == recorded.to_dict()

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Every setting, JSON-able (built from the fields: a new setting is written without more code). The measure
        is written by name, tuples as lists, a PoE setting as its dict."""
        return {f.name: _to_json(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, strict: bool = True) -> "EarlyExitConfig":
        """The configuration ``data`` describes; a setting it leaves out takes its default (a file written before
        the setting existed). ``strict`` (default): a key that is not a setting raises (a typo must not fall back
        to a default); ``strict=False`` reads the settings out of a larger dict (a loss table's metadata). Raises
        :class:`InvalidConfigError` for a value of the wrong type or out of range."""
        if not isinstance(data, Mapping):
            raise InvalidConfigError(f"an early-exit configuration must be a mapping, got {type(data).__name__}.")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if strict and unknown:
            raise InvalidConfigError(f"{unknown} are not early-exit settings (they are {names}): fix the spelling or "
                                     "drop them.")
        return cls(**{name: data[name] for name in names if name in data})

    @classmethod
    def help(cls) -> dict[str, str]:
        """Each setting's help text, by name."""
        return {f.name: f.metadata["help"] for f in fields(cls)}

    @classmethod
    def cli_options(cls) -> dict[str, dict]:
        """``{setting: argparse keywords}``: the CLI adds one ``--<setting>`` option per field from these (so a new
        setting needs no CLI code); each option defaults to None, i.e. the field's default."""
        return {f.name: {"help": f.metadata["help"] + f" (default {f.default!r})", **f.metadata.get("cli", {})}
                for f in fields(cls)}

    # ---------------------------------------------------------------- several configurations at once
    @classmethod
    def grid(cls, base: "EarlyExitConfig | None" = None, **axes) -> list["EarlyExitConfig"]:
        """Every configuration of the product of ``axes`` (setting name → values) over ``base``, in product order:
        ``EarlyExitConfig.grid(measure=["meta", "saturation"], decay_tau=[1, 4])`` is four configurations."""
        base = base if base is not None else cls()
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(axes) - set(names))
        if unknown:
            raise InvalidConfigError(f"grid: {unknown} are not early-exit settings (they are {names}).")
        values = {}
        for name, given in axes.items():  # listed once: an iterator given as an axis is read only here
            values[name] = [] if isinstance(given, (str, bytes, Mapping)) or not hasattr(given, "__iter__") \
                else list(given)
            if not values[name]:
                raise InvalidConfigError(f"grid: {name}={given!r} must be a non-empty list of values, e.g. "
                                         f"{name}=[{getattr(base, name)!r}].")
        keys = list(values)
        return [replace(base, **dict(zip(keys, combo))) for combo in itertools.product(*values.values())]


def _to_json(value):
    if isinstance(value, ConfidenceMeasure):
        return value.name
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


def config_fields() -> tuple[str, ...]:
    """The names of the early-exit settings, in declaration order."""
    return tuple(f.name for f in fields(EarlyExitConfig))
