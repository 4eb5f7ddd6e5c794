"""CNN/DailyMail summarization: ``"summarize: " + article``, scored with ROUGE-L F-measure.

The metric is ``rouge_score``'s ``rougeL`` (longest common subsequence over the whole
text, stemming on), per example, as in CALM (Schuster et al. 2022) and Jazbec et al. 2024
-- not ``rougeLsum`` (which splits on newlines and takes a union-LCS per sentence), and
not ``evaluate``'s bootstrap-aggregated number (which also needs the Hub). The reference
is the dataset's ``highlights`` field: its sentences joined by newlines, which ``rougeL``
treats as plain whitespace.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Mapping

from ..lazy import require
from .base import Task

__all__ = ["CNNDailyMail", "rouge_l"]


class CNNDailyMail(Task):
    name = "cnndm"
    hub_id = "abisee/cnn_dailymail"
    max_new_tokens = 128
    max_input_length = 512

    @cached_property
    def _scorer(self):
        rouge_scorer = require("rouge_score.rouge_scorer", "the cnndm task's ROUGE-L")
        return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def prompt(self, example: Mapping[str, Any]) -> str:
        return "summarize: " + example["article"]

    def reference(self, example: Mapping[str, Any]) -> str:
        return example["highlights"]

    def as_reference(self, text: str) -> str:
        return text

    def score(self, prediction: str, reference: str) -> float:
        """ROUGE-L F-measure (``rouge_score`` ``rougeL``, stemming on) of ``prediction`` against ``reference``.

        ``rouge_score`` gives 0 when either side has no tokens; two texts that both
        have no tokens (e.g. both empty) score 1 here, since they agree.
        """
        if not isinstance(prediction, str) or not isinstance(reference, str):
            raise TypeError("CNNDailyMail.score takes two strings: the predicted summary and the reference "
                            f"highlights (newline-joined), got {type(prediction).__name__} and "
                            f"{type(reference).__name__}.")
        scorer = self._scorer
        if not scorer._tokenizer.tokenize(prediction) and not scorer._tokenizer.tokenize(reference):
            return 1.0
        return float(scorer.score(reference, prediction)["rougeL"].fmeasure)

    def metrics(self, prediction: str, reference: str) -> dict[str, float]:
        value = self.score(prediction, reference)
        return {"score": value, "rougeL": value}


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure as :class:`CNNDailyMail` computes it."""
    return CNNDailyMail().score(prediction, reference)
