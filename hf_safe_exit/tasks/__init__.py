"""Tasks: CNN/DailyMail summarization (ROUGE-L) and SQuAD v1.1 question answering (token F1 / EM).

>>> from hf_safe_exit.tasks import get_task, load_split
>>> task = get_task("cnndm")
>>> pool = load_split(task, "pool", path="../shared/data")   # or path=None for the Hub
>>> task.loss(prediction, task.reference(pool[0]))
"""

from __future__ import annotations

from .base import Task
from .cnndm import CNNDailyMail, rouge_l
from .data import DATA_ENV, SPLITS, DataUnavailableError, load_split, load_task_data, shared_data_dir
from .squad import SQuAD, normalize_answer, squad_exact_match, squad_f1

__all__ = [
    "Task", "CNNDailyMail", "SQuAD", "TASKS", "get_task", "rouge_l", "normalize_answer", "squad_f1",
    "squad_exact_match", "DataUnavailableError", "shared_data_dir", "load_task_data", "load_split", "SPLITS",
    "DATA_ENV", "UnknownTaskError",
]

TASKS: dict[str, type[Task]] = {"cnndm": CNNDailyMail, "squad": SQuAD}


class UnknownTaskError(ValueError):
    """A task name that is not registered."""


def get_task(task: str | Task) -> Task:
    """The task registered under ``task`` (``"cnndm"`` or ``"squad"``); a :class:`Task` instance is returned as is."""
    if isinstance(task, Task):
        return task
    if isinstance(task, str) and task.lower() in TASKS:
        return TASKS[task.lower()]()
    raise UnknownTaskError(f"unknown task {task!r}: use one of {sorted(TASKS)}.")

