"""Deferred state propagation (issue 27): a skipped layer's keys and values are computed when a later token reads
them (any row running that layer fills it for the whole batch), in one product per layer, and never when no token
does.

The checks poison every pending slot with NaN (``kv_buffer.PENDING_VALUE``) and wrap the fill's write so that it
refuses a slot that is not pending: a position read before it is filled shows as NaN logits, one filled twice (or
written directly and then filled) fails the write. Outputs are compared with the eager fills (``DEFER_FILLS =
False``, the path before) and with the independent no-cache reference, in float64.
"""

from __future__ import annotations

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

import hf_safe_exit
from hf_safe_exit import EarlyExit, ForcedExit, PoEConfig
from hf_safe_exit.decoding import dense_rows, early_exit_loop, kv_buffer
from no_cache_reference import reference_exit_logits

VOCAB, STEPS, LAYERS = 61, 9, 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(params=["row-wise", "dense"])
def step_kind(request, monkeypatch):
    if request.param == "dense":
        monkeypatch.setitem(dense_rows.DENSE_ROWS, "cpu", True)
    return request.param


@pytest.fixture
def watched(monkeypatch):
    """Pending slots hold NaN; every fill must find its slot pending; the fills' sizes are recorded per layer."""
    monkeypatch.setattr(kv_buffer, "PENDING_VALUE", float("nan"))
    real_write, fills = kv_buffer.PreallocatedLayer.write_range, []

    def write_range(layer, start, keys, values):
        stop = start + keys.shape[2]
        assert stop <= layer.keys.shape[2], "a fill past the cache's end"
        for buffer in (layer.keys, layer.values):
            assert torch.isnan(buffer[:, :, start:stop]).all(), \
                "a K/V slot was filled that is not pending (filled twice, or written)"
        fills.append((id(layer), stop - start))
        real_write(layer, start, keys, values)

    monkeypatch.setattr(kv_buffer.PreallocatedLayer, "write_range", write_range)
    return fills


def _model(dtype=torch.float64):
    torch.manual_seed(3)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, num_decoder_layers=LAYERS,
                   decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, initializer_factor=2.0,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    return hf_safe_exit.enable(T5ForConditionalGeneration(cfg).eval().to(dtype))


def _batch(rows=5):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, VOCAB, (rows, 9), generator=g)
    mask = (torch.arange(9)[None, :] < torch.tensor([9, 4, 7, 9, 6][:rows])[:, None]).long()
    return ids * mask, mask


def _table(rows=5):
    """Exit layers per (row, step): mostly shallow, with deep tokens now and then (pending positions pile up, then
    a deep token reads them), and rows at different layers at every step."""
    g = torch.Generator().manual_seed(11)
    table = torch.randint(1, 3, (rows, STEPS), generator=g)
    table[torch.arange(rows), torch.arange(rows) % STEPS + 3] = LAYERS
    table[0, -1], table[2, 1] = 3, LAYERS
    return table


def _generate(model, ids, mask, policy, defer: bool, monkeypatch, **kwargs):
    monkeypatch.setattr(early_exit_loop, "DEFER_FILLS", defer)
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, early_exit=policy,
                          return_dict_in_generate=True, output_logits=True, **kwargs)


def _assert_same(out, eager, tol=1e-10):
    assert torch.equal(out.sequences, eager.sequences) and torch.equal(out.exit_layers, eager.exit_layers)
    logits, ref = torch.stack(out.logits, 1), torch.stack(eager.logits, 1)
    assert not logits.isnan().any()
    assert (logits - ref).abs().max().item() < tol
    for ours, theirs in zip(out.past_key_values.self_attention_cache.layers,
                            eager.past_key_values.self_attention_cache.layers):  # the cache handed back is complete
        assert not ours.keys.isnan().any() and not ours.values.isnan().any()
        assert (ours.keys - theirs.keys).abs().max().item() < tol
        assert (ours.values - theirs.values).abs().max().item() < tol


# thresholds at which the random tiny model's rows exit at different layers (some positions pending, some read)
MEASURES = {"softmax": 0.999, "softmax_shortlist": 0.999, "saturation": 0.6, "meta": 0.5}


@pytest.mark.parametrize("case", ["forced", *(f"measure-{m}" for m in MEASURES), "finishing-rows", "decoder-prompt",
                                  "poe"])
def test_deferred_fills_equal_the_eager_ones_and_the_reference(case, step_kind, watched, monkeypatch):
    if case == "poe" and step_kind == "dense":
        pytest.skip("PoE anytime predictions run the row-wise step only")
    model = _model()
    ids, mask = _batch()
    kwargs, prompt_len = {}, 1
    if case == "forced":
        policy = ForcedExit(_table())
    elif case.startswith("measure-"):
        measure = case.removeprefix("measure-")
        if measure == "meta":
            from hf_safe_exit.confidence import MetaClassifierHead, MetaHeadConfig

            torch.manual_seed(0)
            model.meta_head = MetaClassifierHead(MetaHeadConfig(d_model=32)).eval().to(torch.float64)
        policy = EarlyExit(MEASURES[measure], measure=measure)
    elif case == "finishing-rows":  # rows 2 and 5 reach EOS at different steps; their K/V then stay pending
        policy = EarlyExit(0.6, measure="saturation")
    elif case == "decoder-prompt":
        policy, prompt_len = ForcedExit(_table()), 3
        kwargs["decoder_input_ids"] = torch.tensor([[0, 7, 9]] * ids.shape[0])
    else:  # two rows that both exit below the last layer at most steps (a layer is pending when no row runs it)
        policy = EarlyExit(0.01, measure="softmax", anytime=PoEConfig())
        ids, mask = ids[[0, 3]], mask[[0, 3]]
    out = _generate(model, ids, mask, policy, True, monkeypatch, **kwargs)
    if case == "finishing-rows":
        assert (out.exit_layers == 0).any(1).sum() == 2
    assert watched, "nothing was deferred: the case does not test the deferred fills"
    _assert_same(out, _generate(model, ids, mask, policy, False, monkeypatch, **kwargs))
    if case != "poe":  # the logits of each token's exit layer, as the no-cache construction computes them
        L = model.config.num_decoder_layers
        layers = torch.cat([torch.full((ids.shape[0], prompt_len - 1), L), out.exit_layers.clamp(min=1)], dim=1)
        ref = reference_exit_logits(model, ids, mask, out.sequences, layers)[:, prompt_len - 1:]
        err = (ref - torch.stack(out.logits, 1)).abs()[out.exit_layers > 0].max().item()
        assert err < 1e-10, err


def _k_calls(model) -> list[list[int]]:
    """Per decoder layer, the number of rows of every call of its self-attention key projection."""
    calls = [[] for _ in model.decoder.block]
    for idx, block in enumerate(model.decoder.block):
        block.layer[0].SelfAttention.k.register_forward_hook(
            lambda mod, args, out, idx=idx: calls[idx].append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    return calls


def test_keys_and_values_no_token_reads_are_never_computed(step_kind, watched, monkeypatch):
    model = _model()
    calls = _k_calls(model)
    ids, mask = _batch(rows=1)
    monkeypatch.setattr(early_exit_loop, "DEFER_FILLS", True)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, early_exit=ForcedExit(2))
    assert [len(c) for c in calls] == [STEPS, STEPS, 0, 0] and not watched  # layers 3 and 4: nothing, ever
    calls[:] = [[] for _ in calls]
    # the cache handed back is completed: one product per skipped layer, over every position
    out = _generate(model, ids, mask, ForcedExit(2), True, monkeypatch)
    assert calls[2] == calls[3] == [STEPS] and len(watched) == 2
    eager = _generate(model, ids, mask, ForcedExit(2), False, monkeypatch)
    _assert_same(out, eager)


def test_with_use_cache_false_no_cache_is_returned_and_nothing_unread_is_filled(step_kind, watched, monkeypatch):
    """As HF's ``generate(use_cache=False)``, the output holds no cache; the loop still decodes with its own, so the
    tokens and logits are those of ``use_cache=True`` bit for bit, and the K/V no token read are never computed."""
    from hf_safe_exit.compat import find_cache

    model = _model()
    calls = _k_calls(model)
    ids, mask = _batch(rows=2)
    out = _generate(model, ids, mask, ForcedExit(2), True, monkeypatch, use_cache=False)
    assert find_cache(out) is None and calls[2] == calls[3] == [] and not watched
    cached = _generate(model, ids, mask, ForcedExit(2), True, monkeypatch)
    assert find_cache(cached) is not None and calls[2] == calls[3] == [2 * STEPS]  # handed back: completed
    assert torch.equal(out.sequences, cached.sequences) and torch.equal(out.exit_layers, cached.exit_layers)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, cached.logits))


def test_a_deep_token_fills_the_pending_positions_in_one_product(watched, monkeypatch):
    model = _model()
    calls = _k_calls(model)
    ids, mask = _batch(rows=1)
    table = torch.ones((1, STEPS), dtype=torch.long)
    table[0, 5] = LAYERS  # five shallow tokens, then one that runs every layer
    monkeypatch.setattr(early_exit_loop, "DEFER_FILLS", True)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, early_exit=ForcedExit(table))
    assert calls[0] == [1] * STEPS
    for idx in range(1, LAYERS):  # one product: the five pending positions and its own
        assert calls[idx] == [6], (idx, calls[idx])
    assert [n for _, n in watched] == [5] * (LAYERS - 1)


def test_in_a_batch_a_layer_one_row_runs_is_filled_for_every_row(step_kind, watched, monkeypatch):
    """Rows at different layers: where one row runs a layer, every row's K/V there come from that layer's one
    product (the weights are read anyway); a layer is left pending only at the steps where no row runs it."""
    model = _model()
    calls = _k_calls(model)
    ids, mask = _batch(rows=2)
    table = torch.ones((2, STEPS), dtype=torch.long)
    table[0, 3] = LAYERS  # steps 0-2: both rows at layer 1 (layers 2-4 pending); step 3: row 0 runs every layer
    table[1, 6] = 2       # step 6: row 1 runs layer 2 (pending there since step 4)
    out = _generate(model, ids, mask, ForcedExit(table), True, monkeypatch)
    assert out.exit_layers.tolist() == table.tolist()
    assert calls[0] == [2] * STEPS  # both rows' own K/V, every step
    # layer 2 at step 3: 2 rows x (3 pending + 1); at step 6: 2 x (2 pending + 1); the cache handed back: steps 7-8
    assert calls[1] == [8, 6, 4] and calls[2] == calls[3] == [8, 10]
    assert sorted(n for _, n in watched) == sorted([3, 2, 2, 3, 5, 3, 5])
    calls[:] = [[] for _ in calls]
    _assert_same(out, _generate(model, ids, mask, ForcedExit(table), False, monkeypatch))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_deferred_fills_match_the_eager_ones(dtype, step_kind, watched, monkeypatch):
    model = _model(dtype)
    ids, mask = _batch()
    out = _generate(model, ids, mask, ForcedExit(_table()), True, monkeypatch)
    eager = _generate(model, ids, mask, ForcedExit(_table()), False, monkeypatch)
    assert torch.equal(out.exit_layers, eager.exit_layers)
    # the same K/V up to matmul rounding in half precision; tokens may differ only after a near-tie
    logits, ref = torch.stack(out.logits, 1).float(), torch.stack(eager.logits, 1).float()
    assert not logits.isnan().any()
    first = (out.sequences != eager.sequences).any(0).nonzero()
    upto = int(first[0]) - 1 if first.numel() else logits.shape[1]
    assert (logits[:, :upto] - ref[:, :upto]).abs().max().item() < 0.1


def test_under_autocast_the_cache_keeps_one_dtype_and_does_not_regrow(monkeypatch):
    """A pending slot takes the dtype a fill appends (autocast's), not the weight's: before, every step alternating
    between skipping and running a layer switched the buffer's dtype and doubled its capacity (11 M positions after
    20 steps of this case)."""
    model = _model(torch.float32)
    ids, _ = _batch(rows=2)
    table = torch.ones((2, STEPS), dtype=torch.long)
    table[:, 1::2] = LAYERS  # skipped and run in turn at every layer above the first
    caches = {}
    for defer in (False, True):
        monkeypatch.setattr(early_exit_loop, "DEFER_FILLS", defer)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.generate(input_ids=ids, max_new_tokens=STEPS, min_new_tokens=STEPS,
                                 early_exit=ForcedExit(table), return_dict_in_generate=True)
        caches[defer] = out.past_key_values.self_attention_cache.layers
    for ours, eager in zip(caches[True], caches[False]):
        assert ours.keys.dtype == eager.keys.dtype == torch.bfloat16
        assert ours._key_buffer.shape[2] == eager._key_buffer.shape[2]


def test_a_cache_the_caller_passed_is_completed_even_without_return_dict(monkeypatch):
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    model = _model()
    ids, mask = _batch()
    layers = {}
    for defer in (False, True):
        monkeypatch.setattr(early_exit_loop, "DEFER_FILLS", defer)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, early_exit=ForcedExit(1),
                       past_key_values=cache)
        layers[defer] = cache.self_attention_cache.layers
    for ours, eager in zip(layers[True], layers[False]):
        assert (ours.keys - eager.keys).abs().max().item() < 1e-10
        assert (ours.values - eager.values).abs().max().item() < 1e-10


def test_a_call_that_reads_no_cache_skips_the_hand_back_but_never_hf_s_own_cache(monkeypatch):
    """``no_cache_returned`` (the timed calls of collect and the demo): below λ = 1 the output holds no cache (and
    nothing unread is filled) with the same tokens; at λ = 1 HF's own loop keeps its cache, as HF decodes it."""
    from hf_safe_exit.compat import find_cache
    from hf_safe_exit.decoding.early_exit_loop import no_cache_returned

    model = _model()
    ids, mask = _batch()
    assert no_cache_returned(ForcedExit(2)) == {}  # a policy that does not say keeps the cache
    for threshold in (0.999, 1.0):
        policy = EarlyExit(threshold, measure="softmax")
        out, ref = (_generate(model, ids, mask, policy, True, monkeypatch, **extra)
                    for extra in (no_cache_returned(policy), {}))
        assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.exit_layers, ref.exit_layers)
        assert (find_cache(out) is None) == (threshold < 1) and find_cache(ref) is not None
