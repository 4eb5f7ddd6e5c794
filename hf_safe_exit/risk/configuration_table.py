"""``ConfigurationTable``: the calibration losses of G early-exit configurations on the same n examples.

Pareto Testing (Laufer-Goldshtein, Fisch, Barzilay, Jaakkola, ICLR 2023, Algorithm 1; :mod:`hf_safe_exit.risk.pareto`)
chooses one configuration among many with a family-wise guarantee. Its input is this table: ``settings[g]`` is a
configuration (an :class:`~hf_safe_exit.EarlyExitConfig`'s ``to_dict()`` plus ``"threshold"``: λ),
``losses[risk][g, j]`` the loss of example ``j`` decoded with it (the risks of :class:`~hf_safe_exit.risk.LossTable`,
with their ``bounds``), ``costs[name]`` what it costs, per configuration ``(G,)`` or per example ``(G, n)`` (e.g.
``"layer_fraction"``, the fraction of decoder blocks run), ``extras`` other measurements (``task_loss``,
``num_tokens``, ...), and ``metadata`` what the losses belong to (model fingerprint, dtype, meta head fingerprint,
task, lengths, example ids, ``n``, ...: checked as a loss table's; the early-exit settings are per row, in
``settings``, never in ``metadata``).

Every row with threshold 1 decodes with the full model whatever its other settings (a token exits when its
confidence is > λ, never at λ = 1); the first of them is the *default* row, decoded when nothing is certified.
A table is checked whole when built and when read (every setting a valid configuration with a threshold in [0, 1],
no configuration twice, a full-model row, finite losses within their bounds, what the metadata says agrees with the
arrays), and a file carries the content digest it was written with (:mod:`hf_safe_exit.digest`).

:meth:`ConfigurationTable.from_tables` stacks the 1-D λ tables that ``collect`` writes, one per configuration,
collected on the same examples, model, task and lengths; a 1-D table is ``from_tables([table])``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from ..atomic import atomic_write
from ..config import EarlyExitConfig
from ..digest import DIGEST_KEY, check_digest, content_digest
from ..errors import CorruptFileError, MissingCalibrationError
from .loss_table import DEFAULT_LOSS_BOUNDS, RISKS, check_metadata, check_recorded_metadata, json_ready, read_npz
from .table_stack import COST_NAMES, PER_CONFIGURATION_KEYS, stack_tables

__all__ = ["ConfigurationTable", "CONFIGURATIONS_FILENAME", "COST_NAMES", "check_setting"]

CONFIGURATIONS_FILENAME = "early_exit_configurations.npz"
_KIND = "early_exit_configurations"  # the header's "kind": a 1-D λ table's header has none
_FORMAT_VERSION = 1
_TOL = 1e-12  # as selection.prepare_losses: losses on their bounds' ends up to float rounding, λ = 1 up to rounding
_LOAD_FIX = ("Pass a table written by ConfigurationTable.save (or store_calibration), or rebuild it with "
             "ConfigurationTable.from_tables([LossTable.load(path), ...]) from the 1-D tables of `hf-safe-exit collect`")


def check_setting(setting) -> dict:
    """``setting`` (an :class:`~hf_safe_exit.EarlyExitConfig`'s ``to_dict()`` plus ``"threshold"``) in its one
    written form: every setting of the configuration, a built-in measure by name (a table records the measure it
    resolved, never ``"auto"``), the threshold a float in [0, 1] (1.0 for the full model). ``ValueError`` otherwise."""
    if not isinstance(setting, dict) or "threshold" not in setting:
        raise ValueError(f"a configuration must be a dict of early-exit settings with a 'threshold', got {setting!r}.")
    lam = setting["threshold"]
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not np.isfinite(lam) or \
            not 0.0 <= lam <= 1.0 + _TOL:
        raise ValueError(f"threshold={lam!r} must be a number in [0, 1] (1 = the full model).")
    config = EarlyExitConfig.from_dict({k: v for k, v in setting.items() if k != "threshold"})  # strict: no typo
    if config.measure_name == "auto":
        raise ValueError("measure='auto' is resolved before losses are collected: record the measure used "
                         "(e.g. 'meta').")
    return {**config.to_dict(), "threshold": 1.0 if abs(lam - 1.0) <= _TOL else float(lam)}


def _check_rows(kind: str, name, arr: np.ndarray, G: int, n: int) -> None:
    """``costs``/``extras`` entries: named, finite numbers, one per configuration or per (configuration, example)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} are named by non-empty strings, got {name!r}.")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{kind}[{name!r}] holds {arr.dtype} values, not numbers.")
    if arr.shape not in ((G,), (G, n)):
        raise ValueError(f"{kind}[{name!r}] has shape {arr.shape}: one value per configuration ({G},) or per "
                         f"configuration and example ({G}, {n}).")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"{kind}[{name!r}] holds {int((~np.isfinite(arr)).sum())} NaN or infinite value(s).")


def _check_losses(name, arr: np.ndarray, bounds, G: int) -> None:
    if arr.ndim != 2 or arr.shape[0] != G or arr.shape[1] == 0:
        raise ValueError(f"losses[{name!r}] has shape {arr.shape}: it must be ({G}, n), one row per configuration "
                         "(settings) and one column per example, with n >= 1.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"losses[{name!r}] holds NaN or infinite values: drop or fix those examples.")
    lower, upper = bounds
    if not (np.isfinite(lower) and np.isfinite(upper) and lower < upper):
        raise ValueError(f"bounds[{name!r}]={list(bounds)} must be finite with lower < upper.")
    if arr.min() < lower - _TOL or arr.max() > upper + _TOL:
        raise ValueError(f"losses[{name!r}] lie in [{arr.min():.6g}, {arr.max():.6g}], outside their bounds "
                         f"[{lower:g}, {upper:g}].")


@dataclass(eq=False)
class ConfigurationTable:
    """Loss matrices ``(G, n)`` per risk for G configurations (``settings``), their costs, extras and metadata.

    Attributes:
        settings: G dicts, each an ``EarlyExitConfig.to_dict()`` plus ``"threshold"`` (λ in [0, 1]); no two equal,
            at least one at threshold 1 (the full model).
        losses: ``{risk: (G, n) array}``, risks from :data:`~hf_safe_exit.risk.RISKS`.
        costs: ``{name: (G,) or (G, n) array}``, at least one (Pareto Testing minimises one of them).
        bounds: ``{risk: (lower, upper)}``; defaults from :data:`~hf_safe_exit.risk.DEFAULT_LOSS_BOUNDS`.
        extras: other measurements, ``(G,)`` or ``(G, n)``.
        metadata: JSON-able, as a :class:`~hf_safe_exit.risk.LossTable`'s less the early-exit settings and grid.
        source: the file it was read from (for refusals to name; not compared).

    The checks run when the table is built; :meth:`save` builds it again first.
    """

    settings: list
    losses: dict
    costs: dict
    bounds: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.settings, (list, tuple)) or not self.settings:
            raise ValueError("settings must be a non-empty list of configurations (EarlyExitConfig.to_dict() plus "
                             "'threshold'), one per row of the losses.")
        self.metadata = json_ready(dict(self.metadata), "metadata")
        self._check_metadata_keys()
        check_metadata(self.metadata)
        self.settings = [check_setting(s) for s in self.settings]
        self._check_settings()
        G = len(self.settings)
        if not isinstance(self.losses, dict) or not self.losses:
            raise ValueError(f"A ConfigurationTable needs at least one loss matrix, keyed by one of {RISKS}.")
        unknown = sorted(set(self.losses) - set(RISKS))
        if unknown:
            raise ValueError(f"Unknown risk name(s) {unknown}: use {RISKS}.")
        self.bounds = {name: tuple(float(v) for v in self.bounds.get(name, DEFAULT_LOSS_BOUNDS[name]))
                       for name in self.losses}
        self.losses = {name: np.asarray(arr, dtype=np.float64) for name, arr in self.losses.items()}
        for name, arr in self.losses.items():
            _check_losses(name, arr, self.bounds[name], G)
        if len({arr.shape[1] for arr in self.losses.values()}) != 1:
            raise ValueError("All loss matrices must cover the same examples (the same n).")
        if not isinstance(self.costs, dict) or not self.costs:
            raise ValueError("costs must name at least one cost per configuration, e.g. {'layer_fraction': (G, n)}: "
                             "Pareto Testing picks the cheapest certified configuration.")
        self.costs = {name: np.asarray(arr) for name, arr in self.costs.items()}
        self.extras = {name: np.asarray(arr) for name, arr in self.extras.items()}
        for kind, arrays in (("costs", self.costs), ("extras", self.extras)):
            for name, arr in arrays.items():
                _check_rows(kind, name, arr, G, self.n)
        check_recorded_metadata(self.metadata, self.n, self.bounds, self.extras.get("task_loss"))

    def _check_metadata_keys(self) -> None:
        per_row = sorted(set(self.metadata) & set(PER_CONFIGURATION_KEYS))
        if per_row:
            raise ValueError(f"metadata {per_row} describe one configuration: in a ConfigurationTable each "
                             "configuration's settings and threshold are its row of settings; drop them from metadata.")
        if self.metadata.get("strategy") not in (None, "early_exit"):
            raise ValueError(f"metadata strategy={self.metadata['strategy']!r}: a ConfigurationTable holds early-exit "
                             "configurations only.")

    def _check_settings(self) -> None:
        seen: dict[str, int] = {}
        for g, setting in enumerate(self.settings):
            key = json.dumps(setting, sort_keys=True)
            if key in seen:
                raise ValueError(f"settings[{seen[key]}] and settings[{g}] are the same configuration ({setting}): "
                                 "give each configuration once.")
            seen[key] = g
        if not any(s["threshold"] == 1.0 for s in self.settings):
            raise ValueError("no full-model row: one configuration must have threshold 1 (the full model, decoded "
                             "when nothing is certified).")
        depth = self.metadata.get("num_decoder_layers")
        for g, s in enumerate(self.settings):
            if depth is not None and (s["min_exit_layer"] > depth or any(v > depth for v in s["exit_layers"] or ())):
                raise ValueError(f"settings[{g}] min_exit_layer={s['min_exit_layer']} / exit_layers={s['exit_layers']} "
                                 f"lie outside the decoder the metadata records ({depth} layers).")

    # ------------------------------------------------------------------ reading it
    @property
    def n(self) -> int:
        """The number of examples."""
        return next(iter(self.losses.values())).shape[1]

    @property
    def num_configurations(self) -> int:
        return len(self.settings)

    @property
    def thresholds(self) -> np.ndarray:
        """(G,) the threshold λ of each configuration."""
        return np.array([s["threshold"] for s in self.settings], dtype=np.float64)

    @property
    def full_model_index(self) -> int:
        """The default row: the first configuration at threshold 1 (the full model)."""
        return next(g for g, s in enumerate(self.settings) if s["threshold"] == 1.0)

    def config(self, index: int) -> EarlyExitConfig:
        """The early-exit configuration of row ``index`` (its threshold aside)."""
        return EarlyExitConfig.from_dict({k: v for k, v in self.settings[index].items() if k != "threshold"})

    def __eq__(self, other) -> bool:  # arrays compare element-wise: two tables are equal when their contents are
        return isinstance(other, ConfigurationTable) and content_digest(self._content()) == content_digest(
            other._content())

    __hash__ = None  # mutable, like the LossTable

    def digest(self) -> str:
        """A content hash of the whole table (settings, losses, bounds, costs, extras, metadata): fits and integrity
        checks made from it are cached under it."""
        return content_digest(self._content())[:16]

    def _content(self) -> dict:
        return {"settings": self.settings, "losses": self.losses, "costs": self.costs, "extras": self.extras,
                "bounds": {k: list(v) for k, v in self.bounds.items()}, "metadata": self.metadata}

    # ------------------------------------------------------------------ the file
    def save(self, path) -> str:
        """Write one ``.npz`` (no pickles) with its content digest; a directory path gets
        :data:`CONFIGURATIONS_FILENAME`. The table is checked again first: nothing is written that :meth:`load`
        would refuse."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIGURATIONS_FILENAME)
        table = ConfigurationTable(self.settings, self.losses, self.costs, self.bounds, self.extras, self.metadata)
        arrays = {f"loss__{k}": v for k, v in table.losses.items()}
        arrays.update({f"cost__{k}": v for k, v in table.costs.items()})
        arrays.update({f"extra__{k}": v for k, v in table.extras.items()})
        header = {"format_version": _FORMAT_VERSION, "kind": _KIND, "settings": table.settings,
                  "bounds": {k: list(v) for k, v in table.bounds.items()}, "metadata": table.metadata}
        header[DIGEST_KEY] = content_digest({"arrays": arrays, "header": header})
        arrays["header_json"] = np.array(json.dumps(header))
        with atomic_write(path, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        return path

    @classmethod
    def load(cls, path) -> "ConfigurationTable":
        """Read a table written by :meth:`save` (a file, or a directory holding :data:`CONFIGURATIONS_FILENAME`).

        Never unpickles. A missing file raises :class:`~hf_safe_exit.errors.MissingCalibrationError`; one that is
        damaged, of another kind (a 1-D λ table), malformed, not a valid table (see the class) or edited after it
        was written (its digest) a :class:`~hf_safe_exit.errors.CorruptFileError`, naming it.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIGURATIONS_FILENAME)
        if not os.path.isfile(path):
            raise MissingCalibrationError.about(path, "no multi-configuration table there", _LOAD_FIX)
        arrays, header = read_npz(path, _LOAD_FIX)

        def corrupt(problem: str) -> CorruptFileError:
            return CorruptFileError.about(path, problem, _LOAD_FIX)

        if header.get("kind") != _KIND:
            raise corrupt("not a multi-configuration table (its header has no kind 'early_exit_configurations'; a "
                          "1-D λ table is read with LossTable.load, or stacked with ConfigurationTable.from_tables)")
        version = header.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise corrupt(f"its format_version {version!r} is not a format number (an integer >= 1)")
        if version > _FORMAT_VERSION:
            raise CorruptFileError.about(path, f"written by a newer hf_safe_exit (format {version}, this one reads "
                                         f"{_FORMAT_VERSION})", "Upgrade hf_safe_exit to read it")
        parts = {prefix: {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
                 for prefix in ("loss__", "cost__", "extra__")}
        other = sorted(set(arrays) - {f"{p}{k}" for p, group in parts.items() for k in group})
        if other:
            raise corrupt(f"it holds arrays that are none of a configuration table's ({other[:5]})")
        for name, arr in parts["loss__"].items():
            if arr.dtype.kind != "f":  # save writes float64: anything else was converted after writing
                raise corrupt(f"array 'loss__{name}' holds {arr.dtype} values, not the floating-point losses it stores")
        settings, bounds, metadata = header.get("settings"), header.get("bounds", {}), header.get("metadata", {})
        if not isinstance(settings, list) or not isinstance(metadata, dict) or not isinstance(bounds, dict) or \
                not all(isinstance(v, list) and len(v) == 2 for v in bounds.values()):
            raise corrupt("its header's 'settings', 'bounds' or 'metadata' is malformed (settings: a list of "
                          "configurations, bounds: {risk: [lower, upper]}, metadata: an object)")
        try:
            table = cls(settings, parts["loss__"], parts["cost__"], {k: tuple(v) for k, v in bounds.items()},
                        parts["extra__"], metadata, source=path)
        except (ValueError, TypeError) as err:
            raise corrupt(f"its content is not a valid configuration table ({err})") from None
        digested = {k: v for k, v in header.items() if k != DIGEST_KEY}
        check_digest({"arrays": arrays, "header": digested, DIGEST_KEY: header.get(DIGEST_KEY)}, path,
                     "the configuration table", _LOAD_FIX)
        return table

    # ------------------------------------------------------------------ from 1-D tables
    @classmethod
    def from_tables(cls, tables) -> "ConfigurationTable":
        """Stack the 1-D λ tables of several configurations (:class:`~hf_safe_exit.risk.LossTable` s, or paths to
        them), collected on the same examples, model, task and lengths: one row per (configuration, λ), in the
        order given, the λ = 1 row once (the first table's; the full model whatever the configuration: every
        table's λ = 1 losses and task losses must be its). Raises ``ValueError`` naming the two tables that
        disagree (metadata, risks, bounds, measurements, the full model's losses) or hold one configuration twice.
        The extras named in :data:`COST_NAMES` become costs, the others stay extras."""
        return cls(**stack_tables(tables))
