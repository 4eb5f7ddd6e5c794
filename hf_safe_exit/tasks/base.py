"""The task interface: build the model input, score a prediction, turn the score into a loss.

A :class:`Task` is what the calibration pipeline needs to know about a dataset:

* ``prompt(example) -> str`` -- the model input (T5 style, with a task prefix);
* ``reference(example)`` -- the gold target(s) the prediction is scored against;
* ``score(prediction, reference) -> float`` in ``[0, 1]`` (higher is better);
* ``loss(prediction, reference) = 1 - score``, with ``loss_bounds = (0.0, 1.0)``;
* ``consistency_loss(prediction, full_prediction)`` -- ``1 - score`` of the prediction
  against the *full model's* output used as the reference (needs no labels; the
  "consistency" risk of Jazbec et al. 2024).

The risk calibrator (``hf_safe_exit.risk``) consumes these losses as numbers with
declared bounds; the performance-gap losses ``loss(ŷ_λ) − loss(ŷ_1)`` are formed there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Mapping

__all__ = ["Task"]


class Task(ABC):
    """One task: its prompt, its reference, its metric (a score in [0, 1]) and the loss ``1 - score``."""

    #: registry name (``get_task(name)``)
    name: ClassVar[str] = ""
    #: the Hub dataset the task loads by default
    hub_id: ClassVar[str] = ""
    #: (lower, upper) bounds of :meth:`loss` and :meth:`consistency_loss`
    loss_bounds: ClassVar[tuple[float, float]] = (0.0, 1.0)
    #: a sensible ``max_new_tokens`` for decoding this task
    max_new_tokens: ClassVar[int] = 64
    #: a sensible truncation length (tokens) of the encoder input
    max_input_length: ClassVar[int] = 512

    @abstractmethod
    def prompt(self, example: Mapping[str, Any]) -> str:
        """The model input for one example (a row of the dataset)."""

    @abstractmethod
    def reference(self, example: Mapping[str, Any]) -> Any:
        """The gold reference of one example, in the form :meth:`score` takes."""

    @abstractmethod
    def score(self, prediction: str, reference: Any) -> float:
        """The task metric of ``prediction`` against ``reference``, in [0, 1] (1 = perfect)."""

    @abstractmethod
    def as_reference(self, text: str) -> Any:
        """Wrap a model output so that it can be used as the reference in :meth:`score`."""

    def example_id(self, example: Mapping[str, Any]) -> str:
        """A stable identifier of the example (the dataset's ``id`` column)."""
        return str(example["id"])

    def loss(self, prediction: str, reference: Any) -> float:
        """The task loss ``1 - score`` in ``loss_bounds`` = [0, 1]."""
        return 1.0 - float(self.score(prediction, reference))

    def consistency_loss(self, prediction: str, full_prediction: str) -> float:
        """``1 - score`` of ``prediction`` against the full model's output ``full_prediction`` as the reference.

        Equal outputs give exactly 0 (also when both are empty).
        """
        if prediction == full_prediction:
            return 0.0
        return 1.0 - float(self.score(prediction, self.as_reference(full_prediction)))

    def metrics(self, prediction: str, reference: Any) -> dict[str, float]:
        """All metrics the task reports for one prediction (at least ``{"score": ...}``)."""
        return {"score": float(self.score(prediction, reference))}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
