"""Early-exit decoding loops and their ``generate`` integration."""

from .bild import BiLD, BiLDOutput, BiLDStats, bild_policy_factory, lambda_to_rollback, rollback_to_lambda
from .early_exit_loop import EarlyExitGenerateOutput, early_exit_decode, new_decoder_cache
from .enable import enable, is_enabled, write_custom_generate
from .generate import generate, model_generate
from .modes import UnsupportedGenerationModeError
from .readout import SUPPORTED_MODEL_CLASSES, check_supported_model, intermediate_logits

__all__ = [
    "BiLD", "BiLDOutput", "BiLDStats", "bild_policy_factory", "lambda_to_rollback", "rollback_to_lambda",
    "EarlyExitGenerateOutput", "early_exit_decode", "new_decoder_cache", "enable", "generate", "is_enabled",
    "model_generate", "write_custom_generate", "UnsupportedGenerationModeError",
    "SUPPORTED_MODEL_CLASSES", "check_supported_model", "intermediate_logits",
]
