"""The guarantee in a model card: render for a calibrated tiny model, parse back with huggingface_hub and YAML."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from huggingface_hub import ModelCard

from hf_safe_exit import LossTable, RiskControlled, model_fingerprint
from hf_safe_exit.calibration.evaluate import evaluate_table
from hf_safe_exit.calibration.tiny import build_tiny_t5
from hf_safe_exit.cards import (METRIC_TYPES, SECTION_END, SECTION_START, calibration_directory, guarantee_statement,
                                section_markers, write_guarantee_card)

CNNDM_START, CNNDM_END = section_markers("cnndm")
SQUAD_START, SQUAD_END = section_markers("squad")

USER_CARD = """---
license: apache-2.0
tags:
- t5
model-index:
- name: my-tiny-t5
  results:
  - task:
      type: summarization
    dataset:
      name: my eval set
      type: my/eval
    metrics:
    - type: rougeL
      value: 0.25
---

# My tiny T5

Some words the user wrote about the model.

## Limitations

It is tiny and random.
"""


def _synthetic_table(fingerprint: str, task: str | None, *, n: int = 300, seed: int = 0,
                     mean_gap: float = 0.25) -> LossTable:
    """Synthetic losses of one task: the gap shrinks towards λ = 1 (where it is exactly 0), noisy, within [-1, 1]."""
    rng = np.random.default_rng(seed)
    lambdas = np.round(np.linspace(0.0, 1.0, 11), 10)
    gaps = np.clip((1 - lambdas)[:, None] * rng.normal(mean_gap, 0.2, (lambdas.size, n)), -1, 1)
    gaps[-1] = 0.0
    layers = 1 + 5 * lambdas[:, None] * np.ones((1, n))
    extras = {"task_loss": np.clip(0.6 + gaps, 0, 1), "mean_exit_layer": layers, "layer_fraction": layers / 6,
              "wall_time": 1.0 + 2.0 * lambdas}
    metadata = {"model_fingerprint": fingerprint, "measure": "softmax", "schedule": "constant", "min_exit_layer": 1,
                "split": "pool", "num_decoder_layers": 6}
    if task is not None:
        metadata["task"] = task
    return LossTable(lambdas, {"performance_gap": gaps}, extras=extras, metadata=metadata)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny random T5 saved to a directory, and a LossTable of synthetic losses carrying its fingerprint."""
    model = build_tiny_t5(vocab_size=40, seed=0)
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory)
    return model, directory, _synthetic_table(model_fingerprint(model), "cnndm")


@pytest.fixture(scope="module")
def squad_table(calibrated):
    """A second task's synthetic losses for the same model (another n and gap, so another λ̂)."""
    model, _, _ = calibrated
    return _synthetic_table(model_fingerprint(model), "squad", n=240, seed=1, mean_gap=0.15)


def _yaml_header(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.S)
    assert match, "card must start with a YAML block"
    return yaml.safe_load(match.group(1))


def _ours(card) -> dict:
    return {r.metric_type: r for r in card.data.eval_results if r.metric_type in METRIC_TYPES}


def test_card_for_a_calibrated_tiny_model_round_trips(calibrated, tmp_path):
    model, directory, table = calibrated
    (directory / "README.md").write_text(USER_CARD, encoding="utf-8")
    rc = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    cert = rc.certificate
    assert cert.feasible and 0 < cert.lambda_hat < 1  # a real threshold, so the card states real numbers

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plot = tmp_path / "risk_vs_eps.png"  # outside the model directory: must be copied next to the card
    plt.figure(figsize=(1, 1)); plt.plot([0, 1]); plt.savefig(plot); plt.close()

    path = write_guarantee_card(directory, rc, test_results={"test_risk": 0.0712, "n_test": 150, "split": "pool"},
                                efficiency={"mean_exit_layer": 3.5, "num_decoder_layers": 6, "layer_fraction": 0.58,
                                            "speedup": 1.37},
                                hardware="2-core CPU", plots=[str(plot)], calibration_split="pool")
    text = path.read_text(encoding="utf-8")

    # --- independent YAML parse: valid, user's metadata kept, model-index numbers equal the certificate
    meta = _yaml_header(text)
    assert meta["license"] == "apache-2.0" and "t5" in meta["tags"] and "hf-safe-exit" in meta["tags"]
    index = meta["model-index"]
    assert len(index) == 1 and index[0]["name"] == "my-tiny-t5"
    metrics = {m["type"]: m["value"] for res in index[0]["results"] for m in res["metrics"]}
    assert metrics["rougeL"] == 0.25  # the user's own result survives
    assert metrics["early_exit_threshold"] == cert.lambda_hat
    assert metrics["early_exit_calibration_risk"] == cert.empirical_risk
    assert metrics["early_exit_risk_bound"] == cert.risk_bound
    assert metrics["early_exit_test_risk"] == 0.0712
    assert metrics["early_exit_mean_layers"] == 3.5 and metrics["early_exit_speedup"] == 1.37

    # --- huggingface_hub parse (file path: offline)
    card = ModelCard.load(path)
    ours = _ours(card)
    assert set(ours) == set(METRIC_TYPES)
    assert ours["early_exit_threshold"].metric_value == cert.lambda_hat
    assert ours["early_exit_risk_bound"].metric_value == cert.risk_bound
    assert ours["early_exit_threshold"].dataset_split == "pool"
    assert ours["early_exit_threshold"].task_type == "summarization"
    assert card.data.model_name == "my-tiny-t5"

    # --- the text: user's content kept, one section, the guarantee in words with the certificate's numbers
    assert "Some words the user wrote about the model." in card.text and "## Limitations" in card.text
    assert card.text.count(CNNDM_START) == 1 and card.text.count(CNNDM_END) == 1
    assert SECTION_START not in card.text and SECTION_END not in card.text  # the task's markers, not the generic ones
    assert "## Early exit with a risk guarantee: CNN/DailyMail summarisation (ROUGE-L)" in card.text
    assert guarantee_statement(cert, "ROUGE-L") in card.text
    assert (f"With probability at least 1 − δ = 0.9 over the random draw of the {cert.n} calibration examples, the "
            "expected ROUGE-L drop against the full model on a new example from the same distribution is at most "
            "ε = 0.1.") in card.text
    assert f"| Threshold λ̂ | {cert.lambda_hat:.6g} |" in card.text
    assert f"n = {cert.n}" in card.text and "split `pool`" in card.text
    assert f"| Risk bound at λ̂ | {cert.risk_bound:+.4f}" in card.text
    assert "| Confidence measure | softmax |" in card.text
    assert model_fingerprint(model) in card.text
    assert "**3.50** of 6" in card.text and "**1.37×**" in card.text and "2-core CPU" in card.text
    assert "![risk vs eps](hf_safe_exit_plots/cnndm/risk_vs_eps.png)" in card.text
    assert (directory / "hf_safe_exit_plots" / "cnndm" / "risk_vs_eps.png").is_file()

    # --- the calibration next to the card is what from_pretrained loads, and it binds to the model
    loaded = RiskControlled.from_pretrained(directory)
    assert loaded.certificate == cert
    assert loaded.bind(model).threshold == cert.lambda_hat

    # --- updating replaces only our section and our results (CRC now: the in-expectation statement)
    crc = RiskControlled(eps=0.15, method="crc").fit_table(table)
    write_guarantee_card(directory, crc)
    card2 = ModelCard.load(path)
    assert card2.text.count(CNNDM_START) == 1
    assert "Some words the user wrote about the model." in card2.text
    assert "In expectation over the random draw" in card2.text and "ε = 0.15" in card2.text
    assert "1 − δ" not in card2.text.split(CNNDM_START)[1]
    ours2 = _ours(card2)
    assert set(ours2) == {"early_exit_threshold", "early_exit_calibration_risk", "early_exit_risk_bound"}
    assert ours2["early_exit_threshold"].metric_value == crc.certificate.lambda_hat
    assert ours2["early_exit_risk_bound"].metric_value == crc.certificate.risk_bound
    assert [r.metric_value for r in card2.data.eval_results if r.metric_type == "rougeL"] == [0.25]
    assert card2.data.license == "apache-2.0"
    assert RiskControlled.from_pretrained(directory).certificate == crc.certificate


def test_card_from_an_evaluation_uses_the_matching_row(calibrated, tmp_path):
    _, _, table = calibrated
    rc = RiskControlled(eps=0.2, delta=0.1, method="ltt").fit_table(table)
    assert rc.certificate.feasible
    evaluation = evaluate_table(table, eps=(0.05, 0.2), methods=("crc", "ltt"), delta=0.1, repeats=5, n_cal=200)
    row = next(r for r in evaluation["results"] if r["method"] == "ltt" and r["eps"] == 0.2)
    path = write_guarantee_card(tmp_path / "new_model", rc, test_results=evaluation, model_name="fresh")
    card = ModelCard.load(path)
    ours = _ours(card)
    assert card.data.model_name == "fresh"
    assert ours["early_exit_test_risk"].metric_value == row["test_risk_mean"]
    assert ours["early_exit_speedup"].metric_value == row["speedup"]
    assert ours["early_exit_mean_layers"].metric_value == row["mean_exit_layer"]
    assert "over 5 random calibration/test splits" in card.text and "on 100 test examples" in card.text
    # the repeated splits calibrate on n_cal examples each, the shipped λ̂ on all n: the card says which is which
    assert (f"each of 5 random splits calibrates its own threshold on n_cal = 200 examples (mean λ̂ "
            f"{row['lambda_hat_mean']:.3g})") in card.text
    assert f"λ̂ = {rc.certificate.lambda_hat:.6g} above was calibrated once, on all n = {table.n}" in card.text
    assert f"{100 * row['violation_rate']:.1f}%" in card.text
    assert "p-value" in card.text  # LTT reports its p-value at λ̂
    _yaml_header(path.read_text(encoding="utf-8"))


def test_card_errors_are_clear(calibrated, tmp_path):
    _, _, table = calibrated
    with pytest.raises(ValueError, match="not fitted"):
        write_guarantee_card(tmp_path, RiskControlled(eps=0.1))
    rc = RiskControlled(eps=0.1, method="crc").fit_table(table)
    with pytest.raises(ValueError, match="no result for method='crc', eps=0.1"):
        write_guarantee_card(tmp_path, rc, test_results=evaluate_table(table, eps=(0.05,), methods=("crc",),
                                                                       repeats=2))
    with pytest.raises(ValueError, match="unknown keys"):
        write_guarantee_card(tmp_path, rc, test_results={"test_risk": 0.1, "accuracy": 1.0})
    (tmp_path / "README.md").write_text(f"# x\n\n{SECTION_START}\nhalf a section\n", encoding="utf-8")
    with pytest.raises(ValueError, match="only one of the markers"):
        write_guarantee_card(tmp_path, rc)
    (tmp_path / "README.md").write_text(f"# x\n\n{CNNDM_END}\nhalf a section\n", encoding="utf-8")
    with pytest.raises(ValueError, match="only one of the markers"):
        write_guarantee_card(tmp_path, rc)
    twice = f"{CNNDM_START}\none\n{CNNDM_END}\n"
    (tmp_path / "README.md").write_text(f"# x\n\n{twice}\n{twice}", encoding="utf-8")
    with pytest.raises(ValueError, match="one section expected"):
        write_guarantee_card(tmp_path, rc)
    bad = RiskControlled(eps=0.1, method="crc").fit_table(_synthetic_table("f", "two words"))
    with pytest.raises(ValueError, match="cannot name a model-card section"):
        write_guarantee_card(tmp_path / "bad", bad)
    assert not (tmp_path / "bad").exists()  # checked before anything is written
    with pytest.raises(FileNotFoundError, match="plot"):
        write_guarantee_card(tmp_path / "other", rc, plots=["/nonexistent/plot.png"])


def test_card_command_line(calibrated, tmp_path, capsys):
    from hf_safe_exit.cli import main

    _, _, table = calibrated
    rc = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    rc.save_pretrained(tmp_path)
    evaluation = evaluate_table(table, eps=(0.1,), methods=("ucb",), delta=0.1, repeats=3)
    (tmp_path / "eval.json").write_text(__import__("json").dumps(evaluation), encoding="utf-8")
    assert main(["card", "--model", str(tmp_path), "--evaluation", str(tmp_path / "eval.json"), "--split", "pool",
                 "--hardware", "a laptop"]) == 0
    assert "wrote" in capsys.readouterr().out
    card = ModelCard.load(tmp_path / "README.md")
    ours = _ours(card)
    assert ours["early_exit_threshold"].metric_value == rc.certificate.lambda_hat
    assert ours["early_exit_test_risk"].metric_value == evaluation["results"][0]["test_risk_mean"]
    assert "on a laptop" in card.text
    assert main(["card", "--model", str(tmp_path / "nowhere")]) == 2
    assert "risk_control.json" in capsys.readouterr().err


def test_risk_controlled_methods_are_the_card_functions(calibrated, tmp_path):
    _, _, table = calibrated
    rc = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    card = rc.to_model_card(model_name="m", calibration_split="pool")
    assert _ours(card)["early_exit_threshold"].metric_value == rc.certificate.lambda_hat
    assert guarantee_statement(rc.certificate) in card.text
    path = rc.write_card(tmp_path, model_name="m", calibration_split="pool")
    written = ModelCard.load(path)
    assert RiskControlled.from_pretrained(tmp_path, task="cnndm").certificate == rc.certificate
    # the same section, except that the written one names the task folder it stored (calibration/<task>/)
    assert _section(written.text, CNNDM_START, CNNDM_END).replace(", task='cnndm'", "") == \
        _section(card.text, CNNDM_START, CNNDM_END)


# ---------------------------------------------------------------- one guarantee section per calibration task
def _section(text: str, start: str, end: str) -> str:
    assert text.count(start) == 1 and text.count(end) == 1, (start, end)
    return text[text.index(start):text.index(end) + len(end)]


def _results_by_dataset(card) -> dict:
    """{(dataset type, metric type): value} of this library's model-index results."""
    return {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results
            if r.metric_type in METRIC_TYPES}


def _check_numbers(section: str, rc) -> None:
    c = rc.certificate
    assert f"| Threshold λ̂ | {c.lambda_hat:.6g} |" in section
    assert f"ε = {c.eps:g}" in section and f"n = {c.n} |" in section
    assert guarantee_statement(c, "ROUGE-L" if c.task == "cnndm" else "F1") in section


def test_one_guarantee_section_per_task(calibrated, squad_table, tmp_path):
    _, _, table = calibrated
    (tmp_path / "README.md").write_text(USER_CARD, encoding="utf-8")
    cnndm = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    squad = RiskControlled(eps=0.15, delta=0.1, method="ucb").fit_table(squad_table)
    assert cnndm.certificate.lambda_hat != squad.certificate.lambda_hat
    assert cnndm.certificate.n != squad.certificate.n
    write_guarantee_card(tmp_path, cnndm, test_results={"test_risk": 0.071, "n_test": 100},
                         efficiency={"mean_exit_layer": 3.5, "speedup": 1.4}, calibration_split="pool")
    path = write_guarantee_card(tmp_path, squad, test_results={"test_risk": 0.093, "n_test": 80},
                                efficiency={"mean_exit_layer": 2.5, "speedup": 1.9}, calibration_split="pool")

    # --- YAML: valid; both tasks' results and the user's own
    meta = _yaml_header(path.read_text(encoding="utf-8"))
    assert meta["license"] == "apache-2.0" and len(meta["model-index"]) == 1
    card = ModelCard.load(path)
    ours = _results_by_dataset(card)
    cnn, sq = "abisee/cnn_dailymail", "rajpurkar/squad"
    assert ours[(cnn, "early_exit_threshold")] == cnndm.certificate.lambda_hat
    assert ours[(cnn, "early_exit_risk_bound")] == cnndm.certificate.risk_bound
    assert ours[(cnn, "early_exit_test_risk")] == 0.071 and ours[(cnn, "early_exit_speedup")] == 1.4
    assert ours[(sq, "early_exit_threshold")] == squad.certificate.lambda_hat
    assert ours[(sq, "early_exit_calibration_risk")] == squad.certificate.empirical_risk
    assert ours[(sq, "early_exit_test_risk")] == 0.093 and ours[(sq, "early_exit_speedup")] == 1.9
    assert len(ours) == 2 * 6  # six metric types per task (no layer fraction given), nothing duplicated
    assert {r.task_type for r in card.data.eval_results if r.dataset_type == sq} == {"question-answering"}
    assert [r.metric_value for r in card.data.eval_results if r.metric_type == "rougeL"] == [0.25]

    # --- text: both sections, each with its own heading and numbers, cnndm's first; the user's text kept
    text = card.text
    cnndm_section, squad_section = _section(text, CNNDM_START, CNNDM_END), _section(text, SQUAD_START, SQUAD_END)
    assert text.index(CNNDM_END) < text.index(SQUAD_START)
    assert "## Early exit with a risk guarantee: CNN/DailyMail summarisation (ROUGE-L)" in cnndm_section
    assert "## Early exit with a risk guarantee: SQuAD v1.1 question answering (F1)" in squad_section
    _check_numbers(cnndm_section, cnndm)
    _check_numbers(squad_section, squad)
    assert "**1.40×**" in cnndm_section and "**1.90×**" in squad_section
    assert "Some words the user wrote about the model." in text and "## Limitations" in text

    # --- re-writing cnndm with another ε replaces only cnndm's section and results
    cnndm2 = RiskControlled(eps=0.2, delta=0.1, method="ucb").fit_table(table)
    assert cnndm2.certificate.lambda_hat != cnndm.certificate.lambda_hat
    write_guarantee_card(tmp_path, cnndm2)
    card2 = ModelCard.load(path)
    text2 = card2.text
    assert text2.count("<!-- hf_safe_exit:guarantee:") == 4  # two sections, start and end markers each
    _check_numbers(_section(text2, CNNDM_START, CNNDM_END), cnndm2)
    assert "ε = 0.1 " not in _section(text2, CNNDM_START, CNNDM_END)
    assert _section(text2, SQUAD_START, SQUAD_END) == squad_section  # untouched, byte for byte
    assert text2.index(CNNDM_END) < text2.index(SQUAD_START)  # replaced in place
    ours2 = _results_by_dataset(card2)
    assert ours2[(cnn, "early_exit_threshold")] == cnndm2.certificate.lambda_hat
    assert (cnn, "early_exit_test_risk") not in ours2  # the old λ̂'s test risk is not kept with the new λ̂
    assert {k: v for k, v in ours2.items() if k[0] == sq} == {k: v for k, v in ours.items() if k[0] == sq}
    assert [r.metric_value for r in card2.data.eval_results if r.metric_type == "rougeL"] == [0.25]
    _yaml_header(path.read_text(encoding="utf-8"))


def _old_format(text: str) -> str:
    """A card as written before sections carried a task: generic markers and heading."""
    return (text.replace(CNNDM_START, SECTION_START).replace(CNNDM_END, SECTION_END)
            .replace("## Early exit with a risk guarantee: CNN/DailyMail summarisation (ROUGE-L)",
                     "## Early exit with a risk guarantee"))


def test_old_card_with_a_generic_section_migrates(calibrated, squad_table, tmp_path):
    _, _, table = calibrated
    cnndm = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    path = write_guarantee_card(tmp_path, cnndm, model_name="m")
    path.write_text(_old_format(path.read_text(encoding="utf-8")) + "\n## Citation\n\nsomething\n", encoding="utf-8")
    assert SECTION_START in path.read_text(encoding="utf-8") and CNNDM_START not in path.read_text(encoding="utf-8")

    cnndm2 = RiskControlled(eps=0.2, delta=0.1, method="ucb").fit_table(table)
    write_guarantee_card(tmp_path, cnndm2)  # the generic section becomes cnndm's, in place
    text = ModelCard.load(path).text
    assert SECTION_START not in text and SECTION_END not in text
    _check_numbers(_section(text, CNNDM_START, CNNDM_END), cnndm2)
    assert text.index(CNNDM_END) < text.index("## Citation")

    squad = RiskControlled(eps=0.15, delta=0.1, method="ucb").fit_table(squad_table)
    write_guarantee_card(tmp_path, squad)  # a new section right after the other guarantee sections
    card = ModelCard.load(path)
    assert card.text.index(CNNDM_END) < card.text.index(SQUAD_START) < card.text.index("## Citation")
    _check_numbers(_section(card.text, SQUAD_START, SQUAD_END), squad)
    assert {r.dataset_type for r in card.data.eval_results} == {"abisee/cnn_dailymail", "rajpurkar/squad"}

    # an old card is replaced by whichever task writes first (its task is not in its markers)
    path.write_text(_old_format(path.read_text(encoding="utf-8").split(SQUAD_START)[0]), encoding="utf-8")
    write_guarantee_card(tmp_path, squad)
    text = ModelCard.load(path).text
    assert SECTION_START not in text and CNNDM_START not in text and text.count(SQUAD_START) == 1


def test_certificate_without_a_task_keeps_the_generic_markers(calibrated, tmp_path):
    model, _, _ = calibrated
    rc = RiskControlled(eps=0.1, method="crc").fit_table(_synthetic_table(model_fingerprint(model), None))
    assert rc.certificate.task is None
    path = write_guarantee_card(tmp_path, rc, model_name="m")
    text = ModelCard.load(path).text
    assert text.count(SECTION_START) == 1 and text.count(SECTION_END) == 1
    assert "## Early exit with a risk guarantee\n" in text
    assert (tmp_path / "risk_control.json").is_file()


def test_calibration_is_saved_where_the_demo_finds_it(calibrated, squad_table, tmp_path):
    from hf_safe_exit.demo import find_task_calibration

    _, _, table = calibrated
    cnndm = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    squad = RiskControlled(eps=0.15, delta=0.1, method="ucb").fit_table(squad_table)

    # a model with per-task calibration directories: each task's file goes there, none into the root
    model_dir = tmp_path / "per_task"
    for task in ("cnndm", "squad"):
        (model_dir / "calibration" / task).mkdir(parents=True)
    assert calibration_directory(model_dir, "cnndm") == model_dir / "calibration" / "cnndm"
    write_guarantee_card(model_dir, cnndm)
    path = write_guarantee_card(model_dir, squad)
    assert not (model_dir / "risk_control.json").exists()
    for task, rc in (("cnndm", cnndm), ("squad", squad)):
        loaded = RiskControlled.from_pretrained(model_dir / "calibration" / task)
        assert loaded.certificate == rc.certificate
        found, source = find_task_calibration(model_dir, task)
        assert found.certificate == rc.certificate and source.endswith(f"calibration/{task}/risk_control.json")
    text = ModelCard.load(path).text
    assert "task='cnndm'" in _section(text, CNNDM_START, CNNDM_END)
    assert "task='squad'" in _section(text, SQUAD_START, SQUAD_END)

    # a model folder without calibration/ yet: every task still goes to calibration/<task>/ (the one layout),
    # and a bare RiskControlled.from_pretrained(model folder) reads the primary (first stored) task's
    flat = tmp_path / "flat"
    write_guarantee_card(flat, cnndm)
    assert not (flat / "risk_control.json").exists()
    assert RiskControlled.from_pretrained(flat / "calibration" / "cnndm").certificate == cnndm.certificate
    write_guarantee_card(flat, squad)
    for task, rc in (("cnndm", cnndm), ("squad", squad)):
        assert RiskControlled.from_pretrained(flat, task=task).certificate == rc.certificate
        assert find_task_calibration(flat, task)[0].certificate == rc.certificate
    cnndm2 = RiskControlled(eps=0.2, delta=0.1, method="ucb").fit_table(table)
    write_guarantee_card(flat, cnndm2)  # the same task again: updated in place
    assert find_task_calibration(flat, "cnndm")[0].certificate == cnndm2.certificate

    # a model with calibration/ for one task: a new task joins it there rather than the root
    mixed = tmp_path / "mixed"
    (mixed / "calibration" / "cnndm").mkdir(parents=True)
    write_guarantee_card(mixed, squad)
    assert not (mixed / "risk_control.json").exists()
    assert find_task_calibration(mixed, "squad")[0].certificate == squad.certificate

    # save_calibration=False writes nothing but the card (and names where the calibration belongs)
    bare = tmp_path / "bare"
    (bare / "calibration" / "squad").mkdir(parents=True)
    write_guarantee_card(bare, squad, save_calibration=False)
    assert sorted(p.name for p in bare.rglob("*") if p.is_file()) == ["README.md"]
    assert "task='squad'" in (bare / "README.md").read_text(encoding="utf-8")  # read from calibration/squad/


def test_plots_of_two_tasks_do_not_overwrite_each_other(calibrated, squad_table, tmp_path):
    _, _, table = calibrated
    plots = {}
    for task, colour in (("cnndm", b"cnndm"), ("squad", b"squad")):
        plots[task] = tmp_path / f"plots-{task}" / "risk_vs_eps.png"
        plots[task].parent.mkdir()
        plots[task].write_bytes(colour)  # same file name, different content
    model_dir = tmp_path / "model"
    write_guarantee_card(model_dir, RiskControlled(eps=0.1, method="crc").fit_table(table), plots=[plots["cnndm"]])
    write_guarantee_card(model_dir, RiskControlled(eps=0.1, method="crc").fit_table(squad_table),
                         plots=[plots["squad"]])
    for task in ("cnndm", "squad"):
        assert (model_dir / "hf_safe_exit_plots" / task / "risk_vs_eps.png").read_bytes() == task.encode()
    text = (model_dir / "README.md").read_text(encoding="utf-8")
    assert "(hf_safe_exit_plots/squad/risk_vs_eps.png)" in _section(text, SQUAD_START, SQUAD_END)


def test_card_command_line_one_section_per_task(calibrated, squad_table, tmp_path, capsys):
    from hf_safe_exit.cli import main

    _, _, table = calibrated
    model_dir = tmp_path / "model"
    certs = {}
    for task, tab, eps in (("cnndm", table, 0.1), ("squad", squad_table, 0.15)):
        rc = RiskControlled(eps=eps, delta=0.1, method="ucb").fit_table(tab)
        rc.save_pretrained(model_dir / "calibration" / task)
        certs[task] = rc.certificate
    for task in ("cnndm", "squad"):
        assert main(["card", "--model", str(model_dir), "--calibration", str(model_dir / "calibration" / task),
                     "--split", "pool"]) == 0
        out = capsys.readouterr().out
        assert f"calibration/{task}/risk_control.json" in out and f"task '{task}'" in out
    card = ModelCard.load(model_dir / "README.md")
    _check_numbers(_section(card.text, CNNDM_START, CNNDM_END), RiskControlled.from_pretrained(
        model_dir / "calibration" / "cnndm"))
    _check_numbers(_section(card.text, SQUAD_START, SQUAD_END), RiskControlled.from_pretrained(
        model_dir / "calibration" / "squad"))
    ours = _results_by_dataset(card)
    assert ours[("abisee/cnn_dailymail", "early_exit_threshold")] == certs["cnndm"].lambda_hat
    assert ours[("rajpurkar/squad", "early_exit_threshold")] == certs["squad"].lambda_hat
    assert not (model_dir / "risk_control.json").exists()
    for task in ("cnndm", "squad"):  # saved back where they were, unchanged
        assert RiskControlled.from_pretrained(model_dir / "calibration" / task).certificate == certs[task]


class _FakeHub:
    """A Hub repo in memory: the calls push_to_hub makes, on {path: bytes}."""

    def __init__(self, files: dict):
        self.files = dict(files)
        self.uploaded: dict = {}

    def api(self, token=None):
        hub = self

        class Api:
            def create_repo(self, repo_id, exist_ok=False, private=None):
                return repo_id

            def list_repo_files(self, repo_id, revision=None):
                return sorted(hub.files)

            def upload_folder(self, repo_id, folder_path, revision=None, commit_message=""):
                root = Path(folder_path)
                hub.uploaded = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
                hub.files.update(hub.uploaded)
                return "https://huggingface.co/fake/commit/1"
        return Api()

    def download(self, tmp_path):
        def hf_hub_download(repo_id, filename, revision=None, token=None, **_):
            dest = tmp_path / "downloads" / filename
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(self.files[filename])
            return str(dest)
        return hf_hub_download


def test_push_to_hub_keeps_other_tasks(calibrated, squad_table, tmp_path, monkeypatch):
    import huggingface_hub

    from hf_safe_exit.cards import push_to_hub

    _, _, table = calibrated
    cnndm = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    squad = RiskControlled(eps=0.15, delta=0.1, method="ucb").fit_table(squad_table)
    local = tmp_path / "local"
    write_guarantee_card(local, cnndm, model_name="m", repo_id="me/m")
    hub = _FakeHub({p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()})
    generate_files = {"custom_generate/generate.py", "custom_generate/requirements.txt"}
    assert set(hub.files) == {"README.md", "calibration/cnndm/risk_control.json"} | generate_files
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.download(tmp_path))

    push_to_hub(squad, "me/m")
    assert set(hub.uploaded) == {"README.md", "calibration/squad/risk_control.json"} | generate_files
    assert json.loads(hub.files["calibration/cnndm/risk_control.json"])["certificate"]["task"] == "cnndm"
    assert json.loads(hub.files["calibration/squad/risk_control.json"])["certificate"]["task"] == "squad"
    readme = hub.files["README.md"].decode("utf-8")
    _check_numbers(_section(readme, CNNDM_START, CNNDM_END), cnndm)
    squad_section = _section(readme, SQUAD_START, SQUAD_END)
    _check_numbers(squad_section, squad)
    assert 'path = "me/m"' in squad_section and "task='squad'" in squad_section

    push_to_hub(cnndm, "me/m")  # cnndm's: updated in its own folder
    assert set(hub.uploaded) == {"README.md", "calibration/cnndm/risk_control.json"} | generate_files
    assert hub.files["calibration/squad/risk_control.json"]  # still there
    assert ModelCard(hub.files["README.md"].decode("utf-8")).text.count(SQUAD_START) == 1
