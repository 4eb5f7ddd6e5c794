"""Issue 26, root cause 2: a calibration is tied to everything its losses depend on.

The backbone fingerprint covers every value of every weight (an edit of one value the old strided sample skipped is
seen), the dtype (a float16 and a bfloat16 copy are refused alike, saying a cast is the cause), the architecture
settings that change what the weights compute, the meta head whenever the measure reads it (another head, a head
with NaN weights, a head of another width), and BiLD's small model.
"""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch

from hf_safe_exit import EarlyExit, LossTable, RiskControlled, enable, model_fingerprint
from hf_safe_exit.confidence import MetaClassifierHead, MetaHeadConfig
from hf_safe_exit.errors import CorruptFileError, MissingFingerprintError, MissingMetaHeadError, ModelMismatchError
from hf_safe_exit.fingerprint import clear_fingerprint_cache, meta_head_fingerprint
from hf_safe_exit.risk.provenance import record_provenance
from toy_losses import toy_task_losses
from tiny_calibration import build_tiny_t5


def _fresh(model) -> str:
    clear_fingerprint_cache()
    return model_fingerprint(model)


def _strided_sample_fingerprint(model) -> str:
    """The fingerprint before this issue (every ~numel/1024-th value, rounded to bfloat16): the reference that shows
    which edits it missed."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // 1024)][:1024].to(torch.bfloat16).view(torch.int16)
        digest.update(name.encode() + sample.numpy().tobytes())
    return digest.hexdigest()


def _table(model, measure: str = "softmax", **extra) -> LossTable:
    lambdas, task_losses = toy_task_losses(seed=3)
    meta = {**record_provenance(model), "task": "cnndm", "measure": measure, "schedule": "constant",
            "min_exit_layer": 1, "num_decoder_layers": model.config.num_decoder_layers, "max_new_tokens": 3,
            "max_input_length": 16, **extra}
    return LossTable.from_task_losses(lambdas, task_losses, metadata=meta)


def _generate(model, policy):
    enable(model)
    lengths = {} if isinstance(policy, RiskControlled) else {"max_new_tokens": 3}  # a calibration brings its own
    return model.generate(input_ids=torch.tensor([[5, 6, 7, 1]]), early_exit=policy, **lengths)


# ---------------------------------------------------------------- the backbone: every value
def test_an_edit_of_one_value_the_old_sample_skipped_changes_the_fingerprint():
    model = build_tiny_t5(vocab_size=64)
    before, old_before = _fresh(model), _strided_sample_fingerprint(model)
    with torch.no_grad():
        model.shared.weight.view(-1)[1] += 1e-3  # index 1: between two sampled values (stride > 1)
    assert _strided_sample_fingerprint(model) == old_before  # what the old fingerprint could not see ...
    assert _fresh(model) != before                           # ... this one does
    with torch.no_grad():  # and one float32 ulp, which rounding to bfloat16 hid
        model.shared.weight.view(-1)[1] = torch.nextafter(model.shared.weight.view(-1)[1], torch.tensor(9.0))
    assert len({before, _fresh(model)}) == 2


def test_architecture_settings_that_change_the_output_change_the_fingerprint():
    model = build_tiny_t5(vocab_size=64)
    before = _fresh(model)
    for key, value in [("scale_decoder_outputs", not getattr(model.config, "scale_decoder_outputs", False)),
                       ("layer_norm_epsilon", 1e-3)]:
        other = copy.deepcopy(model)
        setattr(other.config, key, value)
        assert _fresh(other) != before, key


# ---------------------------------------------------------------- the dtype
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_copies_are_refused_alike_and_the_refusal_names_the_cast(dtype):
    model = build_tiny_t5(vocab_size=64)
    rc = RiskControlled(eps=0.2).fit_table(_table(model))
    _generate(model, rc)  # the float32 model it was calibrated on decodes
    half = copy.deepcopy(model).to(dtype)
    with pytest.raises(ModelMismatchError, match=f"float32 weights and this model's are {str(dtype)[6:]}"):
        _generate(half, rc)


# ---------------------------------------------------------------- the meta head
def _with_head(seed: int, d_model: int = 16):
    torch.manual_seed(seed)
    return MetaClassifierHead(MetaHeadConfig(d_model=d_model)).eval()


def test_a_meta_calibration_holds_only_for_its_head():
    model = build_tiny_t5(vocab_size=64)
    model.meta_head = _with_head(0)
    table = _table(model, measure="meta")
    table.metadata["meta_head_fingerprint"] = meta_head_fingerprint(model.meta_head)
    assert table.metadata == {**table.metadata, **record_provenance(model, EarlyExit(0.5, measure="meta").config)}
    rc = RiskControlled(eps=0.2).fit_table(table)
    _generate(model, rc)
    assert model_fingerprint(model) == table.metadata["model_fingerprint"]  # the head is not part of the backbone
    model.meta_head = _with_head(1)  # same shape, other weights
    with pytest.raises(ModelMismatchError, match="another meta head"):
        _generate(model, rc)
    # a softmax calibration of the same model does not depend on the head
    _generate(model, RiskControlled(eps=0.2).fit_table(_table(model)))


def test_a_meta_calibration_that_does_not_record_its_head_is_refused_unless_vouched_for():
    model = build_tiny_t5(vocab_size=64)
    model.meta_head = _with_head(0)
    rc = RiskControlled(eps=0.2).fit_table(_table(model, measure="meta"))
    with pytest.raises(MissingFingerprintError, match="meta head"):
        _generate(model, rc)
    _generate(model, RiskControlled(eps=0.2, allow_missing_fingerprint=True).fit_table(_table(model, measure="meta")))


def test_a_stored_meta_calibration_records_the_head_and_refuses_another(tmp_path):
    model = build_tiny_t5(vocab_size=64)
    model.meta_head = _with_head(0)
    table = _table(model, measure="meta", meta_head_fingerprint=meta_head_fingerprint(model.meta_head))
    folder = RiskControlled(eps=0.2).fit_table(table).save_pretrained(tmp_path / "rc")
    loaded = RiskControlled.from_pretrained(tmp_path / "rc")
    assert loaded.calibration.meta_head_fingerprint == meta_head_fingerprint(model.meta_head)
    assert loaded.calibration.dtype == "float32"
    _generate(model, loaded)
    model.meta_head = _with_head(2)
    with pytest.raises(ModelMismatchError, match="another meta head"):
        _generate(model, loaded)
    assert folder


def test_a_head_file_with_nan_weights_is_refused_naming_the_file(tmp_path):
    head = _with_head(0)
    with torch.no_grad():
        head.net.weight[0, 3] = float("nan")
    head.save_pretrained(tmp_path)
    with pytest.raises(CorruptFileError, match=r"meta_head\.safetensors.*NaN"):
        MetaClassifierHead.from_pretrained(tmp_path)


def test_an_attached_head_with_nan_weights_is_refused():
    model = build_tiny_t5(vocab_size=64)
    model.meta_head = _with_head(0)
    with torch.no_grad():
        model.meta_head.net.bias[1] = float("inf")
    with pytest.raises(MissingMetaHeadError, match="NaN or infinite"):
        _generate(model, EarlyExit(0.5, measure="meta"))


def test_a_head_file_of_another_width_is_refused_naming_the_file(tmp_path):
    model = build_tiny_t5(vocab_size=64)
    _with_head(0, d_model=24).save_pretrained(tmp_path)
    model.meta_head = MetaClassifierHead.from_pretrained(tmp_path)
    with pytest.raises(MissingMetaHeadError, match=r"meta_head\.safetensors.*d_model=24.*d_model=16"):
        _generate(model, EarlyExit(0.5, measure="meta"))


# ---------------------------------------------------------------- BiLD's small model
def test_a_bild_calibration_refuses_another_small_model():
    from hf_safe_exit.decoding.bild import BiLD

    large, small = build_tiny_t5(vocab_size=64, seed=0), build_tiny_t5(vocab_size=64, seed=1, num_decoder_layers=1)
    policy = BiLD.from_lambda(small, 1.0).describe()
    lambdas, task_losses = toy_task_losses(seed=3)
    table = LossTable.from_task_losses(lambdas, task_losses, metadata={
        **record_provenance(large), "task": "cnndm", "strategy": "bild", "policy": policy, "max_new_tokens": 3})
    rc = RiskControlled(eps=0.2, small_model=small).fit_table(table)
    _generate(large, rc)
    other = build_tiny_t5(vocab_size=64, seed=2, num_decoder_layers=1)
    with pytest.raises(ModelMismatchError, match="another small model"):
        _generate(large, RiskControlled(eps=0.2, small_model=other).fit_table(table))
