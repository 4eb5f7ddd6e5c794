"""Confidence measures against hand computations; policy validation and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

import hf_safe_exit
from hf_safe_exit import EarlyExit, ForcedExit
from hf_safe_exit.confidence import (LayerView, MetaClassifierHead, MetaConfidence, MetaHeadConfig,
                                     MissingMetaHeadError, SaturationConfidence, SoftmaxConfidence, get_measure)
from hf_safe_exit.decoding.readout import intermediate_logits
from hf_safe_exit.policy import decaying_threshold


def view(layer=2, hidden=None, prev=None, normed=None, logits=None):
    hidden = hidden if hidden is not None else torch.zeros(2, 2)
    return LayerView(layer=layer, step=0, rows=torch.arange(hidden.shape[0]), hidden=hidden,
                     prev_hidden=prev if prev is not None else hidden, normed=normed if normed is not None else hidden,
                     logits_fn=lambda: logits)


def test_softmax_margin_by_hand():
    # row 0: probabilities (0.5, 0.3, 0.2) -> 0.5 - 0.3; row 1: uniform -> 0
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)], [1.0, 1.0, 1.0]])
    conf = SoftmaxConfidence()(view(logits=logits))
    assert torch.allclose(conf, torch.tensor([0.2, 0.0]), atol=1e-6)


def test_saturation_cosine_by_hand_and_zero_at_first_layer():
    hidden = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    prev = torch.tensor([[1.0, 1.0], [3.0, 4.0]])
    conf = SaturationConfidence()(view(layer=3, hidden=hidden, prev=prev))
    assert torch.allclose(conf, torch.tensor([1 / math.sqrt(2), 1.0]), atol=1e-6)
    assert conf.max() <= 1.0  # clamped: never above a threshold of 1
    assert torch.equal(SaturationConfidence()(view(layer=1, hidden=hidden, prev=prev)), torch.zeros(2))


def test_meta_head_probability_by_hand_and_save_load(tmp_path):
    head = MetaClassifierHead(MetaHeadConfig(d_model=2))
    with torch.no_grad():
        head.net.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, -1.0]]))
        head.net.bias.copy_(torch.tensor([0.0, 0.5]))
    normed = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    z = normed[:, 0] - normed[:, 1] + 0.5  # class-1 logit minus class-0 logit (0)
    expected = 1 / (1 + torch.exp(-z))
    conf = MetaConfidence(head)(view(hidden=normed, normed=normed))
    assert torch.allclose(conf, expected, atol=1e-6)
    head.save_pretrained(tmp_path)
    loaded = MetaClassifierHead.from_pretrained(tmp_path)
    assert torch.allclose(MetaConfidence(loaded)(view(hidden=normed, normed=normed)), expected, atol=1e-6)
    mlp = MetaClassifierHead(MetaHeadConfig(d_model=2, hidden_size=4))
    assert mlp(normed).shape == (2, 2)


def tiny_t5(num_decoder_layers=3):
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                               num_decoder_layers=num_decoder_layers, num_heads=4,
                                               decoder_start_token_id=0, initializer_factor=2.0)).eval()


def test_intermediate_readout_of_last_layer_equals_model_logits():
    model = tiny_t5()
    ids = torch.tensor([[5, 6, 7, 1]])
    out = model(input_ids=ids, decoder_input_ids=torch.tensor([[0, 3, 4]]), output_hidden_states=True)
    # HF's last decoder_hidden_states entry is already final-layer-normed; the same ops: equal bit for bit
    assert torch.equal(intermediate_logits(model, out.decoder_hidden_states[-1], normed=True), out.logits)


def test_meta_measure_finds_head_saved_next_to_model(tmp_path):
    model = tiny_t5()
    model.save_pretrained(tmp_path)
    MetaClassifierHead(MetaHeadConfig(d_model=16)).save_pretrained(tmp_path)
    loaded = hf_safe_exit.enable(T5ForConditionalGeneration.from_pretrained(tmp_path).eval())
    out = loaded.generate(input_ids=torch.tensor([[5, 6, 7, 1]]), max_new_tokens=4,
                          early_exit=EarlyExit(threshold=0.0, measure="meta"), return_dict_in_generate=True)
    assert isinstance(loaded.meta_head, MetaClassifierHead)
    assert out.exit_layers.shape == (1, 4)


def test_decaying_threshold_formula():
    # λ_t = 0.9 λ + 0.1 exp(-τ t / N), paper form
    assert decaying_threshold(0.5, 0, 64) == pytest.approx(0.45 + 0.1)
    assert decaying_threshold(0.5, 32, 64) == pytest.approx(0.45 + 0.1 * math.exp(-2.0))
    assert decaying_threshold(1.0, 10, 64) == 1.0
    policy = EarlyExit(threshold=0.3, schedule="decaying")
    assert policy.threshold_at(16, 64) == pytest.approx(0.27 + 0.1 * math.exp(-1.0))
    assert EarlyExit(threshold=0.3).threshold_at(16, 64) == 0.3


# ---------------------------------------------------------------------------------------------- errors
def test_non_t5_model_raises_type_error_naming_supported_classes():
    bart = BartForConditionalGeneration(BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=16, decoder_ffn_dim=16))
    with pytest.raises(TypeError, match="T5ForConditionalGeneration"):
        hf_safe_exit.enable(bart)
    with pytest.raises(TypeError, match="T5ForConditionalGeneration"):
        hf_safe_exit.generate(bart, input_ids=torch.tensor([[3, 4]]), early_exit=EarlyExit())


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.5", True])
def test_threshold_outside_unit_interval_raises(bad):
    with pytest.raises(ValueError, match=r"threshold"):
        EarlyExit(threshold=bad)


@pytest.mark.parametrize("layer", [0, 4, -1])
def test_min_exit_layer_outside_decoder_raises(layer):
    model = hf_safe_exit.enable(tiny_t5(num_decoder_layers=3))
    if layer < 1:  # no model has such a layer: refused when the configuration is made
        with pytest.raises(ValueError, match=r"min_exit_layer=-?\d must be a positive integer"):
            EarlyExit(min_exit_layer=layer)
    else:  # outside this model's decoder: refused when bound to it
        with pytest.raises(ValueError, match=r"min_exit_layer.*\[1, 3\]"):
            model.generate(input_ids=torch.tensor([[5, 6, 1]]), max_new_tokens=2,
                           early_exit=EarlyExit(min_exit_layer=layer))
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        model.generate(input_ids=torch.tensor([[5, 6, 1]]), max_new_tokens=2, early_exit=ForcedExit(layer))


def test_meta_measure_without_trained_head_raises():
    model = hf_safe_exit.enable(tiny_t5())
    with pytest.raises(MissingMetaHeadError, match="train"):
        model.generate(input_ids=torch.tensor([[5, 6, 1]]), max_new_tokens=2, early_exit=EarlyExit(measure="meta"))


def test_unknown_measure_and_schedule_and_beam_search_raise():
    with pytest.raises(ValueError, match="softmax"):
        EarlyExit(measure="entropy")
    with pytest.raises(ValueError, match="schedule"):
        EarlyExit(schedule="linear")
    with pytest.raises(ValueError, match="softmax"):
        get_measure(3)
    model = hf_safe_exit.enable(tiny_t5())
    with pytest.raises(ValueError, match="num_beams=1"):
        model.generate(input_ids=torch.tensor([[5, 6, 1]]), max_new_tokens=2, num_beams=2, early_exit=EarlyExit())
    with pytest.raises(TypeError, match="bind"):
        model.generate(input_ids=torch.tensor([[5, 6, 1]]), max_new_tokens=2, early_exit=0.9)


def test_fingerprint_ignores_an_attached_meta_head_but_sees_weight_changes():
    from hf_safe_exit import model_fingerprint

    model = tiny_t5()
    before = model_fingerprint(model)
    model.meta_head = MetaClassifierHead(MetaHeadConfig(d_model=16))
    assert model_fingerprint(model) == before
    with torch.no_grad():
        model.decoder.block[1].layer[2].DenseReluDense.wo.weight.mul_(1.5)
    assert model_fingerprint(model) != before
    assert model_fingerprint(tiny_t5(num_decoder_layers=2)) != before


def test_forced_exit_answers_on_the_rows_device_from_the_table():
    # On a GPU a lookup that goes through the host is a synchronisation per checked layer: the answer must be made
    # on the rows' device. The "meta" device stands in for a GPU here (no data, so any host round trip would fail).
    model = T5ForConditionalGeneration(T5Config(vocab_size=16, d_model=8, d_kv=4, d_ff=8, num_heads=2, num_layers=2,
                                                num_decoder_layers=3, decoder_start_token_id=0))
    table = torch.tensor([[1, 2, 3], [3, 1, 2]])
    for policy, rows, step, expected in ((ForcedExit(2), torch.tensor([1, 0]), 0, [2, 2]),
                                         (ForcedExit(table), torch.tensor([1]), 1, [1]),
                                         (ForcedExit(table), torch.tensor([0, 1]), 7, [3, 2])):  # past the end: last
        on_meta, measure = policy.bind(model).measure, policy.bind(model).measure
        for layer in (1, 2, 3):
            meta_view = LayerView(layer=layer, step=step, rows=rows.to("meta"), hidden=torch.zeros(len(rows), 8,
                                  device="meta"), prev_hidden=None, normed=None, logits_fn=None)
            assert on_meta(meta_view).device.type == "meta"
            cpu_view = LayerView(layer=layer, step=step, rows=rows, hidden=torch.zeros(len(rows), 8),
                                 prev_hidden=None, normed=None, logits_fn=None)
            assert measure(cpu_view).tolist() == [float(layer >= e) for e in expected]
