"""Which of HF's generation modes early exit runs, and a typed refusal of the others.

Early exit replaces the model forward of HF's greedy search and multinomial sampling
(``GenerationMixin._sample``) with a layer-by-layer loop. Every other mode HF offers either runs
its own forwards (contrastive search, DoLa, assisted and prompt-lookup decoding, beam searches,
classifier-free guidance, continuous batching) or needs per-layer outputs that tokens exiting at
different depths do not have. Running such a call greedily instead would silently change the
output, so each is refused here, in one line that names what is supported.
"""

from __future__ import annotations

import copy

__all__ = ["UnsupportedGenerationModeError", "SUPPORTED_MODES", "check_generation_mode"]

SUPPORTED_MODES = ("greedy_search", "sample")
_SUPPORTED = ("early_exit supports greedy search and multinomial sampling (do_sample=True with temperature, top_k, "
              "top_p, logits processors and stopping criteria)")


class UnsupportedGenerationModeError(ValueError):
    """``generate(..., early_exit=...)`` was asked for a generation mode early exit does not implement."""


def _refuse(what: str, fix: str) -> UnsupportedGenerationModeError:
    return UnsupportedGenerationModeError(f"{what} is not available with early_exit: {_SUPPORTED}; {fix}.")


def check_generation_mode(model, generation_config, kwargs: dict) -> str:
    """Raise :class:`UnsupportedGenerationModeError` unless the call is greedy search or sampling; return the mode.

    ``kwargs`` are the ``generate`` keywords (they override ``generation_config``, as in HF).
    """
    if kwargs.get("custom_generate") is not None:
        raise _refuse("custom_generate", "early_exit is itself a decoding loop: drop one of the two")
    if kwargs.get("assistant_model") is not None:
        raise _refuse("assisted decoding (assistant_model)", "for big-little speculative decoding use "
                      "early_exit=hf_safe_exit.BiLD(small_model, ...)")
    if kwargs.get("synced_gpus"):
        raise _refuse("synced_gpus=True (DeepSpeed ZeRO-3 / FSDP)", "generate on one process per model copy")
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    if generation_config is not None:  # HF fills what the call's config leaves unset from the model's (e.g. num_beams)
        for key, value in model.generation_config.to_dict().items():
            if value is not None and hasattr(config, key) and getattr(config, key) is None:
                setattr(config, key, value)
    for key, value in kwargs.items():  # setattr, not update(): HF validates (and warns) again when it runs
        if hasattr(config, key):
            setattr(config, key, value)
    if getattr(config, "cache_implementation", None) not in (None, "dynamic"):
        raise _refuse(f"cache_implementation={config.cache_implementation!r}",
                      "drop it (early exit fills its own dynamic cache)")
    if getattr(config, "guidance_scale", None) not in (None, 1, 1.0):
        raise _refuse(f"classifier-free guidance (guidance_scale={config.guidance_scale!r})", "drop guidance_scale")
    for flag in ("output_attentions", "output_hidden_states"):
        if getattr(config, flag, False):
            raise _refuse(f"{flag}=True", "tokens exit at different depths, so per-layer tuples are ragged; use "
                          "return_dict_in_generate=True for exit layers and confidences, or output_logits=True")
    for name, what in (("prompt_lookup_num_tokens", "prompt-lookup decoding"),
                       ("assistant_early_exit", "self-speculative decoding (assistant_early_exit)"),
                       ("use_mtp", "multi-token-prediction decoding (use_mtp)"),
                       ("dola_layers", "DoLa decoding (dola_layers)")):
        if getattr(config, name, None) not in (None, False):
            raise _refuse(f"{what}", f"drop {name}")
    mode = str(getattr(config.get_generation_mode(), "value", config.get_generation_mode()))
    if mode not in SUPPORTED_MODES:
        fixes = {"contrastive_search": "drop penalty_alpha (or set top_k=1)",
                 "constrained_beam_search": "drop constraints / force_words_ids",
                 "group_beam_search": "pass num_beams=1", "beam_search": "pass num_beams=1",
                 "beam_sample": "pass num_beams=1"}
        raise _refuse(mode.replace("_", " ") + f" (num_beams={config.num_beams})" * mode.startswith(("beam", "group")),
                      fixes.get(mode, "use greedy search or sampling"))
    return mode
