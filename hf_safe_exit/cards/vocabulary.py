"""How a card names things: tasks and their datasets, methods, bounds, risks, and the guarantee in plain words.

Everything here is text; nothing reads files. The dataset facts are those of :mod:`hf_safe_exit.tasks.data`:
both tasks' calibration/test pools are cut from the datasets' **validation** split, so that is the split a
card's ``model-index`` names; which rows were used goes into the text (:func:`rows_description`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..risk.certificate import PARETO

__all__ = ["TaskInfo", "task_info", "METHOD_WORDS", "BOUND_WORDS", "risk_words", "risk_definition",
           "guarantee_statement", "rows_description"]


@dataclass(frozen=True)
class TaskInfo:
    """A task as a card names it: its metric, HF task type and the Hub dataset (id, config, real split)."""

    metric: str
    task_type: str
    dataset_id: str | None
    display_name: str
    dataset_config: str | None = None
    dataset_split: str | None = None  # a split the Hub dataset really has; None when unknown
    rows: dict | None = None  # LossTable metadata "split" -> which rows of dataset_split that is
    kind: str | None = None  # the task in words, for the section heading


_TASKS = {
    "cnndm": TaskInfo("ROUGE-L", "summarization", "abisee/cnn_dailymail", "CNN/DailyMail 3.0.0", "3.0.0",
                      "validation", {"pool": "validation rows 500–899, the calibration/test pool",
                                     "train": "validation rows 0–499 (the project's training rows)",
                                     "all": "validation split"}, "summarisation"),
    "squad": TaskInfo("F1", "question-answering", "rajpurkar/squad", "SQuAD v1.1", "plain_text", "validation",
                      {"pool": "validation (dev v1.1) articles 36–47, the calibration/test pool",
                       "train": "validation (dev v1.1) articles 0–35 (the project's training rows)",
                       "all": "validation (dev v1.1) split"}, "question answering"),
}

METHOD_WORDS = {
    "crc": "conformal risk control (CRC; Angelopoulos et al. 2022), a guarantee in expectation",
    "ucb": "upper confidence bound (RCPS; Bates et al. 2021), a guarantee with probability 1 − δ",
    "ltt": "Learn then Test (Angelopoulos et al. 2021) with Hoeffding–Bentkus p-values and fixed-sequence testing",
    "naive": "naive empirical risk (no guarantee; for comparison only)",
}
BOUND_WORDS = {"wsr": "Waudby-Smith–Ramdas betting bound", "hoeffding": "Hoeffding bound",
               "hoeffding_bentkus": "Hoeffding–Bentkus bound"}


def task_info(task: str | None) -> TaskInfo:
    """The card's facts about ``task``; an unknown task keeps its name and claims no dataset split."""
    if task in _TASKS:
        return _TASKS[task]
    return TaskInfo("task score", "text-generation", task, task or "unknown task")


def rows_description(task: str | None, metadata: dict) -> str:
    """Which rows a loss table was collected on, in words, from its metadata (split and exclusions).

    >>> rows_description("cnndm", {"split": "pool", "excluded_ids": {"file": "m/selection_eval_ids.json",
    ...                                                             "n_excluded": 200}})
    'validation rows 500–899, the calibration/test pool, less the 200 rows listed in selection_eval_ids.json'
    """
    info = task_info(task)
    split = metadata.get("split")
    text = (info.rows or {}).get(split) or (f"split {split!r}" if split else "rows not recorded")
    excluded = metadata.get("excluded_ids") or {}
    if excluded.get("n_excluded"):
        name = str(excluded.get("file", "a file")).replace("\\", "/").rsplit("/", 1)[-1]
        text += f", less the {excluded['n_excluded']} rows listed in {name}"
    return text


def risk_words(risk: str, metric: str) -> str:
    """The controlled risk in a few words (e.g. "ROUGE-L drop against the full model")."""
    if risk == "performance_gap":
        return f"{metric} drop against the full model"
    if risk == "performance_gap_bounded":
        return f"{metric} drop against the full model, counted as 0 where early exit does better"
    if risk == "consistency":
        return f"1 − {metric} of the early-exit output measured against the full model's own output"
    return risk


def risk_definition(risk: str, metric: str) -> str:
    """The per-example loss behind ``risk``, as the card's table states it."""
    if risk == "performance_gap":
        return (f"per example, {metric}(full model) − {metric}(early exit) against the reference; may be negative "
                "where early exit does better (Jazbec, Timans et al. 2024, the unrestricted performance gap)")
    if risk == "performance_gap_bounded":
        return f"per example, max{{{metric}(full model) − {metric}(early exit), 0}} (CALM's bounded gap)"
    if risk == "consistency":
        return f"per example, 1 − {metric}(early exit, with the full model's output as the reference); needs no labels"
    return risk


def guarantee_statement(certificate, metric: str = "ROUGE-L") -> str:
    """The guarantee of a :class:`~hf_safe_exit.risk.RiskCertificate` in one plain-words paragraph."""
    c = certificate
    what = risk_words(c.risk, metric)
    n = f"{c.n} calibration examples"
    pareto = c.method == PARETO
    none_passed, then = ("No configuration below the full model", "so the model") if pareto else \
        ("No threshold below 1", "so λ̂ = 1: the model")
    tail = "" if c.feasible else (f" {none_passed} passed the test with these {c.n} examples, {then} always runs every "
                                  "decoder layer (the guarantee holds trivially, with no speed-up).")
    if pareto:  # Pareto Testing: the guarantee is for the configuration chosen, not a λ of a fixed one
        return (f"With probability at least 1 − δ = {1 - c.delta:.4g} over the random draw of the {n}, the early-exit "
                f"configuration chosen among {c.num_configurations} (measure, schedule, exit layers and λ̂) has an "
                f"expected {what} on a new example from the same distribution of at most ε = {c.eps:g} (Pareto "
                "Testing: the front found on one part of the examples, its configurations tested on the other)."
                + tail)
    if c.method in ("ucb", "ltt"):
        return (f"With probability at least 1 − δ = {1 - c.delta:.4g} over the random draw of the {n}, the expected "
                f"{what} on a new example from the same distribution is at most ε = {c.eps:g}." + tail)
    if c.method == "crc":
        return (f"In expectation over the random draw of the {n} and a new example from the same distribution, the "
                f"{what} is at most ε = {c.eps:g} (a guarantee on average over calibration draws, not for every "
                "draw)." + tail)
    return (f"None: λ̂ was chosen by the naive empirical risk on {n} (mean {what} ≤ ε = {c.eps:g} on those examples "
            "only), which carries no guarantee for new examples." + tail)
