"""A model card with the guarantee: built in memory (:func:`to_model_card`) or written to a folder
(:func:`write_guarantee_card`, with the calibration, evaluation and plots beside it; see :mod:`.files`)."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import CorruptFileError
from ..risk.certificate import PARETO
from ..risk.configuration_table import CONFIGURATIONS_FILENAME, ConfigurationTable
from ..risk.loss_table import CALIBRATION_FILENAME, LossTable
from .files import FilePlan, calibration_directory, plan_files
from .measurements import Measurements, gather, table_mismatch
from .pareto_card import PARETO_PLOT_NAME, check_configuration_table, pareto_front_figure, render_pareto_section
from .model_index import eval_results, update_metadata
from .render import check_fitted, render_section, replace_section
from .vocabulary import rows_description

__all__ = ["render_guarantee_section", "to_model_card", "write_guarantee_card", "load_card"]


def render_guarantee_section(controlled, *, test_results=None, efficiency: Mapping | None = None,
                             table: LossTable | None = None, plots: Sequence[str] = (), hardware: str | None = None,
                             calibration_split: str | None = None, dataset_name: str | None = None,
                             repo_id: str | None = None, anytime: str | None = None,
                             calibration_subfolder: str | None = None) -> str:
    """The Markdown of the guarantee section (see :func:`write_guarantee_card` for the arguments)."""
    check_fitted(controlled)
    if controlled.certificate.method == PARETO:
        _no_scalar_results(test_results, efficiency)
        return render_pareto_section(controlled, plots=plots, rows=calibration_split, dataset_name=dataset_name,
                                     repo_id=repo_id, calibration_subfolder=calibration_subfolder)
    measured = gather(controlled, test_results=test_results, efficiency=efficiency, table=table, hardware=hardware,
                      rows=calibration_split)
    return render_section(controlled, measured, plots=plots, rows=calibration_split, dataset_name=dataset_name,
                          repo_id=repo_id, anytime=anytime, calibration_subfolder=calibration_subfolder)


def _card(controlled, card, measured, *, plots, model_name, calibration_split, dataset_name, repo_id, anytime,
          calibration_subfolder, section: str | None = None):
    """``card`` (None: a new one) with the guarantee section (``section``, else rendered from ``measured``) and the
    model-index results of ``controlled``; round-tripped once through ``ModelCard``."""
    from huggingface_hub import ModelCard, ModelCardData

    if section is None:
        section = render_section(controlled, measured, plots=plots, rows=calibration_split, dataset_name=dataset_name,
                                 repo_id=repo_id, anytime=anytime, calibration_subfolder=calibration_subfolder)
    name = model_name or (getattr(card.data, "model_name", None) if card is not None else None) \
        or (repo_id.split("/")[-1] if repo_id else "model")
    if card is None:
        card = ModelCard(f"---\n{ModelCardData(model_name=name, library_name='transformers').to_yaml()}\n---\n\n"
                         f"# {name}\n\n")
    ours = eval_results(controlled, measured, rows=calibration_split, dataset_name=dataset_name)
    update_metadata(card.data, ours, name)
    card.text = replace_section(card.text, section, controlled.certificate.task)
    ModelCard(card.content)  # round-trip the YAML once, so that an invalid combination fails here, not on the Hub
    return card


def to_model_card(controlled, card=None, *, test_results=None, efficiency: Mapping | None = None,
                  table: LossTable | None = None, plots: Sequence[str] = (), hardware: str | None = None,
                  model_name: str | None = None, calibration_split: str | None = None,
                  dataset_name: str | None = None, repo_id: str | None = None, anytime: str | None = None,
                  calibration_subfolder: str | None = None):
    """A :class:`huggingface_hub.ModelCard` with the guarantee section of the certificate's task and its results.

    ``card`` is an existing ``ModelCard`` to update: only this task's section (or a generic one) and this library's
    ``model-index`` results for this task's dataset change; the rest is kept. None: a new card. ``plots`` go into
    the card as given (relative paths). Writes nothing.
    """
    check_fitted(controlled)
    if controlled.certificate.method == PARETO:
        section = render_guarantee_section(controlled, test_results=test_results, efficiency=efficiency, plots=plots,
                                           calibration_split=calibration_split, dataset_name=dataset_name,
                                           repo_id=repo_id, calibration_subfolder=calibration_subfolder)
        return _card(controlled, card, Measurements(), plots=plots, model_name=model_name,
                     calibration_split=calibration_split, dataset_name=dataset_name, repo_id=repo_id, anytime=None,
                     calibration_subfolder=calibration_subfolder, section=section)
    measured = gather(controlled, test_results=test_results, efficiency=efficiency, table=table, hardware=hardware,
                      rows=calibration_split)
    return _card(controlled, card, measured, plots=plots, model_name=model_name, calibration_split=calibration_split,
                 dataset_name=dataset_name, repo_id=repo_id, anytime=anytime,
                 calibration_subfolder=calibration_subfolder)


def _no_scalar_results(test_results, efficiency) -> None:
    if test_results is not None or efficiency is not None:
        raise ValueError("a method='pareto' card states the certificate and its front; an evaluation or held-out "
                         "results of a scalar λ̂ do not describe it: drop test_results / efficiency (--evaluation).")


def _card_path(model_dir_or_card_path) -> Path:
    """The card's file (``<dir>/README.md``, or the ``.md`` path given); :class:`~hf_safe_exit.errors.CorruptFileError`
    naming it when what is there cannot be a card file (a directory, a symbolic-link loop, a path through a file),
    before anything is written. A path with nothing there yet is a new card."""
    path = Path(model_dir_or_card_path)
    path = path if path.suffix.lower() == ".md" else path / "README.md"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return path
    except OSError as err:  # stat follows links: a loop (ELOOP) or a file where a folder should be (ENOTDIR)
        problem, fix = {
            errno.ELOOP: ("a symbolic link that loops, not a model card file",
                          "Remove the link (or point it at a file), or pass another path"),
            errno.ENOTDIR: ("a path through a file, not a folder", "Pass a model directory (its README.md is "
                            "written) or the path of a .md file"),
        }.get(err.errno, (f"cannot be reached ({err.strerror or type(err).__name__})",
                          "Check the path and its permissions, or pass another path"))
        raise CorruptFileError.about(path, problem, fix) from None
    if stat.S_ISDIR(mode):
        raise CorruptFileError.about(path, "a directory, not a model card file", "Move the directory away, or pass "
                                     "the model directory (its README.md is written) or another .md file path")
    if not stat.S_ISREG(mode):
        raise CorruptFileError.about(path, "not a regular file, so not a model card",
                                     "Move it away, or pass another path")
    return path


def load_card(path: Path):
    """The model card at ``path`` (a local file: never the Hub); :class:`~hf_safe_exit.errors.CorruptFileError`
    naming it when its text or its YAML metadata cannot be read, before anything is written."""
    import yaml
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(path)
    except OSError as err:  # e.g. no permission to read it
        raise CorruptFileError.about(path, f"the model card cannot be read ({err.strerror or type(err).__name__})",
                                     "Make it readable, or pass another path") from None
    except (ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError) as err:  # UnicodeDecodeError: a ValueError
        detail = " ".join(str(err).split())[:200]
        raise CorruptFileError.about(path, f"not a readable model card ({type(err).__name__}: {detail})",
                                     "Fix its YAML metadata block (between the leading '---' lines) or move the file "
                                     "away; the card is then written afresh") from None


def _stored_table(cal_dir: Path, controlled) -> LossTable | None:
    """The loss table stored in ``cal_dir`` when it is the one ``controlled`` was fitted on, else None."""
    path = cal_dir / CALIBRATION_FILENAME
    if not path.is_file():
        return None
    table = LossTable.load(path)
    return table if table_mismatch(table, controlled) is None else None


def write_card(model_dir_or_card_path, controlled, *, test_results=None, efficiency=None, table=None, plots=(),
               hardware=None, model_name=None, calibration_split=None, dataset_name=None, repo_id=None, anytime=None,
               save_calibration=True, overwrite=False) -> tuple[Path, FilePlan]:
    """:func:`write_guarantee_card`, also returning what it did to the other files (for the Hub push)."""
    check_fitted(controlled)
    path = _card_path(model_dir_or_card_path)
    if controlled.certificate.method == PARETO:
        _no_scalar_results(test_results, efficiency)
        return _write_pareto_card(path, controlled, table=table, plots=plots, model_name=model_name,
                                  calibration_split=calibration_split, dataset_name=dataset_name, repo_id=repo_id,
                                  save_calibration=save_calibration, overwrite=overwrite)
    task = controlled.certificate.task
    cal_dir = calibration_directory(path.parent, task)  # also checks the task name, before anything is written
    table_path = None
    if table is not None and not isinstance(table, LossTable):
        table_path = os.fspath(table)
        table = LossTable.load(table_path)
    given = table  # written beside the calibration; a table found there already is only read
    if table is None:
        table = _stored_table(cal_dir, controlled)
    measured = gather(controlled, test_results=test_results, efficiency=efficiency, table=table, table_path=table_path,
                      hardware=hardware, rows=calibration_split)
    plan = plan_files(path.parent, controlled, evaluation=measured.evaluation, table=given, plots=plots,
                      save_calibration=save_calibration, overwrite=overwrite)
    card, name, subfolder = _existing_card(path, cal_dir, model_name)
    card = _card(controlled, card, measured, plots=plan.plots, model_name=name, calibration_split=calibration_split,
                 dataset_name=dataset_name, repo_id=repo_id, anytime=anytime, calibration_subfolder=subfolder)
    _save(path, card, plan, save_calibration)
    return path, plan


def _existing_card(path: Path, cal_dir: Path, model_name: str | None):
    """(the card at ``path`` or None, the model-index name: ``model_name``, else the card's, else the folder's, the
    calibration's folder relative to the card for the snippet: None when it is the card's own)."""
    card = load_card(path) if path.is_file() else None
    name = model_name or (getattr(card.data, "model_name", None) if card is not None else None) \
        or path.parent.resolve().name
    return card, name, None if cal_dir == path.parent else cal_dir.relative_to(path.parent).as_posix()


def _save(path: Path, card, plan: FilePlan, save_calibration: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    plan.apply()
    card.save(path)
    if save_calibration:
        from ..decoding.enable import write_custom_generate

        write_custom_generate(path.parent)  # the card's snippet loads the model with it


def _configurations(table, cal_dir: Path, controlled) -> tuple[ConfigurationTable | None, ConfigurationTable | None]:
    """(the configuration table to draw, the one given to save beside the calibration): a table or path given, else
    the one stored in ``cal_dir``; either must reproduce the certificate (else ``InconsistentCalibrationError``)."""
    where = table
    if isinstance(table, LossTable):
        raise TypeError("a method='pareto' calibration was fitted on a ConfigurationTable, and this is a 1-D λ table: "
                        f"pass its configuration table ({CONFIGURATIONS_FILENAME}) or its path, or none.")
    if table is not None and not isinstance(table, ConfigurationTable):
        table = ConfigurationTable.load(table)
    given = table
    if table is None and (cal_dir / CONFIGURATIONS_FILENAME).is_file():
        where = cal_dir / CONFIGURATIONS_FILENAME
        table = ConfigurationTable.load(where)
    if table is not None:
        check_configuration_table(table, controlled, where if where is not None else "the configuration table")
    return table, given


def _write_pareto_card(path: Path, controlled, *, table, plots, model_name, calibration_split, dataset_name,
                       repo_id, save_calibration, overwrite) -> tuple[Path, FilePlan]:
    """:func:`write_card` for a ``method="pareto"`` calibration: its section (:mod:`.pareto_card`), the front's
    figure ``hf_safe_exit_plots/<task>/pareto_front.png``, and the configuration table beside the calibration."""
    import matplotlib.pyplot as plt

    task = controlled.certificate.task
    cal_dir = calibration_directory(path.parent, task)
    drawn, given = _configurations(table, cal_dir, controlled)
    rows = calibration_split or (rows_description(task, drawn.metadata) if drawn is not None else None)
    with tempfile.TemporaryDirectory() as tmp:  # the figure is copied into the card's folder by the plan
        figure = pareto_front_figure(controlled.certificate, drawn)
        figure.savefig(Path(tmp) / PARETO_PLOT_NAME, dpi=120)
        plt.close(figure)
        plan = plan_files(path.parent, controlled, plots=[*plots, Path(tmp) / PARETO_PLOT_NAME],
                          save_calibration=save_calibration, overwrite=overwrite,
                          configurations=given if save_calibration else None)
        card, name, subfolder = _existing_card(path, cal_dir, model_name)
        section = render_pareto_section(controlled, plots=plan.plots, rows=rows, dataset_name=dataset_name,
                                        repo_id=repo_id, calibration_subfolder=subfolder)
        card = _card(controlled, card, Measurements(), plots=plan.plots, model_name=name, calibration_split=rows,
                     dataset_name=dataset_name, repo_id=repo_id, anytime=None, calibration_subfolder=subfolder,
                     section=section)
        _save(path, card, plan, save_calibration)
    return path, plan


def write_guarantee_card(model_dir_or_card_path, controlled, *, test_results=None, efficiency: Mapping | None = None,
                         table=None, plots: Sequence[str] = (), hardware: str | None = None,
                         model_name: str | None = None, calibration_split: str | None = None,
                         dataset_name: str | None = None, repo_id: str | None = None, anytime: str | None = None,
                         save_calibration: bool = True, overwrite: bool = False) -> Path:
    """Write or update the model card ``README.md`` with the guarantee of ``controlled`` (a fitted ``RiskControlled``).

    The card gets (or updates) the section of the certificate's task and that task's ``model-index`` results; other
    tasks' sections and results stay, so one card states one guarantee per calibration task.

    Args:
        model_dir_or_card_path: the model directory (its ``README.md`` is written) or a ``.md`` path.
        controlled: a fitted :class:`~hf_safe_exit.risk.RiskControlled`.
        test_results: the evaluation written by ``hf-safe-exit evaluate`` (dict or path: the repeated-split
            procedure, stated as such), or a dict of the shipped λ̂ on held-out examples (``test_risk`` and
            optionally ``test_risk_std``, ``n_test``, ``split``, ``task_loss``, ``full_task_loss``).
        efficiency: the shipped λ̂'s ``mean_exit_layer``, ``num_decoder_layers``, ``layer_fraction``, ``speedup``
            (per generated token), ``batch_size`` on held-out examples.
        table: the loss table (or its path) ``controlled`` was fitted on: the card states what λ̂ does on its
            examples against the full model. Default: the table stored in ``calibration/<task>/`` if it is that one.
        plots: image files; files outside the card's directory are copied into ``hf_safe_exit_plots/<task>/``.
        hardware: where the times were measured (``"auto"`` describes this machine).
        model_name: the name in ``model-index`` (default: the card's, else the directory name).
        calibration_split: which rows calibrated it, in words (default: from the loss table); the ``model-index``
            split is always the dataset's own (``validation`` for cnndm and squad).
        dataset_name, repo_id, anytime: the dataset's display name, the Hub repo of the snippet, anytime predictions.
        save_calibration: also write ``risk_control.json`` (and the evaluation, and ``table`` when given) into
            ``<dir>/calibration/<task>/`` and ``custom_generate/`` (the snippet loads the model with it).
        overwrite: replace a calibration, evaluation or plot of other content (else
            :class:`~hf_safe_exit.cards.WouldOverwriteError`, before anything is written).

    Returns the path of the card.
    """
    return write_card(model_dir_or_card_path, controlled, test_results=test_results, efficiency=efficiency,
                      table=table, plots=plots, hardware=hardware, model_name=model_name,
                      calibration_split=calibration_split, dataset_name=dataset_name, repo_id=repo_id,
                      anytime=anytime, save_calibration=save_calibration, overwrite=overwrite)[0]
