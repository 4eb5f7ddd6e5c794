"""Every promise of equality, at the precision it names, with near-ties built to catch a last-bit difference.

* λ = 1 is HF's ``generate`` **bit for bit** in float32 (and half precision): sequences, scores and logits,
  rows that finish at different steps, decoder prompts, sampling, a 250k-vocabulary MT5.
* Early exits agree with the independent no-cache reference (``no_cache_reference``) on MT5 too.
* BiLD with ``rollback=0`` gives the large model's greedy tokens **except at float ties** in float32 (its verify
  pass runs several tokens in one product, which rounds differently from one token at a time), and **exactly**
  in float64.

A *near-tie*: LM-head row ``b`` is set to row ``a`` times (1 + 1e-7), so the two logits differ by about one float32
ulp whenever ``a`` is a likely token; which one wins is then decided by rounding, and any computation that is
not HF's to the last bit picks the other one somewhere.
"""

from __future__ import annotations

import pytest
import torch
from transformers import MT5Config, MT5ForConditionalGeneration, T5Config, T5ForConditionalGeneration

import hf_safe_exit
from hf_safe_exit import EarlyExit
from hf_safe_exit.compat import cache_kwargs
from hf_safe_exit.decoding import new_decoder_cache
from hf_safe_exit.decoding.bild import BiLD
from no_cache_reference import reference_exit_logits

STEPS = 12


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # conftest's fixture, for every test of this module
    yield


def _t5(seed=3, vocab=97, layers=(3, 3), tied=True, init=4.0):
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=layers[0],
                   num_decoder_layers=layers[1], decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
                   initializer_factor=init, tie_word_embeddings=tied, feed_forward_proj="relu" if tied else "gated-gelu")
    model = T5ForConditionalGeneration(cfg)
    if not tied:  # give the v1.1 head its own weights, as flan-T5 checkpoints have
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * init)
    return hf_safe_exit.enable(model.eval())


def _mt5(seed=4, init=4.0):
    torch.manual_seed(seed)
    cfg = MT5Config(vocab_size=250112, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, num_decoder_layers=3,
                    decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, initializer_factor=init)
    return hf_safe_exit.enable(MT5ForConditionalGeneration(cfg).eval())


def _batch(vocab, rows=4, length=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for r in range(1, rows):
        mask[r, length - 2 * r:] = 0
    return ids * mask, mask


def _hf(model, **kwargs):
    extra = {} if model.config.num_layers == model.config.num_decoder_layers else cache_kwargs(new_decoder_cache(model))
    return type(model).generate(model, **extra, **kwargs)


def _near_tie(model, a: int, b: int, rel: float = 1e-7) -> None:
    with torch.no_grad():
        model.lm_head.weight[b] = model.lm_head.weight[a] * (1 + rel)


def _assert_bitwise(ours, theirs):
    assert torch.equal(ours.sequences, theirs.sequences)
    for name in ("scores", "logits"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b)), name


def _eos_finishing_rows_early(model, ids, mask):
    """A token that row 0 makes early and the other rows later or never: rows then finish at different steps."""
    free = _hf(model, input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, eos_token_id=None)[:, 1:]
    for token in free[0, 1:4].tolist():
        first = [(row == token).nonzero()[0].item() if (row == token).any() else STEPS for row in free]
        if len(set(first)) > 1 and min(first) < STEPS - 2:
            return token
    pytest.fail("no token that finishes rows at different steps: change the seed")


# ---- case 1: MT5 --------------------------------------------------------------------------------------------


def test_mt5_at_lambda_one_is_hf_bit_for_bit():
    model = _mt5()
    assert not hasattr(model.config, "scale_decoder_outputs")  # what made MT5 crash
    ids, mask = _batch(250112)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, return_dict_in_generate=True,
                  output_scores=True, output_logits=True)
    _assert_bitwise(model.generate(**kwargs, early_exit=EarlyExit(threshold=1.0)), _hf(model, **kwargs))


@pytest.mark.parametrize("measure", ["softmax", "softmax_shortlist", "saturation"])
def test_mt5_exits_agree_with_the_no_cache_reference(measure):
    model = _mt5().to(torch.float64)  # float64: the reference's products round differently from the cached ones
    ids, mask = _batch(250112)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, return_dict_in_generate=True,
                  output_logits=True)
    # λ at the median of the first layer's confidences: about half of the tokens exit there, the rest go deeper
    first = model.generate(**kwargs, early_exit=EarlyExit(threshold=0.0, measure=measure)).confidences
    threshold = float(first[~first.isnan()].median())
    out = model.generate(**kwargs, early_exit=EarlyExit(threshold=threshold, measure=measure))
    real = out.exit_layers > 0
    layers = out.exit_layers[real]
    assert (layers < 3).any() and (layers == 3).any(), "the threshold must make some tokens exit, not all"
    ref = reference_exit_logits(model, ids, mask, out.sequences, out.exit_layers.clamp(min=1))
    ours = torch.stack(out.logits, dim=1)
    assert (ref - ours).abs()[real].max().item() < 1e-9
    assert torch.equal(ref.argmax(-1)[real], out.sequences[:, 1:][real])


# ---- case 2: λ = 1 with finished rows, near-ties, any dtype ---------------------------------------------------


@pytest.mark.parametrize("tied", [True, False], ids=["v1.0", "v1.1-deeper-decoder"])
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sample"])
def test_lambda_one_with_finished_rows_is_hf_bit_for_bit(tied, sample):
    model = _t5(tied=tied, layers=(3, 3) if tied else (2, 4))
    ids, mask = _batch(97)
    eos = _eos_finishing_rows_early(model, ids, mask)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, eos_token_id=eos, do_sample=sample,
                  return_dict_in_generate=True, output_scores=True, output_logits=True)
    torch.manual_seed(7)
    ours = model.generate(**kwargs, early_exit=EarlyExit(threshold=1.0))
    torch.manual_seed(7)
    theirs = _hf(model, **kwargs)
    _assert_bitwise(ours, theirs)
    # finished rows: padding after EOS, exit layer 0 there; every real token at the last layer
    new = theirs.sequences[:, 1:]
    after_eos = (new == eos).long().cumsum(1) - (new == eos).long() > 0
    assert after_eos.any() and not after_eos.all()
    assert torch.equal(ours.exit_layers == 0, after_eos)
    assert (ours.exit_layers[~after_eos] == model.config.num_decoder_layers).all()
    assert torch.equal(ours.layer_fraction, torch.ones(ids.shape[0]))


def test_lambda_one_at_a_near_tie_with_finished_rows_is_hf():
    model = _t5(seed=5)
    ids, mask = _batch(97, rows=8, seed=2)
    eos = _eos_finishing_rows_early(model, ids, mask)
    free = _hf(model, input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, eos_token_id=eos)[:, 1:]
    counts = torch.bincount(free.flatten(), minlength=97)
    counts[[0, 1, eos]] = 0
    a = int(counts.argmax())
    b = next(t for t in range(2, 97) if t not in (a, eos) and counts[t] == 0)
    _near_tie(model, a, b)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, eos_token_id=eos,
                  return_dict_in_generate=True, output_scores=True, output_logits=True)
    theirs = _hf(model, **kwargs)
    assert (theirs.sequences == a).any() or (theirs.sequences == b).any()
    _assert_bitwise(model.generate(**kwargs, early_exit=EarlyExit(threshold=1.0)), theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lambda_one_in_half_precision_is_hf_bit_for_bit(dtype):
    model = _t5(seed=6, tied=False, layers=(2, 4)).to(dtype)
    ids, mask = _batch(97)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, return_dict_in_generate=True,
                  output_scores=True, output_logits=True)
    _assert_bitwise(model.generate(**kwargs, early_exit=EarlyExit(threshold=1.0)), _hf(model, **kwargs))


def test_lambda_one_through_risk_control_and_decaying_schedule_is_hf():
    # λ = 1 under the decaying schedule stays 1 at every step (CALM Eq. 4 clipped), so it is HF's loop too
    model = _t5(seed=8)
    ids, mask = _batch(97)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, return_dict_in_generate=True,
                  output_logits=True)
    theirs = _hf(model, **kwargs)
    for policy in (EarlyExit(threshold=1.0, schedule="decaying"), EarlyExit(threshold=1.0, anytime="poe")):
        _assert_bitwise(model.generate(**kwargs, early_exit=policy), theirs)


def test_poe_product_at_the_last_layer_is_not_the_full_model():
    # PoE with final_layer="poe" predicts the last layer with the product over all layers: λ = 1 is then the PoE
    # model, which our loop decodes (so it must differ from HF somewhere on random weights)
    from hf_safe_exit.decoding.poe import PoEConfig

    policy = EarlyExit(threshold=1.0, anytime=PoEConfig(final_layer="poe"))
    assert not policy.is_full_model and EarlyExit(threshold=1.0).is_full_model
    model = _t5(seed=8)
    ids, mask = _batch(97)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, return_dict_in_generate=True,
                  output_logits=True)
    ours = model.generate(**kwargs, early_exit=policy)
    theirs = _hf(model, **kwargs)
    assert not all(torch.equal(x, y) for x, y in zip(ours.logits, theirs.logits))


def test_lambda_one_streamer_sees_what_hf_streams():
    class Record:
        def __init__(self):
            self.puts = []

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.puts.append("end")

    model = _t5(seed=9)
    ids, mask = _batch(97, rows=1)
    ours, theirs = Record(), Record()
    model.generate(input_ids=ids, max_new_tokens=6, streamer=ours, early_exit=EarlyExit(threshold=1.0))
    _hf(model, input_ids=ids, max_new_tokens=6, streamer=theirs)
    assert len(ours.puts) == len(theirs.puts) == 8
    assert all(a == b if isinstance(a, str) else torch.equal(a, b) for a, b in zip(ours.puts, theirs.puts))


# ---- case 3: decoder prompts at λ = 1 --------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_length", [1, 2, 5])
def test_lambda_one_with_a_decoder_prompt_is_hf_bit_for_bit(prompt_length):
    model = _t5(seed=10, tied=False, layers=(2, 4))
    ids, mask = _batch(97)
    g = torch.Generator().manual_seed(3)
    prompt = torch.cat([torch.zeros(4, 1, dtype=torch.long), torch.randint(2, 97, (4, prompt_length - 1), generator=g)], 1)
    kwargs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=prompt, max_new_tokens=STEPS,
                  return_dict_in_generate=True, output_scores=True, output_logits=True)
    ours = model.generate(**kwargs, early_exit=EarlyExit(threshold=1.0))
    _assert_bitwise(ours, _hf(model, **kwargs))
    assert ours.exit_layers.shape == (4, STEPS)


# ---- case 4: BiLD with rollback = 0 ------------------------------------------------------------------------------


def _bild_pair(dtype):
    large = _t5(seed=11, layers=(2, 3), init=2.0).to(dtype)
    torch.manual_seed(12)
    small = T5ForConditionalGeneration(T5Config(**{**large.config.to_dict(), "num_decoder_layers": 2})).eval()
    small.load_state_dict(large.state_dict(), strict=False)
    return large, small.to(dtype)


def _bild_tie(large, small, ids, mask):
    free = _hf(large, input_ids=ids, attention_mask=mask, max_new_tokens=STEPS)[:, 1:]
    counts = torch.bincount(free.flatten(), minlength=97)
    counts[[0, 1]] = 0
    a = int(counts.argmax())
    b = next(t for t in range(2, 97) if t != a and counts[t] == 0)
    for m in (large, small):
        _near_tie(m, a, b)
    return a, b


def test_bild_rollback_zero_at_a_near_tie_is_large_greedy_in_float64():
    large, small = _bild_pair(torch.float64)
    ids, mask = _batch(97)
    _bild_tie(large, small, ids, mask)
    ref = _hf(large, input_ids=ids, attention_mask=mask, max_new_tokens=STEPS)
    out = BiLD(small, fallback=0.5, rollback=0.0, max_draft_len=4).decode(
        large, input_ids=ids, attention_mask=mask, max_new_tokens=STEPS)
    assert torch.equal(out, ref)


def test_bild_rollback_zero_in_float32_differs_from_large_greedy_only_at_float_ties():
    # README: "the same tokens as the large model's greedy output except at float ties". Where the two first differ,
    # HF's own top-two logits must be within float32 rounding of each other.
    large, small = _bild_pair(torch.float32)
    ids, mask = _batch(97)
    _bild_tie(large, small, ids, mask)
    ref = _hf(large, input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, return_dict_in_generate=True,
              output_logits=True)
    out = BiLD(small, fallback=0.5, rollback=0.0, max_draft_len=4).decode(
        large, input_ids=ids, attention_mask=mask, max_new_tokens=STEPS)
    for row in range(ids.shape[0]):
        differ = (out[row] != ref.sequences[row]).nonzero()
        if len(differ):
            step = int(differ[0]) - 1
            top2 = ref.logits[step][row].topk(2).values
            assert (top2[0] - top2[1]).abs() <= 1e-5 * top2[0].abs().clamp(min=1), (row, step, top2)


# ---- found by review: caching off with a deeper decoder, stop strings ---------------------------------------------


@pytest.mark.parametrize("where", ["call", "generation_config"])
def test_lambda_one_without_cache_and_a_deeper_decoder_is_hf(where):
    # HF builds no cache with use_cache=False, so none may be handed over (it would be appended to at every step)
    from transformers import GenerationConfig

    model = _t5(seed=13, tied=False, layers=(2, 4))
    ids, mask = _batch(97)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS)
    if where == "call":
        kwargs["use_cache"] = False
    else:
        kwargs["generation_config"] = GenerationConfig(use_cache=False, max_new_tokens=STEPS, decoder_start_token_id=0,
                                                       eos_token_id=1, pad_token_id=0)
    theirs = type(model).generate(model, **kwargs)
    assert torch.equal(model.generate(**kwargs, early_exit=EarlyExit(threshold=1.0)), theirs)


def test_stop_strings_with_a_tokenizer_stop_as_in_hf():
    # HF drops the tokenizer of a custom_generate call; the stop-string criterion is built for it instead
    model, tokenizer = hf_safe_exit.load_default_model()
    inputs = tokenizer(["summarize: The council voted on Tuesday to turn the old railway depot into a public library."],
                       return_tensors="pt")
    free = type(model).generate(model, **inputs, max_new_tokens=12)
    text = tokenizer.decode(free[0, 1:], skip_special_tokens=True)
    stop = text.split()[1]  # a word the full model writes early
    kwargs = dict(**inputs, max_new_tokens=12, stop_strings=[stop], tokenizer=tokenizer)
    theirs = type(model).generate(model, **kwargs)
    assert theirs.shape[1] < free.shape[1]  # the stop string did stop HF
    assert torch.equal(model.generate(**kwargs, early_exit=EarlyExit(threshold=1.0)), theirs)
    stopped = model.generate(**kwargs, early_exit=EarlyExit(threshold=0.9, measure="softmax"))
    assert stop in tokenizer.decode(stopped[0], skip_special_tokens=True) or stopped.shape[1] == 13
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(**inputs, max_new_tokens=12, stop_strings=[stop], early_exit=EarlyExit(threshold=1.0))


def test_below_lambda_one_rows_stopped_without_eos_go_on_as_in_hf():
    # without an EOS criterion HF does not pad a row that a stopping criterion finished: it goes on generating its
    # tokens. Our loop at full depth (ForcedExit(L)) must too (it used to emit token 0 there)
    from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

    from hf_safe_exit import ForcedExit

    class RowStop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] % 3 == 0

    model = _t5(seed=14)
    ids, mask = _batch(97)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, eos_token_id=None,
                  stopping_criteria=StoppingCriteriaList([RowStop()]), return_dict_in_generate=True)
    theirs = _hf(model, **kwargs)
    ours = model.generate(**kwargs, early_exit=ForcedExit(model.config.num_decoder_layers))
    assert torch.equal(ours.sequences, theirs.sequences)
    stopped = (theirs.sequences[:, 1:] % 3 == 0).long().cumsum(1) - (theirs.sequences[:, 1:] % 3 == 0).long() > 0
    stopped = stopped[:, : ours.exit_layers.shape[1]]
    assert stopped.any() and torch.equal(ours.exit_layers == 0, stopped)
    full = model.generate(**kwargs, early_exit=EarlyExit(threshold=1.0))
    assert torch.equal(full.sequences, theirs.sequences) and torch.equal(full.exit_layers, ours.exit_layers)
