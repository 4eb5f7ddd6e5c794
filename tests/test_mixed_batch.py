"""Batches whose rows exit at different layers: every row as if decoded alone, and as the no-cache reference.

At a layer where only some rows still decide, the decoder runs attention on batch *slices* of the K/V caches
(``RowPlan`` segments: runs of deciding rows, merged across short gaps whose rows get a zero query and whose
outputs are dropped) instead of copying the deciding rows out of the caches. Each test runs under three plans:
``runs`` (never merge: one call per run of consecutive deciding rows), ``span`` (always merge: one call over the
slice from the first to the last deciding row, padding the rows in between), the default cost model, and
``dense`` (:mod:`hf_safe_exit.decoding.dense_rows`, the GPU default: every block on the whole batch, the rows that
exited held at their exit state).
Float64 throughout: batched and single-row matmuls round differently (~1e-16 relative), far below the 1e-9
tolerances, so exit decisions and tokens must agree exactly.
"""

from __future__ import annotations

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

import hf_safe_exit
from hf_safe_exit import EarlyExit, ForcedExit
from hf_safe_exit.confidence import ConfidenceMeasure
from hf_safe_exit.decoding import dense_rows, row_plan
from hf_safe_exit.decoding.poe import poe_log_probs
from no_cache_reference import reference_exit_logits, reference_layer_logits

VOCAB = 89
STEPS = 10
PLANS = {"runs": 0, "span": 10**15, "default": None, "dense": "dense"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(params=sorted(PLANS))
def plan(request, monkeypatch):
    call_bytes = PLANS[request.param]
    if call_bytes == "dense":  # every block on the whole batch, exited rows held by torch.where (the GPU path)
        monkeypatch.setitem(dense_rows.DENSE_ROWS, "cpu", True)
    elif call_bytes is not None:
        monkeypatch.setitem(row_plan.CALL_COST_BYTES, "cpu", call_bytes)
    return request.param


def make_model(kind: str = "v1.1", init: float = 2.0):
    if kind == "v1.1":  # untied head, gated-GELU, shallower encoder than decoder
        options = dict(num_layers=2, num_decoder_layers=4, tie_word_embeddings=False, feed_forward_proj="gated-gelu")
        torch.manual_seed(1)
    else:  # T5 v1.0: tied head with scaled decoder output, ReLU
        options = dict(num_layers=3, num_decoder_layers=3, tie_word_embeddings=True, feed_forward_proj="relu")
        torch.manual_seed(2)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_heads=4, decoder_start_token_id=0,
                   eos_token_id=1, pad_token_id=0, initializer_factor=init, **options)
    model = T5ForConditionalGeneration(cfg)
    if not cfg.scale_decoder_outputs:
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * init)
    return hf_safe_exit.enable(model.eval().to(torch.float64))


def source_batch(rows: int = 6, seed: int = 4):
    """Rows of different source lengths (right padding), so every row attends over its own encoder mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (rows, 11), generator=g)
    lengths = torch.tensor([11, 7, 4, 11, 9, 5, 11, 6][:rows])
    mask = (torch.arange(11)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def scattered_table(rows: int, num_layers: int, seed: int = 7) -> torch.Tensor:
    """Exit layers per (row, step) such that, at every step, rows exit at different layers and the rows still
    deciding at some layer are not consecutive (a gap between deciding rows)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        table = torch.randint(1, num_layers + 1, (rows, STEPS), generator=g)
        ok = True
        for t in range(STEPS):
            col = table[:, t]
            gaps = [bool((d := (col >= j).nonzero().squeeze(1)).numel() > 1 and (d.diff() > 1).any())
                    for j in range(2, num_layers + 1)]
            ok &= len(set(col.tolist())) >= 3 and any(gaps)
        if ok:
            return table


class TableMeasure(ConfidenceMeasure):
    """Confidence 1 once ``view.layer`` reaches the row's prescribed exit layer; records every view and checks
    that its tensors cover exactly ``view.rows``. ``read_logits`` also reads the view's logits (then the exit's
    logits come from that read-out instead of the one batched read-out after the last block)."""

    name = "table"

    def __init__(self, table: torch.Tensor, read_logits: bool = False):
        self.table, self.read_logits, self.views = table, read_logits, []

    def __call__(self, view):
        n = view.rows.numel()
        assert view.rows.dtype == torch.long and n > 0
        assert view.hidden.shape[0] == view.prev_hidden.shape[0] == view.normed.shape[0] == n
        if self.read_logits:
            assert view.logits.shape == (n, VOCAB)
        self.views.append((view.step, view.layer, view.rows.tolist()))
        target = self.table[view.rows, min(view.step, self.table.shape[1] - 1)]
        return (view.layer >= target).double()


def generate(model, ids, mask, policy, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, early_exit=policy,
                           return_dict_in_generate=True, output_logits=True, **kwargs)


def assert_each_row_as_alone(model, ids, mask, out, policies, **kwargs):
    """Row i of the batch output equals row i decoded alone from its unpadded source (tokens, exit layers and
    confidences exactly, logits to 1e-9); after the row finished the batch carries padding."""
    logits = torch.stack(out.logits, dim=1)
    for i, policy in enumerate(policies):
        n_src = int(mask[i].sum())
        row_kwargs = {k: (v[i: i + 1] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        alone = generate(model, ids[i: i + 1, :n_src], mask[i: i + 1, :n_src], policy, **row_kwargs)
        n = alone.sequences.shape[1]
        steps = alone.exit_layers.shape[1]
        assert torch.equal(out.sequences[i, :n], alone.sequences[0]), i
        assert (out.sequences[i, n:] == model.config.pad_token_id).all()
        assert torch.equal(out.exit_layers[i, :steps], alone.exit_layers[0]), i
        assert (out.exit_layers[i, steps:] == 0).all()
        assert torch.equal(out.confidences[i, :steps].isnan(), alone.confidences[0].isnan())
        assert torch.allclose(out.confidences[i, :steps].nan_to_num(-1), alone.confidences[0].nan_to_num(-1))
        err = (logits[i, :steps] - torch.stack(alone.logits, dim=1)[0]).abs().max().item()
        assert err < 1e-9, (i, err)


def assert_matches_no_cache_reference(model, ids, mask, out, prompt_len: int = 1):
    """Logits of every real token equal the no-cache recomputation at its exit layer (prompt tokens: full depth)."""
    L = model.config.num_decoder_layers
    layers = out.exit_layers.clamp(min=1)
    layers = torch.cat([torch.full((layers.shape[0], prompt_len - 1), L), layers], dim=1)
    ref = reference_exit_logits(model, ids, mask, out.sequences, layers)[:, prompt_len - 1:]
    logits = torch.stack(out.logits, dim=1)
    real = out.exit_layers > 0
    err = (ref - logits).abs()[real].max().item()
    assert err < 1e-10, err


@pytest.mark.parametrize("read_logits", [False, True], ids=["batched-readout", "measure-logits"])
@pytest.mark.parametrize("kind", ["v1.1", "v1.0"])
def test_forced_mixed_exits_equal_rows_alone_and_reference(plan, kind, read_logits):
    model = make_model(kind)
    L = model.config.num_decoder_layers
    ids, mask = source_batch()
    table = scattered_table(ids.shape[0], L)
    measure = TableMeasure(table, read_logits)
    out = generate(model, ids, mask, EarlyExit(threshold=0.5, measure=measure, min_exit_layer=1))
    real = out.exit_layers > 0
    assert torch.equal(out.exit_layers[real], table[:, : out.exit_layers.shape[1]][real])
    # every view lists exactly the rows still deciding (unfinished, exit layer not reached), in batch order; a dense
    # step shows the measure the whole batch, and asks it only while some row still decides
    for step, layer, rows in measure.views:
        deciding = [b for b in range(ids.shape[0]) if out.exit_layers[b, step] >= layer]
        assert rows == (list(range(ids.shape[0])) if plan == "dense" and deciding else deciding), (step, layer)
    assert {layer for _, layer, _ in measure.views} == set(range(1, L))
    assert_matches_no_cache_reference(model, ids, mask, out)
    assert_each_row_as_alone(model, ids, mask, out,
                             [EarlyExit(threshold=0.5, measure=TableMeasure(table[i: i + 1], read_logits))
                              for i in range(ids.shape[0])])
    # the same schedule through the public ForcedExit policy gives the same output
    forced = generate(model, ids, mask, ForcedExit(table))
    assert torch.equal(forced.sequences, out.sequences) and torch.equal(forced.exit_layers, out.exit_layers)
    assert all((a - b).abs().max() < 1e-12 for a, b in zip(forced.logits, out.logits))


def test_forced_mixed_exits_after_a_decoder_prompt(plan):
    model = make_model("v1.1")
    ids, mask = source_batch()
    table = scattered_table(ids.shape[0], model.config.num_decoder_layers, seed=11)
    prompt = torch.tensor([[0, 7, 9, 4]] * ids.shape[0])
    out = generate(model, ids, mask, ForcedExit(table), decoder_input_ids=prompt)
    assert (out.sequences[:, :4] == prompt).all()
    assert_matches_no_cache_reference(model, ids, mask, out, prompt_len=4)
    assert_each_row_as_alone(model, ids, mask, out, [ForcedExit(table[i: i + 1]) for i in range(ids.shape[0])],
                             decoder_input_ids=prompt)


def _eos_finishing_rows_at_different_steps(model, ids, mask, policy):
    """A token that, used as EOS, ends at least two rows at different steps while another row keeps going."""
    free = generate(model, ids, mask, policy).sequences[:, 1:]
    for token in torch.unique(free).tolist():
        if token == model.config.pad_token_id:
            continue
        first = [int((row == token).nonzero()[0]) if (row == token).any() else None for row in free]
        ends = {f for f in first if f is not None and f < STEPS - 2}
        if len(ends) >= 2 and any(f is None for f in first):
            return token
    pytest.fail("no token ends rows at different steps: the test needs other seeds")


@pytest.mark.parametrize("measure,threshold", [("softmax", 0.99), ("softmax_shortlist", 0.99), ("saturation", 0.8)])
def test_threshold_exits_with_rows_finishing_at_different_steps(plan, measure, threshold):
    model = make_model("v1.1")
    ids, mask = source_batch()
    policy = EarlyExit(threshold=threshold, measure=measure)
    eos = _eos_finishing_rows_at_different_steps(model, ids, mask, policy)
    out = generate(model, ids, mask, policy, eos_token_id=eos)
    finished = (out.exit_layers == 0).any(dim=1)
    assert finished.sum() >= 2 and not finished.all()
    assert len({int((r > 0).sum()) for r in out.exit_layers[finished]}) >= 2, "rows must finish at different steps"
    # at some step with a finished row, the rows still running exit at different layers
    mixed = [t for t in range(out.exit_layers.shape[1])
             if (out.exit_layers[:, t] == 0).any() and len(set(out.exit_layers[:, t].tolist()) - {0}) >= 2]
    assert mixed, out.exit_layers
    assert_matches_no_cache_reference(model, ids, mask, out)
    assert_each_row_as_alone(model, ids, mask, out, [policy] * ids.shape[0], eos_token_id=eos)


def test_poe_anytime_with_mixed_exits(plan):
    model = make_model("v1.1", init=1.0)
    L = model.config.num_decoder_layers
    ids, mask = source_batch()
    policy = EarlyExit(threshold=0.012, anytime="poe")
    out = generate(model, ids, mask, policy)
    logits = torch.stack(out.logits, dim=1)
    assert any(len(set(out.exit_layers[:, t].tolist())) >= 3 for t in range(STEPS)), out.exit_layers
    ref = reference_layer_logits(model, ids, mask, out.sequences, out.exit_layers.clamp(min=1))
    poe_ref = poe_log_probs(ref)
    for b, t in (out.exit_layers > 0).nonzero().tolist():
        e = int(out.exit_layers[b, t])
        if e < L:  # PoE prediction of layers 1..e
            p_got, p_ref = torch.softmax(logits[b, t], -1), torch.softmax(poe_ref[e - 1, b, t], -1)
            assert torch.allclose(p_got, p_ref, atol=1e-10), (b, t, e)
        else:  # final_layer="model": the model's own logits
            assert torch.allclose(logits[b, t], ref[L - 1, b, t], atol=1e-9), (b, t)
    assert_each_row_as_alone(model, ids, mask, out, [policy] * ids.shape[0])


def test_row_plan_segments():
    plan = row_plan.RowPlan

    def segments(rows, row_bytes, call_bytes):
        return [(lo, hi, start, stop, None if keep is None else keep.tolist())
                for lo, hi, start, stop, keep in plan(rows, row_bytes, call_bytes, torch.device("cpu")).segments]

    rows = [0, 2, 3, 7]
    assert segments(rows, 100, 0) == [(0, 1, 0, 1, None), (2, 4, 1, 3, None), (7, 8, 3, 4, None)]
    assert segments(rows, 100, 150) == [(0, 4, 0, 3, [0, 2, 3]), (7, 8, 3, 4, None)]  # gaps of 1 row merge
    assert segments(rows, 100, 300) == [(0, 8, 0, 4, [0, 2, 3, 7])]
    assert segments([1, 2, 3], 100, 0) == [(1, 4, 0, 3, None)]


def test_never_exiting_equals_hf_generate(plan):
    # our loop with every token at the last layer (ForcedExit(L); λ = 1 itself runs HF's own loop) under every plan,
    # dense steps included, no row finishing early: tokens and logits HF's bit for bit ("v1.0": HF's generate sizes
    # its cache by the encoder depth, so it cannot run "v1.1" with its deeper decoder)
    model = make_model("v1.0").float()  # float32: HF returns float32 logits, so both are then bit-comparable
    ids, mask = source_batch()
    ours = generate(model, ids, mask, ForcedExit(model.config.num_decoder_layers))
    theirs = type(model).generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=STEPS,
                                  return_dict_in_generate=True, output_logits=True)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ours.logits, theirs.logits))


def test_half_precision_model_with_float32_feed_forward_output(plan, tmp_path):
    # from_pretrained(dtype=float16) keeps T5's `wo` in float32, so block outputs are float32 while the embedding is
    # float16: a mixed batch must carry its states in the promoted dtype (this used to raise in index_copy)
    make_model("v1.0").save_pretrained(tmp_path)
    model = hf_safe_exit.enable(T5ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float16).eval())
    assert model.decoder.block[0].layer[-1].DenseReluDense.wo.weight.dtype == torch.float32
    ids, mask = source_batch()
    table = scattered_table(ids.shape[0], model.config.num_decoder_layers)
    # finished rows make a step start with a subset of rows, while every state is still a float16 embedding
    eos = _eos_finishing_rows_at_different_steps(model, ids, mask, ForcedExit(table))
    out = generate(model, ids, mask, ForcedExit(table), eos_token_id=eos)
    real = out.exit_layers > 0
    assert not real.all()
    assert torch.equal(out.exit_layers[real], table[:, : out.exit_layers.shape[1]][real])
    assert all(torch.isfinite(step[real[:, t]]).all() for t, step in enumerate(out.logits))
