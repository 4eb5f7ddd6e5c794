"""Issue 16: every file the library reads is refused, naming the file, the problem and the fix, when it cannot be
trusted: garbage, empty, truncated and foreign files of every kind, an edited λ̂ or edited settings, a missing
fingerprint; the CLI reports each in one line with exit status 2. (Meta heads: test_meta_head_files.py; the
calibration's lengths: test_calibrated_lengths.py; evaluations and cards: test_plotting.py, test_cards_render.py.)"""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from transformers import T5ForConditionalGeneration

import hf_safe_exit
from hf_safe_exit import EarlyExit, PoEConfig
from hf_safe_exit.cli import main
from hf_safe_exit.errors import (CalibrationFileError, CorruptFileError, InconsistentCalibrationError,
                                 InvalidStoredPolicyError, MissingCalibrationError, MissingFingerprintError,
                                 ModelMismatchError)
from hf_safe_exit.fingerprint import model_fingerprint
from hf_safe_exit.risk import CALIBRATION_FILENAME, RISK_CONTROL_FILENAME, LossTable, RiskControlled, clear_cache
from hf_safe_exit.risk.store import store_calibration

from cli_lines import one_error_line
from tiny_t5 import random_t5
from toy_losses import toy_table, toy_task_losses

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_risk_cache")


# ---------------------------------------------------------------- loss tables (.npz)
def _good_npz(path):
    return toy_table(fingerprint="0123456789abcdef").save(path)


def _write_bad_npz(kind: str, path):
    if kind == "garbage":
        path.write_bytes(b"\x00\x17 this is no archive at all " * 20)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = open(_good_npz(path), "rb").read()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "foreign npz":
        np.savez(path, weights=np.ones(3))
    elif kind == "npy":
        with open(path, "wb") as fh:
            np.save(fh, np.ones(3))
    elif kind == "pickled objects":
        np.savez(path, header_json=np.array([{"a": 1}], dtype=object), lambdas=np.array([0.0, 1.0]))
    elif kind == "wrong shape":
        header = json.dumps({"format_version": 1, "bounds": {"consistency": [0, 1]}, "metadata": {}})
        np.savez(path, header_json=np.array(header), lambdas=np.array([0.0, 1.0]), loss__consistency=np.ones((3, 2)))
    elif kind == "text values":
        header = json.dumps({"format_version": 1, "bounds": {}, "metadata": {}})
        np.savez(path, header_json=np.array(header), lambdas=np.array(["0", "1"]), loss__consistency=np.ones((2, 2)))
    elif kind == "no losses":
        np.savez(path, header_json=np.array(json.dumps({"format_version": 1})), lambdas=np.array([0.0, 1.0]))
    elif kind == "header not json":
        np.savez(path, header_json=np.array("{not json"), lambdas=np.array([0.0, 1.0]))


NPZ_KINDS = {"garbage": "not a loss table", "empty": "empty", "truncated": "truncated", "foreign npz": "no 'header_json'",
             "npy": "single .npy array", "pickled objects": "Python objects", "wrong shape": "shape",
             "text values": "not numbers", "no losses": "no a 'loss__<risk>' array|no 'lambdas'|not a complete",
             "header not json": "not a JSON object"}


@pytest.mark.parametrize("kind", list(NPZ_KINDS))
def test_bad_loss_tables_are_refused_naming_the_file_never_suggesting_pickles(kind, tmp_path):
    path = tmp_path / "table.npz"
    _write_bad_npz(kind, path)
    with pytest.raises(CorruptFileError, match=NPZ_KINDS[kind]) as caught:
        LossTable.load(path)
    message = str(caught.value)
    assert str(path) in message and "hf-safe-exit collect" in message and "pickle" not in message.replace(
        "Python objects", "")
    assert "allow_pickle" not in message and isinstance(caught.value, ValueError)


def test_a_missing_loss_table_is_a_missing_calibration(tmp_path):
    with pytest.raises(MissingCalibrationError, match="no loss table") as caught:
        LossTable.load(tmp_path / "nothing.npz")
    assert isinstance(caught.value, FileNotFoundError) and isinstance(caught.value, CalibrationFileError)


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated", "foreign npz", "pickled objects"])
def test_cli_reports_a_bad_table_in_one_line(kind, tmp_path, capsys):
    path = tmp_path / "results.npz"
    _write_bad_npz(kind, path)
    for argv in (["calibrate", "--results", str(path), "--eps", "0.1", "--output", str(tmp_path / "rc")],
                 ["evaluate", "--results", str(path), "--output", str(tmp_path / "eval.json")]):
        line = one_error_line(capsys, argv)
        assert str(path) in line and "allow_pickle" not in line and "collect" in line, line


# ---------------------------------------------------------------- risk_control.json and calibration/config.json
def _saved(tmp_path, with_table=True, **meta):
    """A calibration folder as `calibrate --store-in-model` writes it: λ̂ (ucb, ε 0.05) and, optionally, its table."""
    table = toy_table(fingerprint="0123456789abcdef", **meta)
    rc = RiskControlled(0.05, delta=0.1, method="ucb").fit_table(table)
    folder = tmp_path / "rc"
    rc.save_pretrained(folder)
    if with_table:
        table.save(folder / CALIBRATION_FILENAME)
    return folder, rc, table


def _edit(folder, change):
    path = folder / RISK_CONTROL_FILENAME
    data = json.loads(path.read_text())
    change(data)
    data.pop("digest", None)  # a file without a digest: what its content checks protect
    path.write_text(json.dumps(data))


BAD_JSON = {
    "garbage": (b"\x89PNG\r\n\x1a\n\x00\x00", "cannot be read|not a calibration"),
    "empty": (b"", "empty"),
    "truncated": (b'{"format_version": 1, "params": {"eps": 0.05', "invalid or truncated JSON"),
    "a list": (b"[0.1, 0.2]", "JSON list, not an object"),
    "foreign (a model config)": (b'{"model_type": "t5", "d_model": 16}', "no 'params', 'lambda_'"),
}


@pytest.mark.parametrize("kind", list(BAD_JSON))
def test_bad_risk_control_json_is_refused_naming_the_file(kind, tmp_path):
    folder, _, _ = _saved(tmp_path, with_table=False)
    content, needle = BAD_JSON[kind]
    (folder / RISK_CONTROL_FILENAME).write_bytes(content)
    with pytest.raises(CorruptFileError, match=needle) as caught:
        RiskControlled.from_pretrained(folder)
    assert str(folder / RISK_CONTROL_FILENAME) in str(caught.value)


@pytest.mark.parametrize("change,needle", [
    (lambda d: d.pop("certificate"), "no 'certificate'"),
    (lambda d: d["calibration"].pop("schedule"), r"\['schedule'\] are missing"),  # used to fail only at bind time
    (lambda d: d["certificate"].pop("n"), "certificate is incomplete"),
    (lambda d: d.update(lambda_=1.5), r"lambda_=1\.5 is not a threshold"),
    (lambda d: d["params"].update(colour="red"), "params are not those of a RiskControlled"),
])
def test_incomplete_risk_control_json_is_refused_on_load(change, needle, tmp_path):
    folder, _, _ = _saved(tmp_path, with_table=False)
    _edit(folder, change)
    with pytest.raises(CorruptFileError, match=needle) as caught:
        RiskControlled.from_pretrained(folder)
    assert RISK_CONTROL_FILENAME in str(caught.value) and "KeyError" not in str(caught.value)


def test_an_edited_lambda_is_refused_naming_both_values(tmp_path):
    folder, rc, _ = _saved(tmp_path, with_table=False)
    assert 0.0 < rc.threshold < 1.0
    _edit(folder, lambda d: d.update(lambda_=0.0))
    with pytest.raises(InconsistentCalibrationError) as caught:
        RiskControlled.from_pretrained(folder)
    message = str(caught.value)
    assert "lambda_ (λ̂) is 0.0" in message and f"says {rc.threshold!r}" in message
    assert str(folder / RISK_CONTROL_FILENAME) in message and "hf-safe-exit calibrate" in message
    # an edit off the certificate's grid is caught without the table too
    _edit(folder, lambda d: (d.update(lambda_=0.55), d["certificate"].update(lambda_hat=0.55)))
    with pytest.raises(InconsistentCalibrationError, match="not a threshold of its certificate's grid"):
        RiskControlled.from_pretrained(folder)


def test_a_consistent_edit_is_caught_by_refitting_the_table_beside_it(tmp_path):
    folder, rc, table = _saved(tmp_path)
    assert RiskControlled.from_pretrained(folder).threshold == rc.threshold  # untouched: accepted
    other = float(table.lambdas[0])  # λ̂ and certificate both edited to another grid point
    _edit(folder, lambda d: (d.update(lambda_=other), d["certificate"].update(lambda_hat=other)))
    with pytest.raises(InconsistentCalibrationError, match=rf"states λ̂ = {other!r}, but its own grid statistics give "
                                                           rf"{rc.threshold!r}"):
        RiskControlled.from_pretrained(folder)  # the certificate's own statistics already contradict it
    # forged consistently (λ̂, every statistic passing, the bound and risk at λ̂): only the table beside it can tell
    _edit(folder, _forge_to(other))
    with pytest.raises(InconsistentCalibrationError) as caught:
        RiskControlled.from_pretrained(folder)
    message = str(caught.value)
    assert f"is {other!r}" in message and f"gives {rc.threshold!r}" in message and CALIBRATION_FILENAME in message
    # a table from another calibration set beside an intact file is caught the same way
    folder2, _, _ = _saved(tmp_path / "b")
    table.subset(np.arange(100)).save(folder2 / CALIBRATION_FILENAME)
    with pytest.raises(InconsistentCalibrationError, match="number of calibration examples n is 400.*gives 100"):
        RiskControlled.from_pretrained(folder2)


def _forge_to(threshold: float):
    """An edit of a UCB calibration to ``threshold`` that its certificate cannot see: every grid statistic passes."""
    def change(d):
        cert = d["certificate"]
        cert["grid_statistic"] = [0.0] * len(cert["grid"])
        cert["lambda_hat"] = d["lambda_"] = threshold
        pos = cert["grid"].index(threshold)
        cert["risk_bound"], cert["empirical_risk"] = 0.0, cert["grid_empirical_risk"][pos]
        cert["feasible"] = threshold < 1.0
    return change


def _in_both(key, value):
    """Edit ``key`` in "calibration" and, where the certificate records it too, there: a consistent edit."""
    def change(d):
        d["calibration"][key] = value
        for section in ("params", "certificate"):
            if key in d[section]:
                d[section][key] = value
    return change


@pytest.mark.parametrize("key,edited", [
    ("min_exit_layer", 3), ("schedule", "decaying"), ("decay_tau", 2.0), ("measure", "saturation"),
    ("anytime", PoEConfig(activation="softplus").to_dict()), ("max_new_tokens", 99), ("max_input_length", 999),
    ("task", "squad")])
def test_settings_edited_against_the_table_beside_them_are_refused(key, edited, tmp_path):
    """λ̂ holds for the settings its losses were collected with: the table beside the file records them."""
    folder, rc, table = _saved(tmp_path, decay_tau=4.0, anytime=None, max_new_tokens=32, max_input_length=128)
    assert RiskControlled.from_pretrained(folder).threshold == rc.threshold  # untouched: accepted
    _edit(folder, _in_both(key, edited))
    with pytest.raises(InconsistentCalibrationError) as caught:
        RiskControlled.from_pretrained(folder)
    message = str(caught.value)
    assert str(folder / RISK_CONTROL_FILENAME) in message and CALIBRATION_FILENAME in message
    assert f"calibration.{key} is {edited!r}" in message and f"{key}={table.metadata[key]!r}" in message
    # the json alone (no table beside it) cannot tell: that is what the table's check adds
    (folder / CALIBRATION_FILENAME).unlink()
    assert RiskControlled.from_pretrained(folder).threshold == rc.threshold


def test_only_the_settings_a_table_records_are_compared(tmp_path):
    """Tables written before they recorded the decoding settings: those they lack are not compared."""
    folder, rc, table = _saved(tmp_path)
    lam, losses = toy_task_losses()
    older = LossTable.from_task_losses(lam, losses, metadata={"task": "cnndm",
                                                              "model_fingerprint": table.metadata["model_fingerprint"]})
    older.save(folder / CALIBRATION_FILENAME)
    _edit(folder, _in_both("min_exit_layer", 2))
    assert RiskControlled.from_pretrained(folder).threshold == rc.threshold
    _edit(folder, _in_both("task", "squad"))  # the task it does record is still compared
    with pytest.raises(InconsistentCalibrationError, match="calibration.task is 'squad'.*task='cnndm'"):
        RiskControlled.from_pretrained(folder)


@pytest.mark.parametrize("key,edited", [("anytime", PoEConfig().to_dict()), ("exit_layers", [2])])
def test_settings_a_table_leaves_out_at_their_default_are_still_compared(key, edited, tmp_path):
    """collect writes 'anytime' / 'exit_layers' only when set: a table without them was collected with None."""
    folder, rc, table = _saved(tmp_path)
    assert key not in table.metadata
    _edit(folder, _in_both(key, edited))
    with pytest.raises(InconsistentCalibrationError, match=rf"calibration.{key} is .*{key}=None"):
        RiskControlled.from_pretrained(folder)


def test_model_folder_calibrations_are_checked_when_the_one_liner_loads_them(tmp_path):
    model = random_t5(initializer_factor=4.0)
    model.save_pretrained(tmp_path)
    reloaded = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    table = toy_table(fingerprint=model_fingerprint(model))
    rc = RiskControlled(0.05, delta=0.1, method="ucb").fit_table(table)
    store_calibration(tmp_path, table=table, controlled=rc)
    assert RiskControlled(0.05).resolve(reloaded).threshold == RiskControlled(0.05).fit_table(table).threshold
    stored_json = tmp_path / "calibration" / "cnndm" / RISK_CONTROL_FILENAME
    data = json.loads(stored_json.read_text())
    _forge_to(0.0)(data)
    stored_json.write_text(json.dumps(data))
    clear_cache()
    for load in (lambda: RiskControlled(0.05).resolve(reloaded), lambda: RiskControlled.from_pretrained(tmp_path)):
        with pytest.raises(InconsistentCalibrationError, match="refitting the loss table"):
            load()
    # a garbage or foreign calibration/config.json names itself and the fix
    for content in ("\x00garbage", '["cnndm"]', '{"primary_task": "not a task/name"}'):
        (tmp_path / "calibration" / "config.json").write_text(content)
        clear_cache()
        with pytest.raises(CorruptFileError, match=r"calibration/config\.json'.*primary_task"):
            RiskControlled(0.05).resolve(reloaded)


# ---------------------------------------------------------------- fingerprints
def test_a_missing_fingerprint_is_refused_unless_the_user_opts_out(tmp_path):
    model = random_t5(initializer_factor=4.0)
    table = toy_table()  # no model_fingerprint in its metadata
    with pytest.raises(MissingFingerprintError, match="allow_missing_fingerprint=True"):
        RiskControlled(0.1).fit_table(table).resolve(model)
    assert RiskControlled(0.1, allow_missing_fingerprint=True).fit_table(table).resolve(model).threshold == \
        RiskControlled(0.1).fit_table(table).threshold
    # stored with the model, for the unfitted one-liner
    model.early_exit_calibration = table
    with pytest.raises(MissingFingerprintError, match="does not record which model"):
        RiskControlled(0.1).resolve(model)
    assert RiskControlled(0.1, allow_missing_fingerprint=True).resolve(model).threshold == \
        RiskControlled(0.1).fit_table(table).threshold
    # saved and loaded: the opt-out is the loader's choice, not part of the file
    RiskControlled(0.1).fit_table(table).save_pretrained(tmp_path)
    assert "allow_missing_fingerprint" not in json.loads((tmp_path / RISK_CONTROL_FILENAME).read_text())["params"]
    with pytest.raises(MissingFingerprintError):
        RiskControlled.from_pretrained(tmp_path).resolve(model)
    RiskControlled.from_pretrained(tmp_path, allow_missing_fingerprint=True).resolve(model)
    # another model's fingerprint is refused even with the opt-out
    other = toy_table(fingerprint="0123456789abcdef")
    with pytest.raises(ModelMismatchError, match="another model"):
        RiskControlled(0.1, allow_missing_fingerprint=True).fit_table(other).resolve(model)


def test_cli_calibrate_refuses_a_table_without_fingerprint_unless_told(tmp_path, capsys):
    from tiny_calibration import save_tiny_t5

    model_dir = save_tiny_t5(tmp_path / "model", ["a few words of text for the tokenizer"] * 4, seed=0)
    results = tmp_path / "results.npz"
    toy_table().save(results)
    argv = ["calibrate", "--results", str(results), "--eps", "0.1", "--model", model_dir, "--output",
            str(tmp_path / "rc")]
    line = one_error_line(capsys, argv)
    assert "no model_fingerprint" in line and "--allow-missing-fingerprint" in line
    assert main([*argv, "--allow-missing-fingerprint"]) == 0
    assert (tmp_path / "rc" / RISK_CONTROL_FILENAME).is_file()


# ---------------------------------------------------------------- stored policy specs
def test_a_bad_stored_policy_spec_is_in_the_family(tmp_path):
    model = hf_safe_exit.enable(random_t5(initializer_factor=4.0))
    model.generation_config.early_exit = {"type": "Nonsense", "threshold": 2}
    with pytest.raises(InvalidStoredPolicyError, match="names no policy type") as caught:
        model.generate(input_ids=torch.tensor([[5, 6, 1]]), max_new_tokens=2)
    assert isinstance(caught.value, CalibrationFileError)


# ---------------------------------------------------------------- the shipped default model
@pytest.mark.parametrize("task", ["cnndm", "squad"])
def test_the_shipped_calibrations_pass_every_check(task, tmp_path):
    from hf_safe_exit.risk.store import find_stored

    root = hf_safe_exit.default_model_path()
    stored = find_stored(root, task)  # refits the shipped table against the shipped risk_control.json
    assert stored.table is not None and stored.controlled_json is not None
    assert stored.table.metadata.get("model_fingerprint") is not None
    rc = RiskControlled.from_pretrained(root / "calibration" / task)
    assert rc.certificate.max_new_tokens is not None and rc.certificate.max_input_length is not None
    # and a copy with λ̂ edited is refused
    copy = tmp_path / task
    shutil.copytree(root / "calibration" / task, copy)
    edited = 1.0 if rc.threshold < 1.0 else float(rc.certificate.grid[0])
    _edit(copy, lambda d: (d.update(lambda_=edited), d["certificate"].update(lambda_hat=edited, feasible=edited < 1)))
    with pytest.raises(InconsistentCalibrationError):
        RiskControlled.from_pretrained(copy)


@pytest.mark.parametrize("method,delta", [("crc", None), ("ucb", 0.1), ("ltt", 0.1), ("naive", None)])
@pytest.mark.parametrize("edit,needle", [
    ("forge_threshold", "states λ̂ = "),               # λ̂ moved to a grid point its statistics reject
    ("risk_bound", "states the risk bound at λ̂"),
    ("guarantee", "states the guarantee"),
    ("empirical_risk", "states the empirical risk at λ̂"),
])
def test_a_calibration_without_its_table_checks_its_own_certificate(tmp_path, method, delta, edit, needle):
    # no loss table beside the file: what the certificate states must be what its own grid statistics give
    table = toy_table(fingerprint="f00d")
    rc = RiskControlled(0.05, delta=delta, method=method).fit_table(table)
    folder = tmp_path / "rc"
    rc.save_pretrained(folder)
    assert RiskControlled.from_pretrained(folder).threshold == rc.threshold  # intact: accepted

    def change(d):
        cert = d["certificate"]
        if edit == "forge_threshold":  # the smallest threshold, which the statistics do not select
            lowest = min(g for g in cert["grid"] if not math.isclose(g, cert["lambda_hat"]))
            d["lambda_"] = cert["lambda_hat"] = lowest
            cert["feasible"] = lowest < 1.0
        elif edit == "guarantee":
            cert["guarantee"] = "E[risk] ≤ 0.5"
        else:
            cert[edit] = cert[edit] - 0.01

    _edit(folder, change)
    with pytest.raises(InconsistentCalibrationError, match=needle):
        RiskControlled.from_pretrained(folder)


@pytest.mark.parametrize("key,value,needle", [
    ("max_new_tokens", 1e30, r"max_new_tokens=1e\+30 must be a whole number in \[1, 65536\]"),
    ("max_new_tokens", 2.5, "max_new_tokens=2.5 must be a whole number"),
    ("max_input_length", 0, "max_input_length=0 must be a whole number"),
    ("min_exit_layer", "one", "min_exit_layer='one' must be a positive integer"),
    ("schedule", "sometimes", "schedule='sometimes' is unknown"),
    ("measure", "entropy", None),  # an unknown name may be a custom measure: refused when fitted without it
    ("decay_tau", -1, "decay_tau=-1 must be"),
    ("strategy", "beam", "strategy='beam' is unknown"),
    ("task", "two words", "cannot name a model-card section"),
    ("num_decoder_layers", 2, r"min_exit_layer=3 / exit_layers=None lie outside the decoder it records \(2 layers\)"),
])
def test_a_loss_table_header_is_validated_on_load_naming_the_file(tmp_path, key, value, needle):
    # issue 26, root cause 1: what a table's header says is typed and range-checked, with the file named
    table = toy_table(fingerprint="f00d", min_exit_layer=3, num_decoder_layers=4)
    path = tmp_path / "t.npz"
    table.save(path)
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(str(arrays["header_json"]))
    header.pop("digest", None)  # a hand-made header: its content is what is checked
    header["metadata"][key] = value
    arrays["header_json"] = np.array(json.dumps(header))
    np.savez(path, **arrays)
    if needle is None:
        loaded = LossTable.load(path)
        with pytest.raises(ValueError, match="Unknown confidence measure 'entropy'"):
            RiskControlled(0.1).fit_table(loaded)
        return
    with pytest.raises(CorruptFileError, match=needle) as caught:
        LossTable.load(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_smaller_refusals_of_issue_26(tmp_path, capsys):
    # a string format_version, --exclude-ids entries that are not ids, a batch of 0 rows: each one clear line
    folder, _, table = _saved(tmp_path, with_table=False)
    _edit(folder, lambda d: d.update(format_version="1"))
    with pytest.raises(CorruptFileError, match="format_version '1' is not a format number"):
        RiskControlled.from_pretrained(folder)
    from hf_safe_exit.cli import _excluded_ids

    for content in ([{"id": 1}], [None], [1e400], [True]):
        path = tmp_path / "ids.json"
        path.write_text(json.dumps(content).replace("Infinity", "1e400"))
        with pytest.raises(CorruptFileError, match="are not ids"):
            _excluded_ids(str(path), "cnndm")
    path.write_text(json.dumps(["a", 3]))
    assert _excluded_ids(str(path), "cnndm") == {"a", "3"}
    model = hf_safe_exit.enable(random_t5(initializer_factor=4.0))
    with pytest.raises(ValueError, match=r"empty batch \(inputs of shape \(0, 5\)\)") as caught:
        model.generate(input_ids=torch.zeros(0, 5, dtype=torch.long), early_exit=EarlyExit(0.5))
    assert "\n" not in str(caught.value)


def test_with_the_table_beside_it_a_statistic_the_scan_never_reached_is_checked_too(tmp_path):
    """Issue 26, root cause 3: a UCB statistic below λ̂ (past the first violation) does not change the selection, so
    the file alone cannot show it was forged; the loss table beside it can."""
    from hf_safe_exit.risk import store_calibration
    from hf_safe_exit.risk.store import clear_store_cache, find_stored

    model = random_t5(seed=0)
    model.save_pretrained(tmp_path)
    model = T5ForConditionalGeneration.from_pretrained(tmp_path)  # a model that knows its folder
    table = toy_table(model_fingerprint(model))
    rc = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    store_calibration(tmp_path, table=table, controlled=rc, task="cnndm")
    path = tmp_path / "calibration" / "cnndm" / "risk_control.json"
    data = json.loads(path.read_text())
    cert = data["certificate"]
    below = cert["grid"].index(cert["lambda_hat"]) - 2  # one past the first violation below λ̂
    assert below >= 0
    cert["grid_statistic"][below] = 0.001  # a passing value where the scan stopped: λ̂ is unchanged
    data.pop("digest")
    path.write_text(json.dumps(data))
    clear_store_cache()
    assert RiskControlled.from_dict(data).calibration.threshold == rc.calibration.threshold  # the file alone agrees
    with pytest.raises(InconsistentCalibrationError, match=rf"grid_statistic\[{below}\]"):
        find_stored(model, "cnndm")
