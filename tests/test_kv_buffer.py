"""PreallocatedLayer behaves exactly like HF's own DynamicLayer (the reference), whatever HF does to a cache layer.

Every test drives both layers through the same sequence of operations and compares ``keys`` / ``values`` and the
tensors ``update`` returns bit for bit; then ``generate`` with early exit returns a cache whose contents equal
HF's own ``generate`` cache at λ = 1.
"""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

import hf_safe_exit
from hf_safe_exit import ForcedExit
from hf_safe_exit.decoding.early_exit_loop import new_decoder_cache
from hf_safe_exit.decoding.kv_buffer import PreallocatedLayer
from hf_safe_exit.compat import cache_field, cache_kwargs
from tiny_t5 import random_t5

B, H, D = 3, 2, 4


def kv(n: int, gen: torch.Generator, batch: int = B):
    return torch.randn(batch, H, n, D, generator=gen), torch.randn(batch, H, n, D, generator=gen)


def same(ours, ref, returned=None):
    assert ours.get_seq_length() == ref.get_seq_length()
    assert torch.equal(ours.keys, ref.keys) and torch.equal(ours.values, ref.values)
    if returned is not None:
        assert torch.equal(returned[0], ref.keys) and torch.equal(returned[1], ref.values)


@pytest.mark.parametrize("capacity", [1, 3, 64])
def test_appends_equal_concatenation_through_growth(capacity):
    gen = torch.Generator().manual_seed(0)
    ours, ref = PreallocatedLayer(capacity), DynamicLayer()
    for n in (2, 1, 1, 5, 1, 1, 7):  # a prompt, single tokens, chunks: past the capacity more than once
        k, v = kv(n, gen)
        returned = ours.update(k, v)
        ref.update(k.clone(), v.clone())
        same(ours, ref, returned)


def test_crop_then_append_overwrites_the_cropped_positions():
    gen = torch.Generator().manual_seed(1)
    ours, ref = PreallocatedLayer(16), DynamicLayer()
    for step, n in enumerate((4, 1, 1, 1)):
        k, v = kv(n, gen)
        ours.update(k, v), ref.update(k, v)
    ours.crop(-3), ref.crop(-3)
    same(ours, ref)
    for n in (1, 2):
        k, v = kv(n, gen)
        returned = ours.update(k, v)
        ref.update(k, v)
        same(ours, ref, returned)


@pytest.mark.parametrize("operation", ["batch_select_indices", "reorder_cache", "batch_repeat_interleave", "reset"])
def test_operations_that_replace_the_tensors(operation):
    gen = torch.Generator().manual_seed(2)
    ours, ref = PreallocatedLayer(8), DynamicLayer()
    k, v = kv(5, gen)
    ours.update(k, v), ref.update(k, v)
    arg = {"batch_select_indices": torch.tensor([2, 0]), "reorder_cache": torch.tensor([1, 1, 0]),
           "batch_repeat_interleave": 2, "reset": None}[operation]
    for layer in (ours, ref):
        getattr(layer, operation)(*(() if arg is None else (arg,)))
    batch = {"batch_select_indices": 2, "batch_repeat_interleave": 2 * B}.get(operation, B)
    if operation != "reset":
        same(ours, ref)
    for n in (1, 1, 9):  # the next appends start from the new tensors (and outgrow the capacity)
        k, v = kv(n, gen, batch)
        returned = ours.update(k, v)
        ref.update(k, v)
        same(ours, ref, returned)


def test_returned_tensors_are_views_of_one_buffer():
    # the point of the layer: an append writes in place instead of copying the cache
    gen = torch.Generator().manual_seed(3)
    layer = PreallocatedLayer(10)
    first = layer.update(*kv(2, gen))[0]
    second = layer.update(*kv(1, gen))[0]
    assert first.data_ptr() == second.data_ptr() and second.shape[2] == 3


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity >= 1, got 0"):
        PreallocatedLayer(0)


def test_generate_returns_hf_cache_contents_at_full_depth():
    # every token through every layer of our loop (ForcedExit(L): λ = 1 itself runs HF's own loop and cache)
    model = hf_safe_exit.enable(random_t5(seed=5))
    ids = torch.randint(2, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    kw = dict(input_ids=ids, max_new_tokens=9, min_new_tokens=9, do_sample=False, return_dict_in_generate=True)
    ref = type(model).generate(model, **kw, **cache_kwargs(new_decoder_cache(model)))
    ours = model.generate(**kw, early_exit=ForcedExit(model.config.num_decoder_layers))
    assert torch.equal(ours.sequences, ref.sequences)
    ref_cache, our_cache = getattr(ref, cache_field(type(ref))), getattr(ours, cache_field(type(ours)))
    for ref_layer, our_layer in zip(ref_cache.self_attention_cache.layers, our_cache.self_attention_cache.layers,
                                    strict=True):
        assert isinstance(our_layer, PreallocatedLayer)
        torch.testing.assert_close(our_layer.keys, ref_layer.keys, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(our_layer.values, ref_layer.values, rtol=1e-6, atol=1e-6)
