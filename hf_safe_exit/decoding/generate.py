"""``generate(..., early_exit=...)`` for HuggingFace T5 models.

Two entry points:

* :func:`enable` patches one model instance so that ``model.generate`` accepts
  ``early_exit=``; without it, the call goes to HF's own ``generate`` untouched.
* :func:`generate` is the same thing as a function: ``generate(model, **inputs, early_exit=...)``.

An early-exit policy (anything with ``bind(model)``, see :mod:`hf_safe_exit.policy`)
runs through HF's ``custom_generate`` hook, so HF prepares the encoder pass, the
generation config, logits processors and stopping criteria exactly as usual. A
decoding strategy that needs its own loop (an object with a ``decode(model, **kwargs)``
method, e.g. :class:`hf_safe_exit.decoding.bild.BiLD`) is called directly.
"""

from __future__ import annotations

import functools

from transformers import GenerationMixin

from ..policy import EarlyExitPolicy
from .early_exit_loop import early_exit_decode, new_decoder_cache
from .readout import check_supported_model

__all__ = ["enable", "generate", "is_enabled"]

def _check_generation_options(model, kwargs: dict) -> None:
    gen_config = kwargs.get("generation_config") or model.generation_config
    num_beams = kwargs.get("num_beams", getattr(gen_config, "num_beams", 1)) or 1
    if num_beams > 1:
        raise ValueError(f"early_exit supports greedy search and sampling, not beam search (num_beams={num_beams}): "
                         "pass num_beams=1.")
    if kwargs.get("assistant_model") is not None:
        raise ValueError("early_exit cannot be combined with assistant_model: use "
                         "early_exit=hf_safe_exit.BiLD(small_model, ...) for big-little speculative decoding.")
    if kwargs.get("synced_gpus"):
        raise NotImplementedError("early_exit does not support synced_gpus=True (DeepSpeed ZeRO-3 / FSDP) yet.")
    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.get(flag) or getattr(gen_config, flag, False):
            raise ValueError(f"{flag}=True is not available with early_exit (tokens exit at different depths, so "
                             "per-layer tuples are ragged); use return_dict_in_generate=True for exit layers and "
                             "confidences, or output_logits=True for the exit layers' logits.")


def generate(model, inputs=None, *, early_exit, **kwargs):
    """``model.generate(inputs, **kwargs)`` with per-token early exit decided by ``early_exit``.

    Accepts every ``generate`` argument HF accepts for greedy search and sampling
    (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
    ``eos_token_id``, ``pad_token_id``, ``stopping_criteria``, ``logits_processor``,
    ``generation_config``, ``streamer``, ``return_dict_in_generate``, ``output_scores``,
    ``output_logits``, ...). Returns the sequences like HF or, with
    ``return_dict_in_generate=True``, an :class:`~hf_safe_exit.decoding.EarlyExitGenerateOutput`
    that also carries exit layers and confidences.
    """
    check_supported_model(model)
    decode = getattr(early_exit, "decode", None)
    if callable(decode):
        if inputs is not None:
            kwargs["input_ids"] = inputs
        return decode(model, **kwargs)
    if not isinstance(early_exit, EarlyExitPolicy):
        raise TypeError(
            f"early_exit must be an early-exit policy (hf_safe_exit.EarlyExit, hf_safe_exit.RiskControlled, or any "
            f"object with bind(model)) or a decoding strategy with decode(model, **kwargs); got {type(early_exit)!r}."
        )
    policy = early_exit.bind(model)
    if callable(getattr(policy, "decode", None)):
        # e.g. a RiskControlled fitted on a BiLD loss table binds to a calibrated BiLD strategy
        return generate(model, inputs, early_exit=policy, **kwargs)
    _check_generation_options(model, kwargs)
    streamer = kwargs.pop("streamer", None)
    # Stock generate sizes the decoder cache by the encoder depth; hand it one sized by the decoder.
    if kwargs.get("past_key_values") is None:
        kwargs["past_key_values"] = new_decoder_cache(model)
    return GenerationMixin.generate(
        model,
        inputs,
        custom_generate=early_exit_decode,
        early_exit_policy=policy,
        early_exit_streamer=streamer,
        **kwargs,
    )


def is_enabled(model) -> bool:
    return getattr(model, "_hf_safe_exit_generate", None) is not None


def enable(model):
    """Let ``model.generate`` accept ``early_exit=``; returns the same model object.

    Only this instance is changed: ``model.generate(...)`` without ``early_exit``
    (or with ``early_exit=None``) is HF's own ``generate``, untouched. Calling
    ``enable`` twice is a no-op. Raises ``TypeError`` for unsupported models.
    """
    check_supported_model(model)
    if is_enabled(model):
        return model
    hf_generate = model.generate

    @functools.wraps(hf_generate)
    def generate_with_early_exit(*args, early_exit=None, **kwargs):
        if early_exit is None:
            return hf_generate(*args, **kwargs)
        return generate(model, *args, early_exit=early_exit, **kwargs)

    model.generate = generate_with_early_exit
    model._hf_safe_exit_generate = generate_with_early_exit
    return model
