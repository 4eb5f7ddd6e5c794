"""Where a model keeps its calibrations: the one layout, read and written here.

::

    <model>/calibration/config.json                        {"primary_task": "cnndm"}
    <model>/calibration/<task>/early_exit_calibration.npz  the LossTable: RiskControlled(eps) fits any ε from it
    <model>/calibration/<task>/early_exit_configurations.npz  a ConfigurationTable: RiskControlled(eps, delta,
                                                           method="pareto") chooses a configuration from it
    <model>/calibration/<task>/risk_control.json           λ̂ fitted at the calibrated (ε, δ, method)
    <model>/calibration/<task>/evaluation.json             repeated-split evaluation (optional; the card's numbers)

``hf-safe-exit calibrate --store-in-model``, ``hf-safe-exit card`` and ``push_to_hub`` write it;
``RiskControlled(eps)`` (unfitted), the demo and the examples read it. A model may keep one
calibration per task; ``RiskControlled(eps, task=...)`` picks one, and without ``task=`` the
model's primary task (``calibration/config.json``, or the only task stored) is used.

A file in ``calibration/<task>/`` that records another task (the folders of two tasks swapped or mixed up) is
refused with :class:`~hf_safe_exit.errors.InconsistentCalibrationError`: its λ̂ holds for the task it records.
A ``calibration/config.json`` must name a task that is stored (:class:`~hf_safe_exit.errors.CorruptFileError` naming
it otherwise): it is written by :func:`set_primary_task` and may be edited by hand, so it carries no digest.

A model loaded from the Hub keeps the same layout in its repo, read at the commit its weights were loaded from when
transformers recorded it (:func:`~hf_safe_exit.hub_files.loaded_revision`), else at ``revision=`` or the default
branch. A repo that cannot be asked (offline with nothing cached, no access, no such repo or revision) raises
:class:`~hf_safe_exit.errors.HubFileError`, never "no calibration" (see :mod:`hf_safe_exit.hub_files`).

Checkpoints written before this layout kept one calibration at the model's root
(``<model>/early_exit_calibration.npz``, ``<model>/risk_control.json``); they are still read, as the
calibration of the task their metadata names, when the model has no ``calibration/`` folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorruptFileError, HubFileError, InconsistentCalibrationError, MissingCalibrationError, \
    read_json_object
from ..hub_files import HUB_FIX, clear_hub_cache, hub_file, hub_path, loaded_revision
from .certificate import PARETO
from .configuration_table import CONFIGURATIONS_FILENAME, ConfigurationTable
from .integrity import check_calibration_dict, check_calibration_digest, check_refit
from .loss_table import CALIBRATION_FILENAME, LossTable, check_task_name

__all__ = ["CALIBRATION_SUBDIR", "RISK_CONTROL_FILENAME", "STORE_CONFIG", "MissingCalibrationError",
           "calibration_dir", "check_task_name", "read_calibration_json", "stored_tasks", "primary_task", "set_primary_task",
           "StoredCalibration", "find_stored", "store_calibration", "clear_store_cache"]

CALIBRATION_SUBDIR = "calibration"
RISK_CONTROL_FILENAME = "risk_control.json"
STORE_CONFIG = "config.json"  # calibration/config.json: which task a bare RiskControlled(eps) uses

HOW_TO_CALIBRATE = (
    "Calibrate it once: `hf-safe-exit collect --model <model> --task <task> --output <task>.npz && "
    "hf-safe-exit calibrate --results <task>.npz --eps ... --model <model> --store-in-model` (writes "
    f"<model>/{CALIBRATION_SUBDIR}/<task>/{CALIBRATION_FILENAME}), or build the loss table yourself and use "
    "`RiskControlled(eps=...).fit_table(LossTable.load(path))`, or attach one with "
    "`model.early_exit_calibration = LossTable.load(path)`."
)


def calibration_dir(model_dir, task: str) -> Path:
    """``<model_dir>/calibration/<task>``: where ``task``'s calibration of that model lives."""
    return Path(model_dir) / CALIBRATION_SUBDIR / check_task_name(task)


_TABLES: dict[tuple, LossTable] = {}
_CHECKED: set[tuple] = set()  # (risk_control.json as read, the table beside it) pairs whose refit was checked


def clear_store_cache() -> None:
    """Forget downloaded Hub files, loaded tables and integrity checks (tests; after rewriting a file in place)."""
    clear_hub_cache()
    _TABLES.clear()
    _CHECKED.clear()


def _load_table(path: str, kind=LossTable):
    """The table (a ``kind``: LossTable or ConfigurationTable) at ``path``, cached while the file is unchanged."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size, kind.__name__)
    if key not in _TABLES:
        if len(_TABLES) > 64:
            _TABLES.clear()
        table = kind.load(path)
        if getattr(table, "source", None) is None:  # where it was read from: a calibration fitted on it names it
            table.source = os.fspath(path)
        _TABLES[key] = table
    return _TABLES[key]


# what to do when the Hub cannot be asked, besides connecting: whether the repo stores a calibration is unknown
_OFFLINE_FIX = ("Or attach the calibration yourself: model.early_exit_calibration = LossTable.load(path), or "
                "RiskControlled(eps).fit_table(LossTable.load(path))")


def _unreachable(err: HubFileError) -> HubFileError:
    return err.with_fix(_OFFLINE_FIX)


class _Source:
    """A model's files: a local directory, or a Hub repo at a revision (downloaded on demand)."""

    def __init__(self, root: str, local: bool, revision: str | None = None):
        self.root, self.local = root, local
        self.revision = None if local else revision  # a folder has one state: its files

    def __str__(self) -> str:
        return self.root if self.local else hub_path(self.root, revision=self.revision)

    def get(self, relpath: str) -> str | None:
        """A local path to ``relpath``, or None when the model has no such file; raises ``HubFileError`` when its
        Hub repo cannot be asked (unknown is not "none": the caller would say no calibration is stored)."""
        if self.local:
            path = os.path.join(self.root, relpath)
            return path if os.path.isfile(path) else None
        try:  # kept per process (generate() binds the policy at every call); failures are not kept
            return hub_file(self.root, relpath, revision=self.revision)
        except HubFileError as err:
            raise _unreachable(err) from None

    def tasks(self) -> list[str]:
        """The task folders under ``calibration/``; a Hub repo that cannot be listed raises ``HubFileError``."""
        if self.local:
            base = Path(self.root) / CALIBRATION_SUBDIR
            return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        from huggingface_hub import list_repo_files
        from huggingface_hub.errors import HFValidationError

        try:
            files = list_repo_files(self.root, revision=self.revision)
        except HFValidationError:  # not a repo id: no Hub repo, no calibration
            return []
        except Exception as err:  # noqa: BLE001 - network, access, missing repo or revision: the tasks are unknown
            detail = " ".join(str(err).split())[:300]
            raise _unreachable(HubFileError.about(hub_path(self.root, CALIBRATION_SUBDIR + "/", self.revision),
                                                  f"could not be listed ({type(err).__name__}: {detail})",
                                                  HUB_FIX)) from None
        return sorted({f.split("/")[1] for f in files if f.startswith(CALIBRATION_SUBDIR + "/") and f.count("/") >= 2})


def _source_of(model, revision: str | None) -> _Source | None:
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    name = os.fspath(name)
    if not name:
        return None
    # the calibration read from the commit the weights were loaded from, when known (else revision=, else main)
    revision = revision if revision is not None else loaded_revision(model)
    return _Source(name, local=os.path.isdir(name), revision=revision)


def _check_recorded_task(path, recorded, task: str | None) -> None:
    """A file found in ``calibration/<task>/`` must be for ``task``: λ̂ holds only for the task it was fitted on."""
    if task is not None and recorded is not None and recorded != task:
        raise InconsistentCalibrationError.about(
            path, f"it is stored in the folder of task {task!r} but records task {recorded!r}: the task folders were "
            "swapped or mixed up", f"Move it to {CALIBRATION_SUBDIR}/{recorded}/ (with the files beside it), or store "
            f"the calibration of task {task!r} there (`hf-safe-exit calibrate ... --store-in-model --overwrite`)")


def read_calibration_json(path, table: LossTable | None = None, table_path=None, *, task: str | None = None,
                          configurations: ConfigurationTable | None = None) -> dict:
    """The content of the ``risk_control.json`` at ``path``, checked (see :mod:`hf_safe_exit.risk.integrity`).

    With ``table`` (the loss table stored beside it, at ``table_path``) it must also be what refitting the table
    gives; for a ``method="pareto"`` calibration the table refitted is ``configurations`` (the configuration table
    stored beside it) instead. With ``task`` (the task folder it was found in) the task it records, if any, must be
    ``task``. Raises a :class:`~hf_safe_exit.errors.CalibrationFileError` naming the file otherwise.
    """
    data = read_json_object(path, what=f"a calibration ({RISK_CONTROL_FILENAME})",
                            fix="Write it again with `hf-safe-exit calibrate` or RiskControlled.save_pretrained")
    check_calibration_dict(data, path, digest=False)
    _check_recorded_task(path, data["calibration"].get("task") or data["certificate"].get("task"), task)
    if data["params"].get("method") == PARETO:
        table = configurations
        table_path = None if table is None else table.source or CONFIGURATIONS_FILENAME
    if table is not None:
        key = (json.dumps(data, sort_keys=True), table.digest(), table.metadata.get("model_fingerprint"))
        if key not in _CHECKED:
            check_refit(data, path, table, table_path)
            if len(_CHECKED) > 64:
                _CHECKED.clear()
            _CHECKED.add(key)
    check_calibration_digest(data, path)  # last: an edit the checks above can name (a setting, λ̂) is named
    return data


_STORE_CONFIG_FIX = ("Rewrite it as {\"primary_task\": \"<task>\"} (one of the folders beside it), e.g. with "
                     "hf_safe_exit.risk.store.set_primary_task(model_dir, task), or delete it")


def _configured_primary(src: _Source) -> tuple[str | None, str | None]:
    """(the task ``calibration/config.json`` names, its path), or (None, None) without one. A config that names no
    task, or not a task name, or (in a folder) a task with no folder, is a ``CorruptFileError`` naming it."""
    path = src.get(f"{CALIBRATION_SUBDIR}/{STORE_CONFIG}")
    if path is None:
        return None, None
    data = read_json_object(path, what="a calibration config ({\"primary_task\": ...})", fix=_STORE_CONFIG_FIX)
    task = data.get("primary_task")
    if task is None:  # set_primary_task always writes one: null or left out is an edit, not "no primary task"
        raise CorruptFileError.about(path, "it names no primary_task", _STORE_CONFIG_FIX)
    try:
        check_task_name(task)
    except ValueError as err:
        raise CorruptFileError.about(path, f"its primary_task is not a task name ({err})", _STORE_CONFIG_FIX) from None
    if src.local and task not in src.tasks():  # a Hub repo's folders are looked at when its files are (find_stored)
        raise _unstored_primary(path, task, src.tasks())
    return task, path


def _unstored_primary(path, task: str, tasks: list[str]) -> CorruptFileError:
    return CorruptFileError.about(path, f"its primary_task {task!r} has no calibration stored beside it (nothing in "
                                  f"{CALIBRATION_SUBDIR}/{task}/; the tasks stored: {tasks or 'none'})",
                                  _STORE_CONFIG_FIX)


def primary_task(source) -> str | None:
    """The task ``calibration/config.json`` names, else the only task stored, else None. A config that names no
    stored task raises :class:`~hf_safe_exit.errors.CorruptFileError` naming it."""
    src = source if isinstance(source, _Source) else _Source(os.fspath(source), local=True)
    task = _configured_primary(src)[0]
    if task is not None:
        return task
    tasks = src.tasks()
    return tasks[0] if len(tasks) == 1 else None


def stored_tasks(model_dir) -> list[str]:
    """The tasks with a calibration folder under ``<model_dir>/calibration/``."""
    return _Source(os.fspath(model_dir), local=True).tasks()


def set_primary_task(model_dir, task: str) -> Path:
    """Record ``task`` as the one a bare ``RiskControlled(eps)`` uses for this model."""
    path = Path(model_dir) / CALIBRATION_SUBDIR / STORE_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"primary_task": check_task_name(task)}, indent=2) + "\n", encoding="utf-8")
    return path


def store_calibration(model_dir, *, table: LossTable | None = None, controlled=None, task: str | None = None,
                      primary: bool | None = None) -> list[Path]:
    """Write a loss table (a :class:`LossTable`, or a :class:`~hf_safe_exit.risk.ConfigurationTable` for
    ``method="pareto"``) and/or a fitted ``RiskControlled`` into ``<model_dir>/calibration/<task>/``.

    ``task`` defaults to the table's (or certificate's) task; one of them must name it. The first task stored
    becomes the primary task unless ``primary=False``; ``primary=True`` makes this one primary.
    """
    if table is None and controlled is None:
        raise ValueError("store_calibration needs a loss table, a fitted RiskControlled, or both.")
    if controlled is not None and not getattr(controlled, "is_fitted", False):
        raise ValueError("store_calibration got an unfitted RiskControlled: fit it first (fit_table(table)), or store "
                         "only the table, from which RiskControlled(eps, task=...) fits any ε.")
    named = {t for t in ((table.metadata.get("task") if table is not None else None),
                         (controlled.certificate.task if controlled is not None else None)) if t is not None}
    if task is None and len(named) == 1:
        task = named.pop()
    elif task is None:
        raise ValueError("the calibration does not say which task it is for: pass task=... (the CLI: --task), "
                         f"so that it is stored under {CALIBRATION_SUBDIR}/<task>/.")
    elif named - {task}:
        raise ValueError(f"task={task!r} contradicts the calibration's own task {sorted(named)}: store it under "
                         "its own task.")
    out = calibration_dir(model_dir, task)
    first = not stored_tasks(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if table is not None:  # a ConfigurationTable (for method="pareto") has its own file beside the 1-D table's
        name = CONFIGURATIONS_FILENAME if isinstance(table, ConfigurationTable) else CALIBRATION_FILENAME
        written.append(Path(table.save(out / name)))
    if controlled is not None:
        written.append(Path(controlled.save_pretrained(out)))
    if primary or (primary is None and first and not (Path(model_dir) / CALIBRATION_SUBDIR / STORE_CONFIG).is_file()):
        written.append(set_primary_task(model_dir, task))
    return written


@dataclass
class StoredCalibration:
    """What a model stores for one task: its loss table, its configuration table, its fitted calibration (any of
    them), and where each lies."""

    task: str | None
    table: LossTable | None = None
    table_path: str | None = None
    controlled_json: dict | None = None
    controlled_path: str | None = None
    configurations: ConfigurationTable | None = None
    configurations_path: str | None = None


def _from_attached(model, task: str | None) -> StoredCalibration | None:
    attached = getattr(model, "early_exit_calibration", None)
    if attached is None:
        return None
    if isinstance(attached, ConfigurationTable):
        stored = attached.metadata.get("task")
        if task is not None and stored is not None and stored != task:
            raise MissingCalibrationError(f"the configuration table attached as model.early_exit_calibration is for "
                                          f"task {stored!r}, not {task!r}: attach {task!r}'s table or drop task=.")
        return StoredCalibration(stored if stored is not None else task, configurations=attached,
                                 configurations_path="model.early_exit_calibration")
    if isinstance(attached, LossTable):
        table, where = attached, "model.early_exit_calibration"
    elif isinstance(attached, (str, os.PathLike)):
        where = os.fspath(attached)
        table = _load_table(os.path.join(where, CALIBRATION_FILENAME) if os.path.isdir(where) else where)
    else:
        raise TypeError(f"model.early_exit_calibration must be a LossTable (or a path to one) or a "
                        f"ConfigurationTable, got {type(attached).__name__}.")
    stored = table.metadata.get("task")
    if task is not None and stored is not None and stored != task:
        raise MissingCalibrationError(f"the loss table attached as model.early_exit_calibration is for task "
                                      f"{stored!r}, not {task!r}: attach {task!r}'s table or drop task=.")
    return StoredCalibration(stored if stored is not None else task, table, where)


def find_stored(model, task: str | None = None, *, revision: str | None = None) -> StoredCalibration:
    """The calibration ``model`` stores for ``task`` (default: its primary task); raises with the fix if none.

    ``model``: a loaded model, or the path of a model folder (or a Hub repo id). Looks at
    ``model.early_exit_calibration`` (a :class:`LossTable` or a path), then at the folder or Hub repo
    ``model.name_or_path`` in the layout of this module. A Hub repo is read at ``revision`` (default: the commit the
    loaded model's weights came from, when transformers recorded it, else the default branch).

    Raises :class:`MissingCalibrationError` naming the tasks that are stored when ``task`` is missing or cannot be
    chosen, :class:`~hf_safe_exit.errors.InconsistentCalibrationError` when a file of ``calibration/<task>/`` records
    another task, :class:`~hf_safe_exit.errors.HubFileError` when the Hub repo cannot be asked.
    """
    if task is not None:
        check_task_name(task)
    if isinstance(model, (str, os.PathLike)):  # a model folder or Hub repo id rather than a loaded model
        src = _Source(os.fspath(model), local=os.path.isdir(model), revision=revision)
    else:
        attached = _from_attached(model, task)
        if attached is not None:
            return attached
        src = _source_of(model, revision)
    if src is None:
        raise MissingCalibrationError(
            "RiskControlled(eps=...) without fit() needs the model's stored calibration, and this model has none: it "
            "has no name_or_path (built in memory) and no early_exit_calibration attached. " + HOW_TO_CALIBRATE)
    configured, config_path = (None, None) if task is not None else _configured_primary(src)
    chosen = task if task is not None else configured if configured is not None else primary_task(src)
    tasks = src.tasks() if chosen is None or src.local else None  # listing a Hub repo only when it must be
    if chosen is None and tasks:
        raise MissingCalibrationError(
            f"{src} stores calibrations for several tasks ({', '.join(tasks)}) and names no primary one: choose with "
            f"RiskControlled(eps, task=...), e.g. task={tasks[0]!r}.")
    if chosen is not None:
        sub = f"{CALIBRATION_SUBDIR}/{chosen}"
        table_path, json_path, stacked_path = (src.get(f"{sub}/{name}") for name in (
            CALIBRATION_FILENAME, RISK_CONTROL_FILENAME, CONFIGURATIONS_FILENAME))
        if table_path is not None or json_path is not None or stacked_path is not None:
            table = _load_table(table_path) if table_path else None
            stacked = _load_table(stacked_path, ConfigurationTable) if stacked_path else None
            for path, found in ((table_path, table), (stacked_path, stacked)):
                if found is not None:
                    _check_recorded_task(path, found.metadata.get("task"), chosen)
            return StoredCalibration(chosen, table, table_path,
                                     read_calibration_json(json_path, table, table_path, task=chosen,
                                                           configurations=stacked) if json_path else None,
                                     json_path, stacked, stacked_path)
        tasks = src.tasks() if tasks is None else tasks
        if configured is not None:  # the task calibration/config.json names holds nothing
            raise _unstored_primary(config_path, chosen, tasks)
        if tasks or task is not None and src.local and (Path(src.root) / CALIBRATION_SUBDIR).is_dir():
            raise MissingCalibrationError(
                f"{src} has no calibration for task {chosen!r}"
                + (f"; it has calibrations for: {', '.join(tasks)} (choose one with task=...)" if tasks else "")
                + ". " + HOW_TO_CALIBRATE)
    # checkpoints written before the per-task layout: one calibration at the root, for the task it names
    table_path, json_path = src.get(CALIBRATION_FILENAME), src.get(RISK_CONTROL_FILENAME)
    table = _load_table(table_path) if table_path else None
    legacy = StoredCalibration(None, table, table_path,
                               read_calibration_json(json_path, table, table_path) if json_path else None, json_path)
    if legacy.table is not None or legacy.controlled_json is not None:
        stored_task = (legacy.table.metadata.get("task") if legacy.table is not None
                       else (legacy.controlled_json.get("certificate") or {}).get("task"))
        if task is None or stored_task in (None, task):
            legacy.task = stored_task if stored_task is not None else task
            return legacy
        raise MissingCalibrationError(f"{src} stores one calibration, for task {stored_task!r}, not {task!r}: drop "
                                      f"task= or calibrate for {task!r}. " + HOW_TO_CALIBRATE)
    raise MissingCalibrationError(
        f"RiskControlled(eps=...) without fit() needs the model's stored calibration, and {src} has none "
        f"(no {CALIBRATION_SUBDIR}/<task>/{CALIBRATION_FILENAME}"
        + (f" for task {task!r}" if task else "") + "). " + HOW_TO_CALIBRATE)
