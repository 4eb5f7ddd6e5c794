"""The files a card writes besides README.md, and the rule that it never replaces one silently.

Into ``<card dir>/calibration/<task>/`` (:func:`calibration_directory`): ``risk_control.json``, the
evaluation the card's numbers come from (``evaluation.json``) and, when given, the loss table; the plots
into ``<card dir>/hf_safe_exit_plots/<task>/``. A file that exists with other content is replaced only with
``overwrite=True`` (CLI: ``--overwrite``); otherwise :class:`WouldOverwriteError` names it before anything
is written. Replacing a calibration replaces its folder as a whole: an ``evaluation.json`` that is not
rewritten, and a loss table that does not reproduce the new λ̂, described the old one and are removed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..digest import with_digest, without_digest
from ..errors import WouldOverwriteError
from ..risk.certificate import PARETO
from ..risk.configuration_table import CONFIGURATIONS_FILENAME, ConfigurationTable
from ..risk.loss_table import CALIBRATION_FILENAME, LossTable
from ..risk.store import RISK_CONTROL_FILENAME
from ..risk.store import calibration_dir as store_calibration_dir
from .measurements import table_mismatch

__all__ = ["WouldOverwriteError", "FilePlan", "plan_files", "calibration_directory", "EVALUATION_FILENAME",
           "PLOTS_DIR"]

EVALUATION_FILENAME = "evaluation.json"
PLOTS_DIR = "hf_safe_exit_plots"




def calibration_directory(model_dir, task: str | None) -> Path:
    """Where a card saves ``task``'s calibration for ``model_dir``: ``<model_dir>/calibration/<task>/``.

    The one layout of :mod:`hf_safe_exit.risk.store`, which ``RiskControlled(eps, task=...)``, ``hf-safe-exit
    demo`` and the examples read. A certificate without a task can only go to ``model_dir`` itself.
    """
    if task is None:
        return Path(model_dir)
    return store_calibration_dir(model_dir, task)


def _json_bytes(data: dict) -> bytes:
    # allow_nan=False: a NaN or Infinity token is not JSON, and never a number we publish
    return (json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def _same_json(path: Path, data: dict) -> bool:
    """Whether ``path`` holds ``data``, its digest aside (a file written before digests holds the same content)."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    new = json.loads(json.dumps(data))
    return isinstance(old, dict) and without_digest(old) == without_digest(new)


def _same_calibration(path: Path, controlled) -> bool:
    """Whether ``path`` holds the calibration of ``controlled``: compared as this library reads and writes it, so
    that a file written by an earlier release in an older layout is not taken for another calibration."""
    try:
        old = type(controlled).from_dict(json.loads(path.read_text(encoding="utf-8"))).to_dict()
    except Exception:  # noqa: BLE001 - unreadable, corrupt or refused: not this calibration
        return False
    # the digest covers the release that wrote the file: one of another release is still the same calibration
    new = without_digest(json.loads(json.dumps(controlled.to_dict())))
    old = without_digest(json.loads(json.dumps(old)))
    for data in (old, new):
        data.pop("hf_safe_exit_version", None)
    return old == new


def _same_table(path: Path, table: LossTable) -> bool:
    try:
        old = LossTable.load(path)
    except (OSError, ValueError):
        return False
    return old.digest() == table.digest() and old.metadata == table.metadata


def _same_configurations(path: Path, table: ConfigurationTable) -> bool:
    try:
        return ConfigurationTable.load(path) == table
    except (OSError, ValueError):
        return False


@dataclass
class FilePlan:
    """What a card write will do to files other than README.md; nothing is written until :meth:`apply`."""

    writes: dict = field(default_factory=dict)  # Path -> bytes, or a table (LossTable, ConfigurationTable) to save
    removals: list = field(default_factory=list)
    plots: list = field(default_factory=list)  # the plots' paths relative to the card

    def apply(self) -> None:
        for path, content in self.writes.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                content.save(path)
        for path in self.removals:
            path.unlink(missing_ok=True)


def _plots(plots: Sequence, card_dir: Path, task: str | None, plan: FilePlan) -> list[Path]:
    """Plot paths relative to the card; plots outside its directory are planned as copies into it."""
    conflicts = []
    for p in plots:
        src = Path(p)
        if not src.is_absolute() and not src.exists() and (card_dir / src).is_file():
            src = card_dir / src
        if not src.is_file():
            raise FileNotFoundError(f"plot '{p}' does not exist: write it with `hf-safe-exit plot` first.")
        src = src.resolve()
        try:
            rel = src.relative_to(card_dir.resolve())
        except ValueError:  # copies go per task, so that two tasks' plots of one name never meet
            rel = Path(PLOTS_DIR, task or "", src.name)
            dest, data = card_dir / rel, src.read_bytes()
            if not dest.is_file() or dest.read_bytes() != data:
                if dest.is_file():
                    conflicts.append(dest)
                plan.writes[dest] = data
        plan.plots.append(rel.as_posix())
    return conflicts


def plan_files(card_dir, controlled, *, evaluation: dict | None = None, table: LossTable | None = None,
               plots: Sequence = (), save_calibration: bool = True, overwrite: bool = False,
               configurations: ConfigurationTable | None = None) -> FilePlan:
    """The files a card write adds, replaces or removes; raises :class:`WouldOverwriteError` (nothing written)
    when it would replace a file of other content and ``overwrite`` is False. ``configurations``: the
    configuration table a ``method="pareto"`` calibration was fitted on, saved beside it."""
    card_dir = Path(card_dir)
    if table is not None and save_calibration:  # a table changed in place since it was built: checked before any write
        LossTable(table.lambdas, table.losses, dict(table.bounds), table.extras, table.metadata)
    plan = FilePlan()
    conflicts = _plots(plots, card_dir, controlled.certificate.task, plan)
    if not save_calibration:
        return _refuse_or(plan, conflicts, overwrite)
    cal_dir = calibration_directory(card_dir, controlled.certificate.task)
    rc_path, eval_path, table_path = (cal_dir / RISK_CONTROL_FILENAME, cal_dir / EVALUATION_FILENAME,
                                      cal_dir / CALIBRATION_FILENAME)
    replaced = rc_path.is_file() and not _same_calibration(rc_path, controlled)
    if replaced:
        conflicts.insert(0, rc_path)
    if replaced or not rc_path.is_file():  # the same calibration already there is left as it is
        plan.writes[rc_path] = _json_bytes(controlled.to_dict())
    if evaluation is not None:
        if eval_path.is_file() and not _same_json(eval_path, evaluation):
            conflicts.append(eval_path)
        if not eval_path.is_file() or eval_path in conflicts:
            plan.writes[eval_path] = _json_bytes(with_digest(evaluation))  # as `hf-safe-exit evaluate` writes it
    elif replaced and eval_path.is_file():
        plan.removals.append(eval_path)  # it evaluated the calibration being replaced
    if table is not None:
        if table_path.is_file() and not _same_table(table_path, table):
            conflicts.append(table_path)
        if not table_path.is_file() or table_path in conflicts:
            plan.writes[table_path] = table
    elif replaced and table_path.is_file() and controlled.certificate.method != PARETO:
        # (a pareto calibration is refitted on the configuration table: the 1-D table stays for the scalar methods,
        # as store_calibration keeps it)
        try:
            stale = table_mismatch(LossTable.load(table_path), controlled) is not None
        except (OSError, ValueError):
            stale = True
        if stale:
            plan.removals.append(table_path)
    if configurations is not None:
        path = cal_dir / CONFIGURATIONS_FILENAME
        if path.is_file() and not _same_configurations(path, configurations):
            conflicts.append(path)
        if not path.is_file() or path in conflicts:
            plan.writes[path] = configurations
    return _refuse_or(plan, conflicts, overwrite)


def _refuse_or(plan: FilePlan, conflicts: list, overwrite: bool) -> FilePlan:
    if conflicts and not overwrite:
        more = f" (and {len(conflicts) - 1} more: {', '.join(str(p) for p in conflicts[1:])})" if len(conflicts) > 1 \
            else ""
        raise WouldOverwriteError(f"'{conflicts[0]}' exists with other content{more}: the card would replace it. Pass "
                                  "--overwrite (overwrite=True) to replace it, or write the card elsewhere.")
    return plan
