"""The calibration pipeline: per-example losses over a threshold grid (:func:`collect`) and their evaluation."""

from .runner import ModelMismatchError, StateMismatchError, check_model_matches, collect, default_lambdas
from .strategies import default_bild_lambdas

__all__ = ["collect", "default_lambdas", "default_bild_lambdas", "StateMismatchError", "ModelMismatchError",
           "check_model_matches"]
