"""Loading the task data: from the HuggingFace Hub, or offline from local files, always through ``datasets``.

* CNN/DailyMail: ``datasets.load_dataset("abisee/cnn_dailymail", "3.0.0", split=...)``, or a
  local CSV with the Hub's columns ``article,highlights,id`` (highlights = newline-separated
  sentences).
* SQuAD v1.1: ``datasets.load_dataset("rajpurkar/squad", split=...)``, or the official
  ``dev-v1.1.json`` / ``train-v1.1.json``, flattened to the Hub's layout (``id, title,
  context, question, answers{text, answer_start}``).

Every SQuAD row also gets ``article_index``: the 0-based index of its article (title) in
file order, the unit of the fixed splits.

The fixed splits every number of the project uses (both are cut from the **validation**
split, of which the project's offline copy holds the first 900 CNN/DM rows and the whole
SQuAD dev set):

=========  ==========================  ==================================
task       ``"train"``                 ``"pool"`` (calibration/test pool)
=========  ==========================  ==================================
cnndm      rows 0–499 (500)            rows 500–899 (400)
squad      articles 0–35 (8,123 qs)    articles 36–47 (2,447 questions)
=========  ==========================  ==================================

The offline copy lives in ``../shared/data`` next to the repository, or wherever the
environment variable ``HF_SAFE_EXIT_DATA`` points (:func:`shared_data_dir`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..lazy import require

__all__ = ["DataUnavailableError", "shared_data_dir", "load_task_data", "load_split", "SPLITS", "DATA_ENV"]

DATA_ENV = "HF_SAFE_EXIT_DATA"
SPLITS = ("train", "pool", "all")

# file names looked up when a *directory* is given as the data path
_LOCAL_FILES = {
    "cnndm": ("cnn_dailymail/validation_first900.csv", "validation_first900.csv"),
    "squad": ("squad/dev-v1.1.json", "dev-v1.1.json"),
}
_HUB = {
    "cnndm": ("abisee/cnn_dailymail", "3.0.0"),
    "squad": ("rajpurkar/squad", None),
}
_LOCAL_KIND = {
    "cnndm": "a CSV with columns article,highlights,id",
    "squad": "the official SQuAD v1.1 JSON",
}
_CNNDM_COLUMNS = ("article", "highlights", "id")


class DataUnavailableError(FileNotFoundError):
    """Neither the given local data path nor the HuggingFace Hub could provide the task's data."""


def shared_data_dir() -> Path | None:
    """The project's offline data folder, or ``None`` when there is none.

    ``$HF_SAFE_EXIT_DATA`` if set, else ``../shared/data`` relative to the repository
    root (the folder holding ``hf_safe_exit/``), else the same relative to the current
    directory.
    """
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env).expanduser()
        return path if path.is_dir() else None
    repo_root = Path(__file__).resolve().parents[2]
    for candidate in (repo_root.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None


def _task_name(task) -> str:
    from . import get_task

    return get_task(task).name


def _both_options(name: str) -> str:
    hub_id, config = _HUB[name]
    call = f"datasets.load_dataset({hub_id!r}" + (f", {config!r})" if config else ")")
    example = shared_data_dir()
    example = str(example / _LOCAL_FILES[name][0]) if example else f"/path/to/{Path(_LOCAL_FILES[name][0]).name}"
    return (f"either pass a local path to {_LOCAL_KIND[name]} (e.g. --data {example}), "
            f"or allow Hub access so that {call} can download {hub_id!r}")


def _resolve_local(name: str, path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        for rel in _LOCAL_FILES[name]:
            if (path / rel).is_file():
                return path / rel
        raise DataUnavailableError(f"no {name} data file in directory '{path}' (looked for "
                                   f"{', '.join(_LOCAL_FILES[name])}): {_both_options(name)}.")
    if not path.is_file():
        raise DataUnavailableError(f"no {name} data file at '{path}': {_both_options(name)}.")
    return path


def _load_local(name: str, path: Path):
    datasets = require("datasets", "loading task data")
    if name == "cnndm":
        if path.suffix.lower() not in (".csv", ".gz", ".bz2", ".zip", ".xz"):
            raise ValueError(f"'{path}' is not a CSV: the cnndm task reads {_LOCAL_KIND[name]}.")
        import csv

        header = None
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as fh:
                header = next(csv.reader(fh), None)
        # every column as text: ids such as "1e5..." or "0123" must not turn into numbers
        features = (datasets.Features({c: datasets.Value("string") for c in header}) if header else None)
        ds = datasets.load_dataset("csv", data_files=str(path), split="train", features=features)
        missing = [c for c in _CNNDM_COLUMNS if c not in ds.column_names]
        if missing:
            raise ValueError(f"'{path}' lacks the column(s) {missing}: the cnndm task reads {_LOCAL_KIND[name]}.")
        return ds
    # squad: the official nested JSON {"version", "data": [{"title", "paragraphs": [...]}]}
    if path.suffix.lower() != ".json":
        raise ValueError(f"'{path}' is not a JSON file: the squad task reads {_LOCAL_KIND[name]}.")
    articles = datasets.load_dataset("json", data_files=str(path), field="data", split="train")
    if "paragraphs" not in articles.column_names:
        raise ValueError(f"'{path}' is not in the SQuAD v1.1 layout (data[*].paragraphs[*].qas[*]): "
                         f"the squad task reads {_LOCAL_KIND[name]}.")
    articles = articles.add_column("article_index", list(range(len(articles))))
    return articles.map(_flatten_squad, batched=True, remove_columns=articles.column_names,
                        features=_squad_features(), desc=None)


def _squad_features():
    datasets = require("datasets", "loading task data")
    return datasets.Features({
        "id": datasets.Value("string"),
        "title": datasets.Value("string"),
        "context": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": {"text": datasets.List(datasets.Value("string")),
                    "answer_start": datasets.List(datasets.Value("int32"))},
        "article_index": datasets.Value("int32"),
    })


def _flatten_squad(batch):
    out = {"id": [], "title": [], "context": [], "question": [], "answers": [], "article_index": []}
    for title, paragraphs, index in zip(batch["title"], batch["paragraphs"], batch["article_index"]):
        for paragraph in paragraphs:
            for qa in paragraph["qas"]:
                out["id"].append(qa["id"])
                out["title"].append(title)
                out["context"].append(paragraph["context"])
                out["question"].append(qa["question"])
                out["answers"].append({"text": [a["text"] for a in qa["answers"]],
                                       "answer_start": [a["answer_start"] for a in qa["answers"]]})
                out["article_index"].append(index)
    return out


def _load_hub(name: str, hub_split: str):
    datasets = require("datasets", "loading task data")
    hub_id, config = _HUB[name]
    try:
        if config is None:
            ds = datasets.load_dataset(hub_id, split=hub_split)
        else:
            ds = datasets.load_dataset(hub_id, config, split=hub_split)
    except (ConnectionError, OSError) as exc:  # offline, unreachable, not cached
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataUnavailableError(f"could not load {hub_id!r} from the Hub ({first_line}) and no local path was "
                                   f"given: {_both_options(name)}.") from None
    if name == "squad" and "article_index" not in ds.column_names:
        order: dict[str, int] = {}
        for title in ds["title"]:
            order.setdefault(title, len(order))
        ds = ds.add_column("article_index", [order[t] for t in ds["title"]])
    return ds


def load_task_data(task, path: str | os.PathLike | None = None, hub_split: str = "validation"):
    """The task's whole dataset as a ``datasets.Dataset``: from ``path`` when given, else from the Hub.

    ``path`` is a data file, or a directory holding one (e.g. the project's
    ``../shared/data``). A missing path or an unreachable Hub raises
    :class:`DataUnavailableError` naming both options.
    """
    name = _task_name(task)
    if path is not None:
        return _load_local(name, _resolve_local(name, path))
    return _load_hub(name, hub_split)


def load_split(task, split: str = "pool", path: str | os.PathLike | None = None, hub_split: str = "validation"):
    """One of the project's fixed splits (see the module docstring) of the task's validation data.

    ``split`` is ``"train"``, ``"pool"`` (the calibration/test pool) or ``"all"``.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown: use one of {SPLITS}.")
    name = _task_name(task)
    ds = load_task_data(name, path, hub_split)
    if split == "all":
        return ds
    if name == "cnndm":
        if len(ds) < 900:
            raise ValueError(f"the cnndm splits need the first 900 rows of the validation split, the data has {len(ds)}.")
        return ds.select(range(500) if split == "train" else range(500, 900))
    indices = ds["article_index"]
    keep = [i for i, a in enumerate(indices) if (a <= 35 if split == "train" else 36 <= a <= 47)]
    return ds.select(keep)
