"""Thresholds of a grid decoded as the rows of one batch (issue 28, "make it affordable").

* ``RowThresholds``: every row of a batch of (example × threshold) rows decodes what ``EarlyExit(λ)`` decodes for
  that example (one ``generate`` call per λ, the established path), in float64 where batched and single products
  round alike far below any decision: tokens, exit layers and confidences exactly, logits to 1e-9; the λ = 1 rows
  are HF's own greedy tokens. Row-wise (CPU) and dense (GPU) steps, constant and decaying schedules.
* Per-row thresholds decide as float thresholds do (float32 comparisons), and follow CALM's decaying schedule.
* ``collect`` with the thresholds batched (the default) against one ``generate`` call per cell
  (``batch_thresholds=False``): the same texts and per-example costs in every cell, the same tables (timings
  aside), the encoder run once per batch instead of once per cell, seconds apportioned as documented.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

import hf_safe_exit
from hf_safe_exit import EarlyExit, EarlyExitConfig
from hf_safe_exit.calibration import StateMismatchError, collect
from hf_safe_exit.calibration.grid import ThresholdGrid
from hf_safe_exit.calibration.runner import BATCHED_TIMING
from hf_safe_exit.calibration.state import read_cells
from hf_safe_exit.compat import cache_kwargs
from hf_safe_exit.config import InvalidConfigError
from hf_safe_exit.confidence import ConfidenceMeasure
from hf_safe_exit.decoding import dense_rows
from hf_safe_exit.decoding.early_exit_loop import new_decoder_cache
from hf_safe_exit.decoding.row_thresholds import RowThresholds
from hf_safe_exit.tasks import shared_data_dir

from tiny_calibration import tiny_cnndm

DATA = shared_data_dir()
VOCAB = 89
STEPS = 10
LAMBDAS = [0.0, 0.3, 0.5, 0.7, 1.0]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(params=["rows", "dense"])
def step_kind(request, monkeypatch):
    if request.param == "dense":  # every block on the whole batch (the GPU path), checked here on the CPU
        monkeypatch.setitem(dense_rows.DENSE_ROWS, "cpu", True)
    return request.param


class StateMeasure(ConfidenceMeasure):
    """A confidence in (0, 1) that is a smooth function of the row's own state (nothing of the other rows): rows,
    layers and steps get different values, so the thresholds below split them across layers."""

    name = "state"

    def __call__(self, view):
        return torch.sigmoid(4 * view.normed[:, 0])


def float64_model():
    """A random T5 v1.1 shape (untied head, encoder shallower than the decoder), float64, with spread-out logits."""
    torch.manual_seed(1)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, num_decoder_layers=4,
                   tie_word_embeddings=False, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
                   eos_token_id=1, pad_token_id=0, initializer_factor=2.0)
    return hf_safe_exit.enable(T5ForConditionalGeneration(cfg).eval().to(torch.float64))


def sources(rows: int = 3):
    """Rows of different source lengths (right padding)."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(2, VOCAB, (rows, 11), generator=g)
    mask = (torch.arange(11)[None, :] < torch.tensor([11, 6, 8, 4][:rows])[:, None]).long()
    return ids * mask, mask


def decode(model, ids, mask, policy):
    return model.generate(input_ids=ids, attention_mask=mask, early_exit=policy, max_new_tokens=STEPS,
                          do_sample=False, return_dict_in_generate=True, output_logits=True)


def hf_greedy(model, ids, mask):
    """HF's own generate (the model's class method, no early exit), with a cache sized by the decoder."""
    with torch.no_grad():
        return type(model).generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False,
                                    **cache_kwargs(new_decoder_cache(model)))


@pytest.mark.parametrize("schedule", ["constant", "decaying"])
def test_each_row_decodes_what_its_threshold_decodes_alone(step_kind, schedule):
    model = float64_model()
    config = EarlyExitConfig(measure=StateMeasure(), schedule=schedule)
    ids, mask = sources()
    K = len(LAMBDAS)
    rows = RowThresholds([lam for _ in range(ids.shape[0]) for lam in LAMBDAS], config)  # example-major
    out = decode(model, ids.repeat_interleave(K, 0), mask.repeat_interleave(K, 0), rows)
    logits = torch.stack(out.logits, dim=1)
    for j, lam in enumerate(LAMBDAS):
        alone = decode(model, ids, mask, EarlyExit(lam, config=config))  # one call per λ, as collect did
        steps = alone.exit_layers.shape[1]
        for i in range(ids.shape[0]):
            r = i * K + j
            n = alone.sequences.shape[1]
            assert torch.equal(out.sequences[r, :n], alone.sequences[i]) and (out.sequences[r, n:] == 0).all(), (i, lam)
            assert torch.equal(out.exit_layers[r, :steps], alone.exit_layers[i]), (i, lam)
            assert (out.exit_layers[r, steps:] == 0).all()
            assert torch.equal(out.confidences[r, :steps].nan_to_num(-1), alone.confidences[i].nan_to_num(-1))
            real = alone.exit_layers[i] > 0
            err = (logits[r, :steps][real] - torch.stack(alone.logits, dim=1)[i][real]).abs().max().item()
            assert err < (1e-9 if lam < 1 else 1e-5), (i, lam, err)  # λ = 1 alone is HF's loop: float32 logits
    # not vacuous: the rows of one step exit at different layers, and the λ = 1 rows are HF's own greedy tokens
    assert len(set(out.exit_layers[:, 0].tolist()) - {0}) >= 3
    full = [i * K + LAMBDAS.index(1.0) for i in range(ids.shape[0])]
    hf = hf_greedy(model, ids, mask)
    assert torch.equal(out.sequences[full, : hf.shape[1]], hf) and (out.sequences[full, hf.shape[1]:] == 0).all()


def test_per_row_thresholds_decide_as_a_float_threshold_does():
    # a float threshold meets a float32 confidence in float32 (PyTorch rounds the scalar): the per-row thresholds
    # must too, else a confidence between float32(λ) and λ would exit in one form and not in the other
    model = float64_model()
    lams = [0.1, 0.3, 0.7, 0.9, 1.0]
    bound = RowThresholds(lams, EarlyExitConfig(measure="softmax")).bind(model)
    rows = bound.threshold_at(0, STEPS)
    assert rows.dtype == torch.float32 and rows.shape == (len(lams),)
    at = torch.tensor(lams, dtype=torch.float32)  # each row's confidence just below, at and just above float32(λ)
    for conf, exits in ((torch.nextafter(at, torch.zeros_like(at)), False), (at, False),
                        (torch.nextafter(at, torch.full_like(at, 2.0)), True)):
        # row by row, the float form as EarlyExit runs it (a python float against the row's float32 confidence)
        assert (conf > rows).tolist() == [bool(c > lam) for c, lam in zip(conf, lams)] == [exits] * len(lams)


def test_decaying_per_row_thresholds_follow_calm_eq4():
    model = float64_model()
    lams, tau, n = [0.0, 0.4, 0.8, 1.0], 2.5, 20
    bound = RowThresholds(lams, EarlyExitConfig(measure="softmax", schedule="decaying", decay_tau=tau)).bind(model)
    for step in (0, 3, 19):
        expected = [1.0 if lam >= 1 else min(max(0.9 * lam + 0.1 * math.exp(-tau * step / n), 0.0), 1.0)
                    for lam in lams]  # Schuster et al. 2022, Eq. 4
        assert torch.equal(bound.threshold_at(step, n), torch.tensor(expected, dtype=torch.float32)), step
    # rows that all stay at λ = 1 give the float 1.0: the loop then computes no confidence at all
    assert RowThresholds([1.0, 1.0], bound.config).bind(model).threshold_at(0, n) == 1.0


def test_bad_row_thresholds_are_refused_in_one_line():
    model = float64_model()
    for bad in ([], [0.5, 1.5], [0.5, True], "0.5"):
        with pytest.raises(InvalidConfigError, match="thresholds=.*one per batch row"):
            RowThresholds(bad)
    with pytest.raises(TypeError, match="EarlyExitConfig"):
        RowThresholds([0.5], config={"measure": "softmax"})
    ids, mask = sources()
    with pytest.raises(ValueError, match=r"shape \(3,\).*got torch.float32 of shape \(2,\).*one threshold per row") \
            as caught:
        decode(model, ids, mask, RowThresholds([0.5, 0.5], EarlyExitConfig(measure="softmax")))
    assert "\n" not in str(caught.value)


# ----------------------------------------------------------------------------------------------- collect
GRID = [0.0, 0.5, 0.9, 1.0]
COMMON = dict(lambdas=GRID, batch_size=2, max_new_tokens=6, max_input_length=48, progress=False)
TIMING = ("wall_time", "example_time")
needs_data = pytest.mark.skipif(DATA is None, reason="offline data folder ../shared/data is absent")


@pytest.fixture(scope="module")
def cnndm():
    _, rows, tokenizer, model = tiny_cnndm(5, DATA)  # 3 batches: 2, 2, 1 examples
    return rows, tokenizer, model


def collect_both(cnndm, tmp_path, **kwargs):
    """The same collect run batched and one call per cell, with their state folders' cells."""
    rows, tokenizer, model = cnndm
    tables, cells = {}, {}
    for batched in (True, False):
        state = tmp_path / f"state-{batched}"
        tables[batched] = collect(model, tokenizer, "cnndm", rows, state_dir=state, batch_thresholds=batched,
                                  **{**COMMON, **kwargs})
        cells[batched] = read_cells(state)
    return tables, cells


@needs_data
@pytest.mark.parametrize("schedule", ["constant", "decaying"])
def test_batched_collect_gives_every_cell_what_one_call_per_cell_gives(cnndm, tmp_path, schedule):
    tables, cells = collect_both(cnndm, tmp_path, config=EarlyExitConfig(schedule=schedule))
    assert cells[True].keys() == cells[False].keys() and len(cells[True]) == len(GRID) * 3
    for key, cell in cells[False].items():
        for name in cell:
            if name != "seconds":
                assert cells[True][key][name] == cell[name], (key, name)
    batched, alone = tables[True], tables[False]
    for name in alone.losses:
        np.testing.assert_array_equal(batched.losses[name], alone.losses[name], err_msg=name)
    for name in alone.extras:
        if name not in TIMING:
            np.testing.assert_array_equal(batched.extras[name], alone.extras[name], err_msg=name)
    # not vacuous: the thresholds exit at different layers, and some texts differ from the full model's
    layers = alone.extras["mean_exit_layer"].mean(axis=1)
    assert layers[0] < layers[GRID.index(0.9)] < layers[GRID.index(1.0)] == 3
    assert np.any(alone.losses["consistency"] > 0)
    # the tables say how their times were taken; everything else they record is the same
    assert batched.metadata.pop("timing") == BATCHED_TIMING and "timing" not in alone.metadata
    assert batched.metadata == alone.metadata


@needs_data
def test_full_model_rows_are_hf_greedy_tokens(cnndm):
    rows, tokenizer, model = cnndm
    enc = tokenizer([f"summarize: {r['article']}" for r in rows], return_tensors="pt", padding=True, truncation=True,
                    max_length=48)
    config = EarlyExitConfig(measure="softmax")
    grid = ThresholdGrid(enc, config, dict(enumerate(GRID)), max_new_tokens=STEPS)
    out = grid.output(model, EarlyExit(1.0, config=config))
    with torch.no_grad():
        hf = type(model).generate(model, **enc, max_new_tokens=STEPS, do_sample=False,
                                  **cache_kwargs(new_decoder_cache(model)))
    assert torch.equal(out.sequences, hf)
    with pytest.raises(ValueError, match="not a cell of this grid"):
        grid.output(model, EarlyExit(0.3, config=config))


@needs_data
def test_the_encoder_runs_once_per_batch(cnndm, tmp_path):
    rows, tokenizer, model = cnndm
    calls = []
    hook = model.get_encoder().register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        counts = {}
        for batched in (True, False):
            calls.clear()
            collect(model, tokenizer, "cnndm", rows, batch_thresholds=batched, **COMMON)
            counts[batched] = len(calls)
    finally:
        hook.remove()
    # 3 batches (+1: the untimed warm-up call); one call per cell runs it for each of the 4 thresholds
    assert counts == {True: 3 + 1, False: 3 * len(GRID) + 1}


def test_batched_seconds_are_the_measured_times_apportioned_by_tokens():
    model = float64_model()
    config = EarlyExitConfig(measure=StateMeasure())
    ids, mask = sources()
    grid = ThresholdGrid({"input_ids": ids, "attention_mask": mask}, config, dict(enumerate(LAMBDAS)), STEPS)
    outs = {k: grid.output(model, EarlyExit(lam, config=config)) for k, lam in enumerate(LAMBDAS)}
    seconds = {k: grid.seconds(k) for k in outs}
    assert sum(seconds.values()) == pytest.approx(grid.parts["encoder"] + grid.parts["decode"], rel=1e-12)
    # the tokens a cell's rows generated, counted on its sequences: up to and with EOS, else all of them
    eos = model.config.eos_token_id

    def generated(seq):
        new = seq[1:].tolist()
        return new.index(eos) + 1 if eos in new else len(new)

    tokens = {k: sum(generated(seq) for seq in out.sequences) for k, out in outs.items()}
    assert len(set(tokens.values())) > 1  # not vacuous: some row stops early at some threshold
    for k in outs:  # every token charged the grid's mean time per token
        per_token = (grid.parts["encoder"] + grid.parts["decode"]) / sum(tokens.values())
        assert seconds[k] == pytest.approx(per_token * tokens[k], rel=1e-9), k


@needs_data
def test_a_state_of_one_timing_is_not_resumed_with_the_other(cnndm, tmp_path):
    rows, tokenizer, model = cnndm
    state = tmp_path / "state"
    collect(model, tokenizer, "cnndm", rows, state_dir=state, **COMMON)
    assert json.loads((state / "config.json").read_text())["timing"] == BATCHED_TIMING
    with pytest.raises(StateMismatchError, match=r"other settings \(timing\).*--fresh"):
        collect(model, tokenizer, "cnndm", rows, state_dir=state, batch_thresholds=False, **COMMON)


@needs_data
def test_batch_thresholds_is_checked(cnndm):
    from hf_safe_exit.decoding.bild import bild_policy_factory

    rows, tokenizer, model = cnndm
    with pytest.raises(TypeError, match="batch_thresholds='yes' must be True, False or None"):
        collect(model, tokenizer, "cnndm", rows, batch_thresholds="yes", **COMMON)
    factory = bild_policy_factory(model, fallback=0.5)
    with pytest.raises(ValueError, match="needs the early-exit strategy.*drop batch_thresholds"):
        collect(model, tokenizer, "cnndm", rows, policy_factory=factory, batch_thresholds=True, **COMMON)
