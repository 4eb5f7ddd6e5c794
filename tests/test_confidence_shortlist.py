"""``measure="softmax_shortlist"`` against independent references.

The references are written here with plain torch ops (never the class under test): HF's own
teacher-forced decoder forward with ``output_hidden_states``, the no-cache block-by-block
reference of ``no_cache_reference`` (HF's ``T5Block``s, blocks above a position's exit layer
held fixed), and HF ``generate``.

The tiny models run in float64. Exit tests use ``initializer_factor`` 1-2 rather than 4: at 4 the
tiny decoders are so confident that every token exits at the first check, which would leave the
shortlist branch (layers after the first check) untested; the tests assert that exits do happen
after the first check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

import hf_safe_exit
from hf_safe_exit import EarlyExit
from hf_safe_exit.compat import cache_kwargs
from hf_safe_exit.confidence import (MEASURES, ConfidenceMeasure, InvalidNumCandidatesError, LayerView,
                                     SoftmaxShortlistConfidence, get_measure)
from hf_safe_exit.decoding import new_decoder_cache
from no_cache_reference import block_outputs
from tiny_t5 import CONFIGS, VOCAB


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


def make_model(kind: str, init: float) -> T5ForConditionalGeneration:
    options = dict(CONFIGS[kind])
    torch.manual_seed(options.pop("seed"))
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_heads=4, decoder_start_token_id=0,
                   eos_token_id=1, pad_token_id=0, initializer_factor=init, **options)
    model = T5ForConditionalGeneration(cfg)
    if not cfg.scale_decoder_outputs:  # give the v1.1 head its own weights, as flan-T5 checkpoints have
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * init)
    return hf_safe_exit.enable(model.eval().to(torch.float64))


def padded_batch(rows: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return (ids * mask)[:rows], mask[:rows]


# ----------------------------------------------------------------------------------------------------------
# Hand-written reference of the measure (plain torch ops, not the class under test).
# ----------------------------------------------------------------------------------------------------------
def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits of a raw block output: final layer norm, d_model**-0.5 if the config says so, head."""
    normed = model.decoder.final_layer_norm(hidden)
    if model.config.scale_decoder_outputs:
        normed = normed * (1.0 / math.sqrt(model.config.d_model))
    return normed @ model.lm_head.weight.T


def margin(z: torch.Tensor) -> float:
    p = torch.exp(z - z.max())
    p = p / p.sum()
    top = torch.sort(p, descending=True).values
    return float(top[0] - top[1])


def reference_confidences(layer_logits: list[torch.Tensor], first: int, k: int) -> dict[int, float]:
    """Per checked layer (first..len), the full margin at ``first`` and the margin over its top-k ids after."""
    cand = torch.sort(torch.argsort(layer_logits[first - 1], descending=True)[:k]).values
    out = {first: margin(layer_logits[first - 1])}
    for layer in range(first + 1, len(layer_logits) + 1):
        out[layer] = margin(layer_logits[layer - 1][cand])
    return out


class Recording(ConfidenceMeasure):
    """Runs the real (bound) measure, records every value, and returns 0 so that nothing ever exits."""

    name = "recording"

    def __init__(self, inner: ConfidenceMeasure, records: list):
        self.inner, self.records = inner, records

    def bind(self, model):
        return Recording(self.inner.bind(model), self.records)

    def __call__(self, view: LayerView) -> torch.Tensor:
        conf = self.inner(view)
        self.records.append((view.step, view.layer, view.rows.clone(), conf.clone()))
        return torch.zeros_like(conf, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Every per-layer value against a teacher-forced HF forward (nothing exits, so the states are the full model's).
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("min_exit_layer", [1, 2])
@pytest.mark.parametrize("k", [4, 16])
def test_every_layer_confidence_matches_teacher_forced_brute_force(kind, min_exit_layer, k):
    model = make_model(kind, init=2.0)
    ids, mask = padded_batch()
    records: list = []
    # threshold 0.5 < 1, so the loop computes confidences; the wrapper returns 0, so nothing exits.
    policy = EarlyExit(threshold=0.5, min_exit_layer=min_exit_layer,
                       measure=Recording(SoftmaxShortlistConfidence(num_candidates=k), records))
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, return_dict_in_generate=True,
                         early_exit=policy)
    num_layers = model.config.num_decoder_layers
    real = out.exit_layers > 0
    assert (out.exit_layers[real] == num_layers).all()
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, decoder_input_ids=out.sequences[:, :-1],
                       output_hidden_states=True, use_cache=False).decoder_hidden_states
        # decoder_hidden_states[j] is the raw output of block j for j < num_layers (index 0: embeddings)
        got: dict[tuple[int, int, int], float] = {}
        for step, layer, rows, conf in records:
            for row, value in zip(rows.tolist(), conf.tolist()):
                got[(row, step, layer)] = value
        checked = list(range(min_exit_layer, num_layers))
        expected_keys = {(b, t, j) for b, t in real.nonzero().tolist() for j in checked}
        assert set(got) == expected_keys
        gap_to_full = 0.0
        for b, t in real.nonzero().tolist():
            layer_logits = [head_logits(model, hidden[j][b, t]) for j in range(1, num_layers)]
            ref = reference_confidences(layer_logits, min_exit_layer, k)
            for j in checked:
                assert abs(got[(b, t, j)] - ref[j]) < 1e-10, (b, t, j, got[(b, t, j)], ref[j])
                gap_to_full = max(gap_to_full, abs(ref[j] - margin(layer_logits[j - 1])))
            assert got[(b, t, min_exit_layer)] == pytest.approx(margin(layer_logits[min_exit_layer - 1]), abs=1e-12)
    if min_exit_layer < num_layers - 1:
        # after the first check the value is not the full-vocabulary margin: the test tells the two apart
        assert gap_to_full > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Real exits: decisions, reported confidences and emitted tokens against the no-cache reference.
# ----------------------------------------------------------------------------------------------------------
EXIT_CASES = [  # (kind, init, measure, threshold, min_exit_layer): each spreads exits over several layers
    ("v1.1-untied-2+4", 1.0, SoftmaxShortlistConfidence(num_candidates=4), 0.8, 1),
    ("v1.1-untied-2+4", 1.0, "softmax_shortlist", 0.8, 2),
    ("v1.0-tied-3+3", 2.0, SoftmaxShortlistConfidence(num_candidates=4), 0.5, 1),
]


@pytest.mark.parametrize("kind,init,measure,threshold,min_exit_layer", EXIT_CASES)
def test_exit_decisions_confidences_and_tokens_match_no_cache_reference(kind, init, measure, threshold,
                                                                        min_exit_layer):
    model = make_model(kind, init=init)
    ids, mask = padded_batch()
    k = get_measure(measure).num_candidates
    out = hf_safe_exit.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=10,
                                return_dict_in_generate=True, output_logits=True,
                                early_exit=EarlyExit(threshold=threshold, measure=measure,
                                                     min_exit_layer=min_exit_layer))
    num_layers = model.config.num_decoder_layers
    exit_layers = out.exit_layers
    states = block_outputs(model, ids, mask, out.sequences, exit_layers.clamp(min=1))
    late_exits = outside_shortlist = 0
    with torch.no_grad():
        for b, t in (exit_layers > 0).nonzero().tolist():
            e = int(exit_layers[b, t])
            layer_logits = [head_logits(model, states[j - 1][b, t]) for j in range(1, num_layers + 1)]
            ref = reference_confidences(layer_logits[:-1], min_exit_layer, k)
            # the row kept deciding while the confidence was <= λ and exited at the first layer where it was > λ
            for j in range(min_exit_layer, e if e < num_layers else num_layers):
                assert ref[j] <= threshold, (b, t, j)
            if e < num_layers:
                assert e >= min_exit_layer and ref[e] > threshold
                assert abs(float(out.confidences[b, t]) - ref[e]) < 1e-6  # the loop reports float32
            else:
                assert math.isnan(float(out.confidences[b, t]))
            # the emitted token is the full-vocabulary argmax of the exit layer (never restricted to the shortlist)
            assert int(out.sequences[b, t + 1]) == int(layer_logits[e - 1].argmax())
            assert (out.logits[t][b] - layer_logits[e - 1]).abs().max().item() < 1e-10
            if min_exit_layer < e < num_layers:
                late_exits += 1
                cand = torch.argsort(layer_logits[min_exit_layer - 1], descending=True)[:k]
                outside_shortlist += int(layer_logits[e - 1].argmax() not in cand)
    assert late_exits > 0, "some tokens must exit after the first check (through the shortlist branch)"
    if kind == "v1.1-untied-2+4" and min_exit_layer == 1:
        # on these random weights some exit-layer argmaxes fall outside the shortlist: the read-out is still full
        assert outside_shortlist > 0


# ----------------------------------------------------------------------------------------------------------
# λ = 1 is the full model; a batch is its rows run alone.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("measure", ["softmax_shortlist", SoftmaxShortlistConfidence(num_candidates=32)],
                         ids=["by-name", "instance-k32"])
def test_threshold_one_equals_hf_greedy_generate_batch_2(kind, measure):
    model = make_model(kind, init=4.0)
    ids, mask = padded_batch(rows=2)
    # stock generate needs a decoder-sized cache when encoder and decoder depths differ
    ref = type(model).generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=12,
                               **cache_kwargs(new_decoder_cache(model)))
    out = hf_safe_exit.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=12,
                                early_exit=EarlyExit(threshold=1.0, measure=measure), return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert len(set(ref.flatten().tolist())) > 3
    real = out.exit_layers > 0
    assert (out.exit_layers[real] == model.config.num_decoder_layers).all()


@pytest.mark.parametrize("kind,init,measure,threshold,min_exit_layer", EXIT_CASES)
def test_batch_equals_each_row_alone(kind, init, measure, threshold, min_exit_layer):
    model = make_model(kind, init=init)
    ids, mask = padded_batch()
    policy = EarlyExit(threshold=threshold, measure=measure, min_exit_layer=min_exit_layer)
    kwargs = dict(max_new_tokens=10, early_exit=policy, return_dict_in_generate=True)
    out = hf_safe_exit.generate(model, input_ids=ids, attention_mask=mask, **kwargs)
    assert len(set(out.exit_layers[out.exit_layers > 0].tolist())) > 1, "tokens must exit at different layers"
    assert len({tuple(row.tolist()) for row in out.exit_layers}) == 3, "rows must exit at different layers"
    for i in range(3):
        n_in = int(mask[i].sum())
        alone = hf_safe_exit.generate(model, input_ids=ids[i:i + 1, :n_in], attention_mask=mask[i:i + 1, :n_in],
                                      **kwargs)
        n = alone.sequences.shape[1]
        assert torch.equal(out.sequences[i, :n], alone.sequences[0])
        assert torch.equal(out.exit_layers[i, :n - 1], alone.exit_layers[0])
        torch.testing.assert_close(out.confidences[i, :n - 1], alone.confidences[0], equal_nan=True,
                                   rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------
# State: bind returns a new instance; reuse across generate calls does not leak shortlists.
# ----------------------------------------------------------------------------------------------------------
@dataclass
class FixedPolicy:
    """A bound policy that hands the *same* measure instance to every generate call."""

    measure: ConfidenceMeasure
    threshold: float
    min_exit_layer: int = 1

    def bind(self, model):
        return self

    def threshold_at(self, step, max_new_tokens):
        return self.threshold


def test_bound_instance_reused_across_generate_calls_gives_fresh_results():
    model = make_model("v1.1-untied-2+4", init=1.0)
    ids, mask = padded_batch()
    unbound = SoftmaxShortlistConfidence(num_candidates=4)
    shared = unbound.bind(model)
    assert shared is not unbound and unbound._weight is None and unbound.candidates is None
    kwargs = dict(return_dict_in_generate=True)
    policy = FixedPolicy(shared, threshold=0.8)
    b_ids, b_mask = ids[1:2, :6], mask[1:2, :6]
    fresh = hf_safe_exit.generate(model, input_ids=b_ids, attention_mask=b_mask, max_new_tokens=10,
                                  early_exit=FixedPolicy(unbound.bind(model), 0.8), **kwargs)
    assert (fresh.exit_layers[0, :1] > 1).all(), "step 0 must reach the shortlist branch for this test to bite"
    # first call: another input, one token only (it ends on step 0, the step the second call starts with) ...
    hf_safe_exit.generate(model, input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=1,
                          early_exit=policy, **kwargs)
    # ... then a longer call; then the short one again, then the long one again
    for max_new in (10, 1, 10):
        reused = hf_safe_exit.generate(model, input_ids=b_ids, attention_mask=b_mask, max_new_tokens=max_new,
                                       early_exit=policy, **kwargs)
        n = reused.sequences.shape[1]
        assert torch.equal(reused.sequences[0], fresh.sequences[0, :n])
        assert torch.equal(reused.exit_layers[0], fresh.exit_layers[0, :n - 1])
        torch.testing.assert_close(reused.confidences[0], fresh.confidences[0, :n - 1], equal_nan=True,
                                   rtol=0, atol=0)
    # EarlyExit binds a fresh instance per call and leaves the one it was given untouched
    hf_safe_exit.generate(model, input_ids=b_ids, attention_mask=b_mask, max_new_tokens=3,
                          early_exit=EarlyExit(threshold=0.8, measure=unbound), **kwargs)
    assert unbound._weight is None and unbound.candidates is None


def test_hand_built_views_with_bias_scale_row_indices_and_reset():
    """Direct calls on LayerViews: a linear head with a bias, output scaling, rows out of order, step reset."""
    torch.manual_seed(0)
    d, vocab, k = 6, 11, 3
    head = torch.nn.Linear(d, vocab, bias=True).double()
    model = SimpleNamespace(lm_head=head, config=SimpleNamespace(d_model=d, scale_decoder_outputs=True))
    measure = SoftmaxShortlistConfidence(num_candidates=k).bind(model)
    scale = d ** -0.5

    def view(step, layer, rows, normed):
        rows_t = torch.tensor(rows)
        return LayerView(layer=layer, step=step, rows=rows_t, hidden=normed, prev_hidden=normed, normed=normed,
                         logits_fn=lambda: head(normed * scale))

    def by_hand(normed, cand=None):
        z = (normed * scale) @ head.weight.T + head.bias
        return [margin(row if cand is None else row[c]) for row, c in zip(z, cand or [None] * len(z))]

    with torch.no_grad():
        for trial in range(2):  # the second pass re-runs step 0 on the same instance: no leak from the first
            first = torch.randn(3, d, dtype=torch.float64) * 3
            rows = [2, 0, 4]  # batch rows out of order, row 4 beyond any earlier size
            got = measure(view(0, 2, rows, first))
            assert torch.allclose(got.double(), torch.tensor(by_hand(first), dtype=torch.float64), atol=1e-12)
            z_first = (first * scale) @ head.weight.T + head.bias
            cand = [torch.argsort(z, descending=True)[:k] for z in z_first]
            later = torch.randn(2, d, dtype=torch.float64) * 3  # rows 4 and 2 still deciding
            got = measure(view(0, 3, [4, 2], later))
            expect = by_hand(later, [cand[2], cand[0]])
            assert torch.allclose(got.double(), torch.tensor(expect, dtype=torch.float64), atol=1e-12)
            assert not math.isclose(expect[0], by_hand(later)[0], abs_tol=1e-6)
            # a new step starts from the full vocabulary again
            nxt = torch.randn(1, d, dtype=torch.float64)
            assert float(measure(view(1, 2, [0], nxt))) == pytest.approx(by_hand(nxt)[0], abs=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Registration and validation.
# ----------------------------------------------------------------------------------------------------------
def test_registered_by_name_and_default_candidates():
    assert MEASURES["softmax_shortlist"] is SoftmaxShortlistConfidence
    assert isinstance(get_measure("softmax_shortlist"), SoftmaxShortlistConfidence)
    assert EarlyExit(measure="softmax_shortlist").measure_name == "softmax_shortlist"
    assert EarlyExit(measure=SoftmaxShortlistConfidence(num_candidates=32)).measure_name == "softmax_shortlist"
    assert SoftmaxShortlistConfidence().num_candidates == 16
    assert "num_candidates=32" in repr(SoftmaxShortlistConfidence(num_candidates=32))


@pytest.mark.parametrize("bad", [0, 1, -3, True, 2.5, "8", None])
def test_num_candidates_must_be_an_integer_at_least_two(bad):
    with pytest.raises(InvalidNumCandidatesError, match=rf"num_candidates={bad!r}.*integer >= 2") as err:
        SoftmaxShortlistConfidence(num_candidates=bad)
    assert isinstance(err.value, ValueError)


def test_num_candidates_above_vocabulary_raises_at_bind_and_vocabulary_size_is_allowed():
    model = make_model("v1.0-tied-3+3", init=4.0)
    ids = torch.tensor([[5, 6, 1]])
    with pytest.raises(InvalidNumCandidatesError, match=rf"num_candidates={VOCAB + 1}.*\[2, {VOCAB}\]"):
        model.generate(input_ids=ids, max_new_tokens=2,
                       early_exit=EarlyExit(measure=SoftmaxShortlistConfidence(num_candidates=VOCAB + 1)))
    out = model.generate(input_ids=ids, max_new_tokens=4, early_exit=EarlyExit(
        threshold=0.0, measure=SoftmaxShortlistConfidence(num_candidates=VOCAB)), return_dict_in_generate=True)
    assert out.sequences.shape[1] > 1


def test_unbound_instance_raises_with_the_fix():
    with pytest.raises(ValueError, match=r"bind\(model\)"):
        SoftmaxShortlistConfidence()(LayerView(layer=1, step=0, rows=torch.tensor([0]), hidden=torch.zeros(1, 2),
                                               prev_hidden=torch.zeros(1, 2), normed=torch.zeros(1, 2),
                                               logits_fn=lambda: torch.zeros(1, 5)))
