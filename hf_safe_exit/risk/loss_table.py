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

A table is checked whole when built (shapes, grid, bounds, every number finite, what its metadata says agrees with
its arrays) and when read; a file carries the content digest it was written with (:mod:`hf_safe_exit.digest`),
so that an edit made after writing is refused even where the edited table would still be well formed. A digest
shows an edit, not a forgery: whoever recomputes it after editing gets past it (then only the content checks, and
the model's fingerprint at use, stand in the way). A file without one (older, or hand-made) is read on its content.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np

from ..atomic import atomic_write
from ..digest import DIGEST_KEY, check_digest, content_digest
from ..errors import CalibrationFileError, CorruptFileError, MissingCalibrationError
from .provenance import is_fingerprint
from .selection import prepare_losses

__all__ = ["LossTable", "RISKS", "DEFAULT_LOSS_BOUNDS", "CALIBRATION_FILENAME", "MAX_TOKENS", "check_metadata", "check_task_name",
           "check_recorded_metadata", "json_ready", "read_npz"]

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
    for key in ("model_fingerprint", "meta_head_fingerprint"):
        if meta.get(key) is not None and not is_fingerprint(meta[key]):
            raise ValueError(f"metadata {key}={meta[key]!r} is not a fingerprint (lowercase hex digits, as "
                             "hf_safe_exit.model_fingerprint gives).")
    if meta.get("dtype") is not None and not isinstance(meta["dtype"], str):
        raise ValueError(f"metadata dtype={meta['dtype']!r} must be a string.")
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


def _check_extra(name, arr: np.ndarray, K: int, n: int) -> None:
    """Raise ``ValueError`` unless ``extras[name]`` holds finite numbers, one per λ or one per (λ, example)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"extras are named by non-empty strings, got {name!r}.")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"extras[{name!r}] holds {arr.dtype} values, not numbers.")
    if arr.shape not in ((K,), (K, n)):
        raise ValueError(f"extras[{name!r}] has shape {arr.shape}: its first axis must follow lambdas and any second "
                         f"the examples, ({K},) or ({K}, {n}).")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"extras[{name!r}] holds {int((~np.isfinite(arr)).sum())} NaN or infinite value(s): every "
                         "measurement a table records is a number.")


def _check_agreement(table: "LossTable") -> None:
    """Raise ``ValueError`` where the metadata contradicts the arrays: the grid (``lambdas``), and what
    :func:`check_recorded_metadata` checks."""
    meta, K = table.metadata, table.lambdas.size
    grid = meta.get("lambdas")
    if grid is not None and not (_numbers(grid, K) and np.array_equal(grid, table.lambdas)):
        raise ValueError(f"metadata lambdas={grid!r} is not the grid the losses are on ({table.lambdas.tolist()}).")
    check_recorded_metadata(meta, table.n, table.bounds, table.extras.get("task_loss"))


def check_recorded_metadata(meta: dict, n: int, bounds: dict, task_loss=None) -> None:
    """Raise ``ValueError`` where the metadata of a table of ``n`` examples contradicts its arrays: the examples
    (``n``, ``example_ids``), the task loss's range (``task_loss_bounds``: the risks' ``bounds`` and ``task_loss``
    follow from it), what collect records beside the settings (typed), and no NaN or infinite number."""
    if meta.get("n") is not None and (isinstance(meta["n"], bool) or meta["n"] != n):
        raise ValueError(f"metadata n={meta['n']!r} but the losses hold {n} examples.")
    ids = meta.get("example_ids")
    if ids is not None and (not isinstance(ids, list) or len(ids) != n):
        raise ValueError(f"metadata['example_ids'] must be a list of the {n} examples' ids, got "
                         f"{len(ids) if isinstance(ids, list) else type(ids).__name__} entries.")
    if ids is not None and (not all(_id(i) for i in ids) or len(set(ids)) != n):
        # the guarantee assumes n distinct examples: one counted twice (or an id that is none) is no calibration set
        raise ValueError("metadata['example_ids'] must name each example once, by a string or an integer.")
    if meta.get("task_loss_bounds") is not None:
        _check_task_loss_bounds(bounds, task_loss, meta["task_loss_bounds"])
    for key, (ok, what) in _RECORDED.items():
        if meta.get(key) is not None and not ok(meta[key]):
            raise ValueError(f"metadata {key}={meta[key]!r} must be {what}.")
    try:
        json.dumps(meta, allow_nan=False)
    except ValueError:
        raise ValueError("metadata holds a NaN or infinite number: nothing a table records is one.") from None


def _id(value) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _natural(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


# what collect records beside the settings (a card and a reader show it as it is): a type, where it is there
_RECORDED = {"batch_size": (lambda v: _natural(v, 1), "a whole number >= 1"),
             "subset_seed": (lambda v: _natural(v, 0), "a whole number >= 0"),
             **{key: (lambda v: isinstance(v, str), "a string")
                for key in ("split", "device", "data_source", "model_path", "task_loss", "lambda_order")},
             "versions": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
                          "an object of version strings")}


def _numbers(values, size: int) -> bool:
    return isinstance(values, list) and len(values) == size and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values)


def _check_task_loss_bounds(bounds: dict, task, recorded) -> None:
    """The task loss's range [a, b] fixes the gaps' ranges ([a − b, b − a], [0, b − a]) and holds the task loss."""
    if not (_numbers(recorded, 2) and recorded[0] < recorded[1]):
        raise ValueError(f"metadata task_loss_bounds={recorded!r} must be [lower, upper], finite, lower < upper.")
    a, b = (float(v) for v in recorded)
    implied = {"performance_gap": (a - b, b - a), "performance_gap_bounded": (0.0, b - a)}
    for risk, implied_bounds in implied.items():
        if risk in bounds and not np.allclose(bounds[risk], implied_bounds, rtol=0, atol=1e-12):
            raise ValueError(f"the {risk} bounds {list(bounds[risk])} contradict metadata task_loss_bounds="
                             f"{recorded} (which give {list(implied_bounds)}).")
    if task is not None and task.size and (task.min() < a - 1e-9 or task.max() > b + 1e-9):
        raise ValueError(f"extras['task_loss'] lies in [{task.min():.6g}, {task.max():.6g}], outside metadata "
                         f"task_loss_bounds={recorded}.")


def _digested(arrays: dict, header: dict) -> dict:
    """What a file's digest covers: every array (dtype, shape, bytes) and the header, but for the digest itself."""
    return {"arrays": {k: v for k, v in arrays.items() if k != "header_json"},
            "header": {k: v for k, v in header.items() if k != DIGEST_KEY}}


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
        extras: other arrays of finite numbers, e.g. ``task_loss``/``mean_exit_layer``/``layer_fraction``
            (K, n), ``wall_time`` (K,); each (K,) or (K, n).
        metadata: JSON-able dict (``model_fingerprint``, ``task``, ``measure``, ``schedule``,
            ``min_exit_layer``, ``num_decoder_layers``, ``example_ids``, ``versions``, ...); what it says of the
            arrays (``n``, ``lambdas``, ``example_ids``, ``task_loss_bounds``) must be what they hold.

    The checks run when the table is built; a table changed in place afterwards is checked again by :meth:`save`.
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
            _check_extra(name, arr, self.lambdas.size, self.n)
        self.metadata = json_ready(dict(self.metadata), "metadata")
        check_metadata(self.metadata)
        _check_agreement(self)

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
        if meta.get("n") is not None:
            meta["n"] = int(idx.size)  # what it records must stay what it holds
        extras = {k: (v[:, idx] if v.ndim >= 2 and v.shape[1] == self.n else v) for k, v in self.extras.items()}
        return LossTable(self.lambdas.copy(), {k: v[:, idx] for k, v in self.losses.items()}, dict(self.bounds),
                         extras, meta)

    def digest(self) -> str:
        """A content hash of the whole table (grid, losses, bounds, extras, metadata), used to cache fits and
        integrity checks made from it and to compare tables: two tables that differ in any value, dtype or shape
        never share one. It does not depend on how (or whether) the table was written to a file."""
        return content_digest({"lambdas": self.lambdas, "losses": self.losses, "extras": self.extras,
                               "bounds": {k: list(v) for k, v in self.bounds.items()},
                               "metadata": self.metadata})[:16]

    def save(self, path) -> str:
        """Write one ``.npz`` (no pickles, no dates: the same table gives the same bytes) with its content digest;
        a directory path gets :data:`CALIBRATION_FILENAME`. A table changed in place since it was built is checked
        again first: nothing is written that :meth:`load` would refuse."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CALIBRATION_FILENAME)
        table = LossTable(self.lambdas, self.losses, self.bounds, self.extras, self.metadata)
        arrays = {"lambdas": table.lambdas}
        arrays.update({f"loss__{k}": v for k, v in table.losses.items()})
        arrays.update({f"extra__{k}": v for k, v in table.extras.items()})
        header = {"format_version": _FORMAT_VERSION, "bounds": {k: list(v) for k, v in table.bounds.items()},
                  "metadata": table.metadata}
        header[DIGEST_KEY] = content_digest(_digested(arrays, header))
        arrays["header_json"] = np.array(json.dumps(header))
        with atomic_write(path, "wb") as fh:
            np.savez_compressed(fh, **arrays)  # members dated 1980: the same table gives the same bytes
        return path

    @classmethod
    def load(cls, path) -> "LossTable":
        """Read a table written by :meth:`save` (a file, or a directory holding :data:`CALIBRATION_FILENAME`).

        Never unpickles. A file that is missing, empty, truncated, damaged, not a loss table, whose arrays or
        header are missing or malformed, whose content is not a valid table (see the class), or that does not match
        the digest it was written with raises a :class:`~hf_safe_exit.errors.CalibrationFileError` naming it. A file
        without a digest (written before digests, or by hand) is held to the content checks alone.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CALIBRATION_FILENAME)
        if not os.path.isfile(path):
            raise MissingCalibrationError.about(path, "no loss table there", _LOAD_FIX)
        arrays, header = read_npz(path)
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
            if arr.dtype.kind != "f":  # save writes float64: integers here were converted (values truncated?)
                what = "not numbers" if arr.dtype.kind not in "iub" else ("not the floating-point numbers a loss "
                                                                          "table stores (converted after writing?)")
                raise CorruptFileError.about(path, f"array {name!r} holds {arr.dtype} values, {what}", _LOAD_FIX)
        bounds, metadata = header.get("bounds", {}), header.get("metadata", {})
        if not isinstance(bounds, dict) or not isinstance(metadata, dict) or not all(
                isinstance(v, list) and len(v) == 2 for v in bounds.values()):
            raise CorruptFileError.about(path, "its header's 'bounds' or 'metadata' is malformed (bounds: "
                                         "{risk: [lower, upper]}, metadata: an object)", _LOAD_FIX)
        try:
            table = cls(arrays["lambdas"], losses, {k: tuple(v) for k, v in bounds.items()}, extras, metadata)
        except (ValueError, TypeError) as err:  # the constructor's checks: shapes, grid, bounds, extras, metadata
            raise CorruptFileError.about(path, f"its arrays do not form a loss table ({err})", _LOAD_FIX) from None
        # last: a table that is not valid is refused saying why, a valid one that was edited for being edited
        check_digest({**_digested(arrays, header), DIGEST_KEY: header.get(DIGEST_KEY)}, path, "the loss table",
                     _LOAD_FIX)
        return table


_LOAD_FIX = ("Pass a loss table written by `hf-safe-exit collect --output` (or LossTable.save), or recollect it with "
             "`hf-safe-exit collect ... --output <file>.npz`")


def read_npz(path: str, fix: str = _LOAD_FIX) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and JSON header of a ``.npz`` loss table, without unpickling; numpy's errors named by kind
    (a :class:`~hf_safe_exit.errors.CorruptFileError` naming ``path``, ending with ``fix``)."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise CorruptFileError.about(path, "not a loss table: it is a single .npy array, not an .npz archive",
                                         fix)
        with data:
            arrays = {k: data[k] for k in data.files}
    except CalibrationFileError:
        raise
    except EOFError:
        raise CorruptFileError.about(path, "the file is empty, not a loss table", fix) from None
    except (zipfile.BadZipFile, zlib.error, NotImplementedError):  # a damaged member cannot be decompressed
        raise CorruptFileError.about(path, "truncated or damaged .npz archive (incomplete download or copy?)",
                                     fix) from None
    except (ValueError, OSError, KeyError) as err:
        # numpy reports any other content as "pickled data" or "object arrays": neither is ever loaded here
        problem = ("it holds Python objects, which a loss table never does" if "allow_pickle" in str(err) and
                   zipfile.is_zipfile(path) else "not a loss table (not an .npz archive of numeric arrays)")
        raise CorruptFileError.about(path, problem, fix) from None
    if "header_json" not in arrays:
        raise CorruptFileError.about(path, "not a loss table written by hf_safe_exit: the .npz has no 'header_json' "
                                     f"(it holds {sorted(arrays)[:5]})", fix)
    try:
        header = json.loads(str(arrays.pop("header_json")))
    except (json.JSONDecodeError, ValueError):
        header = None
    if not isinstance(header, dict):
        raise CorruptFileError.about(path, "its 'header_json' is not a JSON object", fix)
    return arrays, header
