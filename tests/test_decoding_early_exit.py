"""Early-exit decoding against independent references: HF ``generate`` and a no-cache recomputation."""

from __future__ import annotations

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

import hf_safe_exit
from hf_safe_exit import EarlyExit, ForcedExit
from hf_safe_exit.compat import cache_kwargs
from hf_safe_exit.confidence import ConfidenceMeasure
from hf_safe_exit.decoding import new_decoder_cache
from no_cache_reference import reference_exit_logits
from tiny_t5 import CONFIGS, VOCAB


def make_model(kind: str, dtype=torch.float32, init: float = 1.0, attn: str = "sdpa"):
    options = dict(CONFIGS[kind])
    torch.manual_seed(options.pop("seed"))
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_heads=4, decoder_start_token_id=0,
                   eos_token_id=1, pad_token_id=0, initializer_factor=init, attn_implementation=attn, **options)
    model = T5ForConditionalGeneration(cfg)
    if not cfg.scale_decoder_outputs:
        # transformers 5 ties lm_head to the embeddings even for v1.1 configs; give the head its own weights,
        # as v1.1 / flan-T5 checkpoints have, so the tests see the difference between the two.
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * init)
        assert model.lm_head.weight is not model.shared.weight
    return hf_safe_exit.enable(model.eval().to(dtype))


def padded_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids = ids * mask  # pad id 0 after the end, as a tokenizer would
    return ids, mask


def hf_generate(model, **kwargs):
    # Stock generate needs a decoder-sized cache when encoder and decoder depths differ.
    return type(model).generate(model, **cache_kwargs(new_decoder_cache(model)), **kwargs)


class Ones(ConfidenceMeasure):
    """A measure that is always exactly 1.0: λ = 1 must still never exit (strict comparison)."""

    name = "ones"

    def __call__(self, view):
        return torch.ones(view.hidden.shape[0])


class Halves(ConfidenceMeasure):
    """A measure that is always exactly 0.5: λ = 0.5 runs our loop and must never exit (strict comparison)."""

    name = "halves"

    def __call__(self, view):
        return torch.full((view.hidden.shape[0],), 0.5)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("batch", ["single", "padded3"])
@pytest.mark.parametrize("policy", [EarlyExit(threshold=1.0), EarlyExit(threshold=1.0, measure=Ones()),
                                    EarlyExit(threshold=1.0, schedule="decaying"),
                                    EarlyExit(threshold=0.5, measure=Halves())],
                         ids=["softmax", "ones", "decay", "loop-halves"])
def test_never_triggering_threshold_equals_hf_greedy(kind, batch, policy):
    model = make_model(kind, init=4.0)
    ids, mask = padded_batch()
    if batch == "single":
        ids, mask = ids[:1], mask[:1]
    ref = hf_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=16)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, early_exit=policy)
    assert torch.equal(out, ref)
    # the tiny model must produce varied tokens, or the comparison would be vacuous
    assert len(set(ref.flatten().tolist())) > 3


def test_sampling_with_never_triggering_threshold_equals_hf_sampling():
    model = make_model("v1.1-untied-2+4", init=4.0)
    ids, mask = padded_batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=20, temperature=0.8)
    torch.manual_seed(123)
    ref = hf_generate(model, **kwargs)
    torch.manual_seed(123)
    out = model.generate(early_exit=EarlyExit(threshold=1.0), **kwargs)
    assert torch.equal(out, ref)


def test_without_early_exit_generate_is_hf_own():
    model = make_model("v1.0-tied-3+3", init=4.0)
    ids, mask = padded_batch()
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8),
                       type(model).generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=8))


# ---------------------------------------------------------------------------------------------------------------
# Independent reference: no cache, whole sequence at once, blocks above a position's exit layer are the identity.
# ---------------------------------------------------------------------------------------------------------------
def _run_forced(model, ids, mask, layers, max_new_tokens=10):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         early_exit=ForcedExit(layers), return_dict_in_generate=True, output_logits=True)
    return out, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("mode", ["fixed", "random"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
def test_forced_exit_logits_match_no_cache_reference(kind, mode, dtype, tol):
    model = make_model(kind, dtype=dtype, init=1.0)
    ids, mask = padded_batch()
    num_layers = model.config.num_decoder_layers
    steps = 10
    if mode == "fixed":
        layers = torch.full((3, steps), 2, dtype=torch.long)
    else:
        layers = torch.randint(1, num_layers + 1, (3, steps), generator=torch.Generator().manual_seed(5))
    out, logits = _run_forced(model, ids, mask, layers, steps)
    real = out.exit_layers > 0
    assert torch.equal(out.exit_layers[real], layers[:, : out.exit_layers.shape[1]][real])
    ref = reference_exit_logits(model, ids, mask, out.sequences, out.exit_layers.clamp(min=1))
    assert ref.shape == logits.shape
    err = (ref - logits).abs()[real].max().item()
    assert err < tol, f"max |Δlogit| = {err}"
    # The reference is sensitive to propagation: pretending skipped layers were run changes the logits.
    if mode == "random":
        wrong = reference_exit_logits(model, ids, mask, out.sequences, torch.full_like(out.exit_layers, num_layers))
        assert (wrong - logits).abs()[real].max().item() > 100 * tol


@pytest.mark.parametrize("policy", [EarlyExit(threshold=0.95), EarlyExit(threshold=0.8, measure="saturation"),
                                    "random-forced"], ids=["softmax", "saturation", "random-forced"])
def test_batch_with_per_sequence_exits_equals_each_sequence_alone(policy):
    # float64: batched and single-row float32 matmuls round differently (~1e-5 relative on logits ~50),
    # which could flip a threshold decision; in float64 the comparison is exact up to 1e-9.
    model = make_model("v1.1-untied-2+4", init=2.0, dtype=torch.float64)
    ids, mask = padded_batch()
    steps = 10
    if policy == "random-forced":
        table = torch.randint(1, 5, (3, steps), generator=torch.Generator().manual_seed(9))
        batch_policy = ForcedExit(table)
        single = [ForcedExit(table[i: i + 1]) for i in range(3)]
    else:
        batch_policy, single = policy, [policy] * 3
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, early_exit=batch_policy,
                         return_dict_in_generate=True, output_logits=True)
    logits = torch.stack(out.logits, dim=1)
    assert len(set(out.exit_layers[out.exit_layers > 0].tolist())) > 1, "exits must differ across tokens/rows"
    for i in range(3):
        length = int(mask[i].sum())
        alone = model.generate(input_ids=ids[i: i + 1, :length], attention_mask=mask[i: i + 1, :length],
                               max_new_tokens=steps, early_exit=single[i], return_dict_in_generate=True,
                               output_logits=True)
        n = alone.sequences.shape[1]
        assert torch.equal(out.sequences[i, :n], alone.sequences[0])
        assert torch.equal(out.exit_layers[i, : n - 1], alone.exit_layers[0])
        alone_logits = torch.stack(alone.logits, dim=1)[0]
        assert (logits[i, : n - 1] - alone_logits).abs().max().item() < 1e-9


def test_finished_sequences_are_padded_and_summary_counts_real_tokens():
    model = make_model("v1.0-tied-3+3", init=4.0)
    ids, mask = padded_batch()
    # make a token that row 0 emits early the EOS, so that some rows finish before others
    eos = int(hf_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=16)[0, 3])
    ref = hf_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=16, eos_token_id=eos)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, eos_token_id=eos,
                         early_exit=EarlyExit(threshold=1.0), return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    gen = out.sequences[:, 1:]
    finished_after = [(row == eos).nonzero() for row in gen]
    assert any(len(f) for f in finished_after), "test needs a row that hits EOS"
    for i, f in enumerate(finished_after):
        if len(f):
            eos_at = int(f[0])
            assert (gen[i, eos_at + 1:] == 0).all()
            assert (out.exit_layers[i, eos_at + 1:] == 0).all()
            assert (out.exit_layers[i, : eos_at + 1] == 3).all()
    n_real = (out.exit_layers > 0).sum(1).float()
    assert torch.allclose(out.mean_exit_layer, out.exit_layers.sum(1) / n_real)
    assert torch.allclose(out.layer_fraction, torch.ones(3))


def test_exits_respect_min_exit_layer_and_report_confidences():
    model = make_model("v1.1-untied-2+4", init=2.0)
    ids, mask = padded_batch()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, return_dict_in_generate=True,
                         early_exit=EarlyExit(threshold=0.0, min_exit_layer=3))
    real = out.exit_layers > 0
    assert (out.exit_layers[real] >= 3).all()
    exited_early = real & (out.exit_layers < 4)
    assert exited_early.any()
    assert (out.confidences[exited_early] > 0).all()
    assert out.layer_fraction.max() < 1


def test_threshold_zero_saves_layers_and_decaying_schedule_is_more_conservative():
    model = make_model("v1.1-untied-2+4", init=2.0)
    ids, mask = padded_batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, return_dict_in_generate=True)
    const = model.generate(early_exit=EarlyExit(threshold=0.2), **kwargs)
    decay = model.generate(early_exit=EarlyExit(threshold=0.2, schedule="decaying"), **kwargs)
    assert const.mean_exit_layer.mean() <= decay.mean_exit_layer.mean()
