"""hf_safe_exit.compat answers with the names the installed transformers actually uses."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
from transformers import MT5ForConditionalGeneration, T5Config, T5ForConditionalGeneration
from transformers.generation.utils import GenerateEncoderDecoderOutput, GenerationMixin
from transformers.modeling_outputs import Seq2SeqLMOutput

from hf_safe_exit.compat import CACHE_NAMES, cache_field, cache_kwarg, cache_kwargs, find_cache
from hf_safe_exit.decoding import new_decoder_cache


def _tiny():
    cfg = T5Config(vocab_size=30, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=2, num_heads=2,
                   decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("cls", [T5ForConditionalGeneration, MT5ForConditionalGeneration])
def test_forward_name_is_in_the_forward_signature(cls):
    name = cache_kwarg(cls)
    assert name in CACHE_NAMES and name in inspect.signature(cls.forward).parameters


def test_generate_name_is_what_generate_hands_to_the_forward():
    assert cache_kwarg() in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    assert cache_kwarg(GenerationMixin.generate) == cache_kwarg()  # takes the cache through **kwargs
    assert cache_kwarg(_tiny()) == cache_kwarg(T5ForConditionalGeneration)


def test_instances_bound_methods_and_partials():
    model = _tiny()
    assert cache_kwarg(model) == cache_kwarg(model.forward) == cache_kwarg(T5ForConditionalGeneration.forward)
    assert cache_kwarg(functools.partial(T5ForConditionalGeneration.forward, model)) == cache_kwarg(model)

    def old_style(x, past_key_values=None):
        return x

    def new_style(x, cache=None):
        return x

    assert cache_kwarg(old_style) == "past_key_values" and cache_kwarg(new_style) == "cache"
    assert cache_kwargs(1, new_style) == {"cache": 1}
    with pytest.raises(TypeError):
        cache_kwarg(object())


def test_find_cache_and_cache_field():
    model = _tiny()
    cache = new_decoder_cache(model)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=ids[:, :1], use_cache=True, **cache_kwargs(cache, model))
    assert find_cache(out) is cache
    assert find_cache(Seq2SeqLMOutput(logits=out.logits)) is None
    assert find_cache({"past_key_values": cache}) is cache and find_cache({"cache": cache}) is cache
    assert find_cache({}, default=0) == 0
    field = cache_field(GenerateEncoderDecoderOutput)
    assert field == cache_field(Seq2SeqLMOutput) and find_cache(GenerateEncoderDecoderOutput(sequences=ids, **{field: cache})) is cache
