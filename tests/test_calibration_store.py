"""The one calibration layout in a model folder: per-task tables, the primary task, task=, and the errors.

Reference: ``RiskControlled(...).fit_table(table)`` on the very table that was stored (the unfitted policy must
bind to the same λ̂), and the files on disk.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

import hf_safe_exit
from hf_safe_exit.fingerprint import model_fingerprint
from hf_safe_exit.models import default_model_available, default_model_path
from hf_safe_exit.risk import (CALIBRATION_FILENAME, LossTable, MissingCalibrationError, RiskControlled,
                               store_calibration)


pytestmark = pytest.mark.usefixtures("fresh_risk_cache")


def _model_dir(tmp_path):
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=2, num_decoder_layers=2,
                   decoder_start_token_id=0)
    model = T5ForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp_path)
    return T5ForConditionalGeneration.from_pretrained(tmp_path).eval()


def _table(model, task, seed, scale=0.3):
    rng = np.random.default_rng(seed)
    lambdas = np.linspace(0, 1, 11)
    loss = np.clip(0.5 + scale * (1 - lambdas)[:, None] * rng.uniform(-0.2, 1, (11, 300)), 0, 1)
    return LossTable.from_task_losses(lambdas, loss, metadata={"model_fingerprint": model_fingerprint(model),
                                                               "task": task, "measure": "softmax"})


def test_task_choice_primary_and_listing(tmp_path):
    model = _model_dir(tmp_path)
    cnndm, squad = _table(model, "cnndm", 0), _table(model, "squad", 1, scale=0.1)
    store_calibration(tmp_path, table=cnndm)  # the first task stored is the primary one
    store_calibration(tmp_path, table=squad)
    assert json.loads((tmp_path / "calibration" / "config.json").read_text()) == {"primary_task": "cnndm"}
    assert (tmp_path / "calibration" / "squad" / CALIBRATION_FILENAME).is_file()
    for eps in (0.02, 0.05, 0.1):
        assert RiskControlled(eps).resolve(model).threshold == RiskControlled(eps).fit_table(cnndm).threshold
        got = RiskControlled(eps, task="squad").resolve(model)
        assert got.threshold == RiskControlled(eps).fit_table(squad).threshold and got.certificate.task == "squad"
    assert RiskControlled(0.05).resolve(model).threshold != RiskControlled(0.05, task="squad").resolve(model).threshold
    with pytest.raises(MissingCalibrationError, match=r"no calibration for task 'xsum'.*cnndm, squad"):
        RiskControlled(0.05, task="xsum").resolve(model)
    with pytest.raises(ValueError, match="collected on task 'cnndm'"):  # a fitted policy checks its task too
        RiskControlled(0.05, task="squad").fit_table(cnndm)

    store_calibration(tmp_path, table=squad, primary=True)
    assert RiskControlled(0.05).resolve(model).certificate.task == "squad"
    (tmp_path / "calibration" / "config.json").unlink()  # two tasks and no primary: the error lists them
    with pytest.raises(MissingCalibrationError, match=r"several tasks \(cnndm, squad\).*task="):
        RiskControlled(0.05).resolve(model)


def test_stored_json_without_table_serves_only_its_own_request(tmp_path):
    model = _model_dir(tmp_path)
    table = _table(model, "cnndm", 0)
    fitted = RiskControlled(0.05, delta=0.1, method="ucb").fit_table(table)
    store_calibration(tmp_path, controlled=fitted)
    assert not (tmp_path / "calibration" / "cnndm" / CALIBRATION_FILENAME).exists()
    bound = RiskControlled(0.05, delta=0.1, method="ucb").resolve(model)
    assert bound.threshold == fitted.threshold and bound.certificate == fitted.certificate
    with pytest.raises(MissingCalibrationError, match=r"eps=0\.1.*loss table"):
        RiskControlled(0.1, delta=0.1, method="ucb").resolve(model)


def test_checkpoints_with_a_root_calibration_still_load(tmp_path):
    model = _model_dir(tmp_path)
    table = _table(model, "cnndm", 0)
    table.save(tmp_path / CALIBRATION_FILENAME)  # the layout before calibration/<task>/
    assert RiskControlled(0.05).resolve(model).threshold == RiskControlled(0.05).fit_table(table).threshold
    assert RiskControlled(0.05, task="cnndm").resolve(model).certificate.task == "cnndm"
    with pytest.raises(MissingCalibrationError, match="for task 'cnndm', not 'squad'"):
        RiskControlled(0.05, task="squad").resolve(model)


def test_store_refuses_a_table_without_task(tmp_path):
    model = _model_dir(tmp_path)
    table = _table(model, "cnndm", 0)
    table.metadata.pop("task")
    with pytest.raises(ValueError, match="task="):
        store_calibration(tmp_path, table=table)
    assert store_calibration(tmp_path, table=table, task="cnndm")[0].parent.name == "cnndm"


@pytest.mark.skipif(not default_model_available(), reason="the shipped default model is not installed")
@pytest.mark.parametrize("task", ["cnndm", "squad"])
def test_default_model_fits_any_eps_for_every_task(task):
    model, _ = hf_safe_exit.load_default_model()
    table = LossTable.load(default_model_path() / "calibration" / task)
    assert table.metadata["task"] == task and table.metadata["model_fingerprint"] == model_fingerprint(model)
    shipped = RiskControlled.from_pretrained(default_model_path(), task=task)
    for eps, delta, method in ((0.02, None, "crc"), (0.05, None, "crc"), (0.1, 0.1, "ucb"), (0.2, 0.05, "ltt")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an infeasible ε warns (λ̂ = 1): the comparison still holds
            expected = RiskControlled(eps, delta=delta, method=method).fit_table(table).threshold
            got = RiskControlled(eps, delta=delta, method=method, task=task if task != "cnndm" else None).resolve(model)
        assert got.threshold == expected
    # the shipped risk_control.json is the stored table refitted at its own request
    params = {k: shipped.get_params()[k] for k in ("eps", "delta", "method", "bound", "risk")}
    assert RiskControlled(**params).fit_table(table).threshold == shipped.threshold
