"""Early-exit decoding continued from a decoder prompt (``decoder_input_ids`` longer than the start token).

References are independent of the early-exit loop: HF's own ``generate`` with the same decoder prompt
(threshold 1 = the full model), and the no-cache recomputation of ``no_cache_reference`` (forced exits),
where the prompt positions run through every layer.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import GenerationMixin, T5Config, T5ForConditionalGeneration

import hf_safe_exit
from hf_safe_exit import EarlyExit, ForcedExit
from hf_safe_exit.decoding import new_decoder_cache
from hf_safe_exit.compat import cache_field, cache_kwargs, find_cache
from hf_safe_exit.decoding.early_exit_loop import (EarlyExitGenerateOutput, UnsupportedDecoderPromptError,
                                                  early_exit_decode)
from no_cache_reference import reference_exit_logits
from tiny_t5 import CONFIGS, VOCAB

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = {
    "start-only": [0],            # just the decoder start token: no prefill at all
    "start+3": [0, 5, 17, 33],    # a real prompt
    "no-start": [5, 17, 33],      # HF prepends the start token itself
}


def make_model(kind: str, dtype=torch.float64, init: float = 4.0):
    options = dict(CONFIGS[kind])
    torch.manual_seed(options.pop("seed"))
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_heads=4, decoder_start_token_id=0,
                   eos_token_id=1, pad_token_id=0, initializer_factor=init, **options)
    model = T5ForConditionalGeneration(cfg)
    if not cfg.scale_decoder_outputs:
        # transformers 5 ties lm_head to the embeddings even for v1.1 configs; untie it as v1.1 checkpoints are.
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * init)
    return model.eval().to(dtype)


def encoder_batch(batch: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return (ids * mask)[:batch], mask[:batch]


def prompt_ids(name: str, batch: int) -> torch.LongTensor:
    return torch.tensor([PROMPTS[name]] * batch)


def hf_generate(model, **kwargs):
    return type(model).generate(model, **cache_kwargs(new_decoder_cache(model)), **kwargs)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_threshold_one_with_decoder_prompt_equals_hf_greedy(kind, batch, prompt):
    model = make_model(kind)
    ids, mask = encoder_batch(batch)
    dec = prompt_ids(prompt, batch)
    new = 10
    ref = hf_generate(model, input_ids=ids, attention_mask=mask, decoder_input_ids=dec, max_new_tokens=new,
                      do_sample=False)
    out = hf_safe_exit.generate(model, input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                                max_new_tokens=new, early_exit=EarlyExit(threshold=1.0), return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    p = 1 + len(PROMPTS[prompt]) if PROMPTS[prompt][0] != 0 else len(PROMPTS[prompt])
    start = torch.zeros(batch, p - dec.shape[1], dtype=torch.long)  # HF's prepended start token, if any
    assert torch.equal(out.sequences[:, :p], torch.cat([start, dec], 1))
    # exit_layers / confidences cover the new tokens only; max_new_tokens counts after the prompt, as in HF.
    assert out.exit_layers.shape == out.confidences.shape == (batch, out.sequences.shape[1] - p)
    assert out.sequences.shape[1] - p <= new
    real = out.exit_layers > 0
    assert (out.exit_layers[real] == model.config.num_decoder_layers).all()
    assert len(set(ref[:, p:].flatten().tolist())) >= 3, "varied tokens, or the comparison would be vacuous"
    if p > 1:  # the prompt must matter, or the comparison would not test the prefill
        plain = hf_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        assert not torch.equal(plain[:, 1: 1 + 4], ref[:, p: p + 4])


def test_sampling_with_decoder_prompt_equals_hf_sampling():
    model = make_model("v1.1-untied-2+4")
    ids, mask = encoder_batch(3)
    kwargs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=prompt_ids("start+3", 3), max_new_tokens=8,
                  do_sample=True, top_k=20, temperature=0.8)
    torch.manual_seed(123)
    ref = hf_generate(model, **kwargs)
    torch.manual_seed(123)
    out = hf_safe_exit.generate(model, early_exit=EarlyExit(threshold=1.0), **kwargs)
    assert torch.equal(out, ref)


# ---------------------------------------------------------------------------------------------------------------
# Early exits after a prompt, against the no-cache reference: prompt positions run all layers, generated positions
# stop at their exit layer (state propagation above it).
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("mode", ["fixed", "random"])
def test_forced_exit_after_prompt_matches_no_cache_reference(kind, mode):
    model = make_model(kind, init=1.0)
    ids, mask = encoder_batch(3)
    dec = prompt_ids("start+3", 3)
    p, steps, num_layers = dec.shape[1], 8, model.config.num_decoder_layers
    if mode == "fixed":
        layers = torch.full((3, steps), 2, dtype=torch.long)
    else:
        layers = torch.randint(1, num_layers + 1, (3, steps), generator=torch.Generator().manual_seed(5))
    out = hf_safe_exit.generate(model, input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                                max_new_tokens=steps, early_exit=ForcedExit(layers), return_dict_in_generate=True,
                                output_logits=True)
    logits = torch.stack(out.logits, dim=1)
    n_new = out.sequences.shape[1] - p
    assert out.exit_layers.shape == (3, n_new) and logits.shape[1] == n_new
    real = out.exit_layers > 0
    assert torch.equal(out.exit_layers[real], layers[:, :n_new][real])
    # The reference's position t predicts token t+1: prompt positions 0..p-2 ran in full (prefill), position p-1
    # onwards are the decoding steps with their exit layers.
    full = torch.full((3, p - 1), num_layers, dtype=torch.long)
    exits = torch.cat([full, out.exit_layers.clamp(min=1)], dim=1)
    ref = reference_exit_logits(model, ids, mask, out.sequences, exits)[:, p - 1:]
    assert ref.shape == logits.shape
    err = (ref - logits).abs()[real].max().item()
    assert err < 1e-10, f"max |Δlogit| = {err}"
    # Sensitive to the prompt: decoding from the last prompt token alone (the old behaviour) differs.
    dropped = reference_exit_logits(model, ids, mask, out.sequences[:, p - 1:], out.exit_layers.clamp(min=1))
    assert (dropped - logits).abs()[real].max().item() > 1e-3
    if mode == "random":
        # ... and to the prefill running every layer: had the prompt positions stopped at layer 1, the layer >= 3
        # K/V they give the new tokens would differ (exits at 1-2 only read layers 1-2, which agree either way).
        assert (out.exit_layers >= 3).any()
        shallow = reference_exit_logits(model, ids, mask, out.sequences, torch.cat([full.clamp(max=1),
                                                                                     out.exit_layers.clamp(min=1)], 1))
        assert (shallow[:, p - 1:] - logits).abs()[real].max().item() > 1e-3


class RecordingPolicy:
    """A never-exiting policy that records the (step, max_new_tokens) it is asked thresholds for."""

    min_exit_layer = 1

    def __init__(self):
        self.calls: list[tuple[int, int]] = []
        self.measure = None

    def bind(self, model):
        self.measure = EarlyExit(threshold=1.0).bind(model).measure
        return self

    def threshold_at(self, step: int, max_new_tokens: int) -> float:
        self.calls.append((step, max_new_tokens))
        return 1.0


def test_threshold_schedule_counts_new_tokens_only():
    model = make_model("v1.0-tied-3+3")
    ids, mask = encoder_batch(1)
    policy = RecordingPolicy()
    out = hf_safe_exit.generate(model, input_ids=ids, attention_mask=mask, decoder_input_ids=prompt_ids("start+3", 1),
                                max_new_tokens=6, eos_token_id=None, early_exit=policy)
    assert out.shape[1] == 4 + 6
    assert policy.calls == [(step, 6) for step in range(6)]


# ---------------------------------------------------------------------------------------------------------------
# Rows of different prompt lengths are refused.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_decoder_prompt_raises_typed_error(side):
    model = make_model("v1.0-tied-3+3")
    ids, mask = encoder_batch(2)
    dec = prompt_ids("start+3", 2)
    dec_mask = torch.ones_like(dec)
    if side == "left":
        dec_mask[1, :2] = 0
    else:
        dec_mask[1, 2:] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask,
                  max_new_tokens=4)
    with pytest.raises(UnsupportedDecoderPromptError, match="grouped by prompt length") as info:
        hf_safe_exit.generate(model, **kwargs, early_exit=EarlyExit(threshold=0.5))
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    # λ = 1 is HF's own loop, which runs padded decoder prompts: the same output as HF's generate
    assert torch.equal(hf_safe_exit.generate(model, **kwargs, early_exit=EarlyExit(threshold=1.0)),
                       hf_generate(model, **kwargs))


def test_unpadded_decoder_attention_mask_is_accepted():
    model = make_model("v1.0-tied-3+3")
    ids, mask = encoder_batch(3)
    dec = prompt_ids("start+3", 3)
    kwargs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, max_new_tokens=6)
    out = hf_safe_exit.generate(model, decoder_attention_mask=torch.ones_like(dec),
                                early_exit=EarlyExit(threshold=1.0), **kwargs)
    assert torch.equal(out, hf_generate(model, do_sample=False, **kwargs))


# ---------------------------------------------------------------------------------------------------------------
# The cache keyword (transformers 5.24: `cache`, before: `past_key_values`) and the streamer.
# ---------------------------------------------------------------------------------------------------------------
def test_cache_is_found_under_either_key():
    cache = object()
    assert find_cache({"cache": cache}) is cache  # what early_exit_decode reads its model_kwargs with
    assert find_cache({"past_key_values": cache}) is cache
    assert find_cache({}) is None


def test_loop_uses_the_handed_cache_and_warns_nothing():
    model = make_model("v1.1-untied-2+4")
    ids, mask = encoder_batch(3)
    dec = prompt_ids("start+3", 3)
    cache = new_decoder_cache(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = GenerationMixin.generate(model, input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                                       max_new_tokens=5, eos_token_id=None, custom_generate=early_exit_decode,
                                       early_exit_policy=EarlyExit(threshold=1.0).bind(model),
                                       return_dict_in_generate=True, **cache_kwargs(cache))
    assert getattr(out, cache_field(EarlyExitGenerateOutput)) is cache
    # prompt (4) + 5 new tokens, the last of which was never fed back
    for layer in range(model.config.num_decoder_layers):
        assert cache.self_attention_cache.get_seq_length(layer) == 4 + 5 - 1
    assert torch.equal(out.sequences, hf_generate(model, input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                                                  max_new_tokens=5, eos_token_id=None, do_sample=False))


class RecordingStreamer:
    def __init__(self):
        self.puts: list[list] = []
        self.ended = False

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended = True


def test_streamer_receives_the_prompt_first_as_with_hf():
    model = make_model("v1.0-tied-3+3")
    ids, mask = encoder_batch(1)
    kwargs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=prompt_ids("start+3", 1), max_new_tokens=5)
    ref, ours = RecordingStreamer(), RecordingStreamer()
    hf_generate(model, streamer=ref, do_sample=False, **kwargs)
    hf_safe_exit.generate(model, streamer=ours, early_exit=EarlyExit(threshold=1.0), **kwargs)
    assert ours.puts == ref.puts and ours.puts[0] == [PROMPTS["start+3"]]
    assert ours.ended and ref.ended
