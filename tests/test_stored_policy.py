"""Policies stored on a generation config and stored calibrations keep exactly the configuration they were made for."""

from __future__ import annotations

import json

import pytest

from hf_safe_exit import EarlyExit, EarlyExitConfig, RiskControlled
from hf_safe_exit.confidence import ConfidenceMeasure
from hf_safe_exit.decoding.stored_policy import policy_from_dict, policy_to_dict
from hf_safe_exit.errors import InvalidStoredPolicyError
from hf_safe_exit.fingerprint import model_fingerprint
from hf_safe_exit.risk import store_calibration
from tiny_t5 import random_t5
from toy_losses import toy_table


def test_a_fitted_request_is_stored_with_the_configuration_it_was_fitted_for():
    table = toy_table(schedule="decaying", decay_tau=1.0, measure="saturation")
    fitted = RiskControlled(0.05, allow_missing_fingerprint=True).fit_table(table)
    spec = json.loads(json.dumps(policy_to_dict(fitted)))
    assert spec["config"] == fitted.calibration.config.to_dict() and spec["allow_missing_fingerprint"] is True
    rebuilt = policy_from_dict(spec)
    assert rebuilt.config == fitted.calibration.config and rebuilt.allow_missing_fingerprint
    # refitted on another folder's table of another configuration: refused, not silently decoded
    with pytest.raises(ValueError, match="config= asks for"):
        rebuilt.fit_table(toy_table(measure="softmax"))


@pytest.mark.parametrize("spec,match", [
    ({"type": "EarlyExit", "threshold": 0.5, "shedule": "decaying"}, r"\['shedule'\] are not early-exit settings"),
    ({"type": "RiskControlled", "eps": 0.05, "config": {"exit_layer": [2]}}, r"\['exit_layer'\] are not early-exit"),
    ({"type": "RiskControlled", "eps": 0.05, "measure": "meta", "schedule": None}, "outside \"config\""),
    ({"type": "EarlyExit", "threshold": 2}, r"threshold=2 is outside \[0, 1\]"),      # issue 26, root cause 8
    ({"type": "EarlyExit", "threshold": 0.5, "min_exit_layer": 0}, "min_exit_layer=0 must be a positive integer"),
])
def test_a_misspelt_or_old_partial_spec_is_refused_naming_the_file(spec, match):
    with pytest.raises(InvalidStoredPolicyError, match=match) as info:
        policy_from_dict(spec)
    assert "generation_config.json" in str(info.value) and "\n" not in str(info.value)


def test_old_flat_specs_without_settings_still_load():
    old = {"type": "RiskControlled", "eps": 0.05, "delta": None, "method": "crc", "bound": "wsr",
           "risk": "performance_gap", "monotonize": None, "measure": None, "schedule": None, "min_exit_layer": None,
           "decay_tau": None, "anytime": None, "exit_layers": None, "task": "cnndm"}
    rebuilt = policy_from_dict(old)
    assert rebuilt.config is None and rebuilt.task == "cnndm"


def test_auto_serves_a_stored_calibration_with_or_without_its_table(tmp_path):
    model = random_t5(seed=3)
    table = toy_table(model_fingerprint(model))
    fitted = RiskControlled(0.1, 0.1, "ucb").fit_table(table)
    store_calibration(tmp_path / "with", table=table, controlled=fitted)
    store_calibration(tmp_path / "without", controlled=fitted)  # only risk_control.json
    for folder in ("with", "without"):
        model.name_or_path = str(tmp_path / folder)
        got = RiskControlled(0.1, 0.1, "ucb", config=EarlyExitConfig()).resolve(model)  # "auto": the file's measure
        assert got.threshold == fitted.threshold and got.config.measure_name == "softmax"


def test_a_custom_measure_calibrates_but_cannot_be_written(tmp_path):
    class Mine(ConfidenceMeasure):
        name = "mine"

        def __call__(self, view):
            return view.hidden.new_ones(view.hidden.shape[0])

    table = toy_table(measure="mine")
    rc = RiskControlled(0.1, config=EarlyExitConfig(measure=Mine()), allow_missing_fingerprint=True).fit_table(table)
    assert isinstance(rc.calibration.config.measure, Mine)
    with pytest.raises(ValueError, match="custom measure 'mine' cannot be written"):
        rc.save_pretrained(tmp_path)
    assert not (tmp_path / "risk_control.json").exists()
    assert isinstance(EarlyExit(0.5, config=rc.calibration.config).measure, Mine)
