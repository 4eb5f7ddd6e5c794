"""hf_safe_exit: fast yet safe early-exit decoding for HuggingFace seq2seq models.

>>> import hf_safe_exit
>>> model = hf_safe_exit.enable(T5ForConditionalGeneration.from_pretrained(path))
>>> model.generate(**inputs, early_exit=hf_safe_exit.EarlyExit(threshold=0.9))
"""

from .decoding import BiLD, EarlyExitGenerateOutput, enable, generate, install_error_hook
from .decoding.poe import PoEConfig
from .cards import write_guarantee_card
from .demo import run_demo
from .confidence import ConfidenceMeasure, MetaClassifierHead, MetaHeadConfig
from .errors import (CalibrationFileError, CorruptFileError, InconsistentCalibrationError, MissingFingerprintError,
                     ModelMismatchError)
from .fingerprint import model_fingerprint
from .models import default_model_path, load_default_model
from .policy import EarlyExit, EarlyExitPolicy, ForcedExit
from .risk import LossTable, RiskCertificate, RiskControlled
from .calibration import collect
from .tasks import get_task, load_split

__version__ = "0.1.0"

# generate(early_exit=...) on a model that was not switched on gets an error naming the fix, not HF's silence
install_error_hook()

__all__ = [
    "BiLD",
    "CalibrationFileError", "CorruptFileError", "InconsistentCalibrationError", "MissingFingerprintError",
    "ModelMismatchError",
    "ConfidenceMeasure", "EarlyExit", "EarlyExitPolicy", "ForcedExit", "MetaClassifierHead", "MetaHeadConfig",
    "model_fingerprint", "LossTable", "RiskCertificate", "RiskControlled", "enable", "generate", "EarlyExitGenerateOutput",
    "collect", "get_task", "load_split", "default_model_path", "load_default_model",
    "PoEConfig", "write_guarantee_card", "run_demo", "__version__",
]
