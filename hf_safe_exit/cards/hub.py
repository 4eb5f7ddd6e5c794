"""Push a guarantee to a Hub repo: the repo's own README.md updated, the calibration, evaluation and plots
uploaded in one commit, under the same no-silent-overwrite rule as a local card (:mod:`.files`)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from ..risk.certificate import PARETO
from ..risk.configuration_table import CONFIGURATIONS_FILENAME
from ..risk.loss_table import CALIBRATION_FILENAME
from ..risk.store import CALIBRATION_SUBDIR, RISK_CONTROL_FILENAME, check_task_name
from .files import EVALUATION_FILENAME, PLOTS_DIR
from .pareto_card import PARETO_PLOT_NAME
from .render import check_fitted
from .write import write_card

__all__ = ["push_to_hub"]


def _targets(controlled, plots: Sequence) -> list[str]:
    """The repo paths a push may write or compare: the README, the task's calibration folder, its plot copies."""
    task = controlled.certificate.task
    prefix = f"{CALIBRATION_SUBDIR}/{task}/" if task else ""  # calibration_directory's layout, as repo paths
    out = ["README.md"] + [prefix + f for f in (RISK_CONTROL_FILENAME, EVALUATION_FILENAME, CALIBRATION_FILENAME,
                                                CONFIGURATIONS_FILENAME)]
    if controlled.certificate.method == PARETO:  # the card writes the front's figure itself
        plots = [*plots, PARETO_PLOT_NAME]
    return out + [f"{PLOTS_DIR}/{task + '/' if task else ''}{Path(p).name}" for p in plots]


def _fetch(api, repo_id: str, paths: Sequence[str], directory: Path, revision: str | None, token: str | None) -> set:
    """Copy those of ``paths`` the repo has into ``directory``; returns the ones copied."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        present = set(api.list_repo_files(repo_id, revision=revision))
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return set()
    copied = set()
    for rel in paths:
        if rel not in present:
            continue
        try:
            src = hf_hub_download(repo_id, rel, revision=revision, token=token)
        except EntryNotFoundError:
            continue
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, directory / rel)
        copied.add(rel)
    return copied


def push_to_hub(controlled, repo_id: str, *, test_results=None, efficiency: Mapping | None = None, table=None,
                plots: Sequence[str] = (), hardware: str | None = None, model_name: str | None = None,
                calibration_split: str | None = None, dataset_name: str | None = None, anytime: str | None = None,
                token: str | None = None, revision: str | None = None, private: bool | None = None,
                overwrite: bool = False,
                commit_message: str = "hf_safe_exit: risk-controlled early-exit calibration and card") -> str:
    """Upload the calibration, its evaluation and plots and an updated README.md to ``repo_id`` in one commit.

    The repo's README is updated (only this task's section and this library's results for its dataset change).
    A calibration, evaluation or plot the repo already has with other content is replaced only with
    ``overwrite=True`` (else :class:`~hf_safe_exit.cards.WouldOverwriteError`, nothing uploaded); replacing a
    calibration deletes the files of its folder that described the old one. Returns the commit URL.
    """
    from huggingface_hub import HfApi

    check_fitted(controlled)
    task = controlled.certificate.task
    if task is not None:
        check_task_name(task)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # the repo's files where the card would write, so that the local rule decides what may be replaced
        # (a repo that does not exist yet has none)
        _fetch(api, repo_id, _targets(controlled, plots), root, revision, token)
        _, plan = write_card(root, controlled, test_results=test_results, efficiency=efficiency, table=table,
                             plots=plots, hardware=hardware, model_name=model_name or repo_id.split("/")[-1],
                             calibration_split=calibration_split, dataset_name=dataset_name, repo_id=repo_id,
                             anytime=anytime, save_calibration=True, overwrite=overwrite)
        # only now, once nothing refused the push: a refused push must not leave an empty repo behind
        api.create_repo(repo_id, exist_ok=True, private=private)
        deleted = [p.relative_to(root).as_posix() for p in plan.removals]
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, commit_message=commit_message,
                                 delete_patterns=deleted or None)
    return str(info)
