"""Meta heads as files (issue 16, CALM's meta measure): a corrupt or half head is an error naming the file, never
"no head" (which would let measure="auto" fall back silently to another measure), in a model folder and in a Hub
repo; a model loaded from the Hub finds the head its repo holds (hf_hub_download mocked by a folder)."""

import pytest
import torch

import hf_safe_exit
from hf_safe_exit.confidence import (HEAD_FREE_DEFAULT, MetaClassifierHead, MetaHeadConfig, find_meta_head,
                                     has_meta_head, resolve_measure)
from hf_safe_exit.errors import CalibrationFileError, CorruptFileError, HubFileError, MissingMetaHeadError
from hf_safe_exit.fingerprint import model_fingerprint
from hf_safe_exit.policy import EarlyExit
from hf_safe_exit.risk import RiskControlled, store_calibration

from tiny_t5 import random_t5
from toy_losses import toy_table

WEIGHTS, CONFIG = "meta_head.safetensors", "meta_head_config.json"
INPUTS = {"input_ids": torch.tensor([[5, 6, 7, 1]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}


pytestmark = pytest.mark.usefixtures("fresh_risk_cache")


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


# ---------------------------------------------------------------- a head saved with the model
def _saved_model(folder, files=(WEIGHTS, CONFIG)):
    """A random T5 saved to ``folder`` with a trained-looking meta head (only ``files`` of its two files), reloaded."""
    from transformers import T5ForConditionalGeneration

    random_t5().save_pretrained(folder)
    head = MetaClassifierHead(MetaHeadConfig(d_model=16))
    torch.manual_seed(3)
    torch.nn.init.normal_(head.net.weight)
    head.save_pretrained(folder)
    for name in {WEIGHTS, CONFIG} - set(files):
        (folder / name).unlink()
    return T5ForConditionalGeneration.from_pretrained(folder).eval(), head


@pytest.mark.parametrize("kept,missing", [(CONFIG, WEIGHTS), (WEIGHTS, CONFIG)])
def test_half_a_head_in_the_model_folder_is_corrupt_not_missing(tmp_path, kept, missing):
    model, _ = _saved_model(tmp_path, files=(kept,))
    for check in (lambda: has_meta_head(model), lambda: EarlyExit(threshold=0.5).bind(model),
                  lambda: find_meta_head(model)):
        with pytest.raises(CorruptFileError, match=f"{missing}'.*missing, while {kept} is there") as caught:
            check()
        assert str(tmp_path / missing) in str(caught.value)
        assert not isinstance(caught.value, MissingMetaHeadError)


def test_a_whole_head_or_none_in_the_model_folder(tmp_path):
    model, head = _saved_model(tmp_path / "with")
    assert has_meta_head(model) and resolve_measure("auto", model) == "meta"
    assert EarlyExit(threshold=0.5).bind(model).measure.name == "meta"
    x = torch.randn(3, 16)
    torch.testing.assert_close(model.meta_head.prob_agree(x), head.prob_agree(x))  # the saved head, loaded
    bare, _ = _saved_model(tmp_path / "without", files=())
    assert not has_meta_head(bare) and resolve_measure("auto", bare) == HEAD_FREE_DEFAULT


# ---------------------------------------------------------------- a head in the model's Hub repo
class _Repo:
    """``hf_hub_download`` of a Hub repo holding the files of ``folder``: a missing file is the Hub's
    EntryNotFoundError; ``offline=True`` fails like an unreachable Hub with nothing cached."""

    def __init__(self, folder, offline=False):
        self.folder, self.offline, self.calls = folder, offline, []

    def __call__(self, repo_id, filename, **kwargs):
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        self.calls.append((repo_id, filename))
        if self.offline:
            raise LocalEntryNotFoundError("cannot reach the Hub and the file is not in the cache")
        path = self.folder / filename
        if not path.is_file():
            raise EntryNotFoundError(f"404: {filename} not in {repo_id}")
        return str(path)


def _from_hub(monkeypatch, repo_folder, repo_id="someone/calm-t5", offline=False):
    """A model as ``from_pretrained(repo_id)`` gives it, whose repo is ``repo_folder``."""
    import huggingface_hub

    repo = _Repo(repo_folder, offline)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", repo)
    model = random_t5()
    model.name_or_path = model.config._name_or_path = repo_id
    return model, repo


def test_a_model_from_the_hub_finds_the_head_in_its_repo(tmp_path, monkeypatch):
    _, head = _saved_model(tmp_path)
    model, repo = _from_hub(monkeypatch, tmp_path)
    assert has_meta_head(model) and resolve_measure("auto", model) == "meta"
    assert {("someone/calm-t5", WEIGHTS), ("someone/calm-t5", CONFIG)} <= set(repo.calls)
    x = torch.randn(3, 16)
    torch.testing.assert_close(find_meta_head(model).prob_agree(x), head.prob_agree(x))
    # the case: a calibration made with the fine-tuned model's head (measure "meta"), used from the Hub
    table = toy_table(fingerprint=model_fingerprint(model), measure="meta",
                      meta_head_fingerprint=hf_safe_exit.meta_head_fingerprint(head))
    store_calibration(tmp_path, table=table)
    fresh, _ = _from_hub(monkeypatch, tmp_path)
    fresh = hf_safe_exit.enable(fresh)
    bound = RiskControlled(0.1).resolve(fresh)
    assert bound.measure.name == "meta" and bound.threshold == RiskControlled(0.1).fit_table(table).threshold
    assert torch.equal(fresh.generate(**INPUTS, early_exit=RiskControlled(0.1), max_new_tokens=4),
                       fresh.generate(**INPUTS, early_exit=EarlyExit(threshold=bound.threshold, measure="meta"),
                                      max_new_tokens=4))


def test_a_hub_repo_without_a_head_has_none(tmp_path, monkeypatch):
    model, repo = _from_hub(monkeypatch, tmp_path)  # an empty repo: the Hub says "no such file"
    assert not has_meta_head(model) and resolve_measure("auto", model) == HEAD_FREE_DEFAULT
    with pytest.raises(MissingMetaHeadError, match="someone/calm-t5"):
        find_meta_head(model)


@pytest.mark.parametrize("kept,missing", [(CONFIG, WEIGHTS), (WEIGHTS, CONFIG)])
def test_half_a_head_in_a_hub_repo_is_corrupt(tmp_path, monkeypatch, kept, missing):
    _saved_model(tmp_path, files=(kept,))
    model, _ = _from_hub(monkeypatch, tmp_path)
    with pytest.raises(CorruptFileError, match=f"hub:someone/calm-t5/{missing}'.*missing, while {kept} is there"):
        has_meta_head(model)


def test_a_hub_repo_that_cannot_be_asked_is_an_error_not_no_head(tmp_path, monkeypatch):
    _saved_model(tmp_path)
    model, _ = _from_hub(monkeypatch, tmp_path, offline=True)
    for check in (lambda: has_meta_head(model), lambda: EarlyExit(threshold=0.5).bind(model)):
        with pytest.raises(HubFileError, match=f"hub:someone/calm-t5/{WEIGHTS}'.*could not be looked up") as caught:
            check()
        assert isinstance(caught.value, CalibrationFileError) and not isinstance(caught.value, MissingMetaHeadError)
