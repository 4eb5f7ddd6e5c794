"""What the card tests share: a tiny calibrated model and synthetic loss tables, a user's own card, a Hub repo in
memory, and readers of a card that do not use the library's own code (YAML, huggingface_hub's ModelCard)."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from hf_safe_exit import LossTable, RiskControlled, model_fingerprint
from hf_safe_exit.calibration.evaluate import evaluate_table
from hf_safe_exit.cards import METRIC_TYPES, guarantee_statement, section_markers, write_guarantee_card

from tiny_calibration import build_tiny_t5

__all__ = ["CNNDM_START", "CNNDM_END", "SQUAD_START", "SQUAD_END", "USER_CARD", "synthetic_table", "calibrated",
           "squad_table", "yaml_header", "our_results", "section", "results_by_dataset", "check_numbers", "FakeHub",
           "shipped_like"]

CNNDM_START, CNNDM_END = section_markers("cnndm")
SQUAD_START, SQUAD_END = section_markers("squad")

USER_CARD = """---
license: apache-2.0
tags:
- t5
model-index:
- name: my-tiny-t5
  results:
  - task:
      type: summarization
    dataset:
      name: my eval set
      type: my/eval
    metrics:
    - type: rougeL
      value: 0.25
---

# My tiny T5

Some words the user wrote about the model.

## Limitations

It is tiny and random.
"""


def synthetic_table(fingerprint: str, task: str | None, *, n: int = 300, seed: int = 0,
                     mean_gap: float = 0.25) -> LossTable:
    """Synthetic losses of one task: the gap shrinks towards λ = 1 (where it is exactly 0), noisy, within [-1, 1]."""
    rng = np.random.default_rng(seed)
    lambdas = np.round(np.linspace(0.0, 1.0, 11), 10)
    gaps = np.clip((1 - lambdas)[:, None] * rng.normal(mean_gap, 0.2, (lambdas.size, n)), -1, 1)
    gaps[-1] = 0.0
    layers = 1 + 5 * lambdas[:, None] * rng.uniform(0.5, 1.0, (1, n))
    layers[-1] = 6.0
    tokens = rng.integers(5, 30, (lambdas.size, n))  # early exit changes the output lengths
    extras = {"task_loss": np.clip(0.6 + gaps, 0, 1), "mean_exit_layer": layers, "layer_fraction": layers / 6,
              "wall_time": 1.0 + 2.0 * lambdas, "num_tokens": tokens}
    metadata = {"model_fingerprint": fingerprint, "measure": "softmax", "schedule": "constant", "min_exit_layer": 1,
                "split": "pool", "num_decoder_layers": 6, "max_new_tokens": 32, "max_input_length": 128}
    if task is not None:
        metadata["task"] = task
    return LossTable(lambdas, {"performance_gap": gaps}, extras=extras, metadata=metadata)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny random T5 saved to a directory, and a LossTable of synthetic losses carrying its fingerprint."""
    model = build_tiny_t5(vocab_size=40, seed=0)
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory)
    return model, directory, synthetic_table(model_fingerprint(model), "cnndm")


@pytest.fixture(scope="module")
def squad_table(calibrated):
    """A second task's synthetic losses for the same model (another n and gap, so another λ̂)."""
    model, _, _ = calibrated
    return synthetic_table(model_fingerprint(model), "squad", n=240, seed=1, mean_gap=0.15)


def yaml_header(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.S)
    assert match, "card must start with a YAML block"
    return yaml.safe_load(match.group(1))


def our_results(card) -> dict:
    return {r.metric_type: r for r in card.data.eval_results if r.metric_type in METRIC_TYPES}


def section(text: str, start: str, end: str) -> str:
    assert text.count(start) == 1 and text.count(end) == 1, (start, end)
    return text[text.index(start):text.index(end) + len(end)]


def results_by_dataset(card) -> dict:
    """{(dataset type, metric type): value} of this library's model-index results."""
    return {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results
            if r.metric_type in METRIC_TYPES}


def check_numbers(text: str, rc) -> None:
    """``text`` (a guarantee section) states ``rc``'s threshold, ε, n and guarantee."""
    c = rc.certificate
    assert f"| Threshold λ̂ | {c.threshold:.6g} |" in text
    assert f"ε = {c.eps:g}" in text and f"n = {c.n} |" in text
    assert guarantee_statement(c, "ROUGE-L" if c.task == "cnndm" else "F1") in text


class FakeHub:
    """A Hub repo in memory: the calls push_to_hub makes, on {path: bytes}. ``exists=False``: no such repo until
    ``create_repo`` (``created`` lists its calls)."""

    def __init__(self, files: dict, exists: bool = True):
        self.files = dict(files)
        self.exists = exists
        self.uploaded: dict = {}
        self.deleted: list = []
        self.created: list = []

    def api(self, token=None):
        hub = self

        class Api:
            def create_repo(self, repo_id, exist_ok=False, private=None):
                hub.created.append(repo_id)
                hub.exists = True
                return repo_id

            def list_repo_files(self, repo_id, revision=None):
                if not hub.exists:  # what the Hub answers for a repo that is not there
                    try:  # the HTTP library huggingface_hub's errors are built on: httpx2 from 2.x, httpx in 1.x
                        import httpx2 as http
                    except ImportError:
                        import httpx as http
                    from huggingface_hub.errors import RepositoryNotFoundError

                    url = f"https://huggingface.co/api/models/{repo_id}"
                    raise RepositoryNotFoundError(f"404: {repo_id}", response=http.Response(
                        404, request=http.Request("GET", url)))
                return sorted(hub.files)

            def upload_folder(self, repo_id, folder_path, revision=None, commit_message="", delete_patterns=None):
                assert hub.exists, "upload_folder to a repo that was not created"
                root = Path(folder_path)
                hub.uploaded = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
                hub.deleted = sorted(f for f in hub.files if f not in hub.uploaded and any(
                    fnmatch.fnmatch(f, pattern) for pattern in ([delete_patterns] if isinstance(delete_patterns, str)
                                                                else delete_patterns or [])))
                for f in hub.deleted:
                    del hub.files[f]
                hub.files.update(hub.uploaded)
                return "https://huggingface.co/fake/commit/1"
        return Api()

    def download(self, tmp_path):
        def hf_hub_download(repo_id, filename, revision=None, token=None, **_):
            dest = tmp_path / "downloads" / filename
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(self.files[filename])
            return str(dest)
        return hf_hub_download


def shipped_like(model_dir: Path, table, tmp_path: Path):
    """A model folder as calibrate_default_model.sh leaves it: 300-example UCB calibration, its table, evaluation
    and plots, and the card. Returns the calibration and {file: bytes} of everything there."""
    from hf_safe_exit.plotting import plot_evaluation

    rc = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    evaluation = evaluate_table(table, eps=(0.1,), methods=("ucb",), delta=0.1, repeats=2)
    plots = plot_evaluation(evaluation, tmp_path / "plots")
    write_guarantee_card(model_dir, rc, test_results=evaluation, table=table, plots=plots, model_name="m")
    return rc, {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
