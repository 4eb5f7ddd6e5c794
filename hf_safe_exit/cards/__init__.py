"""The risk guarantee in a HuggingFace model card (README.md), with ``model-index`` results the Hub renders.

>>> rc = RiskControlled(eps=0.05, delta=0.1, method="ucb").fit_table(table)
>>> write_guarantee_card("my-model/", rc, test_results="eval.json", table=table, plots=["plots/risk_vs_eps.png"],
...                      hardware="auto")

writes (or updates) ``my-model/README.md`` through :class:`huggingface_hub.ModelCard`: one section per
calibration task that states the guarantee in plain words, its settings, what the shipped λ̂ does on its
calibration examples against the full model (from the loss table), the calibration procedure on repeated
random splits (from the evaluation; stated as such), the plots and a snippet that decodes as the calibration
did; and ``model-index`` results that name real dataset splits. The calibration, evaluation and plots are
saved beside it and never replaced silently (``overwrite=True`` / ``--overwrite``).

One concept per module:

* :mod:`.vocabulary` -- how tasks, datasets, methods and risks are named; the guarantee in words;
* :mod:`.measurements` -- the numbers and what each measures (shipped λ̂, procedure, held-out);
* :mod:`.render` -- the section's Markdown and its place in the card;
* :mod:`.pareto_card` -- the section and front figure of a ``method="pareto"`` calibration;
* :mod:`.model_index` -- the ``model-index`` results and metadata (``EvalResult``, ``ModelCardData``);
* :mod:`.files` -- the files written beside the card and the no-silent-overwrite rule;
* :mod:`.write` -- building and writing a card; :mod:`.hub` -- pushing one to the Hub.

:mod:`hf_safe_exit.risk` does not import this package.
"""

from __future__ import annotations

from ..risk.store import CALIBRATION_SUBDIR
from .files import WouldOverwriteError, calibration_directory
from .hub import push_to_hub
from .measurements import describe_hardware
from .model_index import METRIC_TYPES
from .render import SECTION_END, SECTION_START, section_markers
from .vocabulary import guarantee_statement
from .write import render_guarantee_section, to_model_card, write_guarantee_card

__all__ = ["write_guarantee_card", "render_guarantee_section", "guarantee_statement", "to_model_card",
           "push_to_hub", "describe_hardware", "section_markers", "calibration_directory", "METRIC_TYPES",
           "SECTION_START", "SECTION_END", "CALIBRATION_SUBDIR", "WouldOverwriteError"]
