"""Early-exit decoding loops and their ``generate`` integration."""

from .early_exit_loop import EarlyExitGenerateOutput, early_exit_decode, new_decoder_cache
from .generate import enable, generate, is_enabled
from .readout import SUPPORTED_MODEL_CLASSES, check_supported_model, intermediate_logits

__all__ = [
    "EarlyExitGenerateOutput", "early_exit_decode", "new_decoder_cache", "enable", "generate", "is_enabled",
    "SUPPORTED_MODEL_CLASSES", "check_supported_model", "intermediate_logits",
]
