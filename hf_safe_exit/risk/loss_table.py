"""``LossTable``: the calibration loss matrices of one model on one task, stored next to the model.

The calibration pipeline decodes a calibration set once per threshold λ on a grid and
writes a ``LossTable``; :class:`~hf_safe_exit.risk.RiskControlled` reads it and picks λ̂ for
any (ε, δ, method) without decoding again. Convention: ``losses[name][k, j]`` is the loss
of example ``j`` at threshold ``lambdas[k]``.

Risks (Jazbec, Timans et al. 2024, Sec. 3), with ℓ the task loss and ŷ_λ the early-exit output:

* ``"performance_gap"``: ℓ(ŷ_λ, y) − ℓ(ŷ_1, y), unrestricted (may be negative), in [a − b, b − a];
* ``"performance_gap_bounded"``: max{ℓ(ŷ_λ, y) − ℓ(ŷ_1, y), 0}, in [0, b − a] (CALM's choice);
* ``"consistency"``: ℓ(ŷ_λ, ŷ_1), in [0, 1] by default (no labels needed);

for task losses in [a, b] (default [0, 1], so the gap lies in [−1, 1]).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from dataclasses import dataclass, field

import numpy as np

from ..atomic import atomic_write
from ..errors import CalibrationFileError, CorruptFileError, MissingCalibrationError
from .selection import prepare_losses

__all__ = ["LossTable", "RISKS", "DEFAULT_LOSS_BOUNDS", "CALIBRATION_FILENAME", "MAX_TOKENS", "check_metadata", "check_task_name",
           "json_ready"]

CALIBRATION_FILENAME = "early_exit_calibration.npz"
RISKS = ("performance_gap", "performance_gap_bounded", "consistency")
DEFAULT_LOSS_BOUNDS = {"performance_gap": (-1.0, 1.0), "performance_gap_bounded": (0.0, 1.0),
                       "consistency": (0.0, 1.0)}
_FORMAT_VERSION = 1


# task names that fit an HTML comment and a directory name: no spaces, ':', '--', '/', leading or doubled dots
_TASK_NAME = re.compile(r"[A-Za-z0-9_]+(?:[.-][A-Za-z0-9_]+)*")
MAX_TOKENS = 65536  # a length a calibration may record: more is a corrupt header (generate would not end), not a run


def check_task_name(task: str) -> str:
    """``task`` if it can name a model-card section and a calibration directory, else ``ValueError``."""
    if not isinstance(task, str) or not _TASK_NAME.fullmatch(task):
        raise ValueError(f"task {task!r} cannot name a model-card section or a calibration directory: use letters, "
                         "digits, '_', and single '.' or '-' between them (e.g. 'cnndm').")
    return task


def _count(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer() and \
        1 <= value <= MAX_TOKENS


def check_metadata(meta: dict) -> None:
    """Raise ``ValueError`` (one line: the key, the value, what it must be) unless what ``meta`` says can be used:
    the early-exit settings valid (:class:`~hf_safe_exit.EarlyExitConfig`; a custom measure is recorded by name),
    a known strategy, a task name, lengths and a depth that are counts, a first exit layer within that depth."""
    from ..config import EarlyExitConfig  # here, not at the top: reading a table's numbers needs no torch

    strategy = meta.get("strategy")
    if strategy not in (None, "early_exit", "bild"):
        raise ValueError(f"metadata strategy={strategy!r} is unknown: early_exit or bild.")
    if meta.get("task") is not None:
        check_task_name(meta["task"])
    for key in ("model_fingerprint", "dtype", "meta_head_fingerprint"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise ValueError(f"metadata {key}={meta[key]!r} must be a string.")
    for key in ("max_new_tokens", "max_input_length", "num_decoder_layers"):
        if meta.get(key) is not None and not _count(meta[key]):
            raise ValueError(f"metadata {key}={meta[key]!r} must be a whole number in [1, {MAX_TOKENS}].")
    if strategy != "bild" and meta.get("measure") is not None:
        if not isinstance(meta["measure"], str):
            raise ValueError(f"metadata measure={meta['measure']!r} must be a measure's name.")
        config = EarlyExitConfig.from_dict({**meta, "measure": "auto"}, strict=False)  # settings typed, in range
        depth = meta.get("num_decoder_layers")
        if depth is not None and (config.min_exit_layer > depth or any(v > depth for v in config.exit_layers or ())):
            raise ValueError(f"metadata min_exit_layer={config.min_exit_layer} / exit_layers={config.exit_layers} lie "
                             f"outside the decoder it records ({depth} layers).")


def json_ready(obj, what: str):
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be JSON-serialisable (str, numbers, lists, dicts): {err}") from None


@dataclass
class LossTable:
    """Loss matrices ``(K, n)`` per risk on a λ grid, plus extras and JSON metadata.

    Attributes:
        lambdas: (K,) thresholds in [0, 1], containing 1.0.
        losses: ``{risk name: (K, n) array}``; names from :data:`RISKS`.
        bounds: ``{risk name: (lower, upper)}``; defaults from :data:`DEFAULT_LOSS_BOUNDS`.
        extras: other arrays, e.g. ``task_loss``/``mean_exit_layer``/``layer_fraction`` (K, n),
            ``wall_time`` (K,).
        metadata: JSON-able dict (``model_fingerprint``, ``task``, ``measure``, ``schedule``,
            ``min_exit_layer``, ``num_decoder_layers``, ``example_ids``, ``versions``, ...).
    """

    lambdas: np.ndarray
    losses: dict[str, np.ndarray]
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lambdas = np.asarray(self.lambdas, dtype=np.float64)
        if not self.losses:
            raise ValueError(f"A LossTable needs at least one loss matrix, keyed by one of {RISKS}.")
        unknown = set(self.losses) - set(RISKS)
        if unknown:
            raise ValueError(f"Unknown risk name(s) {sorted(unknown)}: use {RISKS}.")
        self.bounds = {name: tuple(float(v) for v in self.bounds.get(name, DEFAULT_LOSS_BOUNDS[name]))
                       for name in self.losses}
        self.losses = {name: np.asarray(arr, dtype=np.float64) for name, arr in self.losses.items()}
        sizes = set()
        for name, arr in self.losses.items():
            prepare_losses(self.lambdas, arr, self.bounds[name])  # validates grid, shape, finiteness, bounds
            sizes.add(arr.shape[1])
        if len(sizes) != 1:
            raise ValueError(f"All loss matrices must cover the same examples; got n = {sorted(sizes)}.")
        self.extras = {name: np.asarray(arr) for name, arr in self.extras.items()}
        for name, arr in self.extras.items():
            if arr.ndim == 0 or arr.shape[0] != self.lambdas.size:
                raise ValueError(f"extras[{name!r}] has shape {arr.shape}; its first axis must follow lambdas "
                                 f"({self.lambdas.size}).")
        self.metadata = json_ready(dict(self.metadata), "metadata")
        check_metadata(self.metadata)
        ids = self.metadata.get("example_ids")
        if ids is not None and len(ids) != self.n:
            raise ValueError(f"metadata['example_ids'] has {len(ids)} entries for {self.n} examples.")

    @property
    def n(self) -> int:
        return next(iter(self.losses.values())).shape[1]

    @classmethod
    def from_task_losses(cls, lambdas, task_losses, consistency_losses=None, task_loss_bounds=(0.0, 1.0),
                         extras=None, metadata=None, consistency_bounds=(0.0, 1.0)) -> "LossTable":
        """Derive the risks from per-threshold task losses ``task_losses[k, j]`` = ℓ(ŷ_{λ_k}, y_j).

        The gap is taken relative to the λ = 1 row (which must exist). ``task_losses`` is also
        kept in ``extras['task_loss']``. ``consistency_losses`` (K, n), ℓ(ŷ_λ, ŷ_1), is optional.
        """
        a, b = (float(v) for v in task_loss_bounds)
        task = np.asarray(task_losses, dtype=np.float64)
        prepare_losses(lambdas, task, (a, b))  # validates grid, shape and range before deriving
        lam = np.asarray(lambdas, dtype=np.float64)
        full = task[int(np.argmin(np.abs(lam - 1.0)))]
        gap = task - full[None, :]
        losses = {"performance_gap": gap, "performance_gap_bounded": np.maximum(gap, 0.0)}
        bounds = {"performance_gap": (a - b, b - a), "performance_gap_bounded": (0.0, b - a)}
        if consistency_losses is not None:
            losses["consistency"] = np.asarray(consistency_losses, dtype=np.float64)
            bounds["consistency"] = tuple(consistency_bounds)
        extras = dict(extras or {})
        extras.setdefault("task_loss", task)
        meta = dict(metadata or {})
        meta.setdefault("task_loss_bounds", [a, b])
        return cls(lam, losses, bounds, extras, meta)

    def subset(self, indices) -> "LossTable":
        """The table restricted to the examples ``indices`` (for calibration/test splits).

        Extras with one entry per (λ, example) are subset; per-λ extras (e.g. ``wall_time``)
        are kept unchanged.
        """
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        if idx.size == 0:
            raise ValueError("subset needs at least one example index.")
        meta = dict(self.metadata)
        if meta.get("example_ids") is not None:
            meta["example_ids"] = [meta["example_ids"][int(i)] for i in idx]
        extras = {k: (v[:, idx] if v.ndim >= 2 and v.shape[1] == self.n else v) for k, v in self.extras.items()}
        return LossTable(self.lambdas.copy(), {k: v[:, idx] for k, v in self.losses.items()}, dict(self.bounds),
                         extras, meta)

    def digest(self) -> str:
        """A content hash of what a fit and its checks read (grid, losses, bounds, metadata), used to cache fits and
        integrity checks made from this table: two tables that differ in any of these never share one."""
        h = hashlib.sha256(self.lambdas.tobytes())
        for name in sorted(self.losses):
            h.update(name.encode())
            h.update(np.ascontiguousarray(self.losses[name]).tobytes())
            h.update(repr(self.bounds[name]).encode())
        h.update(json.dumps(self.metadata, sort_keys=True).encode())
        return h.hexdigest()[:16]

    def save(self, path) -> str:
        """Write one ``.npz`` (no pickles); a directory path gets :data:`CALIBRATION_FILENAME`."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CALIBRATION_FILENAME)
        arrays = {"lambdas": self.lambdas}
        arrays.update({f"loss__{k}": v for k, v in self.losses.items()})
        arrays.update({f"extra__{k}": v for k, v in self.extras.items()})
        header = {"format_version": _FORMAT_VERSION, "bounds": {k: list(v) for k, v in self.bounds.items()},
                  "metadata": self.metadata}
        arrays["header_json"] = np.array(json.dumps(header))
        with atomic_write(path, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        return path

    @classmethod
    def load(cls, path) -> "LossTable":
        """Read a table written by :meth:`save` (a file, or a directory holding :data:`CALIBRATION_FILENAME`).

        Never unpickles. A file that is missing, empty, truncated, not a loss table, or whose arrays or
        header are missing or malformed raises a :class:`~hf_safe_exit.errors.CalibrationFileError` naming it.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CALIBRATION_FILENAME)
        if not os.path.isfile(path):
            raise MissingCalibrationError.about(path, "no loss table there", _LOAD_FIX)
        arrays, header = _read_npz(path)
        version = header.get("format_version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise CorruptFileError.about(path, f"its format_version {version!r} is not a format number (an integer)",
                                         _LOAD_FIX)
        if version > _FORMAT_VERSION:
            raise CorruptFileError.about(path, f"written by a newer hf_safe_exit (format {version!r}, this one reads "
                                         f"{_FORMAT_VERSION})", "Upgrade hf_safe_exit to read it")
        losses = {k[len("loss__"):]: v for k, v in arrays.items() if k.startswith("loss__")}
        extras = {k[len("extra__"):]: v for k, v in arrays.items() if k.startswith("extra__")}
        if "lambdas" not in arrays or not losses:
            missing = "'lambdas'" if "lambdas" not in arrays else "a 'loss__<risk>' array"
            raise CorruptFileError.about(path, f"not a complete loss table: it has no {missing}", _LOAD_FIX)
        for name, arr in {"lambdas": arrays["lambdas"], **{f"loss__{k}": v for k, v in losses.items()}}.items():
            if arr.dtype.kind not in "fiu":
                raise CorruptFileError.about(path, f"array {name!r} holds {arr.dtype} values, not numbers", _LOAD_FIX)
        bounds, metadata = header.get("bounds", {}), header.get("metadata", {})
        if not isinstance(bounds, dict) or not isinstance(metadata, dict) or not all(
                isinstance(v, list) and len(v) == 2 for v in bounds.values()):
            raise CorruptFileError.about(path, "its header's 'bounds' or 'metadata' is malformed (bounds: "
                                         "{risk: [lower, upper]}, metadata: an object)", _LOAD_FIX)
        try:
            return cls(arrays["lambdas"], losses, {k: tuple(v) for k, v in bounds.items()}, extras, metadata)
        except (ValueError, TypeError) as err:  # the constructor's checks: shapes, grid, bounds, risk names
            raise CorruptFileError.about(path, f"its arrays do not form a loss table ({err})", _LOAD_FIX) from None


_LOAD_FIX = ("Pass a loss table written by `hf-safe-exit collect --output` (or LossTable.save), or recollect it with "
             "`hf-safe-exit collect ... --output <file>.npz`")


def _read_npz(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and JSON header of a ``.npz`` loss table, without unpickling; numpy's errors named by kind."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise CorruptFileError.about(path, "not a loss table: it is a single .npy array, not an .npz archive",
                                         _LOAD_FIX)
        with data:
            arrays = {k: data[k] for k in data.files}
    except CalibrationFileError:
        raise
    except EOFError:
        raise CorruptFileError.about(path, "the file is empty, not a loss table", _LOAD_FIX) from None
    except zipfile.BadZipFile:
        raise CorruptFileError.about(path, "truncated or damaged .npz archive (incomplete download or copy?)",
                                     _LOAD_FIX) from None
    except (ValueError, OSError, KeyError) as err:
        # numpy reports any other content as "pickled data" or "object arrays": neither is ever loaded here
        problem = ("it holds Python objects, which a loss table never does" if "allow_pickle" in str(err) and
                   zipfile.is_zipfile(path) else "not a loss table (not an .npz archive of numeric arrays)")
        raise CorruptFileError.about(path, problem, _LOAD_FIX) from None
    if "header_json" not in arrays:
        raise CorruptFileError.about(path, "not a loss table written by hf_safe_exit: the .npz has no 'header_json' "
                                     f"(it holds {sorted(arrays)[:5]})", _LOAD_FIX)
    try:
        header = json.loads(str(arrays.pop("header_json")))
    except (json.JSONDecodeError, ValueError):
        header = None
    if not isinstance(header, dict):
        raise CorruptFileError.about(path, "its 'header_json' is not a JSON object", _LOAD_FIX)
    return arrays, header
