"""examples/finetune_calm.py end to end on a tiny local T5: the folder it writes is a model a user can push.

References: HF's own ``generate`` on the saved weights (λ̂ = 1 must decode exactly like it, and the loss table's
λ = 1 column must be the task loss of HF's outputs on the pool rows it names), the project's fixed splits
(``load_split``) for which rows calibrated it, the starting checkpoint (training must change the weights), and
``huggingface_hub.ModelCard`` for the card.
"""

from __future__ import annotations

import json
import re
import runpy
import shlex
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, HfArgumentParser, T5ForConditionalGeneration

import hf_safe_exit
from hf_safe_exit.fingerprint import model_fingerprint
from hf_safe_exit.risk import LossTable, RiskControlled
from hf_safe_exit.tasks import get_task, load_split, shared_data_dir
from hf_safe_exit.training.finetune import FinetuneConfig, command_line, fit_calibration

from tiny_calibration import save_tiny_t5

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "finetune_calm.py"
DATA = shared_data_dir()
pytestmark = pytest.mark.skipif(DATA is None, reason="the offline data (../shared/data) is not available")

# small lengths and counts keep the whole run (train, meta head, collect, evaluate, card) well under a minute
ARGS = ["--task", "cnndm", "--max-steps", "3", "--n-calibration", "8", "--batch-size", "4", "--meta-examples", "16",
        "--max-input-length", "48", "--max-new-tokens", "12", "--eval-repeats", "20", "--device", "cpu",
        "--learning-rate", "1e-2"]


def run_example(argv: list[str]) -> dict:
    return runpy.run_path(str(EXAMPLE), run_name="finetune_calm")["main"](argv)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("finetune")
    task = get_task("cnndm")
    rows = load_split(task, "train", path=DATA).select(range(40))
    # equal depths, as in released T5s: stock generate (the reference below) sizes its cache by the encoder's
    base = save_tiny_t5(root / "tiny", [task.prompt(r) + " " + r["highlights"] for r in rows], seed=0,
                        num_layers=3, num_decoder_layers=3)
    out = root / "out"
    start = time.perf_counter()
    results = run_example(["--model", base, "--data", str(DATA), "--output", str(out), *ARGS])
    return Path(base), out, results, time.perf_counter() - start


def test_runs_in_under_a_minute(finetuned):
    *_, seconds = finetuned
    assert seconds < 60, f"the tiny end-to-end run took {seconds:.0f}s"


def test_folder_holds_a_pushable_model(finetuned):
    _, out, results, _ = finetuned
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "meta_head.safetensors", "meta_head_config.json", "README.md",
                 "finetune_results.json", "custom_generate/generate.py", "custom_generate/requirements.txt",
                 "calibration/config.json", "calibration/cnndm/early_exit_calibration.npz",
                 "calibration/cnndm/risk_control.json", "calibration/cnndm/evaluation.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "hf_safe_exit_plots" / "cnndm").iterdir()) == [
        "exit_layer_vs_eps.png", "risk_vs_eps.png", "speedup_vs_eps.png"]
    assert json.loads((out / "calibration/config.json").read_text()) == {"primary_task": "cnndm"}
    assert json.loads((out / "finetune_results.json").read_text())["training"]["steps"] == 3 == \
        results["training"]["steps"]


def test_training_changed_the_weights_and_the_calibration_is_of_the_saved_ones(finetuned):
    base, out, _, _ = finetuned
    before = T5ForConditionalGeneration.from_pretrained(base)
    after = T5ForConditionalGeneration.from_pretrained(out)
    assert model_fingerprint(before) != model_fingerprint(after)
    table = LossTable.load(out / "calibration/cnndm/early_exit_calibration.npz")
    assert table.metadata["model_fingerprint"] == model_fingerprint(after)
    head = hf_safe_exit.MetaClassifierHead.from_pretrained(out)
    assert head.config.d_model == after.config.d_model


def test_calibrated_on_pool_rows_only_with_hf_outputs_at_lambda_one(finetuned):
    _, out, _, _ = finetuned
    task = get_task("cnndm")
    table = LossTable.load(out / "calibration/cnndm/early_exit_calibration.npz")
    pool = load_split(task, "pool", path=DATA)
    train_ids = set(load_split(task, "train", path=DATA)["id"])
    by_id = {r["id"]: r for r in pool}
    ids = list(table.metadata["example_ids"])
    assert len(ids) == 8 and set(ids) <= set(by_id) and not set(ids) & train_ids
    rows = [by_id[i] for i in ids]
    model = T5ForConditionalGeneration.from_pretrained(out).eval()  # HF's own generate: no custom_generate
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok([task.prompt(r) for r in rows], return_tensors="pt", padding=True, truncation=True,
              max_length=table.metadata["max_input_length"])
    with torch.no_grad():
        seqs = model.generate(**enc, max_new_tokens=table.metadata["max_new_tokens"], do_sample=False, num_beams=1)
    texts = [t.strip() for t in tok.batch_decode(seqs, skip_special_tokens=True)]
    expected = [task.loss(t, task.reference(r)) for t, r in zip(texts, rows)]
    full = int(np.flatnonzero(table.lambdas == 1.0)[0])
    np.testing.assert_allclose(table.extras["task_loss"][full], expected, atol=1e-12)


def test_card_parses_and_states_the_guarantee_and_per_token_speed(finetuned):
    from huggingface_hub import ModelCard

    _, out, results, _ = finetuned
    card = ModelCard.load(out / "README.md")
    stored = json.loads((out / "calibration/cnndm/risk_control.json").read_text())
    by_type = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert by_type["early_exit_threshold"] == pytest.approx(stored["certificate"]["lambda_hat"])
    assert any(t.endswith("speedup") for t in by_type)  # the speed-up, like for like: per generated token
    assert {"t5", "calm", "early-exit"} <= set(card.data.tags)
    assert "per generated token" in card.text.lower() and "guarantee" in card.text.lower()
    assert "## Training" in card.text and "3 steps" in card.text
    assert "hf_safe_exit_plots/cnndm/risk_vs_eps.png" in card.text
    # the rows, as the project's splits are (tasks.load_split: CNN/DM validation rows 0–499 train, 500–899 pool),
    # in the card's words; and the split numbers called what they are, not "held-out"
    names = {r.dataset_name for r in card.data.eval_results}
    assert names == {"CNN/DailyMail 3.0.0, validation rows 500–899, the calibration/test pool"}
    assert "validation rows 0–499" in card.text and "validation rows 500–899" in card.text
    training = card.text.split("## Training")[1].split("Reproduce:")[0]
    assert "held-out" not in training and "repeated random calibration/test splits of these same 8 rows" in training
    # the card's command reproduces the run's settings
    command = re.search(r"Reproduce: `python examples/finetune_calm.py (.*?)`", card.text).group(1)
    parser = HfArgumentParser(FinetuneConfig)
    (again,) = parser.parse_args_into_dataclasses(args=shlex.split(command.replace("<folder>", "elsewhere")))
    assert {**asdict(again), "output": None} == {**results["config"], "output": None}


def test_one_liner_on_a_plain_from_pretrained_of_the_folder(finetuned):
    _, out, results, _ = finetuned
    model = T5ForConditionalGeneration.from_pretrained(out, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(out)
    inputs = tok(["summarize: the council voted on tuesday to turn the old railway depot into a library ."],
                 return_tensors="pt")
    hf = T5ForConditionalGeneration.generate(model, **inputs, max_new_tokens=12)
    # a target so strict that n = 8 examples certify no early exit: λ̂ = 1, which is HF's own decoding
    strict = RiskControlled(eps=1e-4)
    out_strict = model.generate(**inputs, early_exit=strict, max_new_tokens=12)
    assert strict.resolve(model).threshold == 1.0
    assert torch.equal(out_strict, hf)
    assert torch.equal(model.generate(**inputs, early_exit=False, max_new_tokens=12), hf)
    # the calibrated request (the card's snippet) decodes under the stored certificate
    cfg = results["config"]
    rc = RiskControlled(eps=cfg["eps"], delta=cfg["delta"], method=cfg["method"])
    res = model.generate(**inputs, early_exit=rc, max_new_tokens=12, return_dict_in_generate=True)
    assert res.early_exit.threshold == results["calibration"]["threshold"]
    assert res.certificate == RiskControlled.from_pretrained(out / "calibration" / "cnndm").certificate
    # any other ε is fitted from the stored loss table
    table = LossTable.load(out / "calibration/cnndm/early_exit_calibration.npz")
    loose = model.generate(**inputs, early_exit=RiskControlled(eps=0.5), max_new_tokens=12,
                           return_dict_in_generate=True)
    assert loose.early_exit.threshold == RiskControlled(eps=0.5).fit_table(table).threshold


@pytest.mark.filterwarnings("ignore::UserWarning")  # an infeasible ε warns (λ̂ = 1); the comparison still holds
@pytest.mark.parametrize("method", ["crc", "ucb", "ltt"])
def test_each_method_fits_with_its_delta(method):
    """crc has no δ (RiskControlled refuses one), ucb/ltt get 0.1 unless told: the fit after training takes the
    config as parsed, here on a synthetic table instead of a collected one."""
    from card_helpers import synthetic_table

    (config,) = HfArgumentParser(FinetuneConfig).parse_args_into_dataclasses(
        args=["--model", "m", "--task", "cnndm", "--output", "o", "--method", method, "--eval-repeats", "3"])
    assert config.delta == (None if method == "crc" else 0.1)
    table = synthetic_table("f00d", "cnndm", n=120)
    rc, evaluation = fit_calibration(config, table)
    reference = RiskControlled(0.05, delta=None if method == "crc" else 0.1, method=method).fit_table(table)
    assert rc.certificate == reference.certificate
    assert evaluation["settings"]["delta"] == config.delta and {r["method"] for r in evaluation["results"]} == {method}
    # the card's Reproduce command gives the same config back, naming no δ that was not chosen
    command = command_line(config, output="o")
    assert "--delta" not in command
    (again,) = HfArgumentParser(FinetuneConfig).parse_args_into_dataclasses(
        args=shlex.split(command.split("finetune_calm.py ", 1)[1]))
    assert asdict(again) == asdict(config)


def test_bad_settings_are_one_line_errors_before_any_training(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_example(["--model", "x", "--output", str(tmp_path / "o"), "--task", "cnndm", "--bf16", "--fp16"])
    assert "choose one mixed precision" in capsys.readouterr().err
    with pytest.raises(ValueError, match="n_calibration=1"):
        FinetuneConfig(model="x", task="cnndm", output="o", n_calibration=1)
    # crc has no δ: refused when the command is parsed, not after training and collecting
    with pytest.raises(SystemExit):
        run_example(["--model", "no-such-model", "--output", str(tmp_path / "c"), "--task", "cnndm", "--method", "crc",
                     "--delta", "0.1"])
    assert "delta=0.1 was given but method='crc' has no δ" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="delta"):
        FinetuneConfig(model="x", task="cnndm", output="o", method="ltt", delta=1.5)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("someone's file")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_example(["--model", "no-such-model", "--output", str(tmp_path / "full"), "--task", "cnndm"])
    assert (tmp_path / "full" / "keep.txt").read_text() == "someone's file"
