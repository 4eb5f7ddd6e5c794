"""Confidence measures for early exit: ``softmax``, ``softmax_shortlist``, ``saturation``, ``meta`` (CALM Sec. 3.5).

The default, ``"auto"``, was chosen by measurement (``benchmarks/measure_choice.py``, ``docs/benchmarks.md``): at
equal risk (ε = 0.05, CRC and UCB, both tasks of the default model) the meta classifier gave the lowest decode time
per token on the t5-small, flan-t5-base and flan-t5-large shapes, and among the measures that need no trained head,
``HEAD_FREE_DEFAULT``. So ``"auto"`` is ``"meta"`` on a model that carries a trained meta head and
``HEAD_FREE_DEFAULT`` otherwise (``"softmax"`` with Product-of-Experts predictions); the measure it
resolved to is what a calibration records.
"""

from __future__ import annotations

from .base import ConfidenceMeasure, LayerView
from .meta import MetaClassifierHead, MetaConfidence, MetaHeadConfig, MissingMetaHeadError, find_meta_head
from .saturation import SaturationConfidence
from .shortlist import InvalidNumCandidatesError, SoftmaxShortlistConfidence
from .softmax import SoftmaxConfidence, softmax_margin

MEASURES: dict[str, type[ConfidenceMeasure]] = {
    "softmax": SoftmaxConfidence,
    "softmax_shortlist": SoftmaxShortlistConfidence,
    "saturation": SaturationConfidence,
    "meta": MetaConfidence,
}


AUTO = "auto"
DEFAULT_MEASURE = AUTO
HEAD_FREE_DEFAULT = "softmax_shortlist"


def has_meta_head(model) -> bool:
    """Whether ``model`` carries a trained meta head (``model.meta_head``, saved next to its weights, or in the Hub
    repo it was loaded from). Half a head or an unreachable Hub raises (see ``find_meta_head``): never a silent
    fallback to another measure."""
    try:
        find_meta_head(model)
    except MissingMetaHeadError:
        return False
    return True


def resolve_measure(measure: str | ConfidenceMeasure, model, anytime=None) -> str | ConfidenceMeasure:
    """``"auto"`` → ``"softmax"`` with Product-of-Experts predictions (``anytime``: PoE projects onto the vocabulary
    at every layer anyway, and its confidences are the softmax margins of the PoE distribution), else ``"meta"`` if
    ``model`` has a trained meta head, else ``HEAD_FREE_DEFAULT``. Other measures are returned unchanged."""
    if isinstance(measure, str) and measure == AUTO:
        if anytime is not None:
            return "softmax"
        return "meta" if has_meta_head(model) else HEAD_FREE_DEFAULT
    return measure


def check_measure(measure: str | ConfidenceMeasure) -> None:
    """Raise on anything that is not ``"auto"``, a key of ``MEASURES`` or a ``ConfidenceMeasure`` instance."""
    if isinstance(measure, ConfidenceMeasure) or (isinstance(measure, str) and (measure in MEASURES or measure == AUTO)):
        return
    raise ValueError(f"Unknown confidence measure {measure!r}: use {AUTO!r} (the default), one of {sorted(MEASURES)} "
                     "or an instance of hf_safe_exit.confidence.ConfidenceMeasure.")


def get_measure(measure: str | ConfidenceMeasure, model=None, anytime=None) -> ConfidenceMeasure:
    """A measure instance from its name (``"auto"``, which needs ``model``: see :func:`resolve_measure`, or a key
    of ``MEASURES``: ``softmax``, ``softmax_shortlist``, ``saturation``, ``meta``) or a ready instance."""
    check_measure(measure)
    if isinstance(measure, ConfidenceMeasure):
        return measure
    if measure == AUTO:
        if model is None:
            raise ValueError("measure='auto' is resolved against a model (meta if it has a trained meta head): "
                             "call get_measure('auto', model) or EarlyExit(...).bind(model).")
        measure = resolve_measure(measure, model, anytime)
    return MEASURES[measure]()


def measure_name(measure: str | ConfidenceMeasure) -> str:
    return measure if isinstance(measure, str) else measure.name


__all__ = [
    "ConfidenceMeasure", "LayerView", "SoftmaxConfidence", "SaturationConfidence", "MetaConfidence",
    "MetaClassifierHead", "MetaHeadConfig", "MissingMetaHeadError", "MEASURES", "get_measure", "measure_name",
    "softmax_margin", "SoftmaxShortlistConfidence", "InvalidNumCandidatesError", "AUTO", "DEFAULT_MEASURE",
    "HEAD_FREE_DEFAULT", "has_meta_head", "resolve_measure", "check_measure",
]
