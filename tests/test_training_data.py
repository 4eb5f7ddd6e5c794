"""Span corruption, the fixed data splits, metrics and the static-exit (truncated decoder) evaluation."""

import random

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from hf_safe_exit.decoding.readout import intermediate_logits
from hf_safe_exit.training.data import default_data_dir, load_cnndm, load_squad, pretraining_texts
from hf_safe_exit.training.evaluation import (lead3, squad_em, squad_f1, standard_error, teacher_forced_layer_scores,
                                             truncated_decoder_model)
from hf_safe_exit.training.span_corruption import random_spans_noise_mask, span_corrupt

SENT = list(range(999, 899, -1))  # <extra_id_k> = 999 - k, as in a 1000-token T5 vocabulary


def reconstruct(inputs, targets):
    """Undo span corruption: replace each sentinel in the input by the tokens that follow it in the target."""
    spans, cur = {}, None
    for t in targets[:-1]:
        if t in SENT:
            cur = t
            spans[cur] = []
        else:
            spans[cur].append(t)
    out = []
    for t in inputs[:-1]:
        out.extend(spans[t] if t in SENT else [t])
    return out


@pytest.mark.parametrize("seed", range(5))
def test_span_corruption_round_trips(seed):
    rng = random.Random(seed)
    toks = [rng.randrange(3, 800) for _ in range(rng.randrange(20, 200))]
    inp, tgt = span_corrupt(toks, SENT, rng=random.Random(seed))
    assert inp[-1] == 1 and tgt[-1] == 1
    assert reconstruct(inp, tgt) == toks
    n_spans = sum(t in SENT for t in inp)
    assert n_spans >= 1 and [t for t in inp if t in SENT] == SENT[:n_spans]  # sentinels in order 0, 1, 2, ...
    assert tgt[0] == SENT[0]


def test_noise_mask_density_and_span_length():
    rng = random.Random(0)
    masks = [random_spans_noise_mask(200, 0.15, 3.0, rng) for _ in range(200)]
    assert all(sum(m) == 30 for m in masks)  # round(200 * 0.15)
    assert all(not m[0] for m in masks)  # starts with a non-noise span, as in T5
    n_spans = [sum(1 for i, x in enumerate(m) if x and (i == 0 or not m[i - 1])) for m in masks]
    assert all(s == 10 for s in n_spans)  # round(30 / 3) spans


def test_squad_metrics_by_hand():
    assert squad_em("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    # pred {eiffel, tower, paris} vs gold {tower}: P = 1/3, R = 1, F1 = 0.5
    assert squad_f1("the Eiffel tower in Paris", ["tower", "nothing"]) == pytest.approx(2 * (1 / 4) * 1 / (1 / 4 + 1))
    assert squad_f1("abc", ["xyz"]) == 0.0


def test_lead3():
    art = "First sentence here. Second one follows! Third? Fourth sentence is dropped."
    assert lead3(art) == "First sentence here. Second one follows! Third?"


def _four_layer_decoder_and_its_forward():
    """A tiny T5 with 4 decoder layers, inputs, and its forward with every hidden state (the reference)."""
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=4, num_heads=2,
                   decoder_start_token_id=0, dropout_rate=0.0, initializer_factor=4.0)
    model = T5ForConditionalGeneration(cfg).double().eval()
    ids = torch.randint(3, 50, (2, 6))
    dec = torch.randint(3, 50, (2, 5))
    return model, ids, dec, model(input_ids=ids, decoder_input_ids=dec, output_hidden_states=True)


def test_truncated_decoder_is_static_exit():
    model, ids, dec, full = _four_layer_decoder_and_its_forward()
    for i in (1, 2, 3):
        m = truncated_decoder_model(model, i)
        got = m(input_ids=ids, decoder_input_ids=dec).logits
        ref = intermediate_logits(model, full.decoder_hidden_states[i])
        torch.testing.assert_close(got, ref)
        assert len(model.decoder.block) == 4 and model.config.num_decoder_layers == 4  # original untouched
        assert m.lm_head is model.lm_head
    assert truncated_decoder_model(model, 4) is model


def test_teacher_forced_layer_scores_match_hf_loss_of_each_truncated_decoder():
    """Reference: HF's own loss (labels=...) of the decoder truncated to i blocks, one pair at a time (no
    padding), token-weighted; accuracy by a loop over the target positions."""
    from hf_safe_exit import default_model_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=3,
                   num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
                   initializer_factor=4.0)
    model = T5ForConditionalGeneration(cfg).double().eval()
    pairs = [("summarize: the cat sat on the mat.", "a cat sat."),
             ("question: who? context: Ann met Bob in Paris last year.", "Ann"),
             ("summarize: prices rose again in May, the bureau said.", "prices rose in May, the bureau said")]
    got = teacher_forced_layer_scores(model, tok, pairs, max_source_length=32, max_target_length=6, batch_size=2)
    n_total = 0
    ce_ref, acc_ref = [0.0] * 3, [0.0] * 3
    for src, tgt in pairs:
        enc = tok(src, max_length=32, truncation=True, return_tensors="pt")
        labels = tok(tgt, max_length=6, truncation=True, return_tensors="pt").input_ids
        n = labels.shape[1]
        n_total += n
        for i in range(1, 4):
            out = truncated_decoder_model(model, i)(**enc, labels=labels)
            ce_ref[i - 1] += out.loss.item() * n
            acc_ref[i - 1] += sum(int(out.logits[0, t].argmax() == labels[0, t]) for t in range(n))
    assert got["n_tokens"] == n_total
    assert got["cross_entropy"] == pytest.approx([c / n_total for c in ce_ref], rel=1e-6)  # float32 log-softmax
    assert got["token_accuracy"] == pytest.approx([100 * a / n_total for a in acc_ref])


def test_standard_error_by_hand():
    vals = [0.1, 0.5, 0.2, 0.9, 0.0, 0.3]
    mean = sum(vals) / 6
    assert standard_error(vals) == pytest.approx((sum((v - mean) ** 2 for v in vals) / 5 / 6) ** 0.5)
    assert standard_error([0.4]) == 0.0


DATA = default_data_dir()
needs_data = pytest.mark.skipif(not (DATA / "cnn_dailymail").is_dir(),
                                reason=f"offline project data not found at {DATA} (set HF_SAFE_EXIT_DATA)")


@needs_data
def test_fixed_splits_are_disjoint():
    tr, pool = load_cnndm("train"), load_cnndm("pool")
    assert [r["row"] for r in tr] == list(range(500)) and [r["row"] for r in pool] == list(range(500, 900))
    assert not {r["id"] for r in tr} & {r["id"] for r in pool}
    sq_tr, sq_pool = load_squad("train"), load_squad("pool")
    assert len(sq_tr) == 8123 and len(sq_pool) == 2447
    assert {q["article"] for q in sq_tr} == set(range(36)) and {q["article"] for q in sq_pool} == set(range(36, 48))
    pre = set(pretraining_texts())
    assert not pre & {r["article"] for r in pool}
    assert not pre & {q["context"] for q in sq_pool}


def test_keep_first_decoder_layers_is_the_old_exit_and_round_trips(tmp_path):
    """Reference: the full model's own hidden state after block n, read out by hand (final norm, head)."""
    from hf_safe_exit.training import keep_first_decoder_layers

    model, ids, dec, full = _four_layer_decoder_and_its_forward()
    ref = intermediate_logits(model, full.decoder_hidden_states[3])
    with pytest.raises(ValueError, match="1..4"):
        keep_first_decoder_layers(model, 5)
    assert keep_first_decoder_layers(model, 3) is model
    torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=dec).logits, ref)
    model.save_pretrained(tmp_path)
    again = T5ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert again.config.num_decoder_layers == 3 and len(again.decoder.block) == 3
    torch.testing.assert_close(again(input_ids=ids, decoder_input_ids=dec).logits, ref)
