"""The default model shipped inside the package: loads offline and generates, with and without early exit."""

import json

import pytest
import torch

from hf_safe_exit.models import default_model_available, default_model_path, load_default_model

pytestmark = pytest.mark.skipif(
    not default_model_available(),
    reason=f"the default model is not shipped in {default_model_path()} yet (train it with "
           "scripts/train_default_model.py)",
)


@pytest.fixture(scope="module")
def loaded():
    return load_default_model()


def test_package_files_and_size():
    d = default_model_path()
    names = {p.name for p in d.iterdir()}
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "meta_head.safetensors",
              "meta_head_config.json", "README.md", "heldout_eval_ids.json", "training_results.json"):
        assert f in names, f
    total = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())  # calibrations and plots included
    assert total <= 25 * 1024 * 1024
    held = json.loads((d / "heldout_eval_ids.json").read_text())
    assert all(500 <= r < 900 for r in held["cnndm_rows"])  # evaluation rows come from the pool only
    selection = d / "selection_eval_ids.json"
    if selection.is_file():  # rows an earlier model was looked at to choose this one: never in its own numbers
        chosen_on = json.loads(selection.read_text())
        assert not set(held["cnndm_ids"]) & set(chosen_on["cnndm_ids"])
        assert not set(held["squad_ids"]) & set(chosen_on["squad_ids"])


def test_loads_offline_and_generates(loaded, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = loaded
    assert model.dtype == torch.float32 and not model.training
    assert model.meta_head.config.d_model == model.config.d_model
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1
    enc = tok(["question: Who wrote the letter? context: The letter was written by Anna Smith in 1990.",
               "summarize: The city council voted on Monday to build a new bridge over the river."],
              return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] > 1
    texts = tok.batch_decode(out, skip_special_tokens=True)
    assert all(isinstance(t, str) for t in texts)


def test_plain_from_pretrained_matches(loaded):
    from transformers import T5ForConditionalGeneration

    model, tok = loaded
    plain = T5ForConditionalGeneration.from_pretrained(default_model_path(), dtype=torch.float32).eval()
    enc = tok("summarize: A short test article about the weather.", return_tensors="pt")
    dec = torch.tensor([[0, 5, 6]])
    torch.testing.assert_close(plain(**enc, decoder_input_ids=dec).logits, model(**enc, decoder_input_ids=dec).logits)


def test_early_exit_runs_on_default_model(loaded):
    import hf_safe_exit

    model, tok = loaded
    hf_safe_exit.enable(model)
    enc = tok(["question: Who wrote the letter? context: The letter was written by Anna Smith in 1990."],
              return_tensors="pt")
    full = model.generate(**enc, max_new_tokens=10, do_sample=False)
    same = model.generate(**enc, max_new_tokens=10, do_sample=False,
                          early_exit=hf_safe_exit.EarlyExit(threshold=1.0), return_dict_in_generate=True)
    assert torch.equal(same.sequences, full)  # λ = 1 is exactly the full model
    L = model.config.num_decoder_layers
    for measure in ("softmax", "meta"):
        out = model.generate(**enc, max_new_tokens=10, do_sample=False, return_dict_in_generate=True,
                             early_exit=hf_safe_exit.EarlyExit(threshold=0.0, measure=measure))
        real = out.exit_layers[out.exit_layers > 0]
        assert real.numel() > 0 and int(real.max()) <= L and float(out.mean_exit_layer[0]) < L
