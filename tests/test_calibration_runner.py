"""The calibration runner end to end on a tiny random T5 and real examples from ../shared/data."""

import json

import numpy as np
import pytest
import torch
from collect_helpers import interrupted_after

from hf_safe_exit.calibration import StateMismatchError, collect, default_lambdas
from hf_safe_exit.compat import cache_kwargs
from hf_safe_exit.confidence import HEAD_FREE_DEFAULT
from hf_safe_exit.decoding.early_exit_loop import new_decoder_cache
from hf_safe_exit.fingerprint import model_fingerprint
from hf_safe_exit.risk import LossTable
from hf_safe_exit.tasks import get_task, load_split, shared_data_dir

from tiny_calibration import build_tiny_t5, build_word_tokenizer, tiny_cnndm

DATA = shared_data_dir()
pytestmark = [pytest.mark.skipif(DATA is None, reason="offline data folder ../shared/data (or $HF_SAFE_EXIT_DATA) "
                                                     "is absent"),
              pytest.mark.usefixtures("one_thread")]

LAMBDAS = [0.0, 0.5, 0.9, 1.0]
COMMON = dict(lambdas=LAMBDAS, batch_size=2, max_new_tokens=6, max_input_length=48, progress=False)
TIMING = ("wall_time", "example_time")



@pytest.fixture(scope="module")
def cnndm():
    _, rows, tokenizer, model = tiny_cnndm(5, DATA)
    return rows, tokenizer, model  # 2 encoder / 3 decoder layers


def assert_same_results(a: LossTable, b: LossTable, timing: bool):
    np.testing.assert_array_equal(a.lambdas, b.lambdas)
    assert a.losses.keys() == b.losses.keys() and a.extras.keys() == b.extras.keys()
    for name in a.losses:
        np.testing.assert_array_equal(a.losses[name], b.losses[name], err_msg=name)
    for name in a.extras:
        if timing or name not in TIMING:
            np.testing.assert_array_equal(a.extras[name], b.extras[name], err_msg=name)
    assert a.metadata == b.metadata and a.bounds == b.bounds


def stock_greedy_text(model, tokenizer, prompt, max_new_tokens, max_length):
    """The full model's greedy output from HF's own generate (independent of our decoder loop)."""
    enc = tokenizer([prompt], return_tensors="pt", truncation=True, max_length=max_length)
    # stock generate sizes the cache from the encoder depth; this model's decoder is deeper
    cache = new_decoder_cache(model)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, **cache_kwargs(cache))
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()


def test_default_grid():
    grid = default_lambdas()
    assert grid.size == 20 and grid[0] == 0.0 and grid[-1] == 1.0 and np.all(np.diff(grid) > 0)


def test_result_file_shapes_and_full_model_row(cnndm, tmp_path):
    rows, tokenizer, model = cnndm
    task = get_task("cnndm")
    path = tmp_path / "cnndm.npz"
    table = collect(model, tokenizer, task, rows, output=path, metadata={"note": "test"}, **COMMON)
    loaded = LossTable.load(path)
    assert_same_results(table, loaded, timing=True)
    K, n, L = len(LAMBDAS), len(rows), model.config.num_decoder_layers
    assert set(loaded.losses) == {"performance_gap", "performance_gap_bounded", "consistency"}
    for name in loaded.losses:
        assert loaded.losses[name].shape == (K, n)
    for name in ("task_loss", "mean_exit_layer", "layer_fraction", "num_tokens", "example_time"):
        assert loaded.extras[name].shape == (K, n), name
    assert loaded.extras["wall_time"].shape == (K,) and np.all(loaded.extras["wall_time"] > 0)
    meta = loaded.metadata
    assert meta["model_fingerprint"] == model_fingerprint(model)
    # the default measure "auto" is recorded as what it resolved to: this model has no meta head
    assert meta["task"] == "cnndm" and meta["measure"] == HEAD_FREE_DEFAULT and meta["schedule"] == "constant"
    assert meta["lambdas"] == LAMBDAS and meta["example_ids"] == rows["id"] and meta["note"] == "test"
    assert meta["num_decoder_layers"] == L and {"torch", "transformers", "hf_safe_exit"} <= set(meta["versions"])
    assert loaded.bounds["performance_gap"] == (-1.0, 1.0)

    full = LAMBDAS.index(1.0)
    # λ = 1 is the full model: every performance-gap and consistency loss is exactly 0, all layers run
    assert np.all(loaded.losses["performance_gap"][full] == 0.0)
    assert np.all(loaded.losses["performance_gap_bounded"][full] == 0.0)
    assert np.all(loaded.losses["consistency"][full] == 0.0)
    assert np.all(loaded.extras["mean_exit_layer"][full] == L) and np.all(loaded.extras["layer_fraction"][full] == 1.0)
    # λ = 0 exits wherever the (shortlist) softmax margin is > 0: at layer 1, so 1/L of the layers run
    assert np.all(loaded.extras["mean_exit_layer"][0] == 1.0)
    np.testing.assert_allclose(loaded.extras["layer_fraction"][0], 1.0 / L)
    assert np.any(loaded.losses["consistency"][0] > 0)  # exiting at layer 1 changes some outputs
    # the λ = 1 task losses equal 1 − ROUGE-L of HF's own greedy output, example by example
    for j, row in enumerate(rows):
        text = stock_greedy_text(model, tokenizer, task.prompt(row), 6, 48)
        assert loaded.extras["task_loss"][full, j] == pytest.approx(task.loss(text, task.reference(row)), abs=1e-12)
    # the gap is the task loss minus the full model's, example by example
    np.testing.assert_allclose(loaded.losses["performance_gap"],
                               loaded.extras["task_loss"] - loaded.extras["task_loss"][full])


def test_resume_after_interruption_gives_the_same_file(cnndm, tmp_path):
    rows, tokenizer, model = cnndm
    reference = collect(model, tokenizer, "cnndm", rows, output=tmp_path / "a.npz", **COMMON)
    assert not (tmp_path / "a.npz.partial").exists()  # the default state folder goes once the result is written

    out = tmp_path / "b.npz"
    with pytest.raises(KeyboardInterrupt), interrupted_after(5):
        collect(model, tokenizer, "cnndm", rows, output=out, **COMMON)
    assert not out.exists() and (tmp_path / "b.npz.partial").is_dir()
    resumed = collect(model, tokenizer, "cnndm", rows, output=out, **COMMON)
    assert_same_results(reference, resumed, timing=False)
    assert not (tmp_path / "b.npz.partial").exists()

    # a state folder the caller names is kept: count the cells decoded by each run
    state = tmp_path / "state"
    out = tmp_path / "c.npz"
    lines = lambda: sum(len(f.read_text().splitlines()) for f in state.glob("cells-*.jsonl"))  # noqa: E731
    with pytest.raises(KeyboardInterrupt), interrupted_after(5):
        collect(model, tokenizer, "cnndm", rows, output=out, state_dir=state, **COMMON)
    assert lines() == 5
    resumed = collect(model, tokenizer, "cnndm", rows, output=out, state_dir=state, **COMMON)
    assert lines() == len(LAMBDAS) * 3  # 3 batches of ≤ 2 examples: only the 7 missing cells were decoded
    assert_same_results(reference, LossTable.load(out), timing=False)
    # a rerun with everything done decodes nothing and writes the identical file, timings included
    again = collect(model, tokenizer, "cnndm", rows, output=out, state_dir=state, **COMMON)
    assert lines() == len(LAMBDAS) * 3
    assert_same_results(resumed, again, timing=True)
    assert_same_results(resumed, LossTable.load(out), timing=True)
    # other settings on the same state are refused
    with pytest.raises(StateMismatchError, match="--fresh"):
        collect(model, tokenizer, "cnndm", rows, output=out, state_dir=state, **{**COMMON, "lambdas": [0.3, 1.0]})
    assert json.loads((state / "config.json").read_text())["lambdas"] == LAMBDAS


def test_torn_last_line_is_dropped_on_resume(cnndm, tmp_path):
    """A run killed mid-write leaves a fragment; the next run must not glue its first cell onto it."""
    rows, tokenizer, model = cnndm
    reference = collect(model, tokenizer, "cnndm", rows, output=tmp_path / "a.npz", **COMMON)
    state, out = tmp_path / "state", tmp_path / "b.npz"
    with pytest.raises(KeyboardInterrupt), interrupted_after(3):
        collect(model, tokenizer, "cnndm", rows, output=out, state_dir=state, **COMMON)
    (cells_file,) = state.glob("cells-*.jsonl")
    complete = cells_file.read_text().splitlines()
    cells_file.write_text("\n".join(complete) + "\n" + '{"k": 2, "lambda": 0.9, "batch": 1, "ids": ["')  # torn
    with pytest.raises(KeyboardInterrupt), interrupted_after(2):
        collect(model, tokenizer, "cnndm", rows, output=out, state_dir=state, **COMMON)
    # every line is a whole cell: the fragment was dropped before the two new cells were appended
    lines = cells_file.read_text().splitlines()
    assert cells_file.read_text().endswith("\n") and lines[:3] == complete and len(lines) == 5
    assert [sorted(json.loads(line)) for line in lines] == [sorted(json.loads(complete[0]))] * 5
    # and a later resume needs only the cells that are really missing
    collect(model, tokenizer, "cnndm", rows, output=out, state_dir=state, **COMMON)
    assert len(cells_file.read_text().splitlines()) == len(LAMBDAS) * 3
    assert_same_results(reference, LossTable.load(out), timing=False)


def test_state_files_that_are_not_collects_are_refused_with_the_fix(cnndm, tmp_path):
    from hf_safe_exit.errors import CalibrationFileError, CorruptFileError

    rows, tokenizer, model = cnndm
    state, out = tmp_path / "state", tmp_path / "b.npz"
    with pytest.raises(KeyboardInterrupt), interrupted_after(2):
        collect(model, tokenizer, "cnndm", rows, output=out, state_dir=state, **COMMON)
    (cells_file,) = state.glob("cells-*.jsonl")
    good = cells_file.read_text()
    for bad in ("garbage\n" + good, good + "[1, 2]\n" + good, good + '{"k": 0}\n'):  # garbage, foreign, incomplete
        cells_file.write_text(bad)
        with pytest.raises(CorruptFileError, match=r"cells-000-of-001\.jsonl.*line \d+ is not a finished cell.*--fresh"):
            collect(model, tokenizer, "cnndm", rows, output=out, state_dir=state, **COMMON)
    cells_file.write_text(good)
    for bad in ("", "{not json", "[1, 2]"):  # empty, truncated and foreign settings files
        (state / "config.json").write_text(bad)
        with pytest.raises(CalibrationFileError, match=r"config\.json'.*settings of a partial collect run.*--fresh"):
            collect(model, tokenizer, "cnndm", rows, output=out, state_dir=state, **COMMON)
    # --fresh gets past all of it
    collect(model, tokenizer, "cnndm", rows, output=out, state_dir=state, fresh=True, **COMMON)


def test_squad_losses_are_one_minus_f1(tmp_path):
    rows = load_split("squad", "pool", path=DATA).select(range(4))
    task = get_task("squad")
    tokenizer = build_word_tokenizer([task.prompt(r) for r in rows])
    model = build_tiny_t5(len(tokenizer), seed=3)
    table = collect(model, tokenizer, task, rows, lambdas=[0.5, 1.0], batch_size=4, max_new_tokens=4,
                    max_input_length=64, progress=False)
    assert table.metadata["task"] == "squad" and table.losses["performance_gap"].shape == (2, 4)
    for j, row in enumerate(rows):
        text = stock_greedy_text(model, tokenizer, task.prompt(row), 4, 64)
        assert table.extras["task_loss"][1, j] == pytest.approx(1 - task.score(text, task.reference(row)))


def test_bad_grid_is_refused(cnndm):
    rows, tokenizer, model = cnndm
    with pytest.raises(ValueError, match="λ = 1"):
        collect(model, tokenizer, "cnndm", rows, lambdas=[0.2, 0.5], progress=False)
    with pytest.raises(ValueError, match="at least one example"):
        collect(model, tokenizer, "cnndm", [], lambdas=[1.0], progress=False)


def test_poe_collection_records_its_decoder_and_fits_a_poe_policy(cnndm):
    from hf_safe_exit import EarlyExit, EarlyExitConfig, PoEConfig, RiskControlled
    from hf_safe_exit.decoding.generate import generate

    rows, tokenizer, model = cnndm
    task = get_task("cnndm")
    poe = collect(model, tokenizer, task, rows, config=EarlyExitConfig(anytime="poe"), **COMMON)
    plain = collect(model, tokenizer, task, rows, **COMMON)
    assert poe.metadata["anytime"] == PoEConfig().to_dict() and plain.metadata["anytime"] is None
    full = LAMBDAS.index(1.0)  # PoE's default final_layer="model": λ = 1 is the plain full model
    np.testing.assert_array_equal(poe.extras["task_loss"][full], plain.extras["task_loss"][full])
    # each row of the PoE table is what EarlyExit(anytime="poe") decodes, example by example
    k = LAMBDAS.index(0.5)
    enc = tokenizer([task.prompt(rows[0])], return_tensors="pt", truncation=True, max_length=48)
    out = generate(model, **enc, max_new_tokens=6, early_exit=EarlyExit(threshold=0.5, anytime="poe"))
    text = tokenizer.decode(out[0], skip_special_tokens=True).strip()
    assert poe.extras["task_loss"][k, 0] == pytest.approx(task.loss(text, task.reference(rows[0])), abs=1e-12)
    assert RiskControlled(0.2).fit_table(poe).resolve(model).anytime == PoEConfig()


@pytest.mark.parametrize("damage,needle", [
    ("no_config", "no config.json"),
    ("short_list", r"\['predictions'\] do not hold one value per example"),
    ("wrong_type", "k, batch, ids or seconds have the wrong type"),
    ("missing_cost", "differ from the other cells'"),
    ("directory", "not a file of finished cells"),
])
def test_a_state_folder_resumes_only_what_is_provably_this_run(cnndm, tmp_path, damage, needle):
    # issue 26, root cause 4: cells without their settings, or cells that are not well formed, are refused by name
    from hf_safe_exit.errors import CalibrationFileError

    rows, tokenizer, model = cnndm
    state, out = tmp_path / "state", tmp_path / "out.npz"
    with pytest.raises(KeyboardInterrupt), interrupted_after(3):
        collect(model, tokenizer, "cnndm", rows, output=out, state_dir=state, **COMMON)
    cells = next(state.glob("cells-*.jsonl"))
    lines = [json.loads(line) for line in cells.read_text().splitlines()]
    if damage == "no_config":
        (state / "config.json").unlink()
    elif damage == "directory":
        (state / "cells-009-of-010.jsonl").mkdir()
    else:
        cell = lines[1]
        if damage == "short_list":
            cell["predictions"] = cell["predictions"][:-1]
        elif damage == "wrong_type":
            cell["ids"] = "not a list"
        else:
            cell.pop("mean_exit_layer")
        cells.write_text("".join(json.dumps(c) + "\n" for c in lines))
    with pytest.raises((StateMismatchError, CalibrationFileError), match=needle) as caught:
        collect(model, tokenizer, "cnndm", rows, output=out, state_dir=state, **COMMON)
    assert "\n" not in str(caught.value)


def test_one_writer_per_state_folder(cnndm, tmp_path):
    # issue 26, root cause 6: a second run on the same state folder stops, naming the running one; a lock left by a
    # run that died is taken over; the lock goes when the run ends, finished or interrupted
    import os
    import socket
    import subprocess
    import sys

    from hf_safe_exit.errors import RunInProgressError

    rows, tokenizer, model = cnndm
    state, out = tmp_path / "state", tmp_path / "out.npz"
    state.mkdir()
    host = socket.gethostname()
    (state / "lock").write_text(json.dumps({"pid": os.getppid(), "host": host, "started": "then"}))  # alive
    with pytest.raises(RunInProgressError, match=rf"being written by another collect run \(pid {os.getppid()} on "):
        collect(model, tokenizer, "cnndm", rows, output=out, state_dir=state, **COMMON)
    assert not out.exists() and (state / "lock").exists()  # the other run's lock is left alone
    with pytest.raises(RunInProgressError):  # --fresh does not take it either
        collect(model, tokenizer, "cnndm", rows, output=out, state_dir=state, fresh=True, **COMMON)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (state / "lock").write_text(json.dumps({"pid": int(dead.stdout), "host": host, "started": "then"}))
    with pytest.raises(KeyboardInterrupt), interrupted_after(2):
        collect(model, tokenizer, "cnndm", rows, output=out, state_dir=state, **COMMON)
    assert not (state / "lock").exists()  # taken over from the dead run, released on the interruption
    collect(model, tokenizer, "cnndm", rows, output=out, state_dir=state, **COMMON)
    assert out.exists() and not (state / "lock").exists()
