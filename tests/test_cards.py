"""The guarantee in a model card: render for a calibrated tiny model, parse back with huggingface_hub and YAML."""

from __future__ import annotations

import re

import numpy as np
import pytest
import yaml
from huggingface_hub import ModelCard

from hf_safe_exit import LossTable, RiskControlled, model_fingerprint
from hf_safe_exit.calibration.evaluate import evaluate_table
from hf_safe_exit.calibration.tiny import build_tiny_t5
from hf_safe_exit.cards import METRIC_TYPES, SECTION_END, SECTION_START, guarantee_statement, write_guarantee_card

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


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny random T5 saved to a directory, and a LossTable of synthetic losses carrying its fingerprint."""
    model = build_tiny_t5(vocab_size=40, seed=0)
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory)
    rng = np.random.default_rng(0)
    lambdas = np.round(np.linspace(0.0, 1.0, 11), 10)
    n = 300
    # gap shrinks towards λ = 1 (where it is exactly 0), noisy per example, within [-1, 1]
    gaps = np.clip((1 - lambdas)[:, None] * rng.normal(0.25, 0.2, (lambdas.size, n)), -1, 1)
    gaps[-1] = 0.0
    layers = 1 + 5 * lambdas[:, None] * np.ones((1, n))
    extras = {"task_loss": np.clip(0.6 + gaps, 0, 1), "mean_exit_layer": layers, "layer_fraction": layers / 6,
              "wall_time": 1.0 + 2.0 * lambdas}
    table = LossTable(lambdas, {"performance_gap": gaps}, extras=extras,
                      metadata={"model_fingerprint": model_fingerprint(model), "task": "cnndm", "measure": "softmax",
                                "schedule": "constant", "min_exit_layer": 1, "split": "pool", "num_decoder_layers": 6})
    return model, directory, table


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
    assert card.text.count(SECTION_START) == 1 and card.text.count(SECTION_END) == 1
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
    assert "![risk vs eps](hf_safe_exit_plots/risk_vs_eps.png)" in card.text
    assert (directory / "hf_safe_exit_plots" / "risk_vs_eps.png").is_file()

    # --- the calibration next to the card is what from_pretrained loads, and it binds to the model
    loaded = RiskControlled.from_pretrained(directory)
    assert loaded.certificate == cert
    assert loaded.bind(model).threshold == cert.lambda_hat

    # --- updating replaces only our section and our results (CRC now: the in-expectation statement)
    crc = RiskControlled(eps=0.15, method="crc").fit_table(table)
    write_guarantee_card(directory, crc)
    card2 = ModelCard.load(path)
    assert card2.text.count(SECTION_START) == 1
    assert "Some words the user wrote about the model." in card2.text
    assert "In expectation over the random draw" in card2.text and "ε = 0.15" in card2.text
    assert "1 − δ" not in card2.text.split(SECTION_START)[1]
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
    assert written.text.strip().endswith(card.text.strip().split("\n\n", 1)[1].strip())  # same section
    assert RiskControlled.from_pretrained(tmp_path).certificate == rc.certificate
