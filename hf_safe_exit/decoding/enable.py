"""Switching early exit on for a model, HF's way: ``custom_generate``.

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

Why a partial of a module-level function and not a closure: it survives ``copy.deepcopy`` (the copy's
``generate`` decodes with the copy) and pickling (the function is pickled by name). A policy stored on
``generation_config.early_exit`` is saved as a JSON spec (:mod:`hf_safe_exit.decoding.stored_policy`) and
honoured after reloading.

Importing ``hf_safe_exit`` installs two narrow hooks (:func:`install_error_hook`), both inert for models
that are not switched on and calls without a policy: HF's ``generate`` on a model that was not switched on
refuses ``early_exit=`` (or a policy stored on its generation config), which it would otherwise reject
unhelpfully or silently ignore, with :class:`EarlyExitNotEnabledError` naming the fix; and
``save_pretrained`` of a switched-on model, however it was switched on (``enable`` or
``trust_remote_code``), also writes ``custom_generate/`` and the stored policy's spec.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from .generate import is_inside_early_exit, model_generate
from .readout import check_supported_model
from .stored_policy import POLICY_ATTRIBUTE, policy_to_dict

__all__ = ["enable", "is_enabled", "save_early_exit_model", "write_custom_generate", "EarlyExitNotEnabledError",
           "install_error_hook", "CUSTOM_GENERATE_DIR"]

CUSTOM_GENERATE_DIR = "custom_generate"
_GENERATE_PY = '''"""Early-exit decoding (CALM with risk control) for this checkpoint: https://pypi.org/project/hf_safe_exit

transformers runs this file when the model is loaded with `from_pretrained(..., trust_remote_code=True)`,
or called with `generate(..., custom_generate=<this repo>, trust_remote_code=True)`. It adds one keyword
to `generate`: `early_exit=hf_safe_exit.RiskControlled(eps=0.05)` (a threshold with a statistical
guarantee, fitted on the calibration stored under calibration/<task>/) or `hf_safe_exit.EarlyExit(...)`.
Without it (or with `early_exit=False`) `generate` is transformers' own.
"""

from hf_safe_exit.decoding.generate import model_generate as generate  # noqa: F401
'''


class EarlyExitNotEnabledError(ValueError):
    """``generate`` got an early-exit policy on a model whose ``generate`` is HF's own."""


def is_enabled(model) -> bool:
    """Whether ``model.generate`` is hf_safe_exit's (:func:`enable`, or loaded with its ``custom_generate``)."""
    current = model.__dict__.get("generate")
    return isinstance(current, functools.partial) and current.func is model_generate


_HF_SAVE_PRETRAINED = None  # PreTrainedModel.save_pretrained as transformers defines it (set by the hook)


def enable(model):
    """Let ``model.generate`` accept ``early_exit=``; returns the same model object.

    Only this instance changes: ``generate`` without ``early_exit`` (and without a policy stored on the
    generation config) is HF's own, untouched; ``save_pretrained`` also writes ``custom_generate/``, so that
    ``from_pretrained(saved, trust_remote_code=True)`` is an early-exit model again. Survives
    ``copy.deepcopy`` and pickling. Idempotent. Raises ``TypeError`` for unsupported models.
    """
    check_supported_model(model)
    install_error_hook()  # (already done by `import hf_safe_exit`)
    if not is_enabled(model):
        model.generate = functools.partial(model_generate, model=model)
    return model


def write_custom_generate(save_directory) -> Path:
    """Write ``custom_generate/generate.py`` and ``requirements.txt`` (``hf_safe_exit>=<this version>``)."""
    from .. import __version__

    folder = Path(save_directory) / CUSTOM_GENERATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generate.py").write_text(_GENERATE_PY, encoding="utf-8")
    (folder / "requirements.txt").write_text(f"hf_safe_exit>={__version__}\n", encoding="utf-8")
    return folder


def save_early_exit_model(model, save_directory, *args, **kwargs):
    """HF's ``save_pretrained`` plus ``custom_generate/``, with a stored policy written as its JSON spec.

    ``custom_generate/`` is written first, so that ``save_pretrained(..., push_to_hub=True)`` uploads it too.
    """
    install_error_hook()
    config = model.generation_config
    stored = getattr(config, POLICY_ATTRIBUTE, None)
    from_model_config = getattr(config, "_from_model_config", None)
    spec = None if stored is None else policy_to_dict(stored)  # raises before anything is written
    if kwargs.get("is_main_process", True):
        write_custom_generate(save_directory)
    if stored is not None:
        setattr(config, POLICY_ATTRIBUTE, spec)
        # HF drops every non-standard key of a generation config marked as derived from the model config
        config._from_model_config = False
    try:
        return _HF_SAVE_PRETRAINED(model, save_directory, *args, **kwargs)
    finally:
        if stored is not None:
            setattr(config, POLICY_ATTRIBUTE, stored)
            config._from_model_config = from_model_config


def _not_enabled(model) -> EarlyExitNotEnabledError:
    name = getattr(model, "name_or_path", "") or ""
    saved = f"{name!r}" if name and os.path.isdir(name) else "<folder>"
    return EarlyExitNotEnabledError(
        f"early exit is not switched on for this {type(model).__name__}, so HF's own generate would ignore or reject "
        f"early_exit: call `hf_safe_exit.enable(model)` first (or load a folder saved from an early-exit model with "
        f"`from_pretrained({saved}, trust_remote_code=True)`, or pass `custom_generate=<folder>, "
        "trust_remote_code=True` to generate).")


def install_error_hook() -> None:
    """Install, once per process, the two hooks of this module (see its docstring).

    ``GenerationMixin._prepare_generation_config`` is wrapped to raise only when the call carries ``early_exit``
    (as a keyword or on the generation config) and did not come through hf_safe_exit, i.e. exactly when HF would
    have raised an unhelpful error or silently ignored the policy. ``PreTrainedModel.save_pretrained`` is wrapped
    to call :func:`save_early_exit_model` for switched-on models only.
    """
    global _HF_SAVE_PRETRAINED
    from transformers import GenerationMixin, PreTrainedModel

    original = GenerationMixin._prepare_generation_config
    if getattr(original, "_hf_safe_exit_hook", False):
        return
    hf_save = PreTrainedModel.save_pretrained
    _HF_SAVE_PRETRAINED = hf_save

    @functools.wraps(hf_save)
    def save_pretrained(self, save_directory, *args, **kwargs):
        if is_enabled(self):
            return save_early_exit_model(self, save_directory, *args, **kwargs)
        return hf_save(self, save_directory, *args, **kwargs)

    PreTrainedModel.save_pretrained = save_pretrained

    @functools.wraps(original)
    def _prepare_generation_config(self, *args, **kwargs):
        generation_config, model_kwargs = original(self, *args, **kwargs)
        if not is_inside_early_exit():
            given = model_kwargs.get(POLICY_ATTRIBUTE, kwargs.get(POLICY_ATTRIBUTE))
            stored = getattr(generation_config, POLICY_ATTRIBUTE, None)
            if given not in (None, False) or stored not in (None, False):
                raise _not_enabled(self)
        return generation_config, model_kwargs

    _prepare_generation_config._hf_safe_exit_hook = True
    GenerationMixin._prepare_generation_config = _prepare_generation_config
