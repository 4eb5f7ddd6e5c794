"""SQuAD v1.1 question answering: ``"question: {q} context: {c}"``, scored with token F1 (and exact match).

The answer normalisation and the metrics follow the official SQuAD v1.1 evaluation
script (``evaluate-v1.1.py``): lowercase, remove punctuation, remove the articles
``a``/``an``/``the``, collapse whitespace; F1 on the bag of normalised tokens; the
maximum over the reference answers. One addition from the v2.0 script: when the
prediction and a reference both normalise to no tokens, F1 is 1 (v1.1 never has empty
references; this only matters for the consistency loss between two empty outputs).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any, Mapping, Sequence

from .base import Task

__all__ = ["SQuAD", "normalize_answer", "squad_f1", "squad_exact_match", "f1_score", "exact_match_score"]

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (official SQuAD v1.1)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 of one prediction against one answer (official SQuAD v1.1)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match_score(prediction: str, ground_truth: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0 (official SQuAD v1.1)."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def _answers(reference: str | Sequence[str]) -> list[str]:
    if isinstance(reference, str):
        return [reference]
    answers = list(reference)
    if not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError("a SQuAD reference is a non-empty list of answer strings (the example's answers['text']), "
                         f"got {reference!r}.")
    return answers


def squad_f1(prediction: str, reference: str | Sequence[str]) -> float:
    """Maximum token F1 over the reference answers."""
    return max(f1_score(prediction, answer) for answer in _answers(reference))


def squad_exact_match(prediction: str, reference: str | Sequence[str]) -> float:
    """Maximum exact match over the reference answers."""
    return max(exact_match_score(prediction, answer) for answer in _answers(reference))


class SQuAD(Task):
    name = "squad"
    hub_id = "rajpurkar/squad"
    max_new_tokens = 32
    max_input_length = 512

    def prompt(self, example: Mapping[str, Any]) -> str:
        return f"question: {example['question']} context: {example['context']}"

    def reference(self, example: Mapping[str, Any]) -> list[str]:
        return list(example["answers"]["text"])

    def as_reference(self, text: str) -> list[str]:
        return [text]

    def score(self, prediction: str, reference: str | Sequence[str]) -> float:
        """Token F1 (max over the reference answers); the task loss is ``1 - F1``."""
        if not isinstance(prediction, str):
            raise TypeError(f"SQuAD.score takes the predicted answer as a string, got {type(prediction).__name__}.")
        return squad_f1(prediction, reference)

    def metrics(self, prediction: str, reference: str | Sequence[str]) -> dict[str, float]:
        f1 = self.score(prediction, reference)
        return {"score": f1, "f1": f1, "exact_match": squad_exact_match(prediction, reference)}
