"""λ = 1 is HF's ``generate``: a policy that can never exit decodes through HF's own loop.

Why not our layer-by-layer loop with a threshold that never triggers: its arithmetic is HF's only up to
rounding in three places (rows that finished run in a smaller product than HF's full batch; a decoder
prompt is prefilled in two forwards instead of one; a finished row's logits are not computed at all), and
at a float tie (two logits equal to the last bits) rounding changes a token. The full model is the
reference every risk guarantee is stated against (l(λ) − l(1)), so it must be HF's output to the bit.

So a policy that can never exit (:attr:`hf_safe_exit.EarlyExit.is_full_model`) runs
``GenerationMixin.generate`` with HF's own decoding method for the mode (``_sample``, greedy or sampling),
called through ``custom_generate`` only to watch the stopping criteria: they decide which generated
tokens are real (every real token "exits" at the last layer) and which are padding after a row finished.
Sequences, scores, logits, streamer output and the cache are what HF's ``generate`` returns, bit for bit,
for every batch, dtype, finished row and decoder prompt. Two things are added: the early-exit fields of
:class:`~hf_safe_exit.decoding.early_exit_loop.EarlyExitGenerateOutput` (``return_dict_in_generate=True``),
and, when the decoder is deeper than the encoder and the call uses a cache HF would build, a cache sized by the
decoder (stock ``generate`` sizes it by the encoder and fails with ``IndexError`` there; the arithmetic is
unchanged). "Every case" means every call early exit accepts (greedy search and sampling: :mod:`.modes`).
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import GenerationMixin
from transformers.generation.stopping_criteria import StoppingCriteriaList

from ..compat import CACHE_NAMES, cache_kwarg, find_cache
from .early_exit_loop import EarlyExitGenerateOutput, exit_fields, new_decoder_cache

__all__ = ["full_model_generate"]


class _RecordingCriteria(StoppingCriteriaList):
    """HF's stopping criteria, unchanged, that also keep each step's ``is_done`` (HF calls them once per step)."""

    def __init__(self, criteria, record: list):
        super().__init__(criteria)
        self.record = record

    def __call__(self, input_ids, scores, **kwargs):
        is_done = super().__call__(input_ids, scores, **kwargs)
        self.record.append(is_done)
        return is_done


def _hf_decode(model, input_ids, logits_processor, stopping_criteria, generation_config, full_model_record=None,
               full_model_streamer=None, **model_kwargs):
    # HF's generate hands a custom_generate callable exactly what it hands its own decoding method, except the
    # streamer (it has already put the prompt into it): ours comes back under another name.
    full_model_record["prompt_length"] = input_ids.shape[1]
    criteria = _RecordingCriteria(stopping_criteria, full_model_record["is_done"])
    # greedy search and sampling are both GenerationMixin._sample in transformers 5 (the modes early exit allows)
    return type(model)._sample(model, input_ids, logits_processor=logits_processor, stopping_criteria=criteria,
                               generation_config=generation_config, streamer=full_model_streamer, **model_kwargs)


def _early_exit_fields(sequences: torch.Tensor, record: dict, num_layers: int) -> dict:
    """Exit layers (the last layer for every real token, 0 at padding), NaN confidences, means: as the loop sets
    them, where a token is real iff its row was unfinished before the step that made it."""
    new = sequences.shape[1] - record["prompt_length"]
    batch = sequences.shape[0]
    done = record["is_done"][:new]  # a deferred stop check (transformers >= 5.25, some devices) may record steps
    # that HF then undoes
    finished = torch.zeros(batch, dtype=torch.bool, device=sequences.device)
    real = []
    for is_done in done:
        real.append(~finished)
        finished = finished | is_done.to(finished.device)
    real_t = torch.stack(real, dim=1) if real else torch.zeros((batch, 0), dtype=torch.bool, device=sequences.device)
    exit_layers = real_t.long() * num_layers
    return exit_fields(exit_layers, torch.full(exit_layers.shape, float("nan"), device=sequences.device), num_layers)


def _builds_cache(model, kwargs: dict) -> bool:
    """Whether HF's ``generate`` would build a dynamic cache of its own for this call (none passed, caching on, no
    ``cache_implementation``): only then is a decoder-sized one handed over instead."""
    if find_cache(kwargs) is not None:
        return False
    configs = [kwargs, kwargs.get("generation_config"), model.generation_config]

    def setting(name, default):
        for c in configs:
            value = c.get(name) if isinstance(c, dict) else getattr(c, name, None)
            if value is not None:
                return value
        return default

    return bool(setting("use_cache", True)) and setting("cache_implementation", None) is None


def full_model_generate(model, inputs, kwargs: dict):
    """HF's ``generate(inputs, **kwargs)``, bit for bit; with ``return_dict_in_generate`` its output becomes an
    :class:`EarlyExitGenerateOutput` (every real token at the last layer). ``kwargs`` must hold no policy."""
    kwargs = dict(kwargs)
    config = model.config
    if _builds_cache(model, kwargs) and config.num_decoder_layers != config.num_layers:
        for name in CACHE_NAMES:
            kwargs.pop(name, None)
        kwargs[cache_kwarg()] = new_decoder_cache(model)
    record: dict = {"is_done": []}
    out = GenerationMixin.generate(model, inputs, custom_generate=_hf_decode, full_model_record=record,
                                   full_model_streamer=kwargs.get("streamer"), **kwargs)
    if isinstance(out, torch.Tensor):
        return out
    fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    return EarlyExitGenerateOutput(**fields, **_early_exit_fields(out.sequences, record, config.num_decoder_layers))
