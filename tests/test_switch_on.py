"""Switching early exit on: enable(), deepcopy/pickle, save -> reload, custom_generate, stored policies, errors.

References: HF's own ``generate`` (λ = 1 and with early_exit=False) and the library's own ``generate`` function on
the original model (for copies, reloads and the custom_generate folder, which must decode exactly like it).
"""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

import hf_safe_exit
from hf_safe_exit import EarlyExit, ForcedExit
from hf_safe_exit.decoding import UnsupportedGenerationModeError, is_enabled

X = {"input_ids": torch.tensor([[5, 6, 7, 8, 1], [9, 3, 2, 4, 1]]), "attention_mask": torch.ones(2, 5, dtype=torch.long)}


def _tiny(seed=0):
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=64, d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=3, num_decoder_layers=3,
                   decoder_start_token_id=0, initializer_factor=4.0)
    return T5ForConditionalGeneration(cfg).eval()


def _ref(model, policy, **kw):
    """The library's function form on ``model``: what every switched-on path must equal."""
    return hf_safe_exit.generate(model, **X, early_exit=policy, max_new_tokens=6, **kw)


def test_not_switched_on_is_plain_transformers():
    # nothing is patched: a model that was not switched on gets transformers' own error for the unknown keyword,
    # and a policy stored on its generation config is ignored as any unknown setting is (the full model decodes)
    model = _tiny()
    with pytest.raises(ValueError, match="early_exit"):
        model.generate(**X, early_exit=EarlyExit(0.5), max_new_tokens=3)
    hf = model.generate(**X, max_new_tokens=3)
    model.generation_config.early_exit = EarlyExit(0.5)
    assert torch.equal(model.generate(**X, max_new_tokens=3), hf)
    del model.generation_config.early_exit
    assert not is_enabled(model) and "save_pretrained" not in model.__dict__


def test_enable_keeps_hf_generate_and_reports_the_policy():
    model = hf_safe_exit.enable(_tiny())
    assert hf_safe_exit.enable(model) is model and is_enabled(model)
    hf = T5ForConditionalGeneration.generate(model, **X, max_new_tokens=6)
    assert torch.equal(model.generate(**X, max_new_tokens=6), hf)
    assert torch.equal(model.generate(**X, early_exit=EarlyExit(1.0), max_new_tokens=6), hf)
    out = model.generate(**X, early_exit=EarlyExit(0.2), max_new_tokens=6, return_dict_in_generate=True)
    assert out.early_exit.threshold == 0.2 and out.certificate is None


def test_deepcopy_decodes_with_the_copy():
    model = hf_safe_exit.enable(_tiny())
    before = _ref(model, ForcedExit(2))
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(0.5)
    assert clone.generate.keywords["model"] is clone and is_enabled(clone)
    assert torch.equal(clone.generate(**X, early_exit=ForcedExit(2), max_new_tokens=6), _ref(clone, ForcedExit(2)))
    assert not torch.equal(_ref(clone, ForcedExit(2)), before)  # the copy's weights decode, not the original's
    assert torch.equal(model.generate(**X, early_exit=ForcedExit(2), max_new_tokens=6), before)


def test_pickle_round_trip_stays_switched_on():
    model = hf_safe_exit.enable(_tiny())
    back = pickle.loads(pickle.dumps(model))
    assert is_enabled(back) and back.generate.keywords["model"] is back
    assert torch.equal(back.generate(**X, early_exit=EarlyExit(0.3), max_new_tokens=6), _ref(model, EarlyExit(0.3)))


def test_save_reload_with_trust_remote_code_and_stored_policy(tmp_path):
    model = hf_safe_exit.enable(_tiny())
    model.generation_config.early_exit = EarlyExit(0.3, measure="saturation")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "custom_generate" / "generate.py").is_file()
    assert (tmp_path / "custom_generate" / "requirements.txt").read_text().startswith("hf_safe_exit>=")
    spec = json.loads((tmp_path / "generation_config.json").read_text())["early_exit"]
    assert spec == {"type": "EarlyExit", "threshold": 0.3, "measure": "saturation", "schedule": "constant",
                    "decay_tau": 4.0, "min_exit_layer": 1, "anytime": None, "exit_layers": None}
    assert isinstance(model.generation_config.early_exit, EarlyExit)  # the in-memory object is put back

    reloaded = T5ForConditionalGeneration.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert is_enabled(reloaded)
    expected = _ref(model, EarlyExit(0.3, measure="saturation"))
    assert torch.equal(reloaded.generate(**X, max_new_tokens=6), expected)  # the stored policy is honoured
    hf = _tiny().generate(**X, max_new_tokens=6)  # the same weights (seed), no policy stored, HF's own generate
    assert torch.equal(reloaded.generate(**X, early_exit=False, max_new_tokens=6), hf)  # ... unless switched off

    plain = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()  # no trust_remote_code: HF's generate
    assert not is_enabled(plain) and torch.equal(plain.generate(**X, max_new_tokens=6), hf)


def test_custom_generate_folder_through_hf_generate(tmp_path):
    model = hf_safe_exit.enable(_tiny())
    model.save_pretrained(tmp_path)
    plain = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert not is_enabled(plain)
    for policy in (EarlyExit(0.3), ForcedExit(1), EarlyExit(1.0)):
        got = plain.generate(**X, custom_generate=str(tmp_path), trust_remote_code=True, early_exit=policy,
                             max_new_tokens=6)
        assert torch.equal(got, _ref(model, policy))
    out = plain.generate(**X, custom_generate=str(tmp_path), trust_remote_code=True, early_exit=EarlyExit(0.3),
                         max_new_tokens=6, return_dict_in_generate=True)
    assert torch.equal(out.exit_layers, _ref(model, EarlyExit(0.3), return_dict_in_generate=True).exit_layers)
    with pytest.raises(ValueError, match="trust_remote_code"):  # HF's own gate on remote code stays
        plain.generate(**X, custom_generate=str(tmp_path), early_exit=EarlyExit(0.3), max_new_tokens=6)


def test_stored_policy_refuses_what_cannot_be_saved(tmp_path):
    model = hf_safe_exit.enable(_tiny())
    model.generation_config.early_exit = ForcedExit(2)
    with pytest.raises(ValueError, match="cannot be saved"):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything is written
    model.generation_config.early_exit = {"type": "Nope"}
    with pytest.raises(ValueError, match="names no policy type"):
        model.generate(**X, max_new_tokens=3)


@pytest.mark.parametrize("kwargs, match", [
    ({"penalty_alpha": 0.6, "top_k": 4}, "contrastive search"),
    ({"num_beams": 2}, "beam search"),
    ({"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.0}, "group beam search"),
    ({"num_beams": 2, "do_sample": True}, "beam sample"),
    ({"num_beams": 2, "force_words_ids": [[5]]}, "constrained beam search"),
    ({"dola_layers": "low"}, "DoLa"),
    ({"prompt_lookup_num_tokens": 3}, "prompt-lookup"),
    ({"cache_implementation": "static"}, "cache_implementation"),
    ({"cache_implementation": "paged"}, "cache_implementation"),
    ({"guidance_scale": 1.5}, "guidance"),
    ({"output_hidden_states": True}, "output_hidden_states"),
    ({"custom_generate": "someone/repo"}, "custom_generate"),
])
def test_unsupported_generation_modes_are_refused(kwargs, match):
    model = hf_safe_exit.enable(_tiny())
    with pytest.raises(UnsupportedGenerationModeError, match=match) as err:
        model.generate(**X, early_exit=EarlyExit(0.5), max_new_tokens=3, **kwargs)
    assert "greedy search and multinomial sampling" in str(err.value) and "\n" not in str(err.value)


def test_assistant_model_is_refused_with_bild_as_the_fix():
    model = hf_safe_exit.enable(_tiny())
    with pytest.raises(UnsupportedGenerationModeError, match="BiLD"):
        model.generate(**X, early_exit=EarlyExit(0.5), assistant_model=_tiny(1), max_new_tokens=3)


def test_policy_on_a_generation_config_is_honoured_when_switched_on():
    model = hf_safe_exit.enable(_tiny())
    config = GenerationConfig(early_exit=EarlyExit(0.3), max_new_tokens=6, decoder_start_token_id=0, eos_token_id=1,
                              pad_token_id=0)
    assert torch.equal(model.generate(**X, generation_config=config), _ref(model, EarlyExit(0.3)))
    model.generation_config.early_exit = ForcedExit(1)
    assert torch.equal(model.generate(**X, max_new_tokens=6), _ref(model, ForcedExit(1)))
    # an explicit early_exit= wins over the stored one
    assert torch.equal(model.generate(**X, early_exit=EarlyExit(0.3), max_new_tokens=6), _ref(model, EarlyExit(0.3)))


def test_stored_policy_applies_when_the_call_passes_its_own_generation_config():
    model = hf_safe_exit.enable(_tiny())
    model.generation_config.early_exit = ForcedExit(1)
    out = model.generate(**X, generation_config=GenerationConfig(max_new_tokens=6, decoder_start_token_id=0,
                                                                 eos_token_id=1, pad_token_id=0))
    assert torch.equal(out, _ref(model, ForcedExit(1)))


def test_model_defaults_count_when_checking_the_mode():
    model = hf_safe_exit.enable(_tiny())
    model.generation_config.num_beams = 4  # a checkpoint's default; HF merges it into the call's config
    with pytest.raises(UnsupportedGenerationModeError, match="beam search"):
        model.generate(**X, generation_config=GenerationConfig(max_new_tokens=3, decoder_start_token_id=0),
                       early_exit=EarlyExit(0.5))


@pytest.mark.parametrize("switch", ["first generate", "enable"])
def test_resaving_a_model_loaded_with_remote_code_keeps_custom_generate_and_policy(tmp_path, switch):
    # transformers runs none of our code when it loads a custom_generate folder: the instance's saving is switched
    # on at its first generate, or by enable() (idempotent)
    model = hf_safe_exit.enable(_tiny())
    model.save_pretrained(tmp_path / "a")
    loaded = T5ForConditionalGeneration.from_pretrained(tmp_path / "a", trust_remote_code=True).eval()
    assert is_enabled(loaded)
    if switch == "enable":
        assert hf_safe_exit.enable(loaded) is loaded
    else:
        loaded.generate(**X, max_new_tokens=2)
    loaded.generation_config.early_exit = EarlyExit(0.3)
    loaded.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "custom_generate" / "generate.py").is_file()
    assert json.loads((tmp_path / "b" / "generation_config.json").read_text())["early_exit"]["threshold"] == 0.3
    plain = _tiny()
    plain.save_pretrained(tmp_path / "c")  # a model that is not switched on saves as HF does
    assert not (tmp_path / "c" / "custom_generate").exists()


def test_a_fitted_policy_is_stored_with_its_own_task(tmp_path):
    import numpy as np

    from hf_safe_exit import RiskControlled
    from hf_safe_exit.decoding.stored_policy import policy_from_dict, policy_to_dict
    from hf_safe_exit.fingerprint import model_fingerprint
    from hf_safe_exit.risk import LossTable, store_calibration

    model = _tiny()
    lam = np.linspace(0, 1, 6)
    for task, level in (("cnndm", 0.0), ("squad", 0.3)):  # cnndm is the primary task; squad is fitted
        loss = np.clip(0.5 + level * (1 - lam)[:, None] * np.linspace(0, 1, 50)[None, :], 0, 1)
        table = LossTable.from_task_losses(lam, loss, metadata={"model_fingerprint": model_fingerprint(model),
                                                                "task": task, "measure": "softmax"})
        store_calibration(tmp_path, table=table)
    fitted = RiskControlled(0.05).fit_table(table)
    spec = policy_to_dict(fitted)
    assert spec["task"] == "squad"
    model.save_pretrained(tmp_path)
    reloaded = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    bound = policy_from_dict(spec).resolve(reloaded)
    assert bound.certificate.task == "squad" and bound.threshold == fitted.threshold
