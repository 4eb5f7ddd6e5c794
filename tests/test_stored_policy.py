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


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_an_unreadable_generation_config_holding_a_policy_is_refused_not_dropped(tmp_path, damage):
    """Issue 26, root cause 8: transformers reads an unreadable generation_config.json as none (defaults from
    config.json), which dropped the policy stored there and decoded the full model without a word."""
    import torch
    from transformers import T5ForConditionalGeneration

    from hf_safe_exit import enable

    model = enable(random_t5(seed=0))
    model.generation_config.early_exit = EarlyExit(0.5, measure="softmax")
    model.save_pretrained(tmp_path)
    path = tmp_path / "generation_config.json"
    text = path.read_text()
    assert '"early_exit"' in text
    path.write_text(text[: len(text) // 2] if damage == "truncated" else "\x00garbage{")
    reloaded = enable(T5ForConditionalGeneration.from_pretrained(tmp_path))
    assert getattr(reloaded.generation_config, "early_exit", None) is None  # what transformers does with it
    with pytest.raises(InvalidStoredPolicyError, match=r"generation_config\.json'.*(invalid or truncated JSON)"):
        reloaded.generate(input_ids=torch.tensor([[5, 6, 1]]), max_new_tokens=2)
    # the policy given in the call does not need the file
    reloaded.generate(input_ids=torch.tensor([[5, 6, 1]]), max_new_tokens=2, early_exit=EarlyExit(0.5))


def test_a_saved_copy_decodes_as_the_model_it_was_saved_from(tmp_path):
    """A model saved with save_pretrained keeps its meta head and the calibrations of the folder it was loaded from:
    before, the copy had neither, so measure='auto' resolved to softmax and RiskControlled(eps) found nothing."""
    import shutil

    import torch
    from transformers import T5ForConditionalGeneration

    from hf_safe_exit import enable
    from hf_safe_exit.models import default_model_path

    source = tmp_path / "source"
    shutil.copytree(default_model_path(), source)
    model = enable(T5ForConditionalGeneration.from_pretrained(source))
    assert EarlyExitConfig().resolve(model).measure_name == "meta"
    ids = torch.tensor([[37, 8, 5, 12, 1]])
    before = model.generate(input_ids=ids, early_exit=RiskControlled(eps=0.05)).tolist()
    model.save_pretrained(tmp_path / "copy")
    copy = enable(T5ForConditionalGeneration.from_pretrained(tmp_path / "copy"))
    assert EarlyExitConfig().resolve(copy).measure_name == "meta"
    assert copy.generate(input_ids=ids, early_exit=RiskControlled(eps=0.05)).tolist() == before
