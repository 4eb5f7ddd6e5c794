"""The model fingerprint is computed once per model and weights, and again after any change of a weight."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_safe_exit import fingerprint as fp
from tiny_t5 import random_t5


@pytest.fixture
def computed(monkeypatch):
    calls = []
    real = fp._compute
    monkeypatch.setattr(fp, "_compute", lambda model: calls.append(id(model)) or real(model))
    fp.clear_fingerprint_cache()
    return calls


def _uncached(model) -> str:
    fp.clear_fingerprint_cache()
    try:
        return fp.model_fingerprint(model)
    finally:
        fp.clear_fingerprint_cache()


def test_unchanged_weights_are_hashed_once(computed):
    model = random_t5(seed=1)
    first = fp.model_fingerprint(model)
    assert [fp.model_fingerprint(model) for _ in range(5)] == [first] * 5
    assert len(computed) == 1


@pytest.mark.parametrize("change", [
    lambda m: m.lm_head.weight[3].add_(1.0),                                        # in place, a few values
    lambda m: setattr(m.decoder.block[0].layer[0].SelfAttention.q.weight, "data",
                      torch.randn_like(m.decoder.block[0].layer[0].SelfAttention.q.weight)),  # new storage
    lambda m: m.load_state_dict(random_t5(seed=2).state_dict()),                    # another checkpoint's weights
    lambda m: torch.nn.init.zeros_(m.shared.weight),
], ids=["add_", "data=", "load_state_dict", "init"])
def test_any_weight_change_recomputes(change, computed):
    model = random_t5(seed=1)
    before = fp.model_fingerprint(model)
    with torch.no_grad():
        change(model)
    after = fp.model_fingerprint(model)
    assert len(computed) == 2
    assert after == _uncached(model)  # the cache returns what a fresh computation gives
    assert after != before  # every value is hashed: any of these changes is seen


def test_copies_and_other_models_have_their_own_entries(computed):
    model = random_t5(seed=1)
    clone = copy.deepcopy(model)
    assert fp.model_fingerprint(model) == fp.model_fingerprint(clone)
    assert fp.model_fingerprint(random_t5(seed=3)) != fp.model_fingerprint(model)
    assert len(computed) == 3
    import gc

    entries = len(fp._CACHE)
    del clone
    gc.collect()
    assert len(fp._CACHE) == entries - 1  # weak keys: an entry goes with its model


def test_the_meta_head_is_not_part_of_it(computed):
    from hf_safe_exit import MetaClassifierHead, MetaHeadConfig

    model = random_t5(seed=1)
    before = fp.model_fingerprint(model)
    model.meta_head = MetaClassifierHead(MetaHeadConfig(d_model=model.config.d_model))
    assert fp.model_fingerprint(model) == before


def test_a_write_through_data_needs_the_cache_cleared(computed):
    # ``.data`` is a tensor with its own version counter (autograd's documented escape hatch), so a write through it
    # is invisible to the key: the module docstring says to call clear_fingerprint_cache() after one
    model = random_t5(seed=1)
    first = fp.model_fingerprint(model)
    model.lm_head.weight.data.mul_(0.5)
    assert fp.model_fingerprint(model) == first and len(computed) == 1  # the stale value, as documented
    fp.clear_fingerprint_cache()
    assert fp.model_fingerprint(model) == _uncached(model) != first



def test_a_model_made_in_inference_mode_is_fingerprinted_uncached(computed):
    with torch.inference_mode():
        model = random_t5(seed=1)
    assert fp.model_fingerprint(model) == fp.model_fingerprint(model)
    assert len(computed) == 2  # no version counters to key on: computed each time
