"""ConfigurationTable (risk/configuration_table.py): from_tables against a matrix stacked by hand, the file's round
trip, and every refusal naming what is wrong (a bad argument: ValueError/TypeError; a bad file: CorruptFileError
naming it): edited header or arrays (digest), a forged file with a duplicate configuration or no full-model row,
tables that disagree, a 1-D λ table read as a configuration table and back."""

import json
import zipfile

import numpy as np
import pytest

from hf_safe_exit.config import EarlyExitConfig
from hf_safe_exit.digest import DIGEST_KEY, content_digest
from hf_safe_exit.errors import CorruptFileError, MissingCalibrationError
from hf_safe_exit.risk import CONFIGURATIONS_FILENAME, ConfigurationTable, LossTable

from toy_configurations import CONFIGS, LAMBDAS, one_run

def stacked_by_hand(tables):
    """The rows from_tables must give: every (configuration, λ) in order, the λ = 1 row of the first table only."""
    settings, rows = [], []
    for t, config in zip(tables, CONFIGS):
        for k, lam in enumerate(LAMBDAS):
            if lam == 1.0 and settings and any(s["threshold"] == 1.0 for s in settings):
                continue
            settings.append({**EarlyExitConfig(**config).to_dict(), "threshold": float(lam)})
            rows.append((t, k))
    return settings, rows


def test_from_tables_is_the_matrix_stacked_by_hand():
    tables = one_run()
    table = ConfigurationTable.from_tables(tables)
    settings, rows = stacked_by_hand(tables)
    assert table.settings == settings and table.num_configurations == 3 * 5 - 2 and table.n == 40
    for risk in ("performance_gap", "performance_gap_bounded", "consistency"):
        np.testing.assert_array_equal(table.losses[risk], np.stack([t.losses[risk][k] for t, k in rows]))
    np.testing.assert_array_equal(table.costs["layer_fraction"], np.stack([t.extras["layer_fraction"][k] for t, k in rows]))
    np.testing.assert_array_equal(table.costs["wall_time"], [t.extras["wall_time"][k] for t, k in rows])
    np.testing.assert_array_equal(table.extras["task_loss"], np.stack([t.extras["task_loss"][k] for t, k in rows]))
    assert set(table.costs) == {"layer_fraction", "wall_time"} and set(table.extras) == {"task_loss", "num_tokens"}
    assert table.full_model_index == 4 and table.thresholds[4] == 1.0
    assert table.config(7) == EarlyExitConfig(measure="saturation") and table.settings[7]["threshold"] == 0.5
    assert table.bounds == tables[0].bounds
    assert "measure" not in table.metadata and "lambdas" not in table.metadata
    assert table.metadata["example_ids"] == tables[0].metadata["example_ids"]


def test_one_table_is_the_special_case():
    (table,) = one_run(configs=CONFIGS[:1])
    stacked = ConfigurationTable.from_tables([table])
    assert [s["threshold"] for s in stacked.settings] == LAMBDAS.tolist()
    for risk, losses in table.losses.items():
        np.testing.assert_array_equal(stacked.losses[risk], losses)


def test_round_trip_and_same_bytes(tmp_path):
    table = ConfigurationTable.from_tables(one_run())
    path = table.save(tmp_path)  # a folder gets the file name
    assert path == str(tmp_path / CONFIGURATIONS_FILENAME)
    back = ConfigurationTable.load(tmp_path)
    assert back == table and back.digest() == table.digest() and back.source == path
    again = table.save(tmp_path / "again.npz")
    assert open(path, "rb").read() == open(again, "rb").read()


def _rewrite(path, edit_header=None, edit_arrays=None, redigest=False):
    """Rewrite the .npz at ``path`` with its header and/or arrays edited; ``redigest``: as a forger, with the
    digest recomputed (digest.content_digest of what the file format says it covers)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(str(arrays.pop("header_json")))
    if edit_header:
        edit_header(header)
    if edit_arrays:
        edit_arrays(arrays)
    if redigest:
        header[DIGEST_KEY] = content_digest({"arrays": arrays, "header": {k: v for k, v in header.items()
                                                                          if k != DIGEST_KEY}})
    np.savez_compressed(path, header_json=np.array(json.dumps(header)), **arrays)


@pytest.mark.parametrize("edit_header,edit_arrays,redigest,match", [
    (lambda h: h["settings"][1].update(threshold=0.3), None, False, "does not match the digest"),
    (lambda h: h["metadata"].update(task="other"), None, False, "does not match the digest"),
    (None, lambda a: a["loss__consistency"].__setitem__((0, 0), 0.5), False, "does not match the digest"),
    (lambda h: h["settings"].__setitem__(1, h["settings"][0]), None, True, "settings\\[0\\] and settings\\[1\\] are the "
     "same configuration"),
    (lambda h: h["settings"][4].update(threshold=0.9), None, True, "no full-model row"),
    (lambda h: h["settings"][2].update(measure="auto"), None, True, "measure='auto'"),
    (lambda h: h["settings"][2].update(exit_layer=2), None, True, "not early-exit settings"),
    (lambda h: h["metadata"].update(n=39), None, True, "metadata n=39"),
    (lambda h: h["metadata"].update(measure="softmax"), None, True, "describe one configuration"),
    (None, lambda a: a["loss__consistency"].__setitem__((0, 0), np.nan), True, "NaN"),
    (None, lambda a: a["loss__consistency"].__setitem__((0, 0), 1.5), True, "outside their bounds"),
    (None, lambda a: a.__setitem__("cost__layer_fraction", a["cost__layer_fraction"][:, :3]), True, "shape"),
    (None, lambda a: a.__setitem__("loss__consistency", a["loss__consistency"].astype(np.int64)), True, "int64"),
    (lambda h: h.update(kind=None), None, True, "not a multi-configuration table"),
    (lambda h: h.update(format_version=9), None, True, "newer hf_safe_exit"),
    (lambda h: h.update(settings={"a": 1}), None, True, "malformed"),
])
def test_a_bad_file_is_refused_naming_it(tmp_path, edit_header, edit_arrays, redigest, match):
    path = ConfigurationTable.from_tables(one_run()).save(tmp_path)
    _rewrite(path, edit_header, edit_arrays, redigest)
    with pytest.raises(CorruptFileError, match=match) as caught:
        ConfigurationTable.load(path)
    assert str(caught.value).startswith(f"'{path}': ") and caught.value.path == path and "\n" not in str(caught.value)


def test_damaged_missing_and_other_kind_files(tmp_path):
    path = ConfigurationTable.from_tables(one_run()).save(tmp_path)
    with pytest.raises(MissingCalibrationError, match="no multi-configuration table there"):
        ConfigurationTable.load(tmp_path / "none.npz")
    one_d = one_run(configs=CONFIGS[:1])[0].save(tmp_path / "one_d.npz")
    with pytest.raises(CorruptFileError, match="LossTable.load"):
        ConfigurationTable.load(one_d)
    with pytest.raises(CorruptFileError, match="no 'lambdas'"):
        LossTable.load(path)
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    truncated = tmp_path / "cut.npz"
    truncated.write_bytes(open(path, "rb").read()[:300])
    with pytest.raises(CorruptFileError, match="damaged|not a loss table") as caught:
        ConfigurationTable.load(truncated)
    assert caught.value.path == str(truncated) and "header_json.npy" in names


def _differing(i, **meta):
    tables = one_run()
    tables[i] = one_run(**meta)[i]
    return tables


@pytest.mark.parametrize("tables,match", [
    (lambda: _differing(1, model_fingerprint="def456"), "metadata model_fingerprint is 'abc123' in the first and "
     "'def456'"),
    (lambda: _differing(2, max_new_tokens=16), "metadata max_new_tokens"),
    (lambda: _differing(1, dtype="bfloat16"), "metadata dtype"),
    (lambda: _differing(2, example_ids=[f"other{j}" for j in range(40)]), "metadata example_ids"),
    (lambda: one_run()[:2] + [one_run(seed=1)[2]], "disagree at λ = 1.*task_loss"),
    (lambda: one_run()[:2] + [one_run()[0]], "hold the same configuration"),
    (lambda: [one_run()[0], one_run()[1].subset(range(30))], "number of examples|metadata"),
])
def test_tables_that_disagree_are_refused_naming_both(tables, match):
    tables = tables()
    with pytest.raises(ValueError, match=match) as caught:
        ConfigurationTable.from_tables(tables)
    message = str(caught.value)
    assert message.count("tables[") == 2 and "\n" not in message


def test_meta_heads_must_agree_and_bounds_too():
    configs = ({"measure": "meta"}, {"measure": "softmax"}, {"measure": "meta", "schedule": "decaying"})
    tables = one_run(configs=configs)
    tables[0].metadata["meta_head_fingerprint"] = "aa"
    tables[2].metadata["meta_head_fingerprint"] = "bb"
    with pytest.raises(ValueError, match="tables\\[0\\] and tables\\[2\\].*meta_head_fingerprint"):
        ConfigurationTable.from_tables(tables)
    tables[2].metadata["meta_head_fingerprint"] = "aa"
    assert ConfigurationTable.from_tables(tables).metadata["meta_head_fingerprint"] == "aa"
    gap_only = [LossTable(t.lambdas, {"performance_gap": t.losses["performance_gap"]}, metadata=t.metadata)
                for t in one_run()]
    with pytest.raises(ValueError, match="risks and bounds"):
        ConfigurationTable.from_tables([one_run()[0], gap_only[1]])


def test_from_tables_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        ConfigurationTable.from_tables([])
    with pytest.raises(TypeError, match="list of LossTables"):
        ConfigurationTable.from_tables(one_run()[0])
    with pytest.raises(TypeError, match="tables\\[1\\] is a dict"):
        ConfigurationTable.from_tables([one_run()[0], {}])
    bare = LossTable(LAMBDAS, {"consistency": np.zeros((5, 3))})
    with pytest.raises(ValueError, match="records no early-exit configuration"):
        ConfigurationTable.from_tables([bare])
    paths = [t.save(tmp_path / f"t{i}.npz") for i, t in enumerate(one_run())]  # paths are read, and named
    assert ConfigurationTable.from_tables(paths) == ConfigurationTable.from_tables(one_run())
    changed = one_run(model_fingerprint="def456")[1].save(tmp_path / "t1.npz")
    with pytest.raises(ValueError, match=f"'{paths[0]}' and '{changed}'"):
        ConfigurationTable.from_tables(paths)


def _valid():
    settings = [{**EarlyExitConfig(measure="softmax").to_dict(), "threshold": lam} for lam in (0.5, 1.0)]
    return dict(settings=settings, losses={"consistency": np.zeros((2, 4))}, costs={"layer_fraction": np.ones(2)})


@pytest.mark.parametrize("change,error,match", [
    ({"settings": []}, ValueError, "non-empty list"),
    ({"settings": "softmax"}, ValueError, "non-empty list"),
    ({"settings": [{"measure": "softmax"}, {"threshold": 1.0}]}, ValueError, "with a 'threshold'"),
    ({"settings": [{"threshold": 1.5}, {"threshold": 1.0}]}, ValueError, "threshold=1.5"),
    ({"settings": [{"threshold": True}, {"threshold": 1.0}]}, ValueError, "threshold=True"),
    ({"settings": [{"threshold": 0.5, "measure": "nope"}, {"threshold": 1.0}]}, ValueError, "Unknown confidence"),
    ({"settings": [{"threshold": 0.5, "measure": "softmax", "min_exit_layer": 5}, {"threshold": 1.0, "measure": "softmax"}],
      "metadata": {"num_decoder_layers": 3}},
     ValueError, "outside the decoder"),
    ({"losses": {}}, ValueError, "at least one loss"),
    ({"losses": {"accuracy": np.zeros((2, 4))}}, ValueError, "Unknown risk"),
    ({"losses": {"consistency": np.zeros((3, 4))}}, ValueError, "shape"),
    ({"losses": {"consistency": np.zeros((2, 4)), "performance_gap": np.zeros((2, 5))}}, ValueError, "same examples"),
    ({"costs": {}}, ValueError, "at least one cost"),
    ({"costs": {"layer_fraction": np.ones(3)}}, ValueError, "shape"),
    ({"costs": {"layer_fraction": np.array([1.0, np.inf])}}, ValueError, "infinite"),
    ({"costs": {"t": np.array(["a", "b"])}}, ValueError, "not numbers"),
    ({"metadata": {"strategy": "bild"}}, ValueError, "early-exit configurations only"),
    ({"metadata": {"lambdas": [0.5, 1.0]}}, ValueError, "describe one configuration"),
    ({"metadata": {"example_ids": ["a", "a", "b", "c"]}}, ValueError, "each example once"),
    ({"metadata": {"task": "no/slash"}}, ValueError, "task"),
    ({"bounds": {"consistency": (1.0, 0.0)}}, ValueError, "lower < upper"),
])
def test_bad_contents_are_refused(change, error, match):
    with pytest.raises(error, match=match):
        ConfigurationTable(**{**_valid(), **change})


def test_settings_are_normalised():
    table = ConfigurationTable(**_valid())
    assert table.settings[1]["threshold"] == 1.0 and table.settings[0] == {
        **EarlyExitConfig(measure="softmax").to_dict(), "threshold": 0.5}
    nearly = {**_valid(), "settings": [{"threshold": 0.5, "measure": "softmax"},
                                       {"threshold": 1.0 - 1e-14, "measure": "softmax"}]}
    assert ConfigurationTable(**nearly).full_model_index == 1
