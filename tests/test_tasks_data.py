"""Offline loading of the real task data from ../shared/data and the project's fixed splits."""

import pytest

from hf_safe_exit.tasks import DataUnavailableError, get_task, load_split, load_task_data, shared_data_dir

DATA = shared_data_dir()
needs_data = pytest.mark.skipif(DATA is None, reason="offline data folder ../shared/data (or $HF_SAFE_EXIT_DATA) "
                                                     "is absent; the Hub loaders apply instead")


@needs_data
def test_cnndm_offline_splits():
    train = load_split("cnndm", "train", path=DATA)
    pool = load_split("cnndm", "pool", path=DATA / "cnn_dailymail" / "validation_first900.csv")
    assert (len(train), len(pool)) == (500, 400)
    assert set(pool.column_names) >= {"article", "highlights", "id"}
    assert not set(train["id"]) & set(pool["id"])
    everything = load_task_data("cnndm", DATA)
    assert everything[500]["id"] == pool[0]["id"] and everything[899]["id"] == pool[-1]["id"]
    task = get_task("cnndm")
    assert task.prompt(pool[0]).startswith("summarize: ")
    assert "\n" in task.reference(pool[0])  # highlights are newline-separated sentences


@needs_data
def test_squad_offline_splits():
    train = load_split("squad", "train", path=DATA)
    pool = load_split("squad", "pool", path=DATA / "squad" / "dev-v1.1.json")
    assert (len(train), len(pool)) == (8123, 2447)
    assert set(train["article_index"]) == set(range(36)) and set(pool["article_index"]) == set(range(36, 48))
    assert len(set(pool["id"])) == 2447 and not set(train["id"]) & set(pool["id"])
    row = pool[0]
    assert row["title"] == "Yuan_dynasty"
    assert row["answers"]["text"] and all(isinstance(a, str) for a in row["answers"]["text"])
    assert row["context"][row["answers"]["answer_start"][0]:].startswith(row["answers"]["text"][0])
    assert get_task("squad").prompt(row).startswith(f"question: {row['question']} context: ")


def test_missing_local_path_names_both_options(tmp_path):
    with pytest.raises(DataUnavailableError) as info:
        load_split("squad", "pool", path=tmp_path / "nope.json")
    message = str(info.value)
    assert "\n" not in message and "nope.json" in message
    assert "rajpurkar/squad" in message and "local path" in message


def test_unknown_split_and_wrong_file_type(tmp_path):
    with pytest.raises(ValueError, match="use one of"):
        load_split("cnndm", "test", path=tmp_path)
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="article,highlights,id"):
        load_task_data("cnndm", bad)


def test_no_hub_and_no_path_is_a_clear_error(monkeypatch):
    """With the Hub unreachable (offline mode, as HF_DATASETS_OFFLINE=1 sets it) and no path: one line naming both."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    for task, hub_id in (("cnndm", "abisee/cnn_dailymail"), ("squad", "rajpurkar/squad")):
        with pytest.raises(DataUnavailableError) as info:
            load_split(task, "pool")
        message = str(info.value)
        assert "\n" not in message and hub_id in message and "local path" in message and "--data" in message


def test_local_csv_keeps_ids_as_text_and_env_var_points_to_data(tmp_path, monkeypatch):
    path = tmp_path / "mini.csv"
    path.write_text('article,highlights,id\n"A, b.","x .\ny .",0123\n"C.","z .",1e5\n', encoding="utf-8")
    ds = load_task_data("cnndm", path)
    assert ds["id"] == ["0123", "1e5"] and ds[0]["highlights"] == "x .\ny ." and ds[0]["article"] == "A, b."
    monkeypatch.setenv("HF_SAFE_EXIT_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path
    monkeypatch.setenv("HF_SAFE_EXIT_DATA", str(tmp_path / "missing"))
    assert shared_data_dir() is None
