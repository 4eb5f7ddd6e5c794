"""hf_safe_exit: fast yet safe early-exit decoding for HuggingFace seq2seq models.

>>> import hf_safe_exit
>>> model = hf_safe_exit.enable(T5ForConditionalGeneration.from_pretrained(path))
>>> model.generate(**inputs, early_exit=hf_safe_exit.EarlyExit(threshold=0.9))

``import hf_safe_exit`` loads no model code and none of the optional dependencies: each public name below is
imported from its module on first use (PEP 562), so ``hf_safe_exit.collect`` still works but loads the
calibration runner only then (tests/test_light_import.py).
"""

from .errors import (CalibrationFileError, CorruptFileError, InconsistentCalibrationError, MissingFingerprintError,
                     ModelMismatchError)
from .lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    # the runtime: switch a model on, decode with early exit, under a risk guarantee
    ".anytime": ("PoEConfig",),
    ".decoding": ("BiLD", "EarlyExitGenerateOutput", "enable", "generate"),
    ".confidence": ("ConfidenceMeasure", "MetaClassifierHead", "MetaHeadConfig"),
    ".fingerprint": ("model_fingerprint", "meta_head_fingerprint"),
    ".models": ("default_model_path", "load_default_model"),
    ".config": ("EarlyExitConfig",),
    ".policy": ("EarlyExit", "EarlyExitPolicy", "ForcedExit"),
    ".risk": ("Calibration", "LossTable", "RiskCertificate", "RiskControlled", "RiskController"),
    ".monitor": ("RiskMonitor",),
    # calibrating, documenting and demonstrating it
    ".calibration": ("collect",),
    ".cards": ("write_guarantee_card",),
    ".demo": ("run_demo",),
    ".tasks": ("get_task", "load_split"),
}

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
del lazy_exports

__all__ = [
    "BiLD",
    "CalibrationFileError", "CorruptFileError", "InconsistentCalibrationError", "MissingFingerprintError",
    "ModelMismatchError",
    "Calibration", "ConfidenceMeasure", "EarlyExit", "EarlyExitConfig", "EarlyExitPolicy", "RiskController", "ForcedExit", "MetaClassifierHead", "MetaHeadConfig",
    "model_fingerprint", "meta_head_fingerprint", "LossTable", "RiskCertificate", "RiskControlled", "RiskMonitor", "enable", "generate", "EarlyExitGenerateOutput",
    "collect", "get_task", "load_split", "default_model_path", "load_default_model",
    "PoEConfig", "write_guarantee_card", "run_demo", "__version__",
]
