"""Every code snippet README.md and a generated model card show runs as written (docs/: tests/test_docs_snippets.py).

README's ```python blocks run in order in one namespace (as a reader pasting them into one session would); every
``hf-safe-exit ...`` line of its ```bash blocks is parsed by the CLI's own parser (running them all means decoding
the calibration pools, which the CLI tests do on small data). Its ``python examples/finetune_calm.py`` lines are
parsed by the example's parser, and the offline one runs as written, on the shipped default model (about a
minute), into a fresh folder. A model card written
for a tiny calibrated model has its ```python block run with the card's placeholder replaced by that model's folder.
"""

from __future__ import annotations

import re
import runpy
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

import hf_safe_exit
from hf_safe_exit.cards import write_guarantee_card
from hf_safe_exit.cli import build_parser
from hf_safe_exit.fingerprint import model_fingerprint
from hf_safe_exit.models import default_model_available
from hf_safe_exit.risk import LossTable, RiskControlled, store_calibration

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def _blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in _BLOCK.findall(text) if lang == language]


@pytest.mark.skipif(not default_model_available(), reason="the shipped default model is not installed")
def test_readme_python_snippets_run_as_written(capsys):
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__readme__"}
    blocks = _blocks((ROOT / "README.md").read_text(encoding="utf-8"), "python")
    assert len(blocks) >= 5
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as err:  # noqa: BLE001 - say which block failed
            raise AssertionError(f"README.md python block {i + 1} failed: {type(err).__name__}: {err}\n{block}")
    printed = capsys.readouterr().out
    assert "on task cnndm" in printed  # the headline one-liner decoded under the shipped cnndm calibration


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 210, f"README.md has {lines} lines: a newcomer reads it in five minutes; move details to docs/"


@pytest.mark.skipif(not default_model_available(), reason="the shipped default model is not installed")
def test_readme_states_the_demos_eps_and_why():
    """README says at which ε the demo runs and why; those are the demo's own choices on the stored tables."""
    from hf_safe_exit.demo import demo_eps, full_model_score
    from hf_safe_exit.models import default_model_path

    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    stated = re.search(r"ε = ([\d.]+) on CNN/DM and ε = ([\d.]+) on SQuAD: about a quarter of what this weak model "
                       r"scores\*\* \(ROUGE-L\s+([\d.]+) and F1 ([\d.]+) on its calibration rows\)", readme)
    assert stated, "README no longer states the demo's ε and its reason"
    for task, eps, score in (("cnndm", stated.group(1), stated.group(3)), ("squad", stated.group(2), stated.group(4))):
        table = LossTable.load(default_model_path() / "calibration" / task)
        assert demo_eps(table, task)[0] == float(eps)
        assert f"{full_model_score(table):.2g}" == score


def test_readme_cli_lines_parse():
    parser = build_parser()
    lines = [line.split("#", 1)[0].strip() for block in _blocks((ROOT / "README.md").read_text(encoding="utf-8"),
                                                                 "bash") for line in block.splitlines()]
    commands = [line for line in lines if line.startswith("hf-safe-exit ") and "..." not in line]
    assert len(commands) >= 6
    for line in commands:
        argv = [a for a in shlex.split(line.split("&&")[-1].strip())[1:] if a not in ("[", "]")]
        argv = [a.strip("[]") for a in argv]
        try:
            parser.parse_args(argv)
        except SystemExit as err:
            raise AssertionError(f"README command does not parse: {line}") from err


def test_model_card_snippet_runs_as_written(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    from hf_safe_exit.models import default_model_path

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=8192, d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=2, num_decoder_layers=2,
                   decoder_start_token_id=0)
    model = hf_safe_exit.enable(T5ForConditionalGeneration(cfg).eval())
    model.save_pretrained(tmp_path)
    if default_model_available():  # the card's snippet loads a tokenizer from the same folder
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (tmp_path / name).write_bytes((default_model_path() / name).read_bytes())
    else:
        pytest.skip("needs the shipped tokenizer")
    rng = np.random.default_rng(0)
    lambdas = np.linspace(0, 1, 6)
    task_loss = np.clip(rng.uniform(0, 1, (6, 60)) * (1 - lambdas[:, None]) * 0.2 + 0.5, 0, 1)
    table = LossTable.from_task_losses(lambdas, task_loss, metadata={
        "model_fingerprint": model_fingerprint(model), "task": "cnndm", "measure": "softmax",
        "max_new_tokens": 8, "max_input_length": 32})
    rc = RiskControlled(eps=0.2, delta=0.2, method="ucb").fit_table(table)
    store_calibration(tmp_path, table=table)
    card = write_guarantee_card(tmp_path, rc, model_name="tiny")
    blocks = _blocks(card.read_text(encoding="utf-8"), "python")
    assert len(blocks) == 1
    code = blocks[0].replace("<this repo or directory>", str(tmp_path))
    namespace: dict = {}
    exec(compile(code, "model card snippet", "exec"), namespace)
    out, inputs = namespace["outputs"], namespace["inputs"]
    ref = hf_safe_exit.generate(model, **inputs, early_exit=hf_safe_exit.EarlyExit(rc.threshold), max_new_tokens=8)
    assert torch.equal(out, ref)  # the snippet decodes with the card's λ̂ on this model


@pytest.mark.skipif(not default_model_available(), reason="the shipped default model is not installed")
def test_default_model_card_snippets_run_as_written(capsys):
    from hf_safe_exit.models import default_model_path

    path = default_model_path()
    blocks = _blocks((path / "README.md").read_text(encoding="utf-8"), "python")
    assert len(blocks) == 3  # loading the model, then one guarantee section per task
    for i, block in enumerate(blocks):
        code = block.replace("<this repo or directory>", str(path))
        namespace: dict = {}
        exec(compile(code, f"default model card python block {i + 1}", "exec"), namespace)
        if "early_exit" in namespace:  # a guarantee section: it decoded with the λ̂ its section states
            rc = namespace["early_exit"]
            bound = rc.resolve(namespace["model"])
            stored = RiskControlled.from_pretrained(path, task=rc.task)
            assert bound.threshold == stored.threshold and bound.certificate == stored.certificate
    assert capsys.readouterr().out.count("[") >= 2


def _finetune_commands() -> list[list[str]]:
    lines = [line.split("#", 1)[0].strip() for block in _blocks((ROOT / "README.md").read_text(encoding="utf-8"),
                                                                 "bash") for line in block.splitlines()]
    return [shlex.split(line)[2:] for line in lines if line.startswith("python examples/finetune_calm.py ")]


@pytest.mark.skipif(not default_model_available(), reason="the shipped default model is not installed")
def test_readme_finetune_command_runs_as_written(tmp_path, monkeypatch, one_thread):
    from transformers import HfArgumentParser

    from hf_safe_exit.models import default_model_path
    from hf_safe_exit.tasks import shared_data_dir
    from hf_safe_exit.training.finetune import FinetuneConfig

    commands = _finetune_commands()
    assert len(commands) == 2  # the Hub one and the offline one
    parser = HfArgumentParser(FinetuneConfig)
    configs = [parser.parse_args_into_dataclasses(args=argv)[0] for argv in commands]
    offline = [(argv, c) for argv, c in zip(commands, configs) if c.data is not None]
    assert len(offline) == 1
    argv, config = offline[0]
    if shared_data_dir() is None:
        pytest.skip("the offline data (../shared/data) is not available")
    monkeypatch.chdir(ROOT)  # the command's relative paths are the repository's
    assert Path(config.model).resolve() == default_model_path().resolve()
    out = tmp_path / "out"  # as written (on the shipped default model), but into a fresh folder
    argv = [str(out) if prev == "--output" else arg for prev, arg in zip([None] + argv[:-1], argv)]
    main = runpy.run_path(str(ROOT / "examples" / "finetune_calm.py"), run_name="finetune_calm")["main"]
    results = main(argv)
    assert results["training"]["steps"] == config.max_steps
    assert results["calibration"]["n"] == config.n_calibration
    for name in ("risk_control.json", "early_exit_calibration.npz", "evaluation.json"):
        assert (out / "calibration" / config.task / name).is_file()
    assert (out / "custom_generate" / "generate.py").is_file() and (out / "README.md").is_file()
    # the README's next sentence: a plain from_pretrained of the folder decodes with the one-liner; 8 rows give
    # λ̂ = 1, so its output is HF's own generate's
    import torch
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    import hf_safe_exit

    model = T5ForConditionalGeneration.from_pretrained(out, trust_remote_code=True)
    inputs = AutoTokenizer.from_pretrained(out)(["summarize: The council met on Tuesday."], return_tensors="pt")
    ours = model.generate(**inputs, early_exit=hf_safe_exit.RiskControlled(eps=0.05, delta=0.1, method="ucb"),
                          return_dict_in_generate=True)
    assert ours.early_exit.threshold == 1.0
    hf = model.generate(**inputs, early_exit=False, max_new_tokens=config.max_new_tokens)
    assert torch.equal(ours.sequences, hf)
