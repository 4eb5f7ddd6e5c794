"""Issue 16: every file the library reads is refused, naming the file, the problem and the fix, when it cannot be
trusted: garbage, empty, truncated and foreign files of every kind, an edited λ̂, a missing fingerprint; the CLI
reports each in one line with exit status 2."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

import hf_safe_exit
from hf_safe_exit.cli import main
from hf_safe_exit.confidence import MetaClassifierHead, MetaHeadConfig
from hf_safe_exit.errors import (CalibrationFileError, CorruptFileError, InconsistentCalibrationError,
                                 InvalidStoredPolicyError, MissingCalibrationError, MissingFingerprintError,
                                 MissingMetaHeadError, ModelMismatchError)
from hf_safe_exit.fingerprint import model_fingerprint
from hf_safe_exit.policy import EarlyExit
from hf_safe_exit.risk import CALIBRATION_FILENAME, RISK_CONTROL_FILENAME, LossTable, RiskControlled, clear_cache
from hf_safe_exit.risk.store import store_calibration

from cli_lines import one_error_line

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_t5(seed=0):
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=3, num_heads=2,
                   decoder_start_token_id=0, initializer_factor=4.0)
    return T5ForConditionalGeneration(cfg).eval()


def _table(fingerprint=None, **meta) -> LossTable:
    """400 examples on an 11-point grid: the gap shrinks towards λ = 1, where it is 0."""
    rng = np.random.default_rng(0)
    lam = np.linspace(0, 1, 11)
    full = rng.uniform(0, 0.6, 400)
    task = np.clip(full[None, :] + rng.normal(0.15, 0.2, (11, 400)) * (1 - lam)[:, None] ** 2, 0, 1)
    task[-1] = full
    metadata = {"task": "cnndm", "measure": "softmax", "schedule": "constant", "min_exit_layer": 1, **meta}
    if fingerprint is not None:
        metadata["model_fingerprint"] = fingerprint
    return LossTable.from_task_losses(lam, task, metadata=metadata)


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    from hf_safe_exit.decoding import calibrated_lengths

    clear_cache()
    monkeypatch.setattr(calibrated_lengths, "_WARNED", set())  # "once per process" starts afresh in each test
    yield
    clear_cache()


# ---------------------------------------------------------------- loss tables (.npz)
def _good_npz(path):
    return _table(fingerprint="0123456789abcdef").save(path)


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
    table = _table(fingerprint="0123456789abcdef", **meta)
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
    (lambda d: d["calibration"].pop("schedule"), "'schedule' is None"),  # used to fail only at bind time
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
    assert 0.0 < rc.lambda_ < 1.0
    _edit(folder, lambda d: d.update(lambda_=0.0))
    with pytest.raises(InconsistentCalibrationError) as caught:
        RiskControlled.from_pretrained(folder)
    message = str(caught.value)
    assert "lambda_ (λ̂) is 0.0" in message and f"says {rc.lambda_!r}" in message
    assert str(folder / RISK_CONTROL_FILENAME) in message and "hf-safe-exit calibrate" in message
    # an edit off the certificate's grid is caught without the table too
    _edit(folder, lambda d: (d.update(lambda_=0.55), d["certificate"].update(lambda_hat=0.55)))
    with pytest.raises(InconsistentCalibrationError, match="not a threshold of its certificate's grid"):
        RiskControlled.from_pretrained(folder)


def test_a_consistent_edit_is_caught_by_refitting_the_table_beside_it(tmp_path):
    folder, rc, table = _saved(tmp_path)
    assert RiskControlled.from_pretrained(folder).lambda_ == rc.lambda_  # untouched: accepted
    other = float(table.lambdas[0])  # λ̂ and certificate both edited to another grid point
    _edit(folder, lambda d: (d.update(lambda_=other), d["certificate"].update(lambda_hat=other)))
    with pytest.raises(InconsistentCalibrationError) as caught:
        RiskControlled.from_pretrained(folder)
    message = str(caught.value)
    assert f"is {other!r}" in message and f"gives {rc.lambda_!r}" in message and CALIBRATION_FILENAME in message
    # a table from another calibration set beside an intact file is caught the same way
    folder2, _, _ = _saved(tmp_path / "b")
    table.subset(np.arange(100)).save(folder2 / CALIBRATION_FILENAME)
    with pytest.raises(InconsistentCalibrationError, match="number of calibration examples n is 400.*gives 100"):
        RiskControlled.from_pretrained(folder2)


def test_model_folder_calibrations_are_checked_when_the_one_liner_loads_them(tmp_path):
    model = _tiny_t5()
    model.save_pretrained(tmp_path)
    reloaded = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    table = _table(fingerprint=model_fingerprint(model))
    rc = RiskControlled(0.05, delta=0.1, method="ucb").fit_table(table)
    store_calibration(tmp_path, table=table, controlled=rc)
    assert RiskControlled(0.05).bind(reloaded).threshold == RiskControlled(0.05).fit_table(table).lambda_
    stored_json = tmp_path / "calibration" / "cnndm" / RISK_CONTROL_FILENAME
    data = json.loads(stored_json.read_text())
    data["lambda_"] = data["certificate"]["lambda_hat"] = 0.0
    stored_json.write_text(json.dumps(data))
    clear_cache()
    for load in (lambda: RiskControlled(0.05).bind(reloaded), lambda: RiskControlled.from_pretrained(tmp_path)):
        with pytest.raises(InconsistentCalibrationError, match="refitting the loss table"):
            load()
    # a garbage or foreign calibration/config.json names itself and the fix
    for content in ("\x00garbage", '["cnndm"]', '{"primary_task": "not a task/name"}'):
        (tmp_path / "calibration" / "config.json").write_text(content)
        clear_cache()
        with pytest.raises(CorruptFileError, match=r"calibration/config\.json'.*primary_task"):
            RiskControlled(0.05).bind(reloaded)


# ---------------------------------------------------------------- fingerprints
def test_a_missing_fingerprint_is_refused_unless_the_user_opts_out(tmp_path):
    model = _tiny_t5()
    table = _table()  # no model_fingerprint in its metadata
    with pytest.raises(MissingFingerprintError, match="allow_missing_fingerprint=True"):
        RiskControlled(0.1).fit_table(table).bind(model)
    assert RiskControlled(0.1, allow_missing_fingerprint=True).fit_table(table).bind(model).threshold == \
        RiskControlled(0.1).fit_table(table).lambda_
    # stored with the model, for the unfitted one-liner
    model.early_exit_calibration = table
    with pytest.raises(MissingFingerprintError, match="does not record which model"):
        RiskControlled(0.1).bind(model)
    assert RiskControlled(0.1, allow_missing_fingerprint=True).bind(model).threshold == \
        RiskControlled(0.1).fit_table(table).lambda_
    # saved and loaded: the opt-out is the loader's choice, not part of the file
    RiskControlled(0.1).fit_table(table).save_pretrained(tmp_path)
    assert "allow_missing_fingerprint" not in json.loads((tmp_path / RISK_CONTROL_FILENAME).read_text())["params"]
    with pytest.raises(MissingFingerprintError):
        RiskControlled.from_pretrained(tmp_path).bind(model)
    RiskControlled.from_pretrained(tmp_path, allow_missing_fingerprint=True).bind(model)
    # another model's fingerprint is refused even with the opt-out
    with pytest.raises(ModelMismatchError, match="another model"):
        RiskControlled(0.1, allow_missing_fingerprint=True).fit_table(_table(fingerprint="0123456789abcdef")).bind(model)


def test_cli_calibrate_refuses_a_table_without_fingerprint_unless_told(tmp_path, capsys):
    from hf_safe_exit.calibration.tiny import save_tiny_t5

    model_dir = save_tiny_t5(tmp_path / "model", ["a few words of text for the tokenizer"] * 4, seed=0)
    results = tmp_path / "results.npz"
    _table().save(results)
    argv = ["calibrate", "--results", str(results), "--eps", "0.1", "--model", model_dir, "--output",
            str(tmp_path / "rc")]
    line = one_error_line(capsys, argv)
    assert "no model_fingerprint" in line and "--allow-missing-fingerprint" in line
    assert main([*argv, "--allow-missing-fingerprint"]) == 0
    assert (tmp_path / "rc" / RISK_CONTROL_FILENAME).is_file()


# ---------------------------------------------------------------- meta heads
def _head_dir(tmp_path):
    head = MetaClassifierHead(MetaHeadConfig(d_model=16))
    head.save_pretrained(tmp_path / "head")
    return tmp_path / "head"


@pytest.mark.parametrize("kind,needle", [
    ("weights garbage", "not readable as safetensors"), ("weights empty", "not readable as safetensors"),
    ("weights truncated", "not readable as safetensors"), ("weights of another head", "not those of the head"),
    ("config garbage", "not a meta-head config|cannot be read"), ("config foreign", "not a meta-head config"),
    ("config missing", "missing, while meta_head.safetensors is there")])
def test_bad_meta_heads_are_refused_naming_the_file(kind, needle, tmp_path):
    from safetensors.torch import save_file

    folder = _head_dir(tmp_path)
    weights, config = folder / "meta_head.safetensors", folder / "meta_head_config.json"
    if kind == "weights garbage":
        weights.write_bytes(b"\x01garbage" * 10)
    elif kind == "weights empty":
        weights.write_bytes(b"")
    elif kind == "weights truncated":
        weights.write_bytes(weights.read_bytes()[:40])
    elif kind == "weights of another head":
        save_file({"net.weight": torch.zeros(2, 8), "net.bias": torch.zeros(2)}, str(weights))
    elif kind == "config garbage":
        config.write_bytes(b"\xff\xfe\x00")
    elif kind == "config foreign":
        config.write_text('{"model_type": "t5"}')
    else:
        config.unlink()
    with pytest.raises(CorruptFileError, match=needle) as caught:
        MetaClassifierHead.from_pretrained(folder)
    assert str(folder) in str(caught.value) and "save_pretrained" in str(caught.value)
    # a corrupt head is an error, not "no head" (which would let measure="auto" fall back silently)
    assert not isinstance(caught.value, MissingMetaHeadError)


def test_no_meta_head_at_all_is_still_a_missing_head(tmp_path):
    with pytest.raises(MissingMetaHeadError):
        MetaClassifierHead.from_pretrained(tmp_path)
    assert MetaClassifierHead.from_pretrained(_head_dir(tmp_path)).config.d_model == 16


# ---------------------------------------------------------------- stored policy specs
def test_a_bad_stored_policy_spec_is_in_the_family(tmp_path):
    model = hf_safe_exit.enable(_tiny_t5())
    model.generation_config.early_exit = {"type": "Nonsense", "threshold": 2}
    with pytest.raises(InvalidStoredPolicyError, match="names no policy type") as caught:
        model.generate(input_ids=torch.tensor([[5, 6, 1]]), max_new_tokens=2)
    assert isinstance(caught.value, CalibrationFileError)


# ---------------------------------------------------------------- the calibration's generation settings
INPUTS = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 1], [9, 3, 2, 1, 0, 0]]),
          "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])}


@pytest.fixture
def calibrated():
    model = hf_safe_exit.enable(_tiny_t5())
    table = _table(fingerprint=model_fingerprint(model), measure="saturation", schedule="decaying",
                   min_exit_layer=2, max_new_tokens=25, max_input_length=6)
    return model, RiskControlled(0.1).fit_table(table), table


def _reference(model, rc, **kwargs):
    """The same decoder, every setting spelled out by hand."""
    policy = EarlyExit(threshold=rc.lambda_, measure="saturation", schedule="decaying", min_exit_layer=2)
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
    for key in ("max_new_tokens", "max_input_length"):
        del data["certificate"][key]
    (tmp_path / RISK_CONTROL_FILENAME).write_text(json.dumps(data))
    loaded = RiskControlled.from_pretrained(tmp_path)
    assert loaded.certificate == rc.certificate


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
    edited = 1.0 if rc.lambda_ < 1.0 else float(rc.certificate.grid[0])
    _edit(copy, lambda d: (d.update(lambda_=edited), d["certificate"].update(lambda_hat=edited, feasible=edited < 1)))
    with pytest.raises(InconsistentCalibrationError):
        RiskControlled.from_pretrained(copy)
