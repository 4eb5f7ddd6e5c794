"""``import hf_safe_exit`` changes nothing in transformers: same class attributes, same outputs, same errors.

Each check runs in a fresh interpreter, so that no earlier test has imported hf_safe_exit already: the same
script records, before and after the import, the identity of every attribute of the transformers classes a
library could patch, and what a plain T5, BART and GPT-2 return (or raise) for ordinary calls, for
``early_exit=`` and for a policy-like attribute on their generation config.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys
import torch
import transformers
from transformers import (BartConfig, BartForConditionalGeneration, GenerationConfig, GenerationMixin, GPT2Config,
                          GPT2LMHeadModel, PreTrainedModel, T5Config, T5ForConditionalGeneration)
from transformers.generation.stopping_criteria import StoppingCriteriaList

CLASSES = (GenerationMixin, PreTrainedModel, GenerationConfig, T5ForConditionalGeneration,
           BartForConditionalGeneration, GPT2LMHeadModel, StoppingCriteriaList)


def attributes():
    return {f"{c.__name__}.{k}": id(v) for c in CLASSES for k, v in vars(c).items()}


def models():
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=2,
                                             decoder_start_token_id=0, initializer_factor=4.0)).eval()
    bart = BartForConditionalGeneration(BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                                                   pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                                   decoder_start_token_id=2, forced_eos_token_id=None)).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                      pad_token_id=0)).eval()
    return {"t5": t5, "bart": bart, "gpt2": gpt2}


def behaviour():
    out = {}
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    for name, model in models().items():
        def run(label, **kw):
            try:
                out[f"{name}/{label}"] = model.generate(input_ids=ids, max_new_tokens=4, **kw).tolist()
            except Exception as err:
                out[f"{name}/{label}"] = f"{type(err).__name__}: {err}"
        run("plain")
        run("early_exit kwarg", early_exit=object())
        model.generation_config.early_exit = {"type": "EarlyExit", "threshold": 0.5}
        run("early_exit on generation_config")
    return out


# behaviour first: building a model caches a few values on its class, which must not count as a change
before = {"behaviour": behaviour(), "attributes": attributes()}
import hf_safe_exit  # noqa: E402,F401
after = {"attributes": attributes(), "behaviour": behaviour()}
print(json.dumps({"before": before, "after": after}))
"""


@pytest.fixture(scope="module")
def snapshots():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_no_transformers_class_attribute_changes(snapshots):
    before, after = snapshots["before"]["attributes"], snapshots["after"]["attributes"]
    assert {"GenerationMixin._prepare_generation_config", "PreTrainedModel.save_pretrained",
            "GenerationMixin.generate"} <= set(before)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert changed == []


def test_plain_models_generate_and_fail_identically(snapshots):
    before, after = snapshots["before"]["behaviour"], snapshots["after"]["behaviour"]
    assert before == after
    # the checks are not vacuous: plain calls decode, and an unknown keyword is transformers' own error
    for name in ("t5", "bart", "gpt2"):
        assert isinstance(before[f"{name}/plain"], list)
        assert before[f"{name}/early_exit kwarg"].startswith("ValueError") and "early_exit" in before[
            f"{name}/early_exit kwarg"]


def test_enable_refuses_a_model_that_is_not_t5():
    from transformers import GPT2Config, GPT2LMHeadModel

    import hf_safe_exit

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(TypeError, match="T5ForConditionalGeneration") as info:
        hf_safe_exit.enable(model)
    assert "\n" not in str(info.value) and "GPT2LMHeadModel" in str(info.value)
    assert "generate" not in model.__dict__ and "save_pretrained" not in model.__dict__
