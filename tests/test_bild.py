"""BiLD big-little decoding on tiny random T5 pairs, checked against HF's own generate and fresh forwards."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from hf_safe_exit.compat import cache_kwargs, find_cache
from hf_safe_exit.decoding.bild import (
    BiLD,
    BiLDOutput,
    bild_policy_factory,
    check_compatible_pair,
    lambda_to_rollback,
    rollback_to_lambda,
)
from hf_safe_exit.decoding.bild_cache import BiLDDecoder
from hf_safe_exit.decoding.early_exit_loop import new_decoder_cache

MAX_NEW = 16


def _t5(seed: int, dec_layers: int, dtype=torch.float32, vocab: int = 100) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=dec_layers,
                   num_heads=4, decoder_start_token_id=0, initializer_factor=2.0)
    return T5ForConditionalGeneration(cfg).eval().to(dtype)


def _small_from(large: T5ForConditionalGeneration, noise: float, seed: int) -> T5ForConditionalGeneration:
    """A 2-decoder-layer model built from the large one's first layers plus noise: it agrees with it often, not always."""
    cfg = copy.deepcopy(large.config)
    cfg.num_decoder_layers = 2
    small = T5ForConditionalGeneration(cfg).eval().to(large.dtype)
    small.load_state_dict(large.state_dict(), strict=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(noise * p.std() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return small


def _hf_generate(model, **kwargs):
    """HF's stock generate, with a decoder cache sized by the decoder depth (5.x sizes it by the encoder's)."""
    return model.generate(**cache_kwargs(new_decoder_cache(model)), **kwargs)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared CPU: one intra-op thread is much faster than several contending ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pair():
    large = _t5(0, 3)
    small = _small_from(large, noise=0.15, seed=1)
    return large, small


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(2, 100, (4, 9), generator=gen)
    mask = torch.ones_like(ids)
    for row, length in enumerate([9, 6, 3, 8]):
        mask[row, length:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _rows(batch):
    ids, mask = batch
    return [ids[r : r + 1, : int(mask[r].sum())] for r in range(ids.shape[0])]


# ---------------------------------------------------------------------------------------------
# exactness against HF


@pytest.mark.parametrize("fallback,max_draft_len", [(0.6, 10), (0.0, 3), (1.0, 10)])
def test_rollback_zero_is_large_greedy_batch1(pair, batch, fallback, max_draft_len):
    large, small = pair
    bild = BiLD(small, fallback=fallback, rollback=0.0, max_draft_len=max_draft_len)
    assert bild.rollback == 0.0  # 0 means 0, not "use the default"
    for ids in _rows(batch):
        ref = _hf_generate(large, input_ids=ids, max_new_tokens=MAX_NEW)
        out = bild.decode(large, input_ids=ids, max_new_tokens=MAX_NEW)
        assert torch.equal(out, ref)


def test_rollback_zero_is_large_greedy_padded_batch(pair, batch):
    large, small = pair
    ids, mask = batch
    ref = _hf_generate(large, input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW)
    out = BiLD(small, fallback=0.5, rollback=0.0, max_draft_len=4).decode(
        large, input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, return_dict_in_generate=True)
    assert isinstance(out, BiLDOutput)
    assert torch.equal(out.sequences, ref)
    # the small model did draft, and every drafted token the large model did not fully endorse was rolled back
    assert out.num_drafted > 0
    assert out.num_accepted + out.num_large_tokens == out.num_new_tokens == ids.shape[0] * MAX_NEW


@pytest.mark.parametrize("rollback", [math.inf, 1e9])
def test_huge_rollback_no_fallback_is_small_greedy(pair, batch, rollback):
    large, small = pair
    ids, mask = batch
    bild = BiLD(small, fallback=0.0, rollback=rollback, max_draft_len=5)
    ref = _hf_generate(small, input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW)
    out = bild.decode(large, input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert out.num_rolled_back == 0 and out.num_large_tokens == 0 and out.num_fallbacks == 0
    assert out.num_accepted == out.num_drafted == ids.shape[0] * MAX_NEW
    # the large model only verifies, once per max_draft_len tokens
    assert out.large_model_calls == math.ceil(MAX_NEW / 5)
    for row in _rows(batch):
        assert torch.equal(bild.decode(large, input_ids=row, max_new_tokens=MAX_NEW),
                           _hf_generate(small, input_ids=row, max_new_tokens=MAX_NEW))


def test_differently_shaped_mt5_pair(batch):
    """A small model of another width, depth and class (mT5) than the large one: both exactness limits hold."""
    from transformers import MT5Config, MT5ForConditionalGeneration

    large = _t5(4, 3)
    torch.manual_seed(6)
    small = MT5ForConditionalGeneration(MT5Config(
        vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=2.0)).eval()
    ids, mask = batch
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW)
    assert torch.equal(BiLD(small, fallback=0.3, rollback=0.0, max_draft_len=4).decode(large, **kwargs),
                       _hf_generate(large, **kwargs))
    assert torch.equal(BiLD(small, fallback=0.0, rollback=math.inf, max_draft_len=4).decode(large, **kwargs),
                       _hf_generate(small, **kwargs))


def test_intermediate_thresholds_mix_both_models(pair, batch):
    large, small = pair
    ids, mask = batch
    out = BiLD(small, fallback=0.1, rollback=6.0, max_draft_len=5).decode(
        large, input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, return_dict_in_generate=True)
    assert out.sequences.shape == (ids.shape[0], MAX_NEW + 1)
    assert out.num_accepted > 0 and out.num_rolled_back > 0 and out.num_large_tokens > 0
    assert out.num_accepted + out.num_large_tokens == out.num_new_tokens
    assert out.num_drafted == out.num_accepted + out.num_rolled_back
    assert out.large_model_calls < MAX_NEW  # fewer large calls than tokens per row
    assert out.stats.as_dict()["large_model_calls"] == out.large_model_calls
    # per-row counters add up to the totals
    assert out.row_new_tokens.tolist() == [MAX_NEW] * ids.shape[0]
    assert int(out.row_accepted.sum()) == out.num_accepted and int(out.row_rolled_back.sum()) == out.num_rolled_back
    assert int(out.row_large_tokens.sum()) == out.num_large_tokens
    assert int(out.row_large_calls.max()) == out.large_model_calls
    assert torch.all(out.row_accepted + out.row_large_tokens == out.row_new_tokens)
    assert torch.all(out.large_calls_per_token < 1)


# ---------------------------------------------------------------------------------------------
# EOS, max_new_tokens, logits processors, as HF


def _eos_that_splits(model, ids, mask):
    """A token id that, used as EOS, ends some rows of HF's greedy output early and not others."""
    free = _hf_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW)
    for token in free[:, 2:8].flatten().tolist():
        ref = _hf_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, eos_token_id=token)
        ended = [(row[1:] == token).any().item() for row in ref]
        if any(ended) and not all(ended):
            return token, ref
    pytest.fail("no token splits the batch; change the seed")


def test_eos_and_padding_as_hf(pair, batch):
    large, small = pair
    ids, mask = batch
    eos, ref = _eos_that_splits(large, ids, mask)
    out = BiLD(small, fallback=0.5, rollback=0.0, max_draft_len=4).decode(
        large, input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, eos_token_id=eos)
    assert torch.equal(out, ref)  # same length, EOS in the same places, pad_token_id after it

    eos_s, ref_s = _eos_that_splits(small, ids, mask)
    out_s = BiLD(small, fallback=0.0, rollback=math.inf, max_draft_len=4).decode(
        large, input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, eos_token_id=eos_s)
    assert torch.equal(out_s, ref_s)


@pytest.mark.parametrize("max_new_tokens", [1, 7])
def test_max_new_tokens_and_generation_config_as_hf(pair, batch, max_new_tokens):
    large, small = pair
    ids, mask = batch
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=max_new_tokens, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    ref = _hf_generate(large, input_ids=ids, attention_mask=mask, generation_config=gc)
    out = BiLD(small, rollback=0.0, max_draft_len=10).decode(large, input_ids=ids, attention_mask=mask,
                                                             generation_config=gc)
    assert out.shape == (ids.shape[0], max_new_tokens + 1)
    assert torch.equal(out, ref)


def test_logits_processors_applied_as_hf(pair, batch):
    large, small = pair
    ids, mask = batch
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, repetition_penalty=1.8,
                  no_repeat_ngram_size=2)
    ref = _hf_generate(large, **kwargs)
    assert not torch.equal(ref, _hf_generate(large, input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW))
    assert torch.equal(BiLD(small, fallback=0.5, rollback=0.0).decode(large, **kwargs), ref)
    assert torch.equal(BiLD(small, fallback=0.0, rollback=math.inf, max_draft_len=4).decode(large, **kwargs),
                       _hf_generate(small, **kwargs))


# ---------------------------------------------------------------------------------------------
# caches after per-row rollbacks


def _fresh_self_kv(model, enc_ids, tokens):
    cache = new_decoder_cache(model)
    with torch.no_grad():
        out = model(input_ids=enc_ids, decoder_input_ids=torch.tensor([tokens]), **cache_kwargs(cache, model),
                    use_cache=True)
    return [(layer.keys[0], layer.values[0]) for layer in find_cache(out).self_attention_cache.layers]


def test_cache_after_rollback_equals_fresh_forward(pair, batch):
    large, small = pair
    ids, mask = batch
    rows = _rows(batch)
    snaps = []

    def on_step(info):
        if not any(info["rolled_back"]):
            return
        step = []
        for i, r in enumerate(info["rows"]):
            for name in ("large", "small"):
                dec = info[name]
                kv = [(k.clone(), v.clone()) for k, v in dec.row_cache(i)]
                step.append((name, r, list(dec.tokens[i]), kv, info["sequences"][i]))
        snaps.append((list(info["rolled_back_tokens"]), step))

    BiLD(small, fallback=0.4, rollback=1.5, max_draft_len=6).decode(
        large, input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, bild_step_callback=on_step)
    # rows were rolled back by different amounts in one batched step: per-sequence cropping was exercised
    assert any(len(set(dropped)) > 1 and max(dropped) > 0 for dropped, _ in snaps)
    models = {"large": large, "small": small}
    checked = 0
    for _, step in snaps:
        for name, r, tokens, kv, seq in step:
            # the cache holds the kept prefix, short of at most the last (not yet fed) token
            assert seq[: len(tokens)] == tokens and len(tokens) >= len(seq) - 1
            fresh = _fresh_self_kv(models[name], rows[r], tokens)
            assert len(fresh) == len(kv) == models[name].config.num_decoder_layers
            for (k, v), (fk, fv) in zip(kv, fresh):
                torch.testing.assert_close(k, fk, atol=1e-4, rtol=0)
                torch.testing.assert_close(v, fv, atol=1e-4, rtol=0)
            checked += 1
    assert checked > 10


def test_decoder_per_row_truncate_and_placeholders(pair, batch):
    """The left-padded cache primitive: uneven feeds, per-row crops, rows shorter than the fed block."""
    large, _ = pair
    ids, mask = batch
    rows = _rows(batch)
    with torch.no_grad():
        enc = large.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        dec = BiLDDecoder(large, enc, mask, pad_id=0)
        gen = torch.Generator().manual_seed(3)
        seqs = [[0] + torch.randint(2, 100, (n,), generator=gen).tolist() for n in (7, 1, 4, 0)]
        logits = dec.forward(seqs, [len(s) for s in seqs])  # row 3 is one token long: placeholders in front
        for r, s in enumerate(seqs):
            ref = large(input_ids=rows[r], decoder_input_ids=torch.tensor([s])).logits[0]
            torch.testing.assert_close(logits[r], ref, atol=1e-3, rtol=1e-4)
        dec.truncate([3, 1, 5, 1])  # different crops per row
        seqs = [seqs[0][:3] + [11, 12], seqs[1] + [13], seqs[2] + [14, 15, 16], seqs[3] + [17, 18, 19, 20]]
        logits = dec.forward(seqs, [1, 2, 1, 3])
        for r, s in enumerate(seqs):
            ref = large(input_ids=rows[r], decoder_input_ids=torch.tensor([s])).logits[0]
            torch.testing.assert_close(logits[r], ref[-logits[r].shape[0]:], atol=1e-3, rtol=1e-4)
            for (k, v), (fk, fv) in zip(dec.row_cache(r), _fresh_self_kv(large, rows[r], s)):
                torch.testing.assert_close(k, fk, atol=1e-4, rtol=0)
                torch.testing.assert_close(v, fv, atol=1e-4, rtol=0)
        dec.select_rows([2, 0])
        seqs = [seqs[2] + [21], seqs[0] + [22]]
        logits = dec.forward(seqs, [1, 1])
        for out, r, s in zip(logits, [2, 0], seqs):
            ref = large(input_ids=rows[r], decoder_input_ids=torch.tensor([s])).logits[0, -1:]
            torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# sampling


def test_sampling_reproducible_with_seed(pair, batch):
    large, small = pair
    ids, mask = batch
    bild = BiLD(small, fallback=0.3, rollback=2.0, max_draft_len=4)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=True, top_k=20,
                  temperature=1.3)
    torch.manual_seed(123)
    a = bild.decode(large, **kwargs, return_dict_in_generate=True)
    torch.manual_seed(123)
    b = bild.decode(large, **kwargs, return_dict_in_generate=True)
    torch.manual_seed(124)
    c = bild.decode(large, **kwargs)
    assert torch.equal(a.sequences, b.sequences) and a.stats == b.stats
    assert not torch.equal(a.sequences, c)
    greedy = bild.decode(large, input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW)
    assert not torch.equal(a.sequences, greedy)


def test_sampling_always_fallback_rollback_zero_is_hf_sampling(pair, batch):
    """fallback=1 drafts nothing, so every token is the large model's own draw: HF's sampling, same seed."""
    large, small = pair
    for ids in _rows(batch):
        kwargs = dict(input_ids=ids, max_new_tokens=MAX_NEW, do_sample=True, top_k=30, temperature=1.5)
        torch.manual_seed(7)
        ref = _hf_generate(large, **kwargs)
        torch.manual_seed(7)
        out = BiLD(small, fallback=1.0, rollback=0.0).decode(large, **kwargs, return_dict_in_generate=True)
        assert out.num_drafted == 0  # the small model was never certain (confidence 1), so it never drew a token
        assert torch.equal(out.sequences, ref)


def test_num_return_sequences(pair, batch):
    large, small = pair
    ids, mask = batch
    torch.manual_seed(0)
    out = BiLD(small, rollback=0.0).decode(large, input_ids=ids, attention_mask=mask, max_new_tokens=5,
                                           do_sample=True, num_return_sequences=2)
    assert out.shape == (2 * ids.shape[0], 6)


# ---------------------------------------------------------------------------------------------
# λ and the calibration factory


def test_lambda_mapping(pair, batch):
    large, small = pair
    assert lambda_to_rollback(1.0) == 0.0 and lambda_to_rollback(0.0) == math.inf
    assert rollback_to_lambda(0.0) == 1.0 and rollback_to_lambda(math.inf) == 0.0
    for lam in (0.05, 0.3, 0.9):
        assert rollback_to_lambda(lambda_to_rollback(lam)) == pytest.approx(lam)
    assert lambda_to_rollback(0.5) == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        lambda_to_rollback(1.5)
    factory = bild_policy_factory(small, fallback=0.5, max_draft_len=4)
    ids, mask = batch
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW)
    assert torch.equal(factory(1.0).decode(large, **kwargs), _hf_generate(large, **kwargs))
    policy = BiLD.from_lambda(small, 0.2, fallback=0.5)
    assert policy.rollback == pytest.approx(-math.log(0.2)) and policy.lam == pytest.approx(0.2)
    assert policy.describe()["lambda"] == pytest.approx(0.2)
    # smaller λ is more permissive: fewer drafted tokens rolled back
    strict = factory(0.9).decode(large, **kwargs, return_dict_in_generate=True)
    loose = factory(0.01).decode(large, **kwargs, return_dict_in_generate=True)
    assert loose.num_rolled_back / loose.num_drafted < strict.num_rolled_back / strict.num_drafted


# ---------------------------------------------------------------------------------------------
# errors


def test_bad_parameters_raise(pair):
    _, small = pair
    for kwargs, match in [
        (dict(rollback=-0.1), "negative"),
        (dict(fallback=-0.1), r"\[0, 1\]"),
        (dict(fallback=1.5), r"\[0, 1\]"),
        (dict(rollback=float("nan")), "real number"),
        (dict(fallback="0.5"), "real number"),
        (dict(max_draft_len=0), ">= 1"),
        (dict(max_draft_len=2.5), ">= 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            BiLD(small, **kwargs)
    with pytest.raises(ValueError, match="negative"):
        rollback_to_lambda(-1.0)


def test_mismatched_vocabularies_raise(pair, batch):
    large, _ = pair
    ids, _ = batch
    other = _t5(2, 2, vocab=120)
    with pytest.raises(ValueError, match="mismatched vocabularies.*share a tokenizer"):
        BiLD(other).decode(large, input_ids=ids, max_new_tokens=3)
    special = _t5(3, 2)
    special.config.decoder_start_token_id = 5
    special.generation_config.decoder_start_token_id = 5
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        check_compatible_pair(large, special)


def test_mismatched_tokenizers_raise(pair, batch):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    def tok(vocab):
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")))

    large, small = pair
    ids, _ = batch
    a = tok({"<pad>": 0, "</s>": 1, "hello": 2, "world": 3})
    b = tok({"<pad>": 0, "</s>": 1, "hello": 3, "world": 2})
    with pytest.raises(ValueError, match="mismatched tokenizers"):
        BiLD(small, small_tokenizer=b).decode(large, input_ids=ids, max_new_tokens=3, tokenizer=a)
    out = BiLD(small, small_tokenizer=a, rollback=0.0).decode(large, input_ids=ids, max_new_tokens=3, tokenizer=a)
    assert out.shape == (ids.shape[0], 4)


def test_unsupported_models_and_arguments_raise(pair, batch):
    from transformers import BartConfig, BartForConditionalGeneration

    large, small = pair
    ids, _ = batch
    bart = BartForConditionalGeneration(BartConfig(vocab_size=100, d_model=16, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=16, decoder_ffn_dim=16))
    with pytest.raises(TypeError, match="T5ForConditionalGeneration"):
        BiLD(bart)
    with pytest.raises(TypeError, match="T5ForConditionalGeneration"):
        BiLD(small).decode(bart, input_ids=ids, max_new_tokens=3)
    with pytest.raises(ValueError, match="num_beams"):
        BiLD(small).decode(large, input_ids=ids, max_new_tokens=3, num_beams=2)
    with pytest.raises(ValueError, match="assistant_model"):
        BiLD(small).decode(large, input_ids=ids, max_new_tokens=3, assistant_model=small)
    with pytest.raises(ValueError, match="output_scores"):
        BiLD(small).decode(large, input_ids=ids, max_new_tokens=3, output_scores=True, return_dict_in_generate=True)


# ---------------------------------------------------------------------------------------------
# through generate(early_exit=...)


def test_through_enabled_generate(pair, batch):
    decoding = pytest.importorskip("hf_safe_exit.decoding")
    if not hasattr(decoding, "enable"):
        pytest.skip("hf_safe_exit.decoding.enable not available yet")
    large, small = pair
    ids, mask = batch
    model = decoding.enable(copy.deepcopy(large))
    bild = BiLD(small, fallback=0.4, rollback=2.0, max_draft_len=5)
    direct = bild.decode(large, input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW)
    via = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, early_exit=bild)
    assert torch.equal(via, direct)
    via_kw = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, early_exit=bild,
                            return_dict_in_generate=True)
    assert torch.equal(via_kw.sequences, direct) and via_kw.large_model_calls > 0


# ---------------------------------------------------------------------------------------------
# the rollback threshold picked by the risk calibrator


def test_risk_controlled_picks_rollback_threshold(pair):
    """Losses over a λ grid -> RiskControlled -> λ̂ -> BiLD.from_lambda: the direction and the mapping agree."""
    import numpy as np

    from hf_safe_exit.risk import RiskControlled

    large, small = pair
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(2, 100, (8, 7), generator=gen)
    kwargs = dict(input_ids=ids, max_new_tokens=10)
    full = _hf_generate(large, **kwargs)
    lams = np.array([0.0, 0.001, 0.01, 0.05, 0.2, 0.5, 0.9, 1.0])
    factory = bild_policy_factory(small, fallback=0.2, max_draft_len=4)

    def consistency(seqs):  # fraction of generated positions that differ from the large model's output
        return (seqs[:, 1:] != full[:, 1:]).double().mean(dim=1).numpy()

    losses = np.stack([consistency(factory(float(lam)).decode(large, **kwargs)) for lam in lams])
    assert np.all(losses[-1] == 0.0)  # λ = 1 is the large model
    assert losses[0].mean() > 0.1  # accepting everything departs from it
    eps = 0.1
    rc = RiskControlled(eps=eps, method="naive", risk="consistency").fit(lams, losses)
    # brute force: the smallest λ with every λ' >= λ on the grid at mean loss <= ε
    ok = losses.mean(axis=1) <= eps
    k = len(lams) - 1
    while k > 0 and ok[k - 1]:
        k -= 1
    assert rc.threshold == pytest.approx(lams[k])
    assert 0.0 < rc.threshold < 1.0  # a non-trivial rollback threshold was chosen
    policy = BiLD.from_lambda(small, rc.threshold, fallback=0.2, max_draft_len=4)
    assert policy.rollback == pytest.approx(lambda_to_rollback(lams[k]))
    assert consistency(policy.decode(large, **kwargs)).mean() <= eps
