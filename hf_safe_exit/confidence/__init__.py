"""Confidence measures for early exit: ``softmax``, ``softmax_shortlist``, ``saturation``, ``meta`` (CALM Sec. 3.5)."""

from __future__ import annotations

from .base import ConfidenceMeasure, LayerView
from .meta import MetaClassifierHead, MetaConfidence, MetaHeadConfig, MissingMetaHeadError
from .saturation import SaturationConfidence
from .shortlist import InvalidNumCandidatesError, SoftmaxShortlistConfidence
from .softmax import SoftmaxConfidence, softmax_margin

MEASURES: dict[str, type[ConfidenceMeasure]] = {
    "softmax": SoftmaxConfidence,
    "softmax_shortlist": SoftmaxShortlistConfidence,
    "saturation": SaturationConfidence,
    "meta": MetaConfidence,
}


def get_measure(measure: str | ConfidenceMeasure) -> ConfidenceMeasure:
    """A measure instance from its name (a key of ``MEASURES``: ``softmax``, ``softmax_shortlist``,
    ``saturation``, ``meta``) or a ready instance."""
    if isinstance(measure, ConfidenceMeasure):
        return measure
    if isinstance(measure, str) and measure in MEASURES:
        return MEASURES[measure]()
    raise ValueError(f"Unknown confidence measure {measure!r}: use one of {sorted(MEASURES)} "
                     "or an instance of hf_safe_exit.confidence.ConfidenceMeasure.")


def measure_name(measure: str | ConfidenceMeasure) -> str:
    return measure if isinstance(measure, str) else measure.name


__all__ = [
    "ConfidenceMeasure", "LayerView", "SoftmaxConfidence", "SaturationConfidence", "MetaConfidence",
    "MetaClassifierHead", "MetaHeadConfig", "MissingMetaHeadError", "MEASURES", "get_measure", "measure_name",
    "softmax_margin", "SoftmaxShortlistConfidence", "InvalidNumCandidatesError",
]
