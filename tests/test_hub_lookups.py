"""Hub lookups (issue 26, root cause 9): a model loaded from the Hub reads its calibration from its repo, at a
revision, and never mistakes a Hub it could not ask for "no calibration".

* a failed lookup is not kept: once the Hub answers, the file is found without clear_cache();
* an unreachable Hub raises HubFileError naming the repo, the file and the fix; a Hub that answers "no such file"
  still gives MissingCalibrationError;
* ``revision`` is passed to the Hub and is part of what is kept: two revisions, two downloads, two calibrations;
  a model whose weights came from a known commit reads the calibration of that commit.

``huggingface_hub.hf_hub_download`` and ``list_repo_files`` are replaced by a fake Hub whose revisions are folders.
"""

from pathlib import Path

import pytest

from hf_safe_exit.errors import HubFileError, MissingCalibrationError
from hf_safe_exit.fingerprint import model_fingerprint
from hf_safe_exit.hub_files import hub_file
from hf_safe_exit.risk import RiskControlled, find_stored, store_calibration

from tiny_t5 import random_t5
from toy_losses import toy_table, toy_task_losses

REPO = "someone/t5-hub"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CONFIG = "calibration/config.json"
TABLE = "calibration/cnndm/early_exit_calibration.npz"

pytestmark = pytest.mark.usefixtures("fresh_risk_cache")


class FakeHub:
    """A Hub repo whose revisions are folders (``None``: the default branch). ``offline=True`` fails every call as
    an unreachable Hub with nothing cached does; a missing file is the Hub's own "no such file" answer."""

    def __init__(self, revisions: dict, offline: bool = False):
        self.revisions, self.offline, self.calls = revisions, offline, []

    def _folder(self, revision) -> Path:
        from huggingface_hub.errors import LocalEntryNotFoundError, RevisionNotFoundError

        if self.offline:
            raise LocalEntryNotFoundError("Cannot reach the Hub and the file is not in the disk cache")
        if revision not in self.revisions:
            try:  # the HTTP library huggingface_hub's errors are built on: httpx2 from 2.x, httpx in 1.x
                import httpx2 as http
            except ImportError:
                import httpx as http
            url = f"https://huggingface.co/{REPO}/resolve/{revision}/"
            raise RevisionNotFoundError(f"404: no revision {revision} in {REPO}",
                                        response=http.Response(404, request=http.Request("GET", url)))
        return Path(self.revisions[revision])

    def hf_hub_download(self, repo_id, filename, revision=None, **_):
        from huggingface_hub.errors import EntryNotFoundError

        self.calls.append((repo_id, revision, filename))
        path = self._folder(revision) / filename
        if not path.is_file():
            raise EntryNotFoundError(f"404: {filename} not in {repo_id}@{revision}")
        return str(path)

    def list_repo_files(self, repo_id, revision=None, **_):
        folder = self._folder(revision)
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub

    fake = FakeHub({None: tmp_path / "main"})
    (tmp_path / "main").mkdir()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", fake.list_repo_files)
    return fake


def _table(model, seed: int, **meta):
    """A loss table for ``model`` (cnndm) whose losses differ with ``seed``: a digest of its own."""
    from hf_safe_exit.risk import LossTable

    metadata = {**toy_table().metadata, "model_fingerprint": model_fingerprint(model), **meta}
    return LossTable.from_task_losses(*toy_task_losses(seed), metadata=metadata)


def _hub_model(commit: str | None = None):
    """A model as ``from_pretrained(REPO)`` gives it (with transformers 5.15, which records the weights' commit)."""
    model = random_t5()
    model.name_or_path = model.config._name_or_path = REPO
    if commit is not None:
        model.config._commit_hash = commit
    return model


def test_an_unreachable_hub_is_an_error_and_a_hub_that_says_no_is_no_calibration(hub, tmp_path):
    model = _hub_model()
    store_calibration(tmp_path / "main", table=toy_table(model_fingerprint(model)))
    hub.offline = True
    with pytest.raises(HubFileError) as caught:
        RiskControlled(0.1).resolve(model)
    message = str(caught.value)
    assert not isinstance(caught.value, MissingCalibrationError)
    assert message.startswith(f"'hub:{REPO}/{CONFIG}': could not be looked up (LocalEntryNotFoundError")
    assert "Connect to the Hub" in message and "model.early_exit_calibration = LossTable.load" in message
    assert "\n" not in message and caught.value.path == f"hub:{REPO}/{CONFIG}"

    hub.offline = False  # the Hub answers: this repo (another one's folder) has no calibration at all
    hub.revisions[None] = tmp_path / "empty"
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingCalibrationError, match=f"hub:{REPO} has none"):
        find_stored(REPO)


def test_a_repo_that_cannot_be_listed_is_an_error_not_no_calibration(hub, monkeypatch):
    import huggingface_hub

    def unreachable(repo_id, revision=None, **_):
        raise ConnectionError("Max retries exceeded")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", unreachable)  # its files answer 404, its listing fails
    with pytest.raises(HubFileError, match=f"'hub:{REPO}/calibration/': could not be listed \\(ConnectionError"):
        find_stored(REPO)


def test_a_failed_lookup_is_not_kept(hub, tmp_path):
    model = _hub_model()
    table = toy_table(model_fingerprint(model))
    store_calibration(tmp_path / "main", table=table)
    hub.offline = True
    for _ in range(2):  # asked again each time, and refused each time
        with pytest.raises(HubFileError):
            RiskControlled(0.1).resolve(model)
        with pytest.raises(HubFileError):
            hub_file(REPO, TABLE)
    hub.offline = False  # back online: found, with no clear_cache() in between
    assert RiskControlled(0.1).resolve(model).threshold == RiskControlled(0.1).fit_table(table).threshold
    assert hub_file(REPO, TABLE) == str(tmp_path / "main" / TABLE)
    asked = len(hub.calls)
    RiskControlled(0.1).resolve(model)
    assert len(hub.calls) == asked  # what the Hub answered is kept


def test_revision_is_asked_for_and_part_of_what_is_kept(hub, tmp_path):
    model = _hub_model()
    tables = {"v1": _table(model, seed=1), "v2": _table(model, seed=2)}
    for revision, table in tables.items():
        hub.revisions[revision] = tmp_path / revision
        store_calibration(tmp_path / revision, table=table)
    found = {revision: find_stored(REPO, revision=revision) for revision in ("v1", "v2")}
    for revision in ("v1", "v2"):
        assert found[revision].table.digest() == tables[revision].digest()
        assert found[revision].table_path == str(tmp_path / revision / TABLE)
        assert hub.calls.count((REPO, revision, TABLE)) == 1  # two revisions: two downloads
    with pytest.raises(MissingCalibrationError, match=f"hub:{REPO} has none"):
        find_stored(REPO)  # the default branch holds no calibration: neither revision's is read for it
    asked = len(hub.calls)
    assert find_stored(REPO, revision="v2").table.digest() == tables["v2"].digest()
    assert len(hub.calls) == asked  # kept per revision
    rc = RiskControlled(0.1).fit_table(tables["v1"])
    rc.save_pretrained(tmp_path / "v1")  # a calibration saved at the repo's root, read with from_pretrained
    assert RiskControlled.from_pretrained(REPO, revision="v1").threshold == rc.threshold
    assert (REPO, "v1", "risk_control.json") in hub.calls


def test_a_model_reads_the_calibration_of_the_commit_its_weights_came_from(hub, tmp_path):
    model = _hub_model(commit=COMMIT)
    at_commit, on_main = _table(model, seed=1, max_new_tokens=7), _table(model, seed=2)
    hub.revisions[COMMIT] = tmp_path / "at_commit"
    store_calibration(tmp_path / "at_commit", table=at_commit)
    store_calibration(tmp_path / "main", table=on_main)  # the branch moved on after the weights were loaded
    assert find_stored(model).table.digest() == at_commit.digest()
    assert RiskControlled(0.1).policy_for(model)[0].generation_settings["max_new_tokens"] == 7  # the commit's table
    assert {revision for _, revision, _ in hub.calls} == {COMMIT}
    hub.revisions.pop(COMMIT)  # a commit the Hub does not have: an error naming it, not main's calibration
    from hf_safe_exit.risk import clear_cache

    clear_cache()
    with pytest.raises(HubFileError, match=f"'hub:{REPO}@{COMMIT}/{CONFIG}': could not be looked up "
                                           "\\(RevisionNotFoundError"):
        find_stored(model)


def test_from_pretrained_reads_a_pushed_repos_task_folder_at_a_revision(hub, tmp_path):
    """``RiskControlled.from_pretrained(repo_id, task=...)`` reads the layout push_to_hub writes
    (calibration/<task>/risk_control.json), at the revision asked; before, it looked only at the repo's root."""
    model = _hub_model()
    v1, v2 = _table(model, seed=1), _table(model, seed=2)
    for name, table in (("v1", v1), ("v2", v2)):
        hub.revisions[name] = tmp_path / name
        store_calibration(tmp_path / name, table=table, controlled=RiskControlled(0.1).fit_table(table))
    for name, table in (("v1", v1), ("v2", v2)):
        loaded = RiskControlled.from_pretrained(REPO, task="cnndm", revision=name)
        assert loaded.calibration.threshold == RiskControlled(0.1).fit_table(table).calibration.threshold
        assert (REPO, name, "calibration/cnndm/risk_control.json") in hub.calls
    hub.offline = True  # answers are kept; a revision not asked yet needs the Hub
    with pytest.raises(HubFileError, match="could not be"):
        RiskControlled.from_pretrained(REPO, task="cnndm", revision="v3")
