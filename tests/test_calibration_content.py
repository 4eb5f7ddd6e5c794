"""Issue 26, the fuzz test's findings on ``risk_control.json``, ``calibration/config.json`` and the policy stored in
``generation_config.json``: nothing well-formed but wrong gets through, and every refusal names the file.

A written ``risk_control.json`` carries the digest of its content, so that any edit is refused; a file without one
(older, or hand-made) is held to its content checks: every certificate field typed and in range, the method's own
bound and p-value, the copies of what the guarantee is for equal, fingerprints and dtype of their form. A calibration
remembers the file it was read from, and a refusal for another model or meta head names it.
"""

from __future__ import annotations

import json
import types
from dataclasses import replace

import pytest

from hf_safe_exit.confidence import MetaClassifierHead, MetaHeadConfig
from hf_safe_exit.decoding.stored_policy import policy_from_config
from hf_safe_exit.digest import content_digest
from hf_safe_exit.errors import (CalibrationFileError, CorruptFileError, InvalidStoredPolicyError,
                                 ModelMismatchError)
from hf_safe_exit.fingerprint import meta_head_fingerprint, model_fingerprint
from hf_safe_exit.risk import (CALIBRATION_FILENAME, RISK_CONTROL_FILENAME, Calibration, RiskControlled, find_stored,
                               store_calibration)

from cli_lines import one_error_line
from tiny_t5 import random_t5
from toy_losses import toy_table

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_risk_cache")

FINGERPRINT = "0123456789abcdef"


def _written(tmp_path, method="ucb", delta=0.1, *, fingerprint=FINGERPRINT, with_table=False, name="rc", **meta):
    """A folder holding the ``risk_control.json`` that ``save_pretrained`` writes (and, optionally, its table)."""
    table = toy_table(fingerprint=fingerprint, dtype="float32", **meta)
    folder = tmp_path / name
    eps = 0.2 if method == "ltt" else 0.05  # a feasible ε for each method on these losses
    RiskControlled(eps, delta=delta, method=method).fit_table(table).save_pretrained(folder)
    if with_table:
        table.save(folder / CALIBRATION_FILENAME)
    return folder


def _read(folder) -> dict:
    return json.loads((folder / RISK_CONTROL_FILENAME).read_text(encoding="utf-8"))


def _rewrite(folder, change, *, digest: bool = False) -> None:
    """Apply ``change`` to the file's content; ``digest=False`` also drops its digest (a file without one)."""
    data = _read(folder)
    if not digest:
        data.pop("digest", None)
    change(data)
    (folder / RISK_CONTROL_FILENAME).write_text(json.dumps(data, indent=2), encoding="utf-8")


def _refused(folder, cls=CalibrationFileError) -> str:
    with pytest.raises(cls) as caught:
        RiskControlled.from_pretrained(folder)
    message = str(caught.value)
    assert str(folder / RISK_CONTROL_FILENAME) in message and "\n" not in message, message
    return message


def _set(section, key, value):
    def change(data):
        if value is _DELETE:
            del data[section][key]
        else:
            data[section][key] = value
    return change


_DELETE = object()


# ---------------------------------------------------------------- the digest
@pytest.mark.parametrize("section,key,value", [
    ("calibration", "decay_tau", 1e30), ("calibration", "anytime", {}), ("calibration", "dtype", _DELETE),
    ("calibration", "meta_head_fingerprint", _DELETE), ("certificate", "loss_bounds", [0.0, 1.0]),
])
def test_an_edit_only_the_digest_can_see_is_refused_and_a_file_without_one_reads_as_before(tmp_path, section, key,
                                                                                           value):
    folder = _written(tmp_path, meta_head_fingerprint="00000000000000aa")
    data = _read(folder)
    assert data["digest"] == content_digest(data)
    original = Calibration.from_pretrained(folder)
    # the same content re-encoded (indented otherwise, keys in another order) is the same file
    (folder / RISK_CONTROL_FILENAME).write_text(json.dumps(dict(reversed(list(data.items())))), encoding="utf-8")
    assert Calibration.from_pretrained(folder) == original
    _rewrite(folder, _set(section, key, value), digest=True)
    assert "does not match the digest it was written with" in _refused(folder, CorruptFileError)
    # without a digest the same edit is a well-formed file of an older or hand-made kind: its content checks are all
    # that protect it (this edit passes them), and what it says is read
    _rewrite(folder, lambda d: None)
    assert Calibration.from_pretrained(folder).threshold == original.threshold
    # an edit the content checks can name is named, digest or not
    folder = _written(tmp_path, name="other")
    _rewrite(folder, lambda d: d.update(lambda_=1.5), digest=True)
    assert "lambda_=1.5 is not a threshold" in _refused(folder, CorruptFileError)


def test_what_is_written_can_be_read_back(tmp_path):
    # a calibration built in Python may say anything; what save_pretrained writes is what reading accepts, and one that
    # reading would refuse is refused before anything is written
    fitted = RiskControlled(0.05, delta=0.1, method="ucb").fit_table(toy_table(fingerprint=FINGERPRINT)).calibration
    for odd in (replace(fitted, model_fingerprint="my model"), replace(fitted, dtype="float"),
                replace(fitted, task="two words")):
        with pytest.raises(ValueError, match="cannot be written: reading it back would be refused"):
            odd.save_pretrained(tmp_path / "rc")
        assert not (tmp_path / "rc" / RISK_CONTROL_FILENAME).exists()
    assert Calibration.from_pretrained(fitted.save_pretrained(tmp_path / "rc")) == fitted
    # and the forms files written before the digest, the dtype and the certificate's lengths have, with the request's
    # task (None) under params as the shipped ones have, still read as before
    folder = _written(tmp_path, name="older", max_new_tokens=32, max_input_length=128)
    original = Calibration.from_pretrained(folder)

    def older(data):
        data["params"]["task"] = None
        del data["calibration"]["dtype"]
        for key in ("max_new_tokens", "max_input_length"):
            del data["certificate"][key]
    _rewrite(folder, older)
    loaded = Calibration.from_pretrained(folder)
    assert replace(loaded, dtype="float32") == original and loaded.lengths == original.lengths


# ---------------------------------------------------------------- files without a digest: the certificate's fields
@pytest.mark.parametrize("key,value", [
    ("eps", None), ("eps", {}), ("eps", []), ("eps", "x"),
    ("n", None), ("n", "x"), ("n", []), ("n", {}), ("n", -1),
    ("method", []), ("method", {}),
    ("grid", 3), ("grid", None), ("grid", True), ("grid_statistic", None), ("grid_statistic", True),
    ("grid_empirical_risk", 3), ("grid_empirical_risk", None),
    ("loss_bounds", "x"), ("loss_bounds", []), ("loss_bounds", {}), ("loss_bounds", [1.0]),
])
def test_a_certificate_field_of_the_wrong_type_or_range_is_refused_naming_the_file(tmp_path, key, value):
    folder = _written(tmp_path)
    _rewrite(folder, _set("certificate", key, value))
    message = _refused(folder, CorruptFileError)
    assert "certificate is incomplete or malformed" in message and f"{key}=" in message


@pytest.mark.parametrize("method,delta,key,value,needle", [
    ("crc", None, "bound", "wsr", "is not the bound of method 'crc'"),
    ("naive", None, "bound", "hoeffding", "is not the bound of method 'naive'"),
    ("crc", None, "p_value", 0.01, "only method 'ltt' tests a p-value"),
    ("ucb", 0.1, "p_value", 0.5, "only method 'ltt' tests a p-value"),
    ("ltt", 0.1, "bound", "wsr", "is not the bound of method 'ltt'"),
])
def test_a_bound_or_p_value_the_method_does_not_have_is_refused(tmp_path, method, delta, key, value, needle):
    folder = _written(tmp_path, method, delta)
    _rewrite(folder, _set("certificate", key, value))
    assert needle in _refused(folder, CorruptFileError)


# ---------------------------------------------------------------- files without a digest: the calibration section
@pytest.mark.parametrize("section,key,value,needle", [
    # what the guarantee is for is recorded twice: the copies must agree, a missing one reading as null
    ("certificate", "measure", None, "calibration.measure is 'softmax' but its certificate says None"),
    ("certificate", "measure", _DELETE, "its certificate is incomplete or malformed (no ['measure'])"),
    ("calibration", "measure", None, "calibration.measure is None but its certificate says 'softmax'"),
    ("certificate", "model_fingerprint", None, f"calibration.model_fingerprint is '{FINGERPRINT}'"),
    ("calibration", "model_fingerprint", _DELETE, "calibration.model_fingerprint is None"),
    ("certificate", "task", None, "calibration.task is 'cnndm' but its certificate says None"),
    ("calibration", "task", None, "calibration.task is None but its certificate says 'cnndm'"),
    ("params", "task", "squad", "params.task is 'squad' but calibration.task is 'cnndm'"),
    # the provenance of its form
    ("calibration", "dtype", "x", "calibration.dtype='x' is not the name of a floating-point torch dtype"),
    ("calibration", "dtype", "int64", "calibration.dtype='int64' is not"),
    ("calibration", "dtype", None, "calibration.dtype=None is not"),
    ("calibration", "meta_head_fingerprint", "x", "calibration.meta_head_fingerprint='x' is not"),
    ("calibration", "meta_head_fingerprint", None, "calibration.meta_head_fingerprint=None is not"),
    ("calibration", "max_new_tokens", 1e30, "calibration.max_new_tokens=1e+30 is not a whole number"),
])
def test_a_calibration_section_that_contradicts_itself_or_is_malformed_is_refused(tmp_path, section, key, value,
                                                                                   needle):
    folder = _written(tmp_path, meta_head_fingerprint="00000000000000aa")
    _rewrite(folder, _set(section, key, value))
    assert needle in _refused(folder)


def test_a_forged_fingerprint_must_look_like_one_even_when_both_copies_agree(tmp_path):
    folder = _written(tmp_path)

    def change(data):
        data["calibration"]["model_fingerprint"] = data["certificate"]["model_fingerprint"] = "ANY MODEL"
    _rewrite(folder, change)
    assert "model_fingerprint='ANY MODEL' is not a model fingerprint" in _refused(folder, CorruptFileError)


# ---------------------------------------------------------------- refusals name the file
def test_a_calibration_remembers_its_file_and_a_refusal_for_another_model_names_it(tmp_path):
    model, other = random_t5(seed=0), random_t5(seed=1)
    folder = _written(tmp_path, fingerprint=model_fingerprint(other))
    loaded = Calibration.from_pretrained(folder)
    path = str(folder / RISK_CONTROL_FILENAME)
    assert loaded.source == path and "source" not in loaded.to_dict() and loaded == replace(loaded, source=None)
    with pytest.raises(ModelMismatchError, match="another model") as caught:
        loaded.policy(model)
    assert str(caught.value).startswith(f"'{path}': the calibration it holds was calibrated for another model")
    assert caught.value.path == path


def test_a_fit_on_a_stored_table_names_the_table_when_the_model_differs(tmp_path):
    model, other = random_t5(seed=0), random_t5(seed=1)
    store_calibration(tmp_path, table=toy_table(fingerprint=model_fingerprint(other)))
    stored = find_stored(tmp_path)
    rc = RiskControlled(0.05, delta=0.1, method="ucb").fit_table(stored.table)  # as the demo fits it
    with pytest.raises(ModelMismatchError) as caught:
        rc.policy_for(model)
    assert str(caught.value).startswith(f"'{stored.table_path}': the calibration fitted on this loss table was "
                                        "calibrated for another model")


def test_a_meta_head_mismatch_names_the_calibration_and_the_head_file(tmp_path):
    model = random_t5(seed=0)
    torch_seeded = [MetaClassifierHead(MetaHeadConfig(d_model=16)).eval() for _ in range(2)]
    torch_seeded[1].save_pretrained(tmp_path / "head")
    model.meta_head = MetaClassifierHead.from_pretrained(tmp_path / "head")  # not the head it was calibrated with
    folder = _written(tmp_path, fingerprint=model_fingerprint(model), measure="meta",
                      meta_head_fingerprint=meta_head_fingerprint(torch_seeded[0]))
    with pytest.raises(ModelMismatchError, match="another meta head") as caught:
        RiskControlled.from_pretrained(folder).policy_for(model)
    message = str(caught.value)
    assert message.startswith(f"'{folder / RISK_CONTROL_FILENAME}'") and f"read from '{model.meta_head.source}'" in \
        message and model.meta_head.source.endswith("meta_head.safetensors")


def test_cli_calibrate_names_a_results_file_of_another_model(tmp_path, capsys):
    from tiny_calibration import save_tiny_t5

    model_dir = save_tiny_t5(tmp_path / "model", ["a b c d e f g"], seed=0)
    results = tmp_path / "other.npz"
    toy_table(fingerprint=model_fingerprint(random_t5(seed=5))).save(results)
    line = one_error_line(capsys, ["calibrate", "--results", str(results), "--eps", "0.1", "--model", model_dir,
                                   "--output", str(tmp_path / "out")])
    assert line.startswith(f"hf-safe-exit calibrate: error: '{results}': the results file was calibrated for another "
                           "model"), line


# ---------------------------------------------------------------- calibration/config.json
def _two_tasks(tmp_path):
    for task in ("cnndm", "squad"):
        store_calibration(tmp_path, table=toy_table(fingerprint=FINGERPRINT, task=task))
    return tmp_path / "calibration" / "config.json"


@pytest.mark.parametrize("content,needle", [
    ({"primary_task": None}, "names no primary_task"),
    ({}, "names no primary_task"),
    ({"primary_task": "x"}, r"primary_task 'x' has no calibration stored beside it .*\['cnndm', 'squad'\]"),
])
@pytest.mark.parametrize("tasks", [1, 2])
def test_a_store_config_that_names_no_stored_task_is_refused_naming_it(tmp_path, content, needle, tasks):
    config = _two_tasks(tmp_path) if tasks == 2 else tmp_path / "calibration" / "config.json"
    if tasks == 1:
        store_calibration(tmp_path, table=toy_table(fingerprint=FINGERPRINT))
        needle = needle.replace(r"\['cnndm', 'squad'\]", r"\['cnndm'\]")
    config.write_text(json.dumps(content))
    for read in (find_stored, RiskControlled.from_pretrained):
        with pytest.raises(CorruptFileError, match=needle) as caught:
            read(tmp_path)
        assert str(caught.value).startswith(f"'{config}': ") and "set_primary_task" in str(caught.value)
    config.write_text(json.dumps({"primary_task": "cnndm"}))
    assert find_stored(tmp_path).task == "cnndm"


def test_a_hub_store_config_naming_a_task_the_repo_lacks_is_refused_naming_it(tmp_path, monkeypatch):
    import huggingface_hub

    _two_tasks(tmp_path)
    (tmp_path / "calibration" / "config.json").write_text(json.dumps({"primary_task": "xsum"}))

    def download(repo_id, filename, **kw):  # a Hub repo holding exactly the files under tmp_path
        if not (tmp_path / filename).is_file():
            raise huggingface_hub.errors.EntryNotFoundError(filename)
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kw: [
        str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()])
    with pytest.raises(CorruptFileError, match=r"primary_task 'xsum' has no calibration stored") as caught:
        find_stored("someone/t5-early-exit")
    assert "calibration/config.json" in str(caught.value)


# ---------------------------------------------------------------- generation_config.json
@pytest.mark.parametrize("stored", ["x", -1, 0, 1e30, float("nan"), True, [], {}, {"type": None}, {"type": "x"},
                                    {"type": -1}, {"type": {}}])
def test_a_stored_policy_that_is_none_is_refused_naming_generation_config_json(stored):
    with pytest.raises(InvalidStoredPolicyError) as caught:
        policy_from_config(types.SimpleNamespace(early_exit=stored))
    message = str(caught.value)
    assert "generation_config.json" in message and "Fix or remove \"early_exit\"" in message and "\n" not in message
