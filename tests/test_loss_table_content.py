"""Issue 26, the loss table (``early_exit_calibration.npz``): nothing well-formed but wrong gets through.

What the fuzz test (tests/test_fuzz_artifacts.py) found, checked here on tables built in Python and on files without
a digest (written before digests, or by hand), whose content checks are all that protect them: a damaged archive,
extras that are not finite numbers of the table's shape, losses stored as integers, metadata that contradicts the
arrays, a fingerprint that cannot be one, an unknown measure turned into a policy. And for written files: the digest
``save`` records, which refuses any edit made after writing, even one that leaves a valid table.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_safe_exit import EarlyExitConfig, LossTable, RiskControlled, enable, model_fingerprint
from hf_safe_exit.confidence import ConfidenceMeasure
from hf_safe_exit.errors import CorruptFileError

from cli_lines import one_error_line
from tiny_t5 import random_t5
from toy_losses import toy_table, toy_task_losses

FP = "0123456789abcdef"
GRID = [float(v) for v in toy_task_losses()[0]]
K, N = len(GRID), toy_task_losses()[1].shape[1]  # toy_table's grid and examples (11, 400)
EDITED = "edited \\(or damaged\\) after it was written"


def _arrays(path) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, json.loads(str(arrays.pop("header_json")))


def _rewrite(path, arrays: dict, header: dict, keep_digest: bool = False) -> None:
    """Write ``arrays`` and ``header`` as a loss table file, by hand (without its digest unless ``keep_digest``)."""
    header = {k: v for k, v in header.items() if keep_digest or k != "digest"}
    np.savez(path, header_json=np.array(json.dumps(header)), **arrays)


def _hand_made(tmp_path, table: LossTable, change) -> str:
    """A file of ``table`` without a digest, ``change(arrays, header)`` applied."""
    path = table.save(tmp_path / "t.npz")
    arrays, header = _arrays(path)
    change(arrays, header)
    _rewrite(path, arrays, header)
    return path


def _refused_on_load(path, needle: str) -> None:
    with pytest.raises(CorruptFileError, match=needle) as caught:
        LossTable.load(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


# ------------------------------------------------------------------ a damaged archive
def test_a_damaged_archive_is_a_corrupt_file_naming_it(tmp_path, capsys):
    path = toy_table(FP).save(tmp_path / "t.npz")
    data = Path(path).read_bytes()
    start, size = len(data) // 2 - len(data) // 8, len(data) // 4  # a quarter overwritten in the middle
    block = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    (tmp_path / "t.npz").write_bytes(data[:start] + block + data[start + size:])
    with pytest.raises(zlib.error):  # what numpy raises for it: neither a ValueError nor an OSError
        with np.load(path, allow_pickle=False) as raw:
            [raw[k] for k in raw.files]
    _refused_on_load(path, "damaged")
    line = one_error_line(capsys, ["evaluate", "--results", str(path), "--output", str(tmp_path / "e.json")])
    assert str(path) in line and "damaged" in line


# ------------------------------------------------------------------ extras
NOT_EXTRAS = {
    "as str": lambda a: a.astype(str),
    "with a NaN": lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, np.nan, a),
    "with an infinity": lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, -np.inf, a),
    "of another second axis": lambda a: a[:, :-1],
    "with a third axis": lambda a: a[:, :, None],
    "complex": lambda a: a.astype(np.complex128),
}


@pytest.mark.parametrize("spoil", list(NOT_EXTRAS))
def test_extras_that_are_not_finite_numbers_of_the_tables_shape_are_refused(tmp_path, spoil):
    table = toy_table(FP)
    bad = NOT_EXTRAS[spoil](table.extras["task_loss"])
    with pytest.raises(ValueError, match=r"extras\['task_loss'\]"):
        LossTable(table.lambdas, table.losses, table.bounds, {"task_loss": bad}, table.metadata)
    path = _hand_made(tmp_path, table, lambda arrays, header: arrays.update(extra__task_loss=bad))
    _refused_on_load(path, r"extras\['task_loss'\]")


# ------------------------------------------------------------------ losses stored as integers
@pytest.mark.parametrize("name", ["loss__performance_gap", "loss__performance_gap_bounded"])
def test_losses_stored_as_integers_are_refused_on_load(tmp_path, name):
    # truncated to 0 (or -1), the losses would still lie in their bounds: the dtype is what shows the conversion
    path = _hand_made(tmp_path, toy_table(FP), lambda arrays, header: arrays.update({name: arrays[name].astype(int)}))
    _refused_on_load(path, f"'{name}' holds int64 values, not the floating-point numbers")


# ------------------------------------------------------------------ metadata that contradicts the arrays
CONTRADICTIONS = [
    ("n", N - 1, "metadata n=399 but the losses hold 400 examples"),
    ("n", str(N), "metadata n='400'"),
    ("lambdas", list(np.linspace(0, 1, K)[::-1]), "is not the grid the losses are on"),
    ("lambdas", [0.0, 1.0], "is not the grid the losses are on"),
    ("task_loss_bounds", [0.0, 2.0], r"performance_gap bounds \[-1.0, 1.0\] contradict metadata task_loss_bounds"),
    ("task_loss_bounds", [1.0, 0.0], "must be \\[lower, upper\\]"),
    ("example_ids", "x" * N, "example_ids'\\] must be a list"),
    ("model_fingerprint", "x", "model_fingerprint='x' is not a fingerprint"),
    ("model_fingerprint", FP.upper(), "is not a fingerprint"),
    ("meta_head_fingerprint", "zz", "meta_head_fingerprint='zz' is not a fingerprint"),
    ("example_ids", ["ex0"] * N, "must name each example once"),
    ("example_ids", [None] + [f"ex{i}" for i in range(1, N)], "must name each example once"),
    # what collect records beside the settings, of a type it never writes (a card shows some of it as it is)
    ("batch_size", "x", "metadata batch_size='x' must be a whole number >= 1"),
    ("batch_size", 0, "metadata batch_size=0 must be"),
    ("subset_seed", -1, "metadata subset_seed=-1 must be a whole number >= 0"),
    ("split", 5, "metadata split=5 must be a string"),
    ("versions", {"torch": 2}, "must be an object of version strings"),
    ("excluded_ids", {"n_excluded": float("inf")}, "metadata holds a NaN or infinite number"),
]


@pytest.mark.parametrize("key, value, said", CONTRADICTIONS)
def test_metadata_that_contradicts_the_arrays_is_refused(tmp_path, key, value, said):
    table = toy_table(FP, n=N, lambdas=GRID)
    with pytest.raises(ValueError, match=said):
        LossTable(table.lambdas, table.losses, table.bounds, table.extras, {**table.metadata, key: value})
    path = _hand_made(tmp_path, table, lambda arrays, header: header["metadata"].update({key: value}))
    _refused_on_load(path, said)


def test_a_task_loss_outside_its_recorded_range_is_refused(tmp_path):
    table = toy_table(FP)  # task_loss_bounds [0, 1]
    task = table.extras["task_loss"].copy()
    task[3, 7] = 1.5
    with pytest.raises(ValueError, match=r"extras\['task_loss'\] lies in .* outside metadata task_loss_bounds"):
        LossTable(table.lambdas, table.losses, table.bounds, {"task_loss": task}, table.metadata)
    path = _hand_made(tmp_path, table, lambda arrays, header: arrays.update(extra__task_loss=task))
    _refused_on_load(path, "outside metadata task_loss_bounds")


def test_a_subset_records_its_own_number_of_examples(tmp_path):
    table = toy_table(FP, n=N, example_ids=[f"ex{i}" for i in range(N)])
    sub = table.subset([3, 1])
    assert sub.metadata["n"] == 2 and sub.metadata["example_ids"] == ["ex3", "ex1"]
    assert LossTable.load(sub.save(tmp_path / "sub.npz")).metadata["n"] == 2


# ------------------------------------------------------------------ the digest of a written file
EDITS = {
    "metadata.batch_size": lambda a, h: h["metadata"].update(batch_size=9),
    "metadata.versions.torch": lambda a, h: h["metadata"]["versions"].update(torch="0.0"),
    "metadata.data_source": lambda a, h: h["metadata"].update(data_source="elsewhere"),
    "metadata.max_new_tokens deleted": lambda a, h: h["metadata"].pop("max_new_tokens"),
    "metadata.model_fingerprint = null": lambda a, h: h["metadata"].update(model_fingerprint=None),
    "metadata.decay_tau = 1e30": lambda a, h: h["metadata"].update(decay_tau=1e30),
    "metadata.example_ids changed": lambda a, h: h["metadata"]["example_ids"].reverse(),
    "metadata = {}": lambda a, h: h.update(metadata={}),
    "bounds.consistency wider": lambda a, h: h["bounds"].update(consistency=[0.0, 2.0]),
    "extra__task_loss left out": lambda a, h: a.pop("extra__task_loss"),
    "extra__wall_time as int64": lambda a, h: a.update(extra__wall_time=a["extra__wall_time"].astype(np.int64)),
    "loss__consistency one value lowered": lambda a, h: a["loss__consistency"].__setitem__((0, 0), 0.0),
    "digest = 'x'": lambda a, h: h.update(digest="x"),
    "digest = 0": lambda a, h: h.update(digest=0),
}


def _written(tmp_path) -> str:
    table = toy_table(FP, consistency=True, n=N, batch_size=8, max_new_tokens=16, decay_tau=4.0,
                      versions={"torch": "2.13"}, data_source="here", example_ids=[f"ex{i}" for i in range(N)])
    table = LossTable(table.lambdas, table.losses, table.bounds, {**table.extras, "wall_time": np.full(K, 3.0)},
                      table.metadata)
    return table.save(tmp_path / "t.npz")


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_written_table_edited_after_writing_is_refused_naming_it(tmp_path, edit, capsys):
    path = _written(tmp_path)
    arrays, header = _arrays(path)
    assert isinstance(header["digest"], str) and len(header["digest"]) == 64
    EDITS[edit](arrays, header)
    _rewrite(path, arrays, header, keep_digest=True)
    _refused_on_load(path, EDITED)
    line = one_error_line(capsys, ["calibrate", "--results", str(path), "--eps", "0.1", "--output",
                                   str(tmp_path / "rc")])
    assert str(path) in line


def test_a_file_without_its_digest_reads_as_before(tmp_path):
    """A table written before digests (or by hand) is read, held to the content checks alone; one read and saved
    again is the same file, byte for byte (its digest too)."""
    path = _written(tmp_path)
    table = LossTable.load(path)
    assert Path(table.save(tmp_path / "again.npz")).read_bytes() == Path(path).read_bytes()
    arrays, header = _arrays(path)
    assert "digest" in header
    _rewrite(path, arrays, header)  # the digest left out
    assert LossTable.load(path).digest() == table.digest()


def test_the_table_digest_covers_extras(tmp_path):
    """``LossTable.digest`` keys cached fits and integrity checks, and tells the card writer whether a table changed.
    Extras of integers (collect's num_tokens) and of one value per λ (wall_time) are kept as they are."""
    table = toy_table(FP)

    def with_extras(**extras):
        return LossTable(table.lambdas, table.losses, table.bounds, {**table.extras, **extras}, table.metadata)

    timed, slower = with_extras(wall_time=np.full(K, 3.0)), with_extras(wall_time=np.full(K, 4.0))
    counted = with_extras(num_tokens=np.ones((K, N), dtype=np.int64))
    as_floats = with_extras(num_tokens=np.ones((K, N)))
    assert len({t.digest() for t in (table, timed, slower, counted, as_floats)}) == 5
    back = LossTable.load(counted.save(tmp_path / "t.npz"))
    assert back.extras["num_tokens"].dtype == np.int64 and back.digest() == counted.digest()


def test_save_refuses_a_table_changed_in_place_into_an_invalid_one(tmp_path):
    good = toy_table(FP, n=N)
    path = good.save(tmp_path / "t.npz")
    before = Path(path).read_bytes()
    for spoil in (lambda t: t.extras["task_loss"].__setitem__((0, 0), np.nan),
                  lambda t: t.metadata.update(n=5)):
        table = toy_table(FP, n=N)
        spoil(table)
        with pytest.raises(ValueError, match="NaN or infinite|metadata n=5"):
            table.save(path)
        assert Path(path).read_bytes() == before  # the file there is left as it was


# ------------------------------------------------------------------ an unknown measure turned into a policy
class _Named(ConfidenceMeasure):
    name = "x"

    def __call__(self, view):
        return view.hidden.new_ones(view.hidden.shape[0])


def test_an_unknown_measure_is_refused_naming_the_table_when_it_becomes_a_policy(tmp_path):
    model = enable(random_t5())
    path = toy_table(model_fingerprint(model), measure="x").save(tmp_path / "t.npz")
    assert LossTable.load(path).metadata["measure"] == "x"  # read: a custom measure is recorded by its name
    model.early_exit_calibration = path
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 1]]), "max_new_tokens": 3}
    for use in (lambda: RiskControlled(0.1).policy_for(model),
                lambda: model.generate(**inputs, early_exit=RiskControlled(0.1))):
        with pytest.raises(CorruptFileError, match="Unknown confidence measure 'x'") as caught:
            use()
        assert str(path) in str(caught.value) and "config=EarlyExitConfig(measure=" in str(caught.value)
    # with that measure handed over, the table is its calibration
    calibration, _ = RiskControlled(0.1, config=EarlyExitConfig(measure=_Named())).policy_for(model)
    assert isinstance(calibration.config.measure, _Named)
