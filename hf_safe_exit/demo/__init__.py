"""``hf-safe-exit demo``: risk-controlled early exit on the shipped default model, offline, in under a minute.

:mod:`.run` runs it (and is the CLI), :mod:`.calibration` picks the calibration and the ε it runs at, :mod:`.render`
prints a result, :mod:`.result` holds what is computed.
"""

from .calibration import DEMO_EPS_FRACTION, demo_eps, find_task_calibration, full_model_score
from .result import DemoError, DemoResult
from .run import DEMO_ARTICLE, DEMO_QUESTION, build_parser, main, run_demo, run_from_args

__all__ = ["run_demo", "find_task_calibration", "demo_eps", "full_model_score", "DEMO_EPS_FRACTION", "DemoError",
           "DemoResult", "DEMO_ARTICLE", "DEMO_QUESTION", "build_parser", "run_from_args", "main"]
