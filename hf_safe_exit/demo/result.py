"""What the demo computes for one task, the words it uses for the tasks, and its one error."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DemoError", "DemoResult", "METRIC", "TASK_TITLE", "DATA", "DEFAULT_MAX_NEW_TOKENS"]

METRIC = {"cnndm": "ROUGE-L", "squad": "F1"}
DEFAULT_MAX_NEW_TOKENS = 64  # caps the summary length (CNN/DM's task default is 128) to stay within a minute
TASK_TITLE = {"cnndm": "Summary", "squad": "Answer"}
DATA = {"cnndm": "CNN/DailyMail news articles", "squad": "SQuAD questions on Wikipedia paragraphs"}


class DemoError(RuntimeError):
    """The demo cannot run: the message says what is missing and how to get it."""


@dataclass
class DemoResult:
    task: str
    prompt: str
    text: str
    full_text: str
    pieces: list[str]
    exit_layers: list[int]
    num_layers: int
    threshold: float  # λ̂
    guarantee: str
    calibration_source: str
    time_early: float
    time_full: float  # the full model made to generate exactly new_tokens_early tokens (like for like)
    new_tokens_early: int
    new_tokens_full: int  # the full model's own output length (its text is full_text)
    eps_reason: str = ""  # why the demo runs at this ε (printed)
    shown_input: str = ""  # the input as printed before the output (shortened)
    extra: dict = field(default_factory=dict)

    @property
    def mean_exit_layer(self) -> float:
        return sum(self.exit_layers) / max(len(self.exit_layers), 1)

    @property
    def speedup(self) -> float:
        """The full model's time over early exit's for the same number of generated tokens (``new_tokens_early``:
        the full model is timed with ``min_new_tokens = max_new_tokens`` = that count), encoder included."""
        if self.time_early <= 0 or self.time_full <= 0:
            return float("nan")
        return self.time_full / self.time_early
