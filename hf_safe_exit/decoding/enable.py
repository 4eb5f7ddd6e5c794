"""Switching early exit on for one model, HF's way: ``custom_generate``, per instance, nothing patched.

An *early-exit model* is a T5 whose ``generate`` is :func:`hf_safe_exit.decoding.generate.model_generate`
bound to it, ``functools.partial(model_generate, model=model)``: exactly the object transformers installs
when ``from_pretrained(path, trust_remote_code=True)`` loads a folder holding ``custom_generate/generate.py``
(transformers >= 5: ``GenerationMixin.load_custom_generate``). Two ways in, one result:

* ``hf_safe_exit.enable(model)`` switches one instance on in this process;
* ``T5ForConditionalGeneration.from_pretrained(saved, trust_remote_code=True)`` on a folder that an
  early-exit model's ``save_pretrained``/``push_to_hub`` wrote: they add ``custom_generate/generate.py``
  (one import of ``model_generate``) and ``custom_generate/requirements.txt`` (``hf_safe_exit``). A plain
  ``from_pretrained`` of that folder can still opt in per call:
  ``model.generate(**x, custom_generate=saved, trust_remote_code=True, early_exit=...)``.

Why nothing is patched: importing a library must not change another library's classes (peft, accelerate and
liger-kernel wrap instances too). So ``import hf_safe_exit`` changes no transformers class or function; a model
that was not switched on is HF's, and ``generate(early_exit=...)`` on it gets transformers' own error (an unknown
keyword), while a policy stored on its generation config is ignored as any unknown setting is (it decodes the
full model). ``enable`` also gives the instance its own ``save_pretrained`` (:func:`save_early_exit_model`), so
that a save writes ``custom_generate/``; a model loaded with ``trust_remote_code`` gets it at its first
``generate`` (transformers runs no code of ours when it loads one), or from ``enable(model)``, which is idempotent.

Why partials of module-level functions and not closures: they survive ``copy.deepcopy`` (the copy's methods act
on the copy) and pickling (the functions are pickled by name).
"""

from __future__ import annotations

import functools

from .generate import model_generate
from .readout import check_supported_model
from .saving import CUSTOM_GENERATE_DIR, save_early_exit_model, switch_on_saving, write_custom_generate

__all__ = ["enable", "is_enabled", "save_early_exit_model", "write_custom_generate", "CUSTOM_GENERATE_DIR"]


def is_enabled(model) -> bool:
    """Whether ``model.generate`` is hf_safe_exit's (:func:`enable`, or loaded with its ``custom_generate``)."""
    current = model.__dict__.get("generate")
    return isinstance(current, functools.partial) and current.func is model_generate


def enable(model):
    """Let ``model.generate`` accept ``early_exit=``; returns the same model object.

    Only this instance changes: ``generate`` without ``early_exit`` (and without a policy stored on the
    generation config) is HF's own, untouched; ``save_pretrained`` also writes ``custom_generate/``, so that
    ``from_pretrained(saved, trust_remote_code=True)`` is an early-exit model again. Survives
    ``copy.deepcopy`` and pickling. Idempotent. Raises ``TypeError`` for a model that is not a T5/MT5
    ``...ForConditionalGeneration``.
    """
    check_supported_model(model)
    if not is_enabled(model):
        model.generate = functools.partial(model_generate, model=model)
    switch_on_saving(model)
    return model
