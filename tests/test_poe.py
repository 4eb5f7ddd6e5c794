"""Product-of-Experts anytime exits: the math against brute force, the decoder against a no-cache reference."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

import hf_safe_exit
from hf_safe_exit import EarlyExit
from hf_safe_exit.confidence import softmax_margin
from hf_safe_exit.compat import cache_kwargs
from hf_safe_exit.decoding.early_exit_loop import new_decoder_cache
from no_cache_reference import reference_layer_logits
from hf_safe_exit.decoding.poe import PoEConfig, PoEState, poe_distribution, poe_log_probs, poe_weights

# ----------------------------------------------------------------------------------------------------------------
# The distribution, by brute force
# ----------------------------------------------------------------------------------------------------------------

# 3 exits, 4 rows, 4 classes (float64).
#   row 0: every logit positive: a plain weighted product.
#   row 1: class 0 is vetoed at exit 2 (logit -1), class 3 at exit 1 (0.0 counts as a veto: ReLU(0) = 0).
#   row 2: every class still alive after exit 1 is vetoed at exit 2: the product vanishes at exits 2 and 3
#          and each of them falls back to its own softmax.
#   row 3: every class vetoed at exit 1 already: softmax at every exit.
ROWS = [
    [[1.0, 2.0, 3.0, 0.5], [2.0, 1.0, 0.5, 1.5], [3.0, 0.7, 2.0, 1.0]],
    [[0.5, 4.0, 1.0, 0.0], [-1.0, 3.0, 1.0, 2.0], [4.0, 2.0, 2.5, 0.1]],
    [[0.5, -1.0, 0.2, -3.0], [-2.0, 1.0, -0.5, 5.0], [1.0, 1.0, 2.0, 3.0]],
    [[-1.0, -2.0, 0.0, -0.5], [1.0, 2.0, -3.0, 0.0], [0.5, 1.5, 2.5, 3.5]],
]
LOGITS = torch.tensor(ROWS, dtype=torch.float64).transpose(0, 1).contiguous()  # (exits, rows, classes)


def brute_force(logits, weights, activation="relu"):
    """p_l(y) ∝ ∏_{i≤l} a(z_i(y))^{w_i} with Python floats; softmax of exit l when the product is 0 everywhere."""
    L, n, C = logits.shape
    act = (lambda z: max(z, 0.0)) if activation == "relu" else (lambda z: math.log1p(math.exp(z)))
    out = torch.zeros(L, n, C, dtype=torch.float64)
    for l in range(L):
        for r in range(n):
            prod = [math.prod(act(float(logits[i, r, c])) ** weights[i] for i in range(l + 1)) for c in range(C)]
            total = sum(prod)
            if total == 0.0:
                exps = [math.exp(float(logits[l, r, c])) for c in range(C)]
                prod, total = exps, sum(exps)
            for c in range(C):
                out[l, r, c] = prod[c] / total
    return out


@pytest.mark.parametrize("weights,expected_w", [("linear", [1 / 3, 2 / 3, 1.0]), ("uniform", [1.0, 1.0, 1.0]),
                                                ((0.5, 2.0, 1.5), [0.5, 2.0, 1.5])])
def test_relu_poe_equals_brute_force_product_with_fallback(weights, expected_w):
    assert poe_weights(3, weights).tolist() == pytest.approx(expected_w)
    got = poe_distribution(LOGITS, weights)
    ref = brute_force(LOGITS, expected_w)
    assert torch.allclose(got, ref, atol=1e-12, rtol=0)
    # the cases the fixture is built for
    assert got[1:, 1, 0].eq(0).all() and got[:, 1, 3].eq(0).all()  # vetoes persist at later exits
    for l in range(3):  # row 3: softmax of each exit; row 2 from exit 2 on
        assert torch.allclose(got[l, 3], torch.softmax(LOGITS[l, 3], -1), atol=1e-15)
    for l in (1, 2):
        assert torch.allclose(got[l, 2], torch.softmax(LOGITS[l, 2], -1), atol=1e-15)
    assert not torch.allclose(got[0, 2], torch.softmax(LOGITS[0, 2], -1))  # row 2 at exit 1 is a real product
    assert torch.allclose(got.sum(-1), torch.ones(3, 4, dtype=torch.float64))


def test_softplus_poe_equals_brute_force_and_never_vetoes():
    got = poe_distribution(LOGITS, "linear", activation="softplus")
    assert torch.allclose(got, brute_force(LOGITS, [1 / 3, 2 / 3, 1.0], "softplus"), atol=1e-12, rtol=0)
    assert (got > 0).all()


def test_log_probs_use_finite_minimum_for_vetoed_classes():
    logp = poe_log_probs(LOGITS)
    assert torch.isfinite(logp).all()
    assert logp[1, 1, 0] == torch.finfo(torch.float64).min
    assert torch.softmax(logp, -1)[1, 1, 0] == 0  # softmax of the log-probs is the PoE distribution again
    assert torch.allclose(torch.softmax(logp, -1), poe_distribution(LOGITS), atol=1e-15)


def test_first_exit_with_linear_weights_is_a_tempered_relu_not_the_softmax():
    # p_1 ∝ ReLU(z_1)^{1/L}: the "anytime uncertainty" of the paper, high entropy at the first exit
    z = torch.tensor([[[1.0, 4.0, 9.0]]], dtype=torch.float64).expand(2, 1, 3)
    p1 = poe_distribution(z)[0, 0]
    ref = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64) ** 0.5
    assert torch.allclose(p1, ref / ref.sum(), atol=1e-15)


def test_incremental_state_with_row_subsets_equals_the_batch_formula():
    g = torch.Generator().manual_seed(0)
    L, n, C = 4, 5, 7
    logits = torch.randn(L, n, C, generator=g, dtype=torch.float64) * 2
    logits[:2, 4] = -torch.rand(2, C, generator=g, dtype=torch.float64)  # row 4 vanishes at exit 1
    ref = poe_log_probs(logits)
    state = PoEState(PoEConfig(), L, n, torch.float64, torch.device("cpu"))
    subsets = [None, torch.tensor([0, 1, 2, 4]), torch.tensor([1, 4]), torch.tensor([4])]
    for l, rows in enumerate(subsets, start=1):
        r = torch.arange(n) if rows is None else rows
        got = state.update(l, rows, logits[l - 1, r])
        assert torch.allclose(got, ref[l - 1, r], atol=1e-12, rtol=0)


def test_config_validation_and_policy_option():
    assert EarlyExit(anytime="poe").anytime == PoEConfig()
    assert EarlyExit().anytime is None
    assert EarlyExit(anytime={"activation": "softplus"}).anytime.activation == "softplus"
    with pytest.raises(ValueError, match="anytime"):
        EarlyExit(anytime="moe")
    with pytest.raises(ValueError, match="activation"):
        PoEConfig(activation="tanh")
    with pytest.raises(ValueError, match="positive"):
        PoEConfig(weights=(1.0, -1.0))
    with pytest.raises(ValueError, match="final_layer"):
        PoEConfig(final_layer="last")
    with pytest.raises(ValueError, match="change nothing"):
        PoEConfig(prediction=False, confidence=False)
    model = make_model()
    with pytest.raises(ValueError, match="4 layers"):
        EarlyExit(anytime=PoEConfig(weights=(1.0, 2.0))).bind(model)


# ----------------------------------------------------------------------------------------------------------------
# The decoder with PoE, against a no-cache reference
# ----------------------------------------------------------------------------------------------------------------
VOCAB = 61


def make_model(dtype=torch.float64, init=2.0):
    torch.manual_seed(1)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, num_decoder_layers=4,
                   decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, initializer_factor=init,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    model = T5ForConditionalGeneration(cfg)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * init)
    return hf_safe_exit.enable(model.eval().to(dtype))


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, VOCAB, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids * mask, mask


def _generate(model, policy, steps=10, **kwargs):
    ids, mask = batch()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, early_exit=policy,
                         return_dict_in_generate=True, output_logits=True, **kwargs)
    ref = reference_layer_logits(model, ids, mask, out.sequences, out.exit_layers.clamp(min=1))
    return out, torch.stack(out.logits, dim=1), ref


# PoE margins are far smaller than softmax margins (ReLU'd logits are not exponentiated, and the linear weights
# temper the early exits), so each configuration gets a λ inside its own margin range.
@pytest.mark.parametrize("config,lam", [(PoEConfig(), 0.012), (PoEConfig(final_layer="poe"), 0.012),
                                        (PoEConfig(prediction=False), 0.012), (PoEConfig(confidence=False), 0.5),
                                        (PoEConfig(activation="softplus", weights="uniform"), 0.07)],
                         ids=["default", "final-poe", "confidence-only", "prediction-only", "softplus-uniform"])
def test_poe_decode_follows_the_rule_at_every_token(config, lam):
    """Every real token: exit at the first layer l >= min_exit_layer whose confidence (the softmax margin of the
    PoE distribution at l if ``confidence``, else of layer l's own logits) exceeds λ; its logits are the PoE
    log-probabilities of layers 1..l (``prediction``; at the last layer only with ``final_layer="poe"``), else
    layer l's own logits; the emitted token is their argmax."""
    model = make_model(init=1.0)
    min_layer = 2
    out, logits, ref = _generate(model, EarlyExit(threshold=lam, measure="softmax", min_exit_layer=min_layer,
                                                  anytime=config))
    L = model.config.num_decoder_layers
    w = config.weights
    poe_ref = poe_log_probs(ref, w, config.activation)  # (L, b, T, V): PoE over layers 1..l at each position
    conf_src = poe_ref if config.confidence else ref
    real = out.exit_layers > 0
    seen = set()
    for b, t in real.nonzero().tolist():
        e = int(out.exit_layers[b, t])
        seen.add(e)
        margins = [float(softmax_margin(conf_src[l - 1, b, t])) for l in range(min_layer, L)]
        expected_exit = next((l for l, m in zip(range(min_layer, L), margins) if m > lam), L)
        assert e == expected_exit, (b, t, margins)
        if e < L:
            assert out.confidences[b, t].item() == pytest.approx(margins[e - min_layer], abs=1e-6)  # stored as float32
        use_poe = config.prediction and (e < L or config.final_layer == "poe")
        expected = (poe_ref if use_poe else ref)[e - 1, b, t]
        if use_poe:
            expected = torch.where(expected > torch.finfo(expected.dtype).min / 2, expected,
                                   torch.full_like(expected, torch.finfo(expected.dtype).min))
            p_got, p_ref = torch.softmax(logits[b, t], -1), torch.softmax(expected, -1)
            assert torch.allclose(p_got, p_ref, atol=1e-10), (b, t, e)
            assert torch.equal(p_got == 0, p_ref == 0)  # the same vetoed tokens
        else:
            assert torch.allclose(logits[b, t], expected, atol=1e-9), (b, t, e)
        assert int(out.sequences[b, t + 1]) == int(expected.argmax())
    assert len(seen) == 3, f"exits must vary for the check to mean something, saw {seen}"
    if config.confidence and config.activation == "relu":
        # the PoE must actually change decisions compared with plain early exit at the same λ
        plain = model.generate(input_ids=batch()[0], attention_mask=batch()[1], max_new_tokens=10,
                               early_exit=EarlyExit(threshold=lam, measure="softmax", min_exit_layer=min_layer),
                               return_dict_in_generate=True)
        assert not torch.equal(plain.exit_layers, out.exit_layers)


def test_at_threshold_one_default_poe_is_exactly_the_full_model_and_final_poe_is_the_L_layer_product():
    """λ = 1: no token exits before layer L. With ``final_layer="model"`` (default) the output is bit-identical
    to HF greedy (the plain full model); with ``final_layer="poe"`` every token is the argmax of the product over
    all L layers of the teacher-forced full forward (no exits, so no propagation), which differs from the plain
    model here."""
    model = make_model()
    ids, mask = batch()
    hf = type(model).generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=10,
                              **cache_kwargs(new_decoder_cache(model)))
    default = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10,
                             early_exit=EarlyExit(threshold=1.0, measure="softmax", anytime="poe"))
    assert torch.equal(default, hf)
    out, logits, ref = _generate(model, EarlyExit(threshold=1.0, measure="softmax",
                                                  anytime=PoEConfig(final_layer="poe")))
    L = model.config.num_decoder_layers
    assert (out.exit_layers == L).all()
    full = poe_log_probs(ref)[L - 1]
    assert torch.allclose(torch.softmax(logits, -1), torch.softmax(full, -1), atol=1e-10)
    assert torch.equal(out.sequences[:, 1:], full.argmax(-1))
    assert not torch.equal(out.sequences, hf)


def test_poe_decode_with_masking_processor_stays_finite():
    # min_new_tokens masks EOS with -inf; vetoed tokens carry a finite minimum, so no NaN appears.
    model = make_model(dtype=torch.float32)
    ids, mask = batch()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                         early_exit=EarlyExit(threshold=0.2, measure="softmax", anytime="poe"),
                         return_dict_in_generate=True, output_scores=True)
    scores = torch.stack(out.scores, 1)
    assert not torch.isnan(scores).any()
    assert (out.sequences[:, 1:] != 1).all()
