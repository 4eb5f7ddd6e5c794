"""The guarantee in a model card: render for a calibrated tiny model, parse back with huggingface_hub and YAML."""

from __future__ import annotations

import fnmatch
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
from hf_safe_exit.cards import (METRIC_TYPES, SECTION_END, SECTION_START, WouldOverwriteError, calibration_directory,
                                guarantee_statement, section_markers, to_model_card, write_guarantee_card)
from hf_safe_exit.errors import InconsistentCalibrationError

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
    layers = 1 + 5 * lambdas[:, None] * rng.uniform(0.5, 1.0, (1, n))
    layers[-1] = 6.0
    tokens = rng.integers(5, 30, (lambdas.size, n))  # early exit changes the output lengths
    extras = {"task_loss": np.clip(0.6 + gaps, 0, 1), "mean_exit_layer": layers, "layer_fraction": layers / 6,
              "wall_time": 1.0 + 2.0 * lambdas, "num_tokens": tokens}
    metadata = {"model_fingerprint": fingerprint, "measure": "softmax", "schedule": "constant", "min_exit_layer": 1,
                "split": "pool", "num_decoder_layers": 6, "max_new_tokens": 32, "max_input_length": 128}
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
                                hardware="2-core CPU", plots=[str(plot)], calibration_split="pool rows 0-299")
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
    ours_yaml = [res for res in index[0]["results"] if res["dataset"].get("type") == "abisee/cnn_dailymail"]
    assert {res["dataset"]["split"] for res in ours_yaml} == {"validation"}  # a split the dataset has
    assert all("pool rows 0-299" in res["dataset"]["name"] for res in ours_yaml)  # the rows: in the text

    # --- huggingface_hub parse (file path: offline)
    card = ModelCard.load(path)
    ours = _ours(card)
    assert {"early_exit_threshold", "early_exit_risk_bound", "early_exit_test_risk", "early_exit_speedup"} <= set(ours)
    assert ours["early_exit_threshold"].metric_value == cert.lambda_hat
    assert ours["early_exit_risk_bound"].metric_value == cert.risk_bound
    assert ours["early_exit_threshold"].dataset_split == "validation"
    assert ours["early_exit_threshold"].dataset_config == "3.0.0"
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
    assert f"n = {cert.n} |" in card.text and "split `validation`): pool rows 0-299" in card.text
    assert f"| Risk bound at λ̂ | {cert.risk_bound:+.4f}" in card.text
    assert "| Confidence measure | softmax |" in card.text
    assert model_fingerprint(model) in card.text
    assert "**3.50** of 6" in card.text and "**1.37×**" in card.text and "2-core CPU" in card.text
    assert "![risk vs eps](hf_safe_exit_plots/cnndm/risk_vs_eps.png)" in card.text
    assert (directory / "hf_safe_exit_plots" / "cnndm" / "risk_vs_eps.png").is_file()
    # the snippet decodes as the calibration did: its lengths, read from the table the calibration was fitted on
    assert "max_new_tokens=32" in card.text and "truncation=True, max_length=128" in card.text

    # --- the calibration next to the card is what from_pretrained loads, and it binds to the model
    loaded = RiskControlled.from_pretrained(directory)
    assert loaded.certificate == cert
    assert loaded.bind(model).threshold == cert.lambda_hat

    # --- updating with another calibration of the task replaces it only when asked, then only ours changes
    crc = RiskControlled(eps=0.15, method="crc").fit_table(table)
    with pytest.raises(WouldOverwriteError, match="risk_control.json.*--overwrite"):
        write_guarantee_card(directory, crc)
    write_guarantee_card(directory, crc, overwrite=True)
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


def test_card_from_an_evaluation_states_the_procedure_not_the_shipped_threshold(calibrated, tmp_path):
    _, _, table = calibrated
    rc = RiskControlled(eps=0.2, delta=0.1, method="ltt").fit_table(table)
    assert rc.certificate.feasible
    evaluation = evaluate_table(table, eps=(0.05, 0.2), methods=("crc", "ltt"), delta=0.1, repeats=5, n_cal=200)
    row = next(r for r in evaluation["results"] if r["method"] == "ltt" and r["eps"] == 0.2)
    assert evaluation["speedup_basis"] == "per generated token"
    path = write_guarantee_card(tmp_path / "new_model", rc, test_results=evaluation, model_name="fresh")
    card = ModelCard.load(path)
    ours = _ours(card)
    assert card.data.model_name == "fresh"
    # the split procedure's numbers are typed and named as such, never as "test risk at λ̂"
    assert "early_exit_test_risk" not in ours and "early_exit_speedup" not in ours
    assert ours["early_exit_split_test_risk"].metric_value == row["test_risk_mean"]
    assert ours["early_exit_split_speedup"].metric_value == row["speedup"]
    assert ours["early_exit_split_mean_layers"].metric_value == row["mean_exit_layer"]
    assert ours["early_exit_split_violation_rate"].metric_value == row["violation_rate"]
    for r in (ours["early_exit_split_test_risk"], ours["early_exit_split_speedup"]):
        assert r.metric_args == {"repeats": 5, "n_cal": 200, "n_test": 100, "lambda_hat_mean": row["lambda_hat_mean"],
                                 "method": "ltt", "eps": 0.2, "delta": 0.1}
        assert "5 random splits, n_cal = 200, n_test = 100" in r.metric_name
    assert "Repeated-split" in ours["early_exit_split_test_risk"].metric_name
    assert "λ̂ = " not in ours["early_exit_split_test_risk"].metric_name  # no claim about the shipped λ̂
    assert {r.dataset_split for r in ours.values()} == {"validation"}
    assert (f"Each split calibrated its own threshold (ltt, ε = 0.2, δ = 0.1) on its n_cal examples (mean λ̂ over the "
            f"splits: {row['lambda_hat_mean']:.3g})") in card.text
    assert f"the shipped λ̂ = {rc.certificate.lambda_hat:.6g} was calibrated once, on all n = {table.n}" in card.text
    assert f"(mean ± sd over the 5 splits; target ε = 0.2)" in card.text
    assert f"{100 * row['violation_rate']:.1f}%" in card.text
    assert "p-value" in card.text  # LTT reports its p-value at λ̂
    # the evaluation is saved beside the calibration the card states, where the card's numbers can be checked
    assert json.loads((tmp_path / "new_model" / "calibration" / "cnndm" / "evaluation.json").read_text()) == \
        json.loads(json.dumps(evaluation))
    _yaml_header(path.read_text(encoding="utf-8"))


def test_quality_and_speed_at_the_shipped_threshold_are_like_for_like(calibrated, tmp_path):
    """What the shipped λ̂ does: early exit and the full model on the same examples, speed per generated token."""
    _, _, table = calibrated
    rc = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    lam = rc.certificate.lambda_hat
    k, full = list(table.lambdas).index(lam), list(table.lambdas).index(1.0)
    ex = table.extras
    # the reference, computed here from the table's raw arrays
    score, full_score = 1 - ex["task_loss"][k].mean(), 1 - ex["task_loss"][full].mean()
    tokens, full_tokens = ex["num_tokens"][k].sum(), ex["num_tokens"][full].sum()
    layers = (ex["mean_exit_layer"][k] * ex["num_tokens"][k]).sum() / tokens
    speedup = (ex["wall_time"][full] / full_tokens) / (ex["wall_time"][k] / tokens)
    path = write_guarantee_card(tmp_path, rc, table=table, model_name="m")
    ours = _ours(ModelCard.load(path))
    assert ours["early_exit_calibration_score"].metric_value == pytest.approx(score, rel=1e-12)
    assert ours["full_model_calibration_score"].metric_value == pytest.approx(full_score, rel=1e-12)
    assert ours["early_exit_calibration_layers"].metric_value == pytest.approx(layers, rel=1e-12)
    assert ours["early_exit_calibration_speedup"].metric_value == pytest.approx(speedup, rel=1e-12)
    for r in ours.values():
        assert f"n = {table.n}" in r.metric_name
    text = path.read_text(encoding="utf-8")
    assert f"| tokens generated | {tokens:,} | {full_tokens:,} |" in text
    assert f"| ROUGE-L (mean per example) | {score:.4f} | {full_score:.4f} |" in text
    assert f"| speed-up per generated token | **{speedup:.2f}×** | 1× |" in text
    assert (tmp_path / "calibration" / "cnndm" / "early_exit_calibration.npz").is_file()  # saved with it

    # λ̂ = 1 (no early exit): the card's two columns are the same outputs, so the same numbers
    never = RiskControlled(eps=0.001, delta=0.1, method="ucb")
    with pytest.warns(UserWarning):
        never.fit_table(table)
    assert never.certificate.lambda_hat == 1.0
    path = write_guarantee_card(tmp_path / "never", never, table=table, model_name="m")
    ours = _ours(ModelCard.load(path))
    assert ours["early_exit_calibration_score"].metric_value == ours["full_model_calibration_score"].metric_value
    assert ours["early_exit_calibration_layers"].metric_value == 6.0
    assert ours["early_exit_calibration_speedup"].metric_value == 1.0


def test_card_refuses_an_evaluation_or_table_of_another_calibration(calibrated, tmp_path):
    model, _, table = calibrated
    rc = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    small = table.subset(np.arange(24))  # the case: a 24-example calibration beside a 300-example evaluation
    other = RiskControlled(eps=0.1, method="crc").fit_table(small)
    evaluation = evaluate_table(table, eps=(0.1,), methods=("crc", "ucb"), repeats=2)
    (tmp_path / "eval.json").write_text(json.dumps(evaluation), encoding="utf-8")
    with pytest.raises(InconsistentCalibrationError, match=r"eval\.json.*examples is 300, the calibration's 24"):
        write_guarantee_card(tmp_path / "a", other, test_results=str(tmp_path / "eval.json"))
    with pytest.raises(InconsistentCalibrationError, match="not the one this calibration was fitted on"):
        write_guarantee_card(tmp_path / "b", rc, table=small)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


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
    (tmp_path / "eval.json").write_text(json.dumps(evaluation), encoding="utf-8")
    table.save(tmp_path / "cnndm.npz")
    assert main(["card", "--model", str(tmp_path), "--evaluation", str(tmp_path / "eval.json"), "--hardware",
                 "a laptop", "--results", str(tmp_path / "cnndm.npz")]) == 0
    assert "wrote" in capsys.readouterr().out
    card = ModelCard.load(tmp_path / "README.md")
    ours = _ours(card)
    assert ours["early_exit_threshold"].metric_value == rc.certificate.lambda_hat
    assert ours["early_exit_split_test_risk"].metric_value == evaluation["results"][0]["test_risk_mean"]
    assert "early_exit_calibration_speedup" in ours and "(a laptop)" in ours["early_exit_calibration_speedup"].metric_name
    assert "on a laptop" in card.text
    assert main(["card", "--model", str(tmp_path / "nowhere")]) == 2
    assert "risk_control.json" in capsys.readouterr().err


def test_to_model_card_is_the_written_card(calibrated, tmp_path):
    _, _, table = calibrated
    rc = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    card = to_model_card(rc, model_name="m", table=table)
    assert _ours(card)["early_exit_threshold"].metric_value == rc.certificate.lambda_hat
    assert guarantee_statement(rc.certificate) in card.text
    path = write_guarantee_card(tmp_path, rc, model_name="m", table=table)
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
    write_guarantee_card(tmp_path, cnndm2, overwrite=True)
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
    write_guarantee_card(tmp_path, cnndm2, overwrite=True)  # the generic section becomes cnndm's, in place
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
    write_guarantee_card(flat, cnndm2, overwrite=True)  # the same task again: replaced when asked
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
        self.deleted: list = []

    def api(self, token=None):
        hub = self

        class Api:
            def create_repo(self, repo_id, exist_ok=False, private=None):
                return repo_id

            def list_repo_files(self, repo_id, revision=None):
                return sorted(hub.files)

            def upload_folder(self, repo_id, folder_path, revision=None, commit_message="", delete_patterns=None):
                root = Path(folder_path)
                hub.uploaded = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
                hub.deleted = sorted(f for f in hub.files if f not in hub.uploaded and any(
                    fnmatch.fnmatch(f, pattern) for pattern in ([delete_patterns] if isinstance(delete_patterns, str)
                                                                else delete_patterns or [])))
                for f in hub.deleted:
                    del hub.files[f]
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


# ---------------------------------------------------------------- nothing overwritten silently
def _shipped_like(model_dir: Path, table, tmp_path: Path):
    """A model folder as calibrate_default_model.sh leaves it: 300-example UCB calibration, its table, evaluation
    and plots, and the card. Returns the calibration and {file: bytes} of everything there."""
    from hf_safe_exit.plotting import plot_evaluation

    rc = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    evaluation = evaluate_table(table, eps=(0.1,), methods=("ucb",), delta=0.1, repeats=2)
    plots = plot_evaluation(evaluation, tmp_path / "plots")
    write_guarantee_card(model_dir, rc, test_results=evaluation, table=table, plots=plots, model_name="m")
    return rc, {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}


def test_card_never_replaces_a_calibration_evaluation_or_plot_silently(calibrated, tmp_path, capsys):
    from hf_safe_exit.cli import main
    from hf_safe_exit.plotting import plot_evaluation

    _, _, table = calibrated
    model_dir = tmp_path / "model"
    rc, before = _shipped_like(model_dir, table, tmp_path)
    cal = model_dir / "calibration" / "cnndm"
    assert {p.name for p in cal.iterdir()} == {"risk_control.json", "evaluation.json", "early_exit_calibration.npz"}

    # writing the same calibration again changes nothing
    write_guarantee_card(model_dir, rc, test_results=str(cal / "evaluation.json"), model_name="m",
                         plots=[model_dir / "hf_safe_exit_plots" / "cnndm" / name for name in
                                ("risk_vs_eps.png", "exit_layer_vs_eps.png", "speedup_vs_eps.png")])
    assert {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()} == before

    # the case: a 24-example CRC calibration from elsewhere, carded into the model -> refused, one line
    small = table.subset(np.arange(24))
    other = RiskControlled(eps=0.3, method="crc").fit_table(small)
    other.save_pretrained(tmp_path / "other")
    assert main(["card", "--model", str(model_dir), "--calibration", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(cal / "risk_control.json") in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()} == before  # nothing written

    # a different plot of the same name: refused too
    changed = evaluate_table(table, eps=(0.1, 0.2), methods=("ucb",), delta=0.1, repeats=2)
    new_plots = plot_evaluation(changed, tmp_path / "plots2")
    with pytest.raises(WouldOverwriteError, match="risk_vs_eps.png"):
        write_guarantee_card(model_dir, rc, plots=new_plots)
    assert {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()} == before

    # --overwrite replaces the calibration as a whole: the old evaluation and the table of 300 examples go
    assert main(["card", "--model", str(model_dir), "--calibration", str(tmp_path / "other"), "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "removed" in out and "evaluation.json" in out
    assert {p.name for p in cal.iterdir()} == {"risk_control.json"}
    assert RiskControlled.from_pretrained(cal).certificate == other.certificate
    assert _ours(ModelCard.load(model_dir / "README.md"))["early_exit_threshold"].metric_value == \
        other.certificate.lambda_hat


def test_overwrite_keeps_a_table_that_still_reproduces_the_calibration(calibrated, tmp_path):
    _, _, table = calibrated
    model_dir = tmp_path / "model"
    _shipped_like(model_dir, table, tmp_path)
    eps2 = RiskControlled(eps=0.2, delta=0.1, method="ucb").fit_table(table)  # another ε of the same table
    write_guarantee_card(model_dir, eps2, overwrite=True)
    cal = model_dir / "calibration" / "cnndm"
    assert {p.name for p in cal.iterdir()} == {"risk_control.json", "early_exit_calibration.npz"}
    text = (model_dir / "README.md").read_text(encoding="utf-8")
    assert f"What the shipped λ̂ = {eps2.certificate.lambda_hat:.6g} does" in text  # read from the kept table


def test_push_to_hub_never_replaces_silently(calibrated, tmp_path, monkeypatch):
    import huggingface_hub

    from hf_safe_exit.cards import push_to_hub

    _, _, table = calibrated
    local = tmp_path / "local"
    _shipped_like(local, table, tmp_path)
    hub = _FakeHub({p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()})
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.download(tmp_path))
    before = dict(hub.files)
    other = RiskControlled(eps=0.3, method="crc").fit_table(table.subset(np.arange(24)))
    with pytest.raises(WouldOverwriteError, match="calibration/cnndm/risk_control.json.*overwrite"):
        push_to_hub(other, "me/m")
    assert hub.files == before and not hub.uploaded  # nothing uploaded

    push_to_hub(other, "me/m", overwrite=True)
    assert hub.deleted == ["calibration/cnndm/early_exit_calibration.npz", "calibration/cnndm/evaluation.json"]
    assert json.loads(hub.files["calibration/cnndm/risk_control.json"])["certificate"]["n"] == 24
    assert "calibration/cnndm/evaluation.json" not in hub.files


def test_model_index_names_real_splits_and_no_removed_pipeline(calibrated, squad_table, tmp_path):
    """The card's metadata as the Hub reads it: real dataset splits, and no pipeline transformers 5 removed."""
    _, _, table = calibrated
    (tmp_path / "README.md").write_text("---\npipeline_tag: text2text-generation\nlicense: mit\n---\n\n# m\n",
                                        encoding="utf-8")
    for tab in (table, squad_table):
        rc = RiskControlled(eps=0.15, delta=0.1, method="ucb").fit_table(tab)
        evaluation = evaluate_table(tab, eps=(0.15,), methods=("ucb",), delta=0.1, repeats=2)
        write_guarantee_card(tmp_path, rc, test_results=evaluation, table=tab, model_name="m")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.pipeline_tag is None and card.data.license == "mit"
    meta = _yaml_header((tmp_path / "README.md").read_text(encoding="utf-8"))
    assert "pipeline_tag" not in meta
    datasets = {(r["dataset"]["type"], r["dataset"].get("config"), r["dataset"]["split"])
                for r in meta["model-index"][0]["results"]}
    # the splits those Hub datasets really have (abisee/cnn_dailymail 3.0.0: train/validation/test;
    # rajpurkar/squad plain_text: train/validation), and the pools are cut from validation
    assert datasets == {("abisee/cnn_dailymail", "3.0.0", "validation"), ("rajpurkar/squad", "plain_text", "validation")}
    names = {r["dataset"]["name"] for r in meta["model-index"][0]["results"]}
    assert any("validation rows 500–899" in n for n in names)
    assert any("articles 36–47" in n for n in names)
