"""Nothing well-formed but wrong gets through (issue 26): an evaluation, collect's state folder, an ``--exclude-ids``
file and a meta head are held to their digest (when written by the library) and to their content (always).

* ``evaluation.json``: written with its digest and the digest of the loss table it evaluated; an edit is refused
  naming the file; without a digest (older, hand-made) every field is checked (known methods, risk, bound; settings'
  types; the rows those of the settings; full-model values, exit layers, rates in range); a card refuses an
  evaluation of another table than the one it shows (or the one stored beside the evaluation).
* collect's cells: each line written with its digest; an edited line is refused; a line without one must still be a
  cell of this run (its λ the grid's at its k, its ids its batch's, costs and seconds finite and in range); a setting
  flipped to ``true`` where the run has 1 is another setting.
* ``--exclude-ids``: an id that is no example of the split is refused, naming the file.
* the meta head: its config's fields checked (the error names ``meta_head_config.json``), non-floating or mixed weights
  refused naming the weights; a half-precision copy of a float32 head loads, and the calibration of the float32 head
  refuses it (another fingerprint).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_safe_exit import EarlyExitConfig, LossTable, RiskControlled
from hf_safe_exit.calibration import collect
from hf_safe_exit.calibration.evaluate import evaluate_table, read_evaluation, validate_evaluation, write_evaluation
from hf_safe_exit.cards import write_guarantee_card
from hf_safe_exit.cli import main
from hf_safe_exit.confidence import MetaClassifierHead, MetaHeadConfig
from hf_safe_exit.errors import CorruptFileError, InconsistentCalibrationError, ModelMismatchError, StateMismatchError
from hf_safe_exit.fingerprint import meta_head_fingerprint
from hf_safe_exit.risk.loss_table import CALIBRATION_FILENAME
from hf_safe_exit.risk.provenance import check_model_matches, record_provenance
from hf_safe_exit.tasks import load_split, shared_data_dir

from card_helpers import synthetic_table
from cli_lines import one_error_line
from collect_helpers import interrupted_after
from tiny_calibration import build_tiny_t5, tiny_cnndm

DATA = shared_data_dir()
FINGERPRINT = "0123456789abcdef"
needs_data = pytest.mark.skipif(DATA is None, reason="offline data folder ../shared/data is absent")
pytestmark = pytest.mark.usefixtures("one_thread")


# ============================================================================================ evaluation.json
@pytest.fixture(scope="module")
def tables():
    """Two tables of the same model, task, settings and size (so every other check passes), with other losses."""
    return synthetic_table(FINGERPRINT, "cnndm", seed=0), synthetic_table(FINGERPRINT, "cnndm", seed=1)


@pytest.fixture(scope="module")
def evaluation(tables):
    return evaluate_table(tables[0], eps=(0.1,), methods=("crc", "ucb"), delta=0.1, repeats=4)


def _edited(evaluation: dict, edit) -> dict:
    data = copy.deepcopy(evaluation)
    edit(data)
    return data


def _set(section, key, value):
    return lambda e: e[section].__setitem__(key, value) if section else e.__setitem__(key, value)


def _row(i, key, value):
    return lambda e: e["results"][i].__setitem__(key, value)


# each was read as a usable evaluation before (a file without a digest is held to its content alone)
WRONG = [
    (_set("settings", "methods", ["x"]), "settings.methods"),
    (_set("settings", "eps", "x"), "settings.eps"),
    (_set("settings", "risk", "x"), "settings.risk"),
    (_set("settings", "bound", "x"), "settings.bound"),
    (_set("settings", "monotonize", "x"), "settings.monotonize"),
    (_set("settings", "seed", -1), "settings.seed"),
    (_set("settings", "seed", True), "settings.seed"),
    (_set("settings", "delta", None), "settings.delta"),
    (lambda e: e["settings"].pop("seed"), "settings has no 'seed'"),
    (_set("metadata", "measure", 1e30), "measure"),
    (_set("metadata", "min_exit_layer", True), "min_exit_layer"),
    (_set("full_model", "wall_time", -1), "full_model.wall_time"),
    (_set("full_model", "generated_tokens", "x"), "full_model.generated_tokens"),
    (_set("full_model", "generated_tokens", None), "full_model.generated_tokens"),
    (_set("full_model", "task_loss", 1e30), "full_model.task_loss"),
    (_set("full_model", "task_loss", -1), "full_model.task_loss"),
    (_set("full_model", "mean_exit_layer", 0), "full_model.mean_exit_layer"),
    (_set("full_model", "mean_exit_layer", 1e30), "full_model.mean_exit_layer"),
    (lambda e: e["results"].pop(0), "not one per method and ε"),
    (_row(0, "method", "ucb"), "results[0].method"),
    (_row(1, "bound", "x"), "results[1].bound"),
    (_row(1, "delta", 0.2), "results[1].delta"),
    (_row(0, "speedup", None), "results[0] has a speedup of None"),
    (_row(0, "mean_exit_layer", 1e30), "results[0].mean_exit_layer"),
    (_row(0, "mean_exit_layer_std", 1e30), "results[0].mean_exit_layer_std"),
    (_row(0, "test_risk_std", 5.0), "results[0].test_risk_std"),
    (_row(0, "task_loss", -1), "results[0].task_loss"),
    (_row(0, "violation_rate", 0.3), "not a fraction of the 4 splits"),
    (_set(None, "speedup_basis", "x"), "speedup_basis"),
    (_set(None, "results_file", 1), "results_file"),
    (_set(None, "table_digest", 5), "table_digest"),
]


@pytest.mark.parametrize("edit, said", WRONG, ids=[said for _, said in WRONG])
def test_an_evaluation_without_a_digest_is_held_to_its_content(evaluation, tmp_path, edit, said):
    assert validate_evaluation(evaluation) is evaluation  # the unedited one passes
    path = tmp_path / "evaluation.json"
    path.write_text(json.dumps(_edited(evaluation, edit), indent=1), encoding="utf-8")
    with pytest.raises(CorruptFileError) as caught:
        read_evaluation(path)
    assert str(path) in str(caught.value) and said in str(caught.value)


def test_plot_refuses_an_evaluation_whose_measure_is_not_a_name(evaluation, tmp_path, capsys):
    path = tmp_path / "evaluation.json"
    path.write_text(json.dumps(_edited(evaluation, _set("metadata", "measure", 1e30))), encoding="utf-8")
    line = one_error_line(capsys, ["plot", "--evaluation", str(path), "--output-dir", str(tmp_path / "plots")])
    assert str(path) in line and "measure" in line
    assert not (tmp_path / "plots").exists()


def test_evaluate_writes_digests_and_an_edit_is_refused_by_reader_and_card(tables, tmp_path, capsys):
    table = tables[0]
    table.save(tmp_path / "table.npz")
    out = tmp_path / "evaluation.json"
    assert main(["evaluate", "--results", str(tmp_path / "table.npz"), "--eps", "0.1", "--methods", "crc,ucb",
                 "--repeats", "4", "--output", str(out)]) == 0
    written = json.loads(out.read_text(encoding="utf-8"))
    assert written["table_digest"] == table.digest() and isinstance(written["digest"], str)
    read = read_evaluation(out)
    assert "digest" not in read and read["table_digest"] == table.digest()  # the file's digest is not a result
    # a file without its digest is read as one written before digests: the same content
    out.write_text(json.dumps({k: v for k, v in written.items() if k != "digest"}, indent=1), encoding="utf-8")
    assert read_evaluation(out) == read
    # the forged card number: the test risk the card shows raised by 0.05, every field still in range
    written["results"][0]["test_risk_mean"] = round(written["results"][0]["test_risk_mean"] + 0.05, 6)
    out.write_text(json.dumps(written, indent=1), encoding="utf-8")
    with pytest.raises(CorruptFileError, match="does not match the digest") as caught:
        read_evaluation(out)
    assert str(out) in str(caught.value)
    rc = RiskControlled(eps=0.1, method="crc").fit_table(table)
    rc.save_pretrained(tmp_path / "cal")
    line = one_error_line(capsys, ["card", "--model", str(tmp_path / "model"), "--calibration", str(tmp_path / "cal"),
                                   "--evaluation", str(out)])
    assert str(out) in line and "digest" in line and not (tmp_path / "model").exists()


def test_a_card_refuses_an_evaluation_of_another_table(tables, tmp_path):
    shown, other = tables
    rc = RiskControlled(eps=0.1, method="crc").fit_table(shown)
    of_other = tmp_path / "other" / "evaluation.json"
    write_evaluation(evaluate_table(other, eps=(0.1,), methods=("crc",), repeats=2), of_other)
    with pytest.raises(InconsistentCalibrationError, match="another loss table") as caught:
        write_guarantee_card(tmp_path / "model", rc, test_results=str(of_other), table=shown)
    assert str(of_other) in str(caught.value)
    # no table given: the one stored beside the evaluation is the reference
    shown.save(of_other.parent / CALIBRATION_FILENAME)
    with pytest.raises(InconsistentCalibrationError, match="loss table beside it") as caught:
        write_guarantee_card(tmp_path / "model", rc, test_results=str(of_other))
    assert str(of_other) in str(caught.value) and not (tmp_path / "model").exists()
    # the evaluation of the table shown is accepted, and saved beside the calibration with its digest
    of_shown = tmp_path / "shown" / "evaluation.json"
    write_evaluation(evaluate_table(shown, eps=(0.1,), methods=("crc",), repeats=2), of_shown)
    write_guarantee_card(tmp_path / "model", rc, test_results=str(of_shown), table=shown)
    saved = tmp_path / "model" / "calibration" / "cnndm" / "evaluation.json"
    assert read_evaluation(saved) == read_evaluation(of_shown) and "digest" in json.loads(saved.read_text())


def test_the_shipped_evaluations_carry_their_digest_and_their_table(tmp_path):
    root = Path(__file__).resolve().parents[1] / "hf_safe_exit" / "default_model" / "calibration"
    for task in ("cnndm", "squad"):
        data = json.loads((root / task / "evaluation.json").read_text(encoding="utf-8"))
        assert isinstance(data.get("digest"), str)
        assert read_evaluation(root / task / "evaluation.json")["table_digest"] == \
            LossTable.load(root / task / CALIBRATION_FILENAME).digest()


# ============================================================================================ collect's state
LAMBDAS = [0.0, 0.5, 1.0]
COMMON = dict(lambdas=LAMBDAS, batch_size=2, max_new_tokens=4, max_input_length=32, progress=False)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A tiny model on 4 CNN/DM rows (2 batches × 3 λ = 6 cells), and the state folder of a run stopped after 3
    cells."""
    if DATA is None:
        pytest.skip("offline data folder ../shared/data is absent")
    task, rows, tokenizer, model = tiny_cnndm(4, DATA)  # 3 decoder layers
    state = tmp_path_factory.mktemp("state") / "state"
    with pytest.raises(KeyboardInterrupt), interrupted_after(3):
        collect(model, tokenizer, "cnndm", rows, output=state.parent / "out.npz", state_dir=state, **COMMON)
    return rows, tokenizer, model, state


def _resume(interrupted, tmp_path, edit_cells=None, edit_config=None):
    """Collect again on a copy of the interrupted state, its cells (JSON objects) and settings edited first."""
    rows, tokenizer, model, original = interrupted
    state = tmp_path / "state"
    shutil.copytree(original, state)
    cells_file = next(state.glob("cells-*.jsonl"))
    if edit_cells is not None:
        cells = [json.loads(line) for line in cells_file.read_text().splitlines()]
        edit_cells(cells)
        cells_file.write_text("".join(json.dumps(cell) + "\n" for cell in cells))
    if edit_config is not None:
        config = json.loads((state / "config.json").read_text())
        edit_config(config)
        (state / "config.json").write_text(json.dumps(config))
    return collect(model, tokenizer, "cnndm", rows, output=tmp_path / "out.npz", state_dir=state, **COMMON), cells_file


def _older(edit):
    """Cells as a release before digests wrote them (no digest), then ``edit`` applied to the first."""
    def apply(cells):
        for cell in cells:
            cell.pop("digest", None)
        edit(cells[0])
    return apply


def _cell(key, value):
    return lambda cell: cell.__setitem__(key, value)


def _first_row(key, value):
    return lambda cell: cell[key].__setitem__(0, value)


OLDER_WRONG = [
    (_cell("lambda", 0.25), "is not the run's threshold at index"),
    (lambda cell: cell.update(k=cell["k"] + 1), "is not the run's threshold at index"),  # moved to another λ
    (_first_row("ids", "not-an-example"), "ids are not those of batch"),
    (_first_row("mean_exit_layer", -1.0), "mean_exit_layer"),
    (_first_row("mean_exit_layer", math.nan), "mean_exit_layer"),
    (_first_row("mean_exit_layer", 4.0), "mean_exit_layer"),  # the model has 3 decoder layers
    (_first_row("layer_fraction", math.inf), "layer_fraction"),
    (_first_row("layer_fraction", 1.5), "layer_fraction"),
    (_first_row("num_tokens", 2.5), "num_tokens"),
    (_first_row("num_tokens", -1), "num_tokens"),
    (_first_row("num_tokens", None), "num_tokens"),
    (_cell("seconds", -1.0), "seconds"),
    (_cell("seconds", math.nan), "seconds"),
    (_cell("seconds", True), "seconds"),
]


@needs_data
@pytest.mark.parametrize("edit, said", OLDER_WRONG, ids=[f"{i}-{said}" for i, (_, said) in enumerate(OLDER_WRONG)])
def test_a_cell_without_a_digest_must_be_a_cell_of_this_run(interrupted, tmp_path, edit, said):
    with pytest.raises(CorruptFileError, match=said) as caught:
        _resume(interrupted, tmp_path, edit_cells=_older(edit))
    assert "cells-000-of-001.jsonl': line 1 is not a finished cell" in str(caught.value)


@needs_data
def test_cells_carry_their_digest_and_an_edited_one_is_refused(interrupted, tmp_path):
    _, _, _, original = interrupted
    cells = [json.loads(line) for line in next(original.glob("cells-*.jsonl")).read_text().splitlines()]
    assert len(cells) == 3 and all(isinstance(cell["digest"], str) for cell in cells)

    def forge(cells):  # a prediction replaced by another text: every type and count still right
        cells[0]["predictions"][0] += " and more"
    with pytest.raises(CorruptFileError, match="does not match the digest it was written with") as caught:
        _resume(interrupted, tmp_path, edit_cells=forge)
    assert "cells-000-of-001.jsonl': line 1" in str(caught.value)
    # the same cells without digests (a state of a release before them) resume to the table of a fresh run
    rows, tokenizer, model, _ = interrupted
    older, _ = _resume(interrupted, tmp_path / "older", edit_cells=_older(lambda cell: None))
    fresh = collect(model, tokenizer, "cnndm", rows, **COMMON)
    for name in older.losses:
        np.testing.assert_array_equal(older.losses[name], fresh.losses[name])
    np.testing.assert_array_equal(older.extras["mean_exit_layer"], fresh.extras["mean_exit_layer"])


@needs_data
def test_a_setting_flipped_to_true_is_another_setting(interrupted, tmp_path):
    with pytest.raises(StateMismatchError, match="min_exit_layer") as caught:
        _resume(interrupted, tmp_path, edit_config=lambda config: config.update(min_exit_layer=True))
    assert str(tmp_path / "state") in str(caught.value)


# ============================================================================================ --exclude-ids
@needs_data
@pytest.mark.parametrize("ids", [[-1], ["not-an-id"], "deleted"])
def test_exclude_ids_that_match_no_example_are_refused_naming_the_file(tmp_path, capsys, ids):
    pool = [str(i) for i in load_split("cnndm", "pool", path=DATA)["id"]]
    ids = pool[:2] + (["0" * 40] if ids == "deleted" else ids)  # an id of a row that is not in the data
    exclude = tmp_path / "exclude.json"
    exclude.write_text(json.dumps({"cnndm_ids": ids}))
    argv = ["collect", "--model", str(tmp_path / "no-model"), "--data", str(DATA), "--task", "cnndm", "--split",
            "pool", "--output", str(tmp_path / "out.npz"), "--no-progress", "--exclude-ids", str(exclude)]
    line = one_error_line(capsys, argv)
    assert str(exclude) in line and "1 of its 3 ids are no example of the pool split of cnndm" in line
    exclude.write_text(json.dumps({"cnndm_ids": pool[:2]}))  # ids of the split pass (the model is what is missing)
    line = one_error_line(capsys, argv)
    assert "no-model" in line and str(exclude) not in line


# ============================================================================================ the meta head
def _head_files(folder: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    torch.manual_seed(0)
    head = MetaClassifierHead(MetaHeadConfig(d_model=16))
    head.save_pretrained(folder)
    if config is not None:
        (folder / "meta_head_config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors(load_file(folder / "meta_head.safetensors")), folder / "meta_head.safetensors")
    return folder


@pytest.mark.parametrize("field, value", [("d_model", 0), ("d_model", True), ("d_model", 16.0), ("d_model", "16"),
                                          ("hidden_size", -1), ("hidden_size", math.nan), ("hidden_size", True),
                                          ("dropout", 1.0), ("dropout", -0.1), ("dropout", "x"), ("dropout", True),
                                          ("dropout", math.nan), ("dropout", 1e30)])
def test_a_meta_head_config_is_checked_naming_it(tmp_path, field, value):
    folder = _head_files(tmp_path, config={"d_model": 16, "hidden_size": 0, "dropout": 0.0, field: value})
    with pytest.raises(CorruptFileError, match=field) as caught:
        MetaClassifierHead.from_pretrained(folder)
    assert str(folder / "meta_head_config.json") in str(caught.value) and "safetensors" not in str(caught.value)
    with pytest.raises(ValueError, match=field):
        MetaHeadConfig(**{"d_model": 16, field: value})


@pytest.mark.parametrize("tensors, said", [
    (lambda t: {**t, "net.weight": t["net.weight"].round().int()}, "not floating-point"),
    (lambda t: {k: v.round().int() for k, v in t.items()}, "not floating-point"),
    (lambda t: {**t, "net.bias": t["net.bias"].half()}, "several dtypes"),
    (lambda t: {**t, "net.weight": t["net.weight"].double()}, "several dtypes"),
])
def test_meta_head_weights_that_are_not_one_floating_dtype_are_refused_naming_them(tmp_path, tensors, said):
    folder = _head_files(tmp_path, tensors=tensors)
    with pytest.raises(CorruptFileError, match=said) as caught:
        MetaClassifierHead.from_pretrained(folder)
    assert str(folder / "meta_head.safetensors") in str(caught.value)


def test_a_half_precision_copy_of_a_head_loads_and_its_calibration_refuses_it(tmp_path):
    """A head saved in half precision (a model cast to float16 saves its head so) loads, cast to float32; the
    calibration of the float32 original records another head fingerprint, so it refuses the copy (the values
    differ); a calibration made with the half-precision head accepts it again on a float16 model."""
    original = MetaClassifierHead.from_pretrained(_head_files(tmp_path / "f32"))
    half = MetaClassifierHead.from_pretrained(_head_files(tmp_path / "f16", tensors=lambda t: {
        k: v.half() for k, v in t.items()}))
    assert all(p.dtype == torch.float32 for p in half.parameters())
    for name, value in half.state_dict().items():
        torch.testing.assert_close(value, original.state_dict()[name].half().float(), rtol=0, atol=0)
    model = build_tiny_t5(40)
    config = EarlyExitConfig(measure="meta")
    model.meta_head = original
    recorded = {**record_provenance(model, config), "measure": "meta"}
    model.meta_head = half
    with pytest.raises(ModelMismatchError, match="meta"):
        check_model_matches(recorded, model)
    model16 = build_tiny_t5(40).half()
    model16.meta_head = original.half()
    recorded16 = {**record_provenance(model16, config), "measure": "meta"}
    model16.meta_head = MetaClassifierHead.from_pretrained(tmp_path / "f16").half()
    check_model_matches(recorded16, model16)  # the same head, in the model's dtype
    assert meta_head_fingerprint(model16.meta_head) == meta_head_fingerprint(original.half())
    # one tensor half, one float32: no head is saved so (it would load as another head than either)
    mixed = _head_files(tmp_path / "mixed", tensors=lambda t: {**t, "net.bias": t["net.bias"].half()})
    with pytest.raises(CorruptFileError, match="several dtypes"):
        MetaClassifierHead.from_pretrained(mixed)

