"""The calibration pipeline: per-example losses over a threshold grid (:func:`collect`) and their evaluation.

Names are imported from their modules on first use (PEP 562): reading an evaluation (:mod:`.evaluate`, which the
model card needs) then loads neither the runner nor the decoding loops it drives.
"""

from ..lazy import lazy_exports

_EXPORTS = {
    ".runner": ("ModelMismatchError", "StateMismatchError", "check_model_matches", "collect", "default_lambdas"),
    ".strategies": ("default_bild_lambdas",),
}

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
del lazy_exports

__all__ = ["collect", "default_lambdas", "default_bild_lambdas", "StateMismatchError", "ModelMismatchError",
           "check_model_matches"]
