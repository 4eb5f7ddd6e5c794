"""``exit_layers``: the confidence is checked only after the named decoder layers, and calibrations keep the setting.

Decoding is checked against a brute-force reference: the no-cache decoder (``no_cache_reference``) gives every
layer's logits at every generated position; each position's exit layer must be the first *named* layer whose
full-vocabulary softmax margin (top-1 − top-2 probability, computed here with ``torch.softmax``) exceeds λ, else the
last layer, and its token the argmax of that layer's logits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hf_safe_exit import EarlyExit, EarlyExitConfig, RiskControlled
from hf_safe_exit.confidence import ConfidenceMeasure
from hf_safe_exit.errors import InconsistentCalibrationError
from hf_safe_exit.risk import CALIBRATION_FILENAME, RISK_CONTROL_FILENAME
from no_cache_reference import reference_layer_logits
from test_decoding_early_exit import make_model, padded_batch
from toy_losses import toy_table

L = 4  # the "v1.1-untied-2+4" model's decoder depth


class LayerSpy(ConfidenceMeasure):
    """Records the layers it is asked about; never confident (so every named layer is reached)."""

    name = "layer_spy"

    def __init__(self):
        self.layers: list[int] = []

    def __call__(self, view):
        self.layers.append(view.layer)
        return torch.zeros(view.hidden.shape[0])


@pytest.mark.parametrize("exit_layers,lam", [((1, 3), 0.8), ((2,), 0.9), ((1, 2, 3), 0.95)])
def test_exits_equal_the_brute_force_first_named_layer_over_lambda(exit_layers, lam):
    model = make_model("v1.1-untied-2+4", dtype=torch.float64, init=2.0)
    ids, mask = padded_batch()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, return_dict_in_generate=True,
                         early_exit=EarlyExit(threshold=lam, measure="softmax", exit_layers=exit_layers))
    layers = reference_layer_logits(model, ids, mask, out.sequences, out.exit_layers.clamp(min=1))
    top2 = torch.softmax(layers, dim=-1).topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]  # (L, batch, T)
    real = out.exit_layers > 0
    expected = torch.full_like(out.exit_layers, L)
    for layer in sorted(exit_layers, reverse=True):  # the first named layer over λ wins
        expected = torch.where(margin[layer - 1] > lam, layer, expected)
    assert torch.equal(out.exit_layers[real], expected[real])
    tokens = layers.argmax(-1)  # (L, batch, T): each position's token is its exit layer's argmax
    emitted = tokens.gather(0, (out.exit_layers.clamp(min=1) - 1)[None])[0]
    assert torch.equal(out.sequences[:, 1:][real], emitted[real])
    # the choice of λ makes the test see tokens exit at more than one layer (named ones and, but for (1, 2, 3), L)
    assert (out.exit_layers[real] < L).any() and len(set(out.exit_layers[real].tolist())) >= 2
    assert set(out.exit_layers[real].tolist()) <= set(exit_layers) | {L}


def test_the_measure_runs_only_at_named_layers_from_min_exit_layer_on():
    model = make_model("v1.1-untied-2+4")
    ids, mask = padded_batch()
    spy = LayerSpy()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5,
                   early_exit=EarlyExit(threshold=0.5, measure=spy, exit_layers=(3, 2), min_exit_layer=2))
    assert spy.layers and set(spy.layers) == {2, 3}
    spy_all = LayerSpy()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5,
                   early_exit=EarlyExit(threshold=0.5, measure=spy_all))
    assert set(spy_all.layers) == {1, 2, 3}  # without exit_layers every layer but the last is checked


@pytest.mark.parametrize("bad", [(), (0, 2), (2, 2), "3", (True,), (1.5,), 3])
def test_bad_exit_layers_are_refused_at_construction(bad):
    with pytest.raises(ValueError, match="exit_layers=.* must be distinct positive integers"):
        EarlyExit(exit_layers=bad)
    with pytest.raises(ValueError, match="exit_layers="):
        EarlyExitConfig(exit_layers=bad)


def test_exit_layers_outside_the_decoder_or_below_min_exit_layer_are_refused_at_bind():
    model = make_model("v1.1-untied-2+4")
    with pytest.raises(ValueError, match=r"\[5\] lie outside the decoder, which has 4 layers"):
        EarlyExit(exit_layers=(2, 5)).bind(model)
    with pytest.raises(ValueError, match=r"\[1\] lie below min_exit_layer=2"):
        EarlyExit(exit_layers=(1, 3), min_exit_layer=2).bind(model)
    assert EarlyExit(exit_layers=[3, 1]).exit_layers == (1, 3)


def test_a_calibration_decodes_with_the_exit_layers_its_losses_were_collected_with(tmp_path):
    model = make_model("v1.1-untied-2+4")
    from hf_safe_exit.fingerprint import model_fingerprint

    table = toy_table(fingerprint=model_fingerprint(model), measure="softmax", exit_layers=[1, 3])
    rc = RiskControlled(0.05, delta=0.1, method="ucb").fit_table(table)
    assert rc.resolve(model).exit_layers == (1, 3)
    asks = EarlyExitConfig(measure="softmax", exit_layers=(2,))
    with pytest.raises(ValueError, match=r"'exit_layers': \[1, 3\].*but config= asks for .*'exit_layers': \[2\]"):
        RiskControlled(0.05, delta=0.1, method="ucb", config=asks).fit_table(table)
    plain = toy_table(fingerprint=model_fingerprint(model), measure="softmax")  # every layer checked
    with pytest.raises(ValueError, match=r"'exit_layers': None.*but config= asks for .*'exit_layers': \[2\]"):
        RiskControlled(0.05, delta=0.1, method="ucb", config=asks).fit_table(plain)
    assert RiskControlled(0.05, delta=0.1, method="ucb").fit_table(plain).resolve(model).exit_layers is None
    # saved and loaded: the setting survives, and an edit against the table beside it is refused
    rc.save_pretrained(tmp_path)
    table.save(tmp_path / CALIBRATION_FILENAME)
    assert RiskControlled.from_pretrained(tmp_path).resolve(model).exit_layers == (1, 3)
    path = tmp_path / RISK_CONTROL_FILENAME
    data = json.loads(path.read_text())
    data["calibration"]["exit_layers"] = [2]
    path.write_text(json.dumps(data))
    with pytest.raises(InconsistentCalibrationError, match=r"calibration.exit_layers is \[2\].*exit_layers=\[1, 3\]"):
        RiskControlled.from_pretrained(tmp_path)


def test_policies_with_exit_layers_survive_generation_config_json():
    from hf_safe_exit.decoding.stored_policy import policy_from_dict, policy_to_dict

    for policy in (EarlyExit(threshold=0.7, exit_layers=(3, 1)),
                   RiskControlled(0.1, config=EarlyExitConfig(exit_layers=[2]), task="cnndm")):
        spec = json.loads(json.dumps(policy_to_dict(policy)))
        rebuilt = policy_from_dict(spec)
        assert rebuilt.config.exit_layers == policy.config.exit_layers and rebuilt.config == policy.config


def test_collect_records_exit_layers_and_decodes_with_them():
    from hf_safe_exit.calibration import collect
    from hf_safe_exit.tasks import shared_data_dir
    from tiny_calibration import tiny_cnndm

    data = shared_data_dir()
    if data is None:
        pytest.skip("offline data folder ../shared/data (or $HF_SAFE_EXIT_DATA) is absent")
    task, rows, tokenizer, model = tiny_cnndm(3, data)  # 3 decoder layers
    common = dict(lambdas=[0.0, 1.0], batch_size=3, max_new_tokens=5, max_input_length=32, progress=False)
    named = collect(model, tokenizer, task, rows, config=EarlyExitConfig(measure="softmax", exit_layers=[2]), **common)
    every = collect(model, tokenizer, task, rows, config=EarlyExitConfig(measure="softmax"), **common)
    assert named.metadata["exit_layers"] == [2] and every.metadata["exit_layers"] is None
    # at λ = 0 every token exits at the first layer whose confidence is checked
    np.testing.assert_array_equal(named.extras["mean_exit_layer"][0], 2.0)
    np.testing.assert_array_equal(every.extras["mean_exit_layer"][0], 1.0)
    assert RiskControlled(0.5).fit_table(named).resolve(model).exit_layers == (2,)
