"""The guarantee section of a model card: rendered for a calibrated tiny model and parsed back with
huggingface_hub and YAML; what each number measures (the shipped λ̂ on its calibration rows, the split
procedure), like for like; a card of another calibration, or an unreadable card, refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from huggingface_hub import ModelCard

from hf_safe_exit import RiskControlled, model_fingerprint
from hf_safe_exit.calibration.evaluate import evaluate_table
from hf_safe_exit.cards import (SECTION_END, SECTION_START, WouldOverwriteError, guarantee_statement, to_model_card,
                                write_guarantee_card)
from hf_safe_exit.errors import CorruptFileError, InconsistentCalibrationError

from card_helpers import calibrated  # noqa: F401, F811 (a fixture)
from card_helpers import CNNDM_END, CNNDM_START, USER_CARD, our_results, section, synthetic_table, yaml_header
from cli_lines import one_error_line


def test_card_for_a_calibrated_tiny_model_round_trips(calibrated, tmp_path):
    model, directory, table = calibrated
    (directory / "README.md").write_text(USER_CARD, encoding="utf-8")
    rc = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    cert = rc.certificate
    assert cert.feasible and 0 < cert.threshold < 1  # a real threshold, so the card states real numbers

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
    meta = yaml_header(text)
    assert meta["license"] == "apache-2.0" and "t5" in meta["tags"] and "hf-safe-exit" in meta["tags"]
    index = meta["model-index"]
    assert len(index) == 1 and index[0]["name"] == "my-tiny-t5"
    metrics = {m["type"]: m["value"] for res in index[0]["results"] for m in res["metrics"]}
    assert metrics["rougeL"] == 0.25  # the user's own result survives
    assert metrics["early_exit_threshold"] == cert.threshold
    assert metrics["early_exit_calibration_risk"] == cert.empirical_risk
    assert metrics["early_exit_risk_bound"] == cert.risk_bound
    assert metrics["early_exit_test_risk"] == 0.0712
    assert metrics["early_exit_mean_layers"] == 3.5 and metrics["early_exit_speedup"] == 1.37
    ours_yaml = [res for res in index[0]["results"] if res["dataset"].get("type") == "abisee/cnn_dailymail"]
    assert {res["dataset"]["split"] for res in ours_yaml} == {"validation"}  # a split the dataset has
    assert all("pool rows 0-299" in res["dataset"]["name"] for res in ours_yaml)  # the rows: in the text

    # --- huggingface_hub parse (file path: offline)
    card = ModelCard.load(path)
    ours = our_results(card)
    assert {"early_exit_threshold", "early_exit_risk_bound", "early_exit_test_risk", "early_exit_speedup"} <= set(ours)
    assert ours["early_exit_threshold"].metric_value == cert.threshold
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
    assert f"| Threshold λ̂ | {cert.threshold:.6g} |" in card.text
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
    assert loaded.resolve(model).threshold == cert.threshold

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
    ours2 = our_results(card2)
    assert set(ours2) == {"early_exit_threshold", "early_exit_calibration_risk", "early_exit_risk_bound"}
    assert ours2["early_exit_threshold"].metric_value == crc.certificate.threshold
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
    ours = our_results(card)
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
    assert f"the shipped λ̂ = {rc.certificate.threshold:.6g} was calibrated once, on all n = {table.n}" in card.text
    assert f"(mean ± sd over the 5 splits; target ε = 0.2)" in card.text
    assert f"{100 * row['violation_rate']:.1f}%" in card.text
    assert "p-value" in card.text  # LTT reports its p-value at λ̂
    # the evaluation is saved beside the calibration the card states, where the card's numbers can be checked
    from hf_safe_exit.calibration.evaluate import read_evaluation

    saved = tmp_path / "new_model" / "calibration" / "cnndm" / "evaluation.json"
    assert read_evaluation(saved) == json.loads(json.dumps(evaluation))  # and its digest matches what it holds
    yaml_header(path.read_text(encoding="utf-8"))


def test_quality_and_speed_at_the_shipped_threshold_are_like_for_like(calibrated, tmp_path):
    """What the shipped λ̂ does: early exit and the full model on the same examples, speed per generated token."""
    _, _, table = calibrated
    rc = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    lam = rc.certificate.threshold
    k, full = list(table.lambdas).index(lam), list(table.lambdas).index(1.0)
    ex = table.extras
    # the reference, computed here from the table's raw arrays
    score, full_score = 1 - ex["task_loss"][k].mean(), 1 - ex["task_loss"][full].mean()
    tokens, full_tokens = ex["num_tokens"][k].sum(), ex["num_tokens"][full].sum()
    layers = (ex["mean_exit_layer"][k] * ex["num_tokens"][k]).sum() / tokens
    speedup = (ex["wall_time"][full] / full_tokens) / (ex["wall_time"][k] / tokens)
    path = write_guarantee_card(tmp_path, rc, table=table, model_name="m")
    ours = our_results(ModelCard.load(path))
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
    assert never.certificate.threshold == 1.0
    path = write_guarantee_card(tmp_path / "never", never, table=table, model_name="m")
    ours = our_results(ModelCard.load(path))
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
    with pytest.raises(ValueError, match="cannot name a model-card section"):  # refused by the table already
        RiskControlled(eps=0.1, method="crc").fit_table(synthetic_table("f", "two words"))
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
    ours = our_results(card)
    assert ours["early_exit_threshold"].metric_value == rc.certificate.threshold
    assert ours["early_exit_split_test_risk"].metric_value == evaluation["results"][0]["test_risk_mean"]
    assert "early_exit_calibration_speedup" in ours and "(a laptop)" in ours["early_exit_calibration_speedup"].metric_name
    assert "on a laptop" in card.text
    assert main(["card", "--model", str(tmp_path / "nowhere")]) == 2
    assert "risk_control.json" in capsys.readouterr().err


def test_to_model_card_is_the_written_card(calibrated, tmp_path):
    _, _, table = calibrated
    rc = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    card = to_model_card(rc, model_name="m", table=table)
    assert our_results(card)["early_exit_threshold"].metric_value == rc.certificate.threshold
    assert guarantee_statement(rc.certificate) in card.text
    path = write_guarantee_card(tmp_path, rc, model_name="m", table=table)
    written = ModelCard.load(path)
    assert RiskControlled.from_pretrained(tmp_path, task="cnndm").certificate == rc.certificate
    # the same section, except that the written one names the task folder it stored (calibration/<task>/)
    assert section(written.text, CNNDM_START, CNNDM_END).replace(", task='cnndm'", "") == \
        section(card.text, CNNDM_START, CNNDM_END)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00 not text", b"---\nlicense: [unclosed\n---\n\n# m\n",
                                     b"---\n- a list, not metadata\n---\n\n# m\n"])
def test_an_unreadable_card_is_refused_naming_it(calibrated, tmp_path, capsys, content):
    """A README.md that is not a model card: CorruptFileError naming it, before anything is written; CLI: one line."""
    _, _, table = calibrated
    rc = RiskControlled(eps=0.1, method="crc").fit_table(table)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "README.md").write_bytes(content)
    with pytest.raises(CorruptFileError, match=r"README\.md'.*not a readable model card") as caught:
        write_guarantee_card(model_dir, rc)
    assert str(model_dir / "README.md") in str(caught.value)
    assert [p.name for p in model_dir.iterdir()] == ["README.md"]  # no calibration, plots or custom_generate/
    rc.save_pretrained(tmp_path / "calibration")
    line = one_error_line(capsys, ["card", "--model", str(model_dir), "--calibration", str(tmp_path / "calibration")])
    assert str(model_dir / "README.md") in line and "YAML metadata" in line
    assert (model_dir / "README.md").read_bytes() == content


def test_the_card_states_the_calibrated_configuration(calibrated, tmp_path):
    # the settings row is read from the calibration's EarlyExitConfig, not assumed
    model, directory, table = calibrated
    meta = {**table.metadata, "schedule": "decaying", "decay_tau": 2.0, "min_exit_layer": 2, "exit_layers": [2, 4]}
    other = type(table)(table.lambdas, table.losses, extras=table.extras, metadata=meta)
    rc = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(other)
    text = write_guarantee_card(tmp_path / "card", rc, hardware="2-core CPU").read_text(encoding="utf-8")
    assert "| Threshold schedule | decaying (τ = 2), first exit layer 2, confidence checked after layers 2, 4 |" \
        in text
    assert "| Confidence measure | softmax |" in text


def test_card_refuses_an_evaluation_or_table_of_another_configuration(calibrated, tmp_path):
    # same examples, model and task, but collected with another early-exit configuration: not this calibration's
    model, _, table = calibrated
    rc = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    meta = {**table.metadata, "schedule": "decaying", "decay_tau": 1.0}
    decaying = type(table)(table.lambdas, table.losses, extras=table.extras, metadata=meta)
    evaluation = evaluate_table(decaying, eps=(0.1,), methods=("ucb",), delta=0.1, repeats=2)
    (tmp_path / "eval.json").write_text(json.dumps(evaluation), encoding="utf-8")
    with pytest.raises(InconsistentCalibrationError, match="early-exit configuration differs.*'schedule': 'decaying'"):
        write_guarantee_card(tmp_path / "a", rc, test_results=str(tmp_path / "eval.json"))
    with pytest.raises(InconsistentCalibrationError, match="not the one this calibration was fitted on"):
        write_guarantee_card(tmp_path / "b", rc, table=decaying)
