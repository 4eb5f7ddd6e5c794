"""``generate(..., early_exit=...)`` for HuggingFace T5 models.

Two functions:

* :func:`generate` is the engine: ``generate(model, **inputs, early_exit=..., ...)`` decodes with
  per-token early exit. ``early_exit`` is a configuration at a threshold (``EarlyExit``, or any policy with
  ``bind(model)``, see :mod:`hf_safe_exit.policy`), which runs through HF's ``custom_generate`` hook (HF prepares
  the encoder pass, the generation config, logits processors and stopping criteria as usual); a
  ``RiskControlled``, which resolves to one (or to a calibrated BiLD); or a
  :class:`~hf_safe_exit.decoding.bild.BiLD`, whose own loop is called directly.
* :func:`model_generate` is what an early-exit model's ``generate`` is (:func:`hf_safe_exit.enable`
  installs it on an instance, and ``from_pretrained(..., trust_remote_code=True)`` on a folder with
  ``custom_generate/generate.py`` installs the same function, see :mod:`hf_safe_exit.decoding.enable`):
  with ``early_exit=`` it calls :func:`generate`; without it, the policy stored on the generation
  config (``generation_config.early_exit``) if there is one; else HF's own ``generate``, untouched.
"""

from __future__ import annotations

import copy

from transformers import GenerationMixin
from transformers.generation.stopping_criteria import StopStringCriteria, StoppingCriteriaList

from ..compat import CACHE_NAMES, cache_kwarg, find_cache
from ..config import EarlyExitConfig
from ..monitor import RiskMonitor
from ..policy import EarlyExit, EarlyExitPolicy
from ..risk.controlled import RiskControlled
from .bild import BiLD
from .calibrated_lengths import apply_calibrated_lengths
from .early_exit_loop import EarlyExitGenerateOutput, early_exit_decode, new_decoder_cache
from .full_model import full_model_generate
from .modes import check_generation_mode
from .readout import check_supported_model
from .saving import switch_on_saving
from .stored_policy import check_saved_generation_config, policy_from_config

__all__ = ["generate", "model_generate"]


def model_generate(*args, model, early_exit=None, **kwargs):
    """An early-exit model's ``generate``: HF's ``generate`` plus the ``early_exit=`` keyword.

    ``early_exit``: a policy (``hf_safe_exit.EarlyExit(...)``, ``hf_safe_exit.RiskControlled(eps=...)``) or a
    decoding strategy (``hf_safe_exit.BiLD(...)``); ``None`` (default) uses the policy stored as
    ``generation_config.early_exit`` (the call's ``generation_config=`` first, then the model's), if any;
    ``False`` runs HF's own ``generate`` even when a policy is stored. ``model`` is keyword-only so that this
    function works both as ``functools.partial(model_generate, model=m)`` and as HF's ``custom_generate``.
    A model loaded with ``trust_remote_code`` gets its saving switched on here, at its first call
    (:mod:`hf_safe_exit.decoding.enable`).
    """
    switch_on_saving(model)
    if early_exit is None:  # the call's generation config first; HF merges the model's custom entries into it too
        call_config = kwargs.get("generation_config")
        early_exit = policy_from_config(call_config) if call_config is not None else None
        if early_exit is None:
            check_saved_generation_config(model)  # an unreadable file would drop its policy without a word
            early_exit = policy_from_config(model.generation_config)
    if early_exit is None or early_exit is False:
        return type(model).generate(model, *args, **kwargs)
    return generate(model, *args, early_exit=early_exit, **kwargs)


def generate(model, inputs=None, *, early_exit, **kwargs):
    """``model.generate(inputs, **kwargs)`` with per-token early exit decided by ``early_exit``.

    ``early_exit`` is an early-exit configuration at a threshold (:class:`~hf_safe_exit.EarlyExit`, or any policy
    with ``bind(model)``, e.g. :class:`~hf_safe_exit.ForcedExit`), a risk-controlled request
    (:class:`~hf_safe_exit.RiskControlled`: λ̂ fitted from its calibration or the model's stored one), or BiLD
    (:class:`~hf_safe_exit.BiLD`, which runs its own loop), or a :class:`~hf_safe_exit.RiskMonitor` (its policy,
    watched on live traffic: :mod:`hf_safe_exit.monitor`).

    Accepts every ``generate`` argument HF accepts for greedy search and sampling
    (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
    ``eos_token_id``, ``pad_token_id``, ``stopping_criteria``, ``stop_strings`` with ``tokenizer``,
    ``logits_processor``, ``generation_config``, ``streamer``, ``decoder_input_ids``, ``return_dict_in_generate``,
    ``output_scores``, ``output_logits``, ...); other generation modes raise
    :class:`~hf_safe_exit.decoding.modes.UnsupportedGenerationModeError`. Returns the sequences like HF
    or, with ``return_dict_in_generate=True``, an :class:`EarlyExitGenerateOutput` that also carries exit
    layers, confidences, the bound policy that ran (``early_exit``: its ``threshold`` is λ̂) and its
    ``certificate`` (a :class:`~hf_safe_exit.risk.RiskCertificate` when risk control chose λ̂).

    A policy calibrated with recorded lengths decodes with the calibration's ``max_new_tokens`` unless the call
    sets a length, and warns when the call departs from them (see :mod:`hf_safe_exit.decoding.calibrated_lengths`).
    """
    check_supported_model(model)
    _check_not_empty(inputs, kwargs)
    if isinstance(early_exit, RiskMonitor):  # it decodes with its policy through this function, and monitors
        return early_exit.generate(model, inputs, decode=generate, **kwargs)
    certificate = None
    if isinstance(early_exit, RiskControlled):
        calibration, early_exit = early_exit.policy_for(model)  # an EarlyExit at λ̂ (bound below, once), or a BiLD
        certificate = calibration.certificate  # BiLD's too: its lengths apply below
    if isinstance(early_exit, BiLD):
        if inputs is not None:
            kwargs["input_ids"] = inputs
        # a calibrated BiLD decodes with the calibration's lengths
        apply_calibrated_lengths(model, certificate, None, kwargs)
        check_generation_mode(model, kwargs.get("generation_config"), {**kwargs, "assistant_model": None})
        return early_exit.decode(model, **kwargs)
    if isinstance(early_exit, EarlyExitConfig):
        raise TypeError("early_exit got an EarlyExitConfig, which has no threshold: pass EarlyExit(λ, config=...) or "
                        "RiskControlled(eps, config=...).")
    if not isinstance(early_exit, EarlyExitPolicy):
        raise TypeError(
            f"early_exit must be an early-exit policy (hf_safe_exit.EarlyExit, hf_safe_exit.RiskControlled, "
            f"hf_safe_exit.ForcedExit or any object with bind(model)) or hf_safe_exit.BiLD; got {type(early_exit)!r}.")
    policy = early_exit.bind(model)
    check_generation_mode(model, kwargs.get("generation_config"), kwargs)
    apply_calibrated_lengths(model, getattr(policy, "certificate", None), inputs, kwargs)
    _stop_strings_as_criterion(kwargs)
    if isinstance(policy, EarlyExit) and policy.is_full_model:
        # λ = 1: HF's own loop, so the full model is HF's generate to the bit (see decoding/full_model.py)
        out = full_model_generate(model, inputs, kwargs)
    else:
        out = _early_exit_generate(model, inputs, policy, kwargs)
    if isinstance(out, EarlyExitGenerateOutput):
        out.early_exit = policy
        out.certificate = getattr(policy, "certificate", None)
    return out


def _check_not_empty(inputs, kwargs: dict) -> None:
    """A batch of 0 rows has nothing to decode: one clear error rather than a tensor error deep inside."""
    for given in (inputs, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if hasattr(given, "shape") and len(given.shape) >= 1 and given.shape[0] == 0:
            raise ValueError(f"generate got an empty batch (inputs of shape {tuple(given.shape)}): pass at least "
                             "one row.")


def _stop_strings_as_criterion(kwargs: dict) -> None:
    """Move ``stop_strings`` (the call's, or its ``generation_config``'s) into ``stopping_criteria``, in place.

    Why: HF's ``generate`` hands a ``custom_generate`` callable's extra keywords over instead of its own mode
    keywords, so the ``tokenizer`` that HF needs to build the stop-string criterion is dropped and it raises. The
    criterion built here is the one HF would build (``StopStringCriteria(tokenizer, stop_strings)``); the order of
    the criteria does not matter (HF ORs them).
    """
    stop = kwargs.pop("stop_strings", None)
    config = kwargs.get("generation_config")
    if stop is None and config is not None and getattr(config, "stop_strings", None) is not None:
        config = copy.deepcopy(config)
        stop, config.stop_strings = config.stop_strings, None
        kwargs["generation_config"] = config
    if stop is None:
        return
    tokenizer = kwargs.pop("tokenizer", None)
    if tokenizer is None:
        raise ValueError("stop_strings needs the model's tokenizer: pass tokenizer=... to generate, as HF requires.")
    kwargs["stopping_criteria"] = StoppingCriteriaList(
        [*(kwargs.get("stopping_criteria") or []), StopStringCriteria(tokenizer=tokenizer, stop_strings=stop)])


def _early_exit_generate(model, inputs, policy, kwargs: dict):
    """HF's ``generate`` with our layer-by-layer loop (:func:`early_exit_decode`) as its decoding method."""
    streamer = kwargs.pop("streamer", None)
    # Stock generate sizes the decoder cache by the encoder depth; hand it one sized by the decoder, under the
    # keyword this transformers release takes (a user's cache passed under the old name is moved, not warned about).
    cache = find_cache(kwargs)
    for name in CACHE_NAMES:
        kwargs.pop(name, None)
    kwargs[cache_kwarg()] = cache if cache is not None else new_decoder_cache(model)
    # a cache the caller passed is theirs after the call: no K/V may be left pending in it (deferred_kv)
    return GenerationMixin.generate(model, inputs, custom_generate=early_exit_decode, early_exit_policy=policy,
                                    early_exit_streamer=streamer, early_exit_complete_cache=cache is not None,
                                    **kwargs)
