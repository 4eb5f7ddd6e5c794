"""Decoding as the calibration did (issue 16): its lengths and settings apply by default, a call or a model that
departs from them warns once with both values (worded for either direction), and each test sees the warnings
afresh (tests/conftest.py clears them), whatever ran before it."""

import json
import warnings

import pytest
import torch
from transformers import GenerationConfig

import hf_safe_exit
from hf_safe_exit.decoding.calibrated_lengths import clear_warned
from hf_safe_exit.fingerprint import model_fingerprint
from hf_safe_exit.policy import EarlyExit
from hf_safe_exit.risk import RISK_CONTROL_FILENAME, RiskControlled

from tiny_t5 import random_t5
from toy_losses import toy_table

pytestmark = pytest.mark.usefixtures("one_thread")


INPUTS = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 1], [9, 3, 2, 1, 0, 0]]),
          "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])}


@pytest.fixture
def calibrated():
    model = hf_safe_exit.enable(random_t5(initializer_factor=4.0))
    table = toy_table(fingerprint=model_fingerprint(model), measure="saturation", schedule="decaying",
                      min_exit_layer=2, max_new_tokens=25, max_input_length=6)
    return model, RiskControlled(0.1).fit_table(table), table


def _reference(model, rc, **kwargs):
    """The same decoder, every setting spelled out by hand."""
    policy = EarlyExit(threshold=rc.threshold, measure="saturation", schedule="decaying", min_exit_layer=2)
    return model.generate(**INPUTS, early_exit=policy, **kwargs)


def test_calibrated_lengths_and_settings_apply_by_default(calibrated):
    model, rc, table = calibrated
    assert rc.certificate.max_new_tokens == 25 and rc.certificate.max_input_length == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a call that agrees with the calibration warns about nothing
        out = model.generate(**INPUTS, early_exit=rc, return_dict_in_generate=True)
        unfitted = RiskControlled(0.1)
        model.early_exit_calibration = table
        out_stored = model.generate(**INPUTS, early_exit=unfitted)
    reference = _reference(model, rc, max_new_tokens=25)
    assert torch.equal(out.sequences, reference) and torch.equal(out_stored, reference)
    assert reference.shape[1] > 21  # longer than HF's own default (max_length 20) would have given
    bound = out.early_exit  # measure, schedule and min exit layer are the calibration's
    assert bound.measure.name == "saturation" and bound.schedule == "decaying" and bound.min_exit_layer == 2
    assert out.certificate.max_new_tokens == 25


def test_a_call_that_contradicts_the_calibration_warns_once_with_both_values(calibrated):
    model, rc, _ = calibrated
    with pytest.warns(UserWarning, match=r"this call sets max_new_tokens=5.*calibrated with max_new_tokens=25"):
        out = model.generate(**INPUTS, early_exit=rc, max_new_tokens=5)
    assert torch.equal(out, _reference(model, rc, max_new_tokens=5))  # the call's value is used
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(**INPUTS, early_exit=rc, max_new_tokens=5)  # once per (setting, values)
    with pytest.warns(UserWarning, match=r"generation_config sets max_length=9 \(8 new tokens\).*max_new_tokens=25"):
        model.generate(**INPUTS, early_exit=rc, generation_config=GenerationConfig(max_length=9))
    # a length stored on the model is a default: the calibration's wins, and says so
    model.generation_config.max_new_tokens = 7
    with pytest.warns(UserWarning, match=r"model\.generation_config sets max_new_tokens=7.*calibration's 25"):
        out = model.generate(**INPUTS, early_exit=rc)
    assert torch.equal(out, _reference(model, rc, max_new_tokens=25))


def test_an_input_longer_than_the_calibrations_truncation_warns(calibrated):
    model, rc, _ = calibrated
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 6 tokens at most: as calibrated (padding does not count)
        model.generate(**INPUTS, early_exit=rc)
    long = {"input_ids": torch.arange(2, 12)[None], "attention_mask": torch.ones(1, 10, dtype=torch.long)}
    with pytest.warns(UserWarning, match=r"input of 10 tokens is longer than the calibration's max_input_length=6.*"
                                         r"truncation=True, max_length=6"):
        model.generate(**long, early_exit=rc)


def test_calibrated_lengths_survive_save_and_load_from_old_files(calibrated, tmp_path):
    """Files written before the certificate recorded the lengths: they are read from "calibration"."""
    _, rc, _ = calibrated
    rc.save_pretrained(tmp_path)
    data = json.loads((tmp_path / RISK_CONTROL_FILENAME).read_text())
    data.pop("digest")  # a file written before digests, as before the certificate recorded the lengths
    for key in ("max_new_tokens", "max_input_length"):
        del data["certificate"][key]
    (tmp_path / RISK_CONTROL_FILENAME).write_text(json.dumps(data))
    loaded = RiskControlled.from_pretrained(tmp_path)
    assert loaded.certificate == rc.certificate


@pytest.mark.parametrize("stored,way", [(40, "longer"), (7, "shorter")])
def test_a_stored_model_length_warning_says_which_way_it_departs(calibrated, stored, way):
    """The calibration's 25 new tokens win over the model's stored length, longer or shorter; the warning says
    which, and what passing the stored length would do. (max_new_tokens=7 is also warned about by the test
    above: this one passes after it only because every test starts with no warning shown.)"""
    model, rc, _ = calibrated
    model.generation_config.max_new_tokens = stored
    with pytest.warns(UserWarning) as caught:
        out = model.generate(**INPUTS, early_exit=rc)
    (message,) = [str(w.message) for w in caught if "model.generation_config" in str(w.message)]
    assert f"sets max_new_tokens={stored}" in message and f"Pass max_new_tokens={stored}" in message
    assert f"({way} outputs than calibrated" in message
    assert ("longer" if way == "shorter" else "shorter") not in message
    assert torch.equal(out, _reference(model, rc, max_new_tokens=25))


def test_clear_warned_shows_a_warning_again(calibrated):
    model, rc, _ = calibrated
    with pytest.warns(UserWarning, match="this call sets max_new_tokens=3"):
        model.generate(**INPUTS, early_exit=rc, max_new_tokens=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(**INPUTS, early_exit=rc, max_new_tokens=3)  # once per process ...
    clear_warned()
    with pytest.warns(UserWarning, match="this call sets max_new_tokens=3"):
        model.generate(**INPUTS, early_exit=rc, max_new_tokens=3)  # ... until cleared
