"""The small default model that ships inside the package (see ``hf_safe_exit/default_model/README.md``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL_DIR", "default_model_path", "default_model_available", "load_default_model"]

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


def default_model_path() -> Path:
    """Directory of the shipped default model (weights, config, tokenizer, meta head, card)."""
    return DEFAULT_MODEL_DIR


def default_model_available() -> bool:
    d = DEFAULT_MODEL_DIR
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()


def load_default_model(*, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       with_meta_head: bool = True):
    """Load the shipped default T5 and its tokenizer offline: ``(model, tokenizer)``.

    The model is a ``T5ForConditionalGeneration`` in eval mode with early exit switched on
    (:func:`hf_safe_exit.enable`), so ``model.generate(**inputs, early_exit=RiskControlled(eps=0.05))``
    runs under the calibration it ships (``calibration/<task>/``; summarization (``cnndm``) is its primary
    task, ``task="squad"`` picks the other). Also loadable with
    ``T5ForConditionalGeneration.from_pretrained(hf_safe_exit.models.default_model_path())``. Its trained
    meta-classifier head is attached as ``model.meta_head`` so that ``measure="meta"`` works out of the box.
    """
    from .decoding import enable

    from transformers import AutoTokenizer, T5ForConditionalGeneration

    if not default_model_available():
        raise FileNotFoundError(
            f"the default model is not present in {DEFAULT_MODEL_DIR}: this installation was built without it. "
            "Train it with scripts/train_default_model.py (writes that directory) or load your own checkpoint.")
    path = str(DEFAULT_MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = T5ForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.to(device).eval()
    if with_meta_head:
        from .confidence.meta import META_WEIGHTS_NAME, MetaClassifierHead

        if os.path.isfile(os.path.join(path, META_WEIGHTS_NAME)):
            model.meta_head = MetaClassifierHead.from_pretrained(path).to(device=device, dtype=dtype)
    return enable(model), tokenizer
