"""Early-exit decoding loops and their ``generate`` integration."""

from .bild import BiLD, BiLDOutput, BiLDStats, bild_policy_factory, lambda_to_rollback, rollback_to_lambda
from .early_exit_loop import EarlyExitGenerateOutput, early_exit_decode, new_decoder_cache
from .generate import enable, generate, is_enabled
from .readout import SUPPORTED_MODEL_CLASSES, check_supported_model, intermediate_logits

__all__ = [
    "BiLD", "BiLDOutput", "BiLDStats", "bild_policy_factory", "lambda_to_rollback", "rollback_to_lambda",
    "EarlyExitGenerateOutput", "early_exit_decode", "new_decoder_cache", "enable", "generate", "is_enabled",
    "SUPPORTED_MODEL_CLASSES", "check_supported_model", "intermediate_logits",
]
