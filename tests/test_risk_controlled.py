"""RiskControlled: fit / certificate / warnings, validation, save/load, and the early_exit= protocol."""

import json
import warnings

import numpy as np
import pytest
import torch
from transformers import T5ForConditionalGeneration

from hf_safe_exit.config import EarlyExitConfig
from hf_safe_exit.fingerprint import model_fingerprint
from hf_safe_exit.policy import EarlyExit
from hf_safe_exit.risk import (CALIBRATION_FILENAME, RISK_CONTROL_FILENAME, Calibration, LossTable,
                               MissingCalibrationError, RiskControlled, select)

from tiny_t5 import random_t5
from toy_losses import toy_table, toy_task_losses


pytestmark = pytest.mark.usefixtures("fresh_risk_cache")


def _table(fingerprint=None, **meta):
    return toy_table(fingerprint, task="toy", consistency=True, **meta)


# ---------------------------------------------------------------- fit
@pytest.mark.parametrize("method,delta,bound", [("crc", None, "wsr"), ("ucb", 0.1, "wsr"), ("ucb", 0.1, "hoeffding"),
                                                ("ucb", 0.1, "hoeffding_bentkus"), ("ltt", 0.1, "wsr"),
                                                ("naive", None, "wsr")])
def test_fit_returns_self_and_matches_select(method, delta, bound):
    table = _table()
    gap = table.losses["performance_gap"]
    rc = RiskControlled(0.1, delta=delta, method=method, bound=bound)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rc.fit(table.lambdas, gap) is rc
    sel = select(method, table.lambdas, gap, 0.1, delta, bound=bound, loss_bounds=(-1, 1))
    cert = rc.certificate
    assert rc.threshold == sel.threshold == cert.threshold
    assert cert.eps == 0.1 and cert.delta == delta and cert.method == method and cert.n == gap.shape[1]
    k = int(np.flatnonzero(table.lambdas == rc.threshold)[0])
    assert cert.empirical_risk == pytest.approx(gap[k].mean())
    assert cert.grid == sorted(table.lambdas.tolist())
    assert cert.feasible == (rc.threshold < 1)
    if method == "crc":
        n = gap.shape[1]
        assert cert.risk_bound == pytest.approx(n / (n + 1) * gap[k].mean() + 1 / (n + 1))
    if method in ("crc", "ucb", "naive") and cert.feasible:
        assert cert.risk_bound <= 0.1


def test_fit_table_records_metadata_and_chooses_risk():
    table = _table(fingerprint="abc123")
    rc = RiskControlled(0.05, risk="consistency").fit_table(table)
    assert rc.certificate.model_fingerprint == "abc123" and rc.certificate.task == "toy"
    assert rc.certificate.measure == "softmax" and rc.certificate.risk == "consistency"
    direct = RiskControlled(0.05, risk="consistency").fit(table.lambdas, table.losses["consistency"], (0, 1))
    assert direct.threshold == rc.threshold


def test_infeasible_warns_and_returns_one():
    table = _table().subset(np.arange(15))  # CRC needs eps ≥ 1/(n+1) = 0.0625
    with pytest.warns(UserWarning, match=r"n=15 calibration examples are too few.* 0\.0625 > ε = 0\.05.*"
                      r"decodes at λ = 1.*never exits early") as caught:
        rc = RiskControlled(0.05).fit_table(table)
    assert rc.threshold == 1.0 and rc.certificate.feasible is False
    assert "fails the test" not in str(caught[0].message)
    # enough examples, but every λ < 1 harms too much: the message says so instead
    with pytest.warns(UserWarning, match=r"no λ < 1 passes the test with n=400.*at the largest, λ = 0\.9"):
        assert RiskControlled(0.003).fit_table(_table()).threshold == 1.0


def test_unrestricted_gap_more_efficient_than_zero_bounded_via_api():
    table = _table()
    a = RiskControlled(0.05, 0.1, method="ucb").fit_table(table)
    b = RiskControlled(0.05, 0.1, method="ucb", risk="performance_gap_bounded").fit_table(table)
    assert a.threshold <= b.threshold


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs,match", [
    ({"eps": 0.0}, "eps"), ({"eps": 1.0}, "eps"), ({"eps": -0.1}, "eps"), ({"eps": float("nan")}, "eps"),
    ({"eps": 0.1, "delta": 0.1}, "drop delta"),                       # crc has no δ
    ({"eps": 0.1, "method": "naive", "delta": 0.1}, "drop delta"),
    ({"eps": 0.1, "method": "ucb"}, "pass delta"),
    ({"eps": 0.1, "method": "ltt"}, "pass delta"),
    ({"eps": 0.1, "method": "ucb", "delta": 0.0}, "delta"),
    ({"eps": 0.1, "method": "ucb", "delta": 1.5}, "delta"),
    ({"eps": 0.1, "method": "magic"}, "method"),
    ({"eps": 0.1, "method": "ucb", "delta": 0.1, "bound": "chernoff"}, "bound"),
    ({"eps": 0.1, "risk": "accuracy"}, "risk"),
    ({"eps": 0.1, "monotonize": "yes"}, "monotonize"),
])
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RiskControlled(**kwargs)


@pytest.mark.parametrize("lam,losses,match", [
    ([0.0, 0.5], np.zeros((2, 4)), "λ = 1"),
    ([0.0, 0.5, 1.0], np.zeros((4, 3)), "shape"),
    ([0.0, 1.0], np.zeros((2, 0)), "empty"),
    ([0.0, 1.0], np.array([[np.nan, 0.0], [0.0, 0.0]]), "NaN"),
    ([0.0, 1.0], np.array([[2.0, 0.0], [0.0, 0.0]]), "loss_bounds"),
])
def test_fit_validation(lam, losses, match):
    with pytest.raises(ValueError, match=match):
        RiskControlled(0.1).fit(lam, losses)


def test_measure_mismatch_with_table_raises():
    with pytest.raises(ValueError, match="measure"):
        RiskControlled(0.1, config=EarlyExitConfig(measure="saturation")).fit_table(_table())
    with pytest.raises(ValueError, match="no 'consistency'"):
        lam, task = toy_task_losses()
        RiskControlled(0.1, risk="consistency").fit_table(LossTable.from_task_losses(lam, task))


# ---------------------------------------------------------------- persistence
def test_save_and_load_round_trip(tmp_path):
    rc = RiskControlled(0.08, 0.1, method="ucb", bound="hoeffding_bentkus", risk="performance_gap_bounded").fit_table(
        _table(fingerprint="f00d"))
    assert rc.certificate.feasible
    path = rc.save_pretrained(tmp_path / "rc")
    assert path.endswith(RISK_CONTROL_FILENAME)
    data = json.loads((tmp_path / "rc" / RISK_CONTROL_FILENAME).read_text())
    assert data["lambda_"] == rc.threshold and data["calibration"]["model_fingerprint"] == "f00d"
    back = RiskControlled.from_pretrained(tmp_path / "rc")
    assert back.threshold == rc.threshold and back.certificate == rc.certificate
    assert back.get_params() == rc.get_params()
    assert RiskControlled.from_pretrained(path).threshold == rc.threshold  # the file itself works too


def test_save_unfitted_raises(tmp_path):
    with pytest.raises(ValueError, match="not fitted"):
        RiskControlled(0.1).save_pretrained(tmp_path)


def test_from_pretrained_missing_wraps_hub_error(monkeypatch, tmp_path):
    """A Hub repo that answers "no such file" is no calibration (MissingCalibrationError, a FileNotFoundError); one
    that cannot be asked is an error saying so (HubFileError), never "no calibration" (issue 26, root cause 9)."""
    import huggingface_hub

    from hf_safe_exit.errors import HubFileError, MissingCalibrationError

    calls = []

    def fake_download(repo_id, filename, **kw):
        calls.append((repo_id, filename, kw.get("revision")))
        raise huggingface_hub.errors.EntryNotFoundError("404")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kw: ["config.json"])
    with pytest.raises(MissingCalibrationError):
        RiskControlled.from_pretrained("someone/model", revision="v1")
    assert calls[0] == ("someone/model", RISK_CONTROL_FILENAME, "v1")

    def offline(repo_id, filename, **kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(HubFileError, match=r"someone/model.*risk_control\.json.*could not be looked up"):
        RiskControlled.from_pretrained("someone/model")
    with pytest.raises(FileNotFoundError, match="hf-safe-exit calibrate"):
        RiskControlled.from_pretrained(tmp_path)  # a directory without the file, and no calibration/ either


def test_loss_table_round_trip_and_subset(tmp_path):
    table = _table(fingerprint="0123456789abcdef", example_ids=[f"ex{i}" for i in range(400)])
    path = table.save(tmp_path)
    assert path.endswith(CALIBRATION_FILENAME)
    back = LossTable.load(tmp_path)
    assert back.metadata == table.metadata and back.bounds == table.bounds and back.digest() == table.digest()
    for name in table.losses:
        np.testing.assert_array_equal(back.losses[name], table.losses[name])
    np.testing.assert_array_equal(back.extras["task_loss"], table.extras["task_loss"])
    sub = back.subset([3, 1])
    assert sub.n == 2 and sub.metadata["example_ids"] == ["ex3", "ex1"]
    np.testing.assert_array_equal(sub.losses["consistency"], table.losses["consistency"][:, [3, 1]])


def test_loss_table_derives_risks_from_task_losses():
    lam, task = toy_task_losses()
    order = np.random.default_rng(0).permutation(len(lam))  # the λ = 1 row need not come last
    table = LossTable.from_task_losses(lam[order], task[order], task_loss_bounds=(0.0, 1.0))
    full = task[-1]
    np.testing.assert_allclose(table.losses["performance_gap"], task[order] - full)
    np.testing.assert_allclose(table.losses["performance_gap_bounded"], np.maximum(task[order] - full, 0))
    assert table.bounds["performance_gap"] == (-1.0, 1.0) and table.bounds["performance_gap_bounded"] == (0.0, 1.0)
    wide = LossTable.from_task_losses(lam, 2 * task, task_loss_bounds=(0.0, 2.0))
    assert wide.bounds["performance_gap"] == (-2.0, 2.0)
    with pytest.raises(ValueError, match="λ = 1"):
        LossTable.from_task_losses(lam[:-1], task[:-1])
    with pytest.raises(ValueError, match="bounds"):
        LossTable.from_task_losses(lam, task + 1.0)


# ---------------------------------------------------------------- the early_exit= protocol
def test_bind_fitted_gives_early_exit_with_calibrated_settings():
    model = random_t5()
    table = _table(fingerprint=model_fingerprint(model), schedule="decaying", min_exit_layer=2)
    rc = RiskControlled(0.1, 0.1, method="ucb").fit_table(table)
    bound = rc.resolve(model)
    assert isinstance(bound, EarlyExit)
    assert bound.threshold == rc.threshold and bound.schedule == "decaying" and bound.min_exit_layer == 2
    assert bound.measure.name == "softmax"
    assert not hasattr(model, "early_exit") and not hasattr(model.generation_config, "early_exit")


def test_bind_on_another_model_raises():
    model_a, model_b = random_t5(0), random_t5(1)
    rc = RiskControlled(0.1).fit_table(_table(fingerprint=model_fingerprint(model_a)))
    rc.resolve(model_a)
    with pytest.raises(ValueError, match="another model"):
        rc.resolve(model_b)


def test_fitted_from_raw_matrix_needs_measure_to_bind():
    lam, task = toy_task_losses()
    # a raw matrix records no model: binding it needs the explicit opt-out (tests/test_file_integrity.py)
    rc = RiskControlled(0.1, allow_missing_fingerprint=True).fit(lam, task - task[-1])
    with pytest.raises(ValueError, match="measure"):
        rc.resolve(random_t5())
    rc = RiskControlled(0.1, config=EarlyExitConfig(measure="saturation"), allow_missing_fingerprint=True).fit(
        lam, task - task[-1])
    assert rc.resolve(random_t5()).measure.name == "saturation"


def test_unfitted_one_liner_with_attached_table(monkeypatch):
    model = random_t5()
    table = _table(fingerprint=model_fingerprint(model))
    model.early_exit_calibration = table
    for eps, delta, method in ((0.05, None, "crc"), (0.1, 0.1, "ucb")):
        policy = RiskControlled(eps, delta, method=method)
        bound = policy.resolve(model)
        assert bound.threshold == RiskControlled(eps, delta, method=method).fit_table(table).threshold
        assert not policy.is_fitted  # the user's object is left untouched
    # cached: a second bind with the same request does not refit
    fits = []
    original = Calibration.fit
    monkeypatch.setattr(Calibration, "fit", lambda *a: fits.append(1) or original(*a))
    RiskControlled(0.05).resolve(model)
    RiskControlled(0.05).resolve(model)
    assert fits == []
    RiskControlled(0.07).resolve(model)  # a new ε fits once
    RiskControlled(0.07).resolve(model)
    assert fits == [1]


def test_unfitted_one_liner_from_checkpoint_directory(tmp_path):
    model = random_t5()
    model.save_pretrained(tmp_path)
    reloaded = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert model_fingerprint(reloaded) == model_fingerprint(model)
    with pytest.raises(MissingCalibrationError, match="hf-safe-exit calibrate"):
        RiskControlled(0.05).resolve(reloaded)
    _table(fingerprint=model_fingerprint(model)).save(tmp_path / CALIBRATION_FILENAME)
    bound = RiskControlled(0.05).resolve(reloaded)
    assert bound.threshold == RiskControlled(0.05).fit_table(LossTable.load(tmp_path)).threshold


def test_unfitted_one_liner_rejects_table_of_another_model():
    model = random_t5()
    model.early_exit_calibration = _table(fingerprint="0123456789abcdef")
    with pytest.raises(ValueError, match="another model"):
        RiskControlled(0.05).resolve(model)


def test_unfitted_without_calibration_explains_how_to_calibrate():
    with pytest.raises(MissingCalibrationError, match="fit_table"):
        RiskControlled(0.05).resolve(random_t5())


def test_unfitted_one_liner_downloads_from_hub(monkeypatch, tmp_path):
    import huggingface_hub

    from hf_safe_exit.risk import store_calibration

    model = random_t5()
    table = _table(fingerprint=model_fingerprint(model))
    table.metadata["task"] = "cnndm"
    store_calibration(tmp_path, table=table)  # the repo's files, in the layout the library writes
    calls = []

    def fake_download(repo_id, filename, **kw):  # a Hub repo holding exactly the files under tmp_path
        calls.append((repo_id, filename))
        path = tmp_path / filename
        if not path.is_file():  # what the Hub answers for a file the repo does not hold
            raise huggingface_hub.errors.EntryNotFoundError(filename)
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model.config._name_or_path = "someone/t5-early-exit"
    model.name_or_path = "someone/t5-early-exit"
    bound = RiskControlled(0.05).resolve(model)
    assert ("someone/t5-early-exit", "calibration/config.json") in calls
    assert ("someone/t5-early-exit", f"calibration/cnndm/{CALIBRATION_FILENAME}") in calls
    assert bound.threshold == RiskControlled(0.05).fit_table(table).threshold
    assert bound.certificate.task == "cnndm"
    n_calls = len(calls)
    RiskControlled(0.05).resolve(model)
    assert len(calls) == n_calls  # downloaded files are cached for the process


def test_generate_one_liner_with_risk_controlled():
    enable = pytest.importorskip("hf_safe_exit.decoding").enable  # the core issue's entry point
    model = enable(random_t5())
    model.early_exit_calibration = _table(fingerprint=model_fingerprint(model))
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 1], [9, 3, 2, 1]]), "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    fitted = RiskControlled(0.1).fit_table(model.early_exit_calibration)
    assert fitted.certificate.feasible
    out_one_liner = model.generate(**inputs, early_exit=RiskControlled(eps=0.1), max_new_tokens=4)
    out_fitted = model.generate(**inputs, early_exit=fitted, max_new_tokens=4)
    out_plain = model.generate(**inputs, early_exit=EarlyExit(threshold=fitted.threshold, measure="softmax"),
                               max_new_tokens=4)
    assert torch.equal(out_one_liner, out_fitted) and torch.equal(out_fitted, out_plain)


def test_loss_table_validation():
    lam, task = toy_task_losses()
    with pytest.raises(ValueError, match="JSON"):
        LossTable.from_task_losses(lam, task, metadata={"bad": object()})
    with pytest.raises(ValueError, match="example_ids"):
        LossTable.from_task_losses(lam, task, metadata={"example_ids": [1, 2]})
    with pytest.raises(ValueError, match="Unknown risk"):
        LossTable(lam, {"accuracy": task})
    with pytest.raises(ValueError, match="first axis"):
        LossTable.from_task_losses(lam, task, extras={"wall_time": np.ones(3)})
    with pytest.raises(ValueError, match="same examples"):
        LossTable(lam, {"consistency": task, "performance_gap_bounded": task[:, :5]})


# ---------------------------------------------------------------- Product-of-Experts calibrations
def test_poe_calibration_binds_decodes_and_round_trips_with_poe(tmp_path):
    from hf_safe_exit import PoEConfig

    enable = pytest.importorskip("hf_safe_exit.decoding").enable
    model = enable(random_t5())
    poe = PoEConfig(activation="softplus")
    table = _table(fingerprint=model_fingerprint(model), anytime=poe.to_dict())
    rc = RiskControlled(0.1).fit_table(table)
    bound = rc.resolve(model)
    assert bound.anytime == poe  # the calibrated decoder, not plain early exit
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 1], [9, 3, 2, 1]]), "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    ours = model.generate(**inputs, early_exit=rc, max_new_tokens=5, output_scores=True, return_dict_in_generate=True)
    ref = model.generate(**inputs, early_exit=EarlyExit(threshold=rc.threshold, measure="softmax", anytime=poe),
                         max_new_tokens=5, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(ours.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ours.scores, ref.scores))
    rc.save_pretrained(tmp_path)
    assert RiskControlled.from_pretrained(tmp_path).resolve(model).anytime == poe
    agreeing = RiskControlled(0.1, config=EarlyExitConfig(measure="softmax", anytime=poe))
    assert agreeing.fit_table(table).threshold == rc.threshold  # an agreeing configuration is accepted


def test_anytime_mismatch_with_table_raises():
    with pytest.raises(ValueError, match="anytime"):
        RiskControlled(0.1, config=EarlyExitConfig(anytime="poe")).fit_table(_table())  # a plain early-exit table
    from hf_safe_exit import PoEConfig

    with pytest.raises(ValueError, match="anytime"):
        RiskControlled(0.1, config=EarlyExitConfig(anytime=PoEConfig(weights="uniform"))).fit_table(
            _table(anytime=PoEConfig().to_dict()))
    with pytest.raises(TypeError, match="EarlyExitConfig"):
        RiskControlled(0.1, config={"anytime": "poe"})


def test_generation_settings_of_the_calibration_survive_save_and_load(tmp_path):
    rc = RiskControlled(0.1).fit_table(_table(fingerprint="f00d", max_new_tokens=48, max_input_length=160))
    assert rc.generation_settings == {"max_new_tokens": 48, "max_input_length": 160}
    rc.save_pretrained(tmp_path)
    assert RiskControlled.from_pretrained(tmp_path).generation_settings == rc.generation_settings
    assert RiskControlled(0.1).fit_table(_table()).generation_settings == {}
