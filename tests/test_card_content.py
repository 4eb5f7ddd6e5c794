"""No number that is not one is published (issue 26, root causes 7 and 8): an evaluation with NaN or infinity, or
of another shape, is refused naming its file (card and plot, Python and CLI); a loss table whose extras are NaN
is refused (built, saved or read; see tests/test_loss_table_content.py), and one changed in place after it was built
still gives a card without NaN, saying what it left out; ``evaluate --output`` never writes a NaN or Infinity token;
a card path that is a directory or a symbolic-link loop is a one-line CorruptFileError naming it."""

from __future__ import annotations

import copy
import json
import math
import os
import re

import numpy as np
import pytest
from huggingface_hub import ModelCard

from hf_safe_exit import LossTable, RiskControlled
from hf_safe_exit.calibration.evaluate import evaluate_table
from hf_safe_exit.cards import write_guarantee_card
from hf_safe_exit.errors import CorruptFileError
from hf_safe_exit.plotting import plot_evaluation

from card_helpers import calibrated  # noqa: F401, F811 (a fixture)
from card_helpers import our_results, synthetic_table
from cli_lines import one_error_line

NOT_A_NUMBER = re.compile(r"(?<![A-Za-z])(nan|inf|infinity)(?![A-Za-z])", re.IGNORECASE)


def strict_json(text: str):
    """``text`` parsed as JSON proper: a NaN, Infinity or -Infinity token fails the test."""
    def refuse(token):
        raise AssertionError(f"{token} written into a JSON file")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def shipped(calibrated):
    """The calibration of the tiny model's table (UCB, ε = 0.1) and its evaluation."""
    _, _, table = calibrated
    rc = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    return rc, evaluate_table(table, eps=(0.1,), methods=("ucb",), delta=0.1, repeats=2)


def saved_calibration(rc, tmp_path):
    rc.save_pretrained(tmp_path / "calibration")
    return str(tmp_path / "calibration")


def set_at(data: dict, where: tuple, value) -> dict:
    data = copy.deepcopy(data)
    target = data
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    return data


# ------------------------------------------------------------------ an evaluation with NaN or infinity
@pytest.mark.parametrize("where, value, field", [
    (("results", 0, "test_risk_mean"), float("nan"), "results[0].test_risk_mean"),
    (("results", 0, "speedup"), float("inf"), "results[0].speedup"),
    (("results", 0, "violation_rate"), float("-inf"), "results[0].violation_rate"),
    (("full_model", "wall_time"), float("nan"), "full_model.wall_time"),
    (("settings", "loss_bounds", 1), float("inf"), "settings.loss_bounds[1]")])
def test_an_evaluation_with_nan_or_infinity_is_refused_naming_it(shipped, tmp_path, capsys, where, value, field):
    rc, evaluation = shipped
    path = tmp_path / "evaluation.json"
    path.write_text(json.dumps(set_at(evaluation, where, value)), encoding="utf-8")  # NaN / Infinity tokens

    with pytest.raises(CorruptFileError) as caught:  # Python, from the file
        write_guarantee_card(tmp_path / "model", rc, test_results=str(path))
    assert str(path) in str(caught.value) and field in str(caught.value) and "finite" in str(caught.value)
    assert not (tmp_path / "model").exists()  # refused before anything was written
    with pytest.raises(CorruptFileError, match="not a finite number"):  # Python, the same evaluation as a dict
        write_guarantee_card(tmp_path / "model", rc, test_results=set_at(evaluation, where, value))
    with pytest.raises(CorruptFileError, match="not a finite number"):  # nor plotted
        plot_evaluation(set_at(evaluation, where, value), tmp_path / "plots")
    assert not (tmp_path / "plots").exists()

    calibration = saved_calibration(rc, tmp_path)
    line = one_error_line(capsys, ["card", "--model", str(tmp_path / "model"), "--calibration", calibration,
                                   "--evaluation", str(path)])
    assert str(path) in line and field in line and "hf-safe-exit evaluate" in line
    line = one_error_line(capsys, ["plot", "--evaluation", str(path), "--output-dir", str(tmp_path / "plots")])
    assert str(path) in line and field in line
    assert not (tmp_path / "model").exists() and not (tmp_path / "plots").exists()


# ------------------------------------------------------------------ an evaluation of another shape
@pytest.mark.parametrize("change, said", [
    (lambda e: e["settings"].pop("repeats"), "settings has no 'repeats'"),
    (lambda e: e.update(results=[3]), "results[0] is int"),
    (lambda e: e.update(settings=3), "'settings' is int"),
    (lambda e: e.update(results=[]), "'results' list is empty"),
    (lambda e: e["results"][0].pop("lambda_hat_mean"), "results[0] has no 'lambda_hat_mean'"),
    (lambda e: e["results"][0].update(eps="0.1"), "results[0].eps is '0.1'"),
    (lambda e: e["results"][0].update(violation_rate=1.5), "results[0].violation_rate is 1.5"),
    (lambda e: e["results"][0].update(test_risk_mean=7.0), "loss range"),
    (lambda e: e["settings"].update(n_cal=0), "settings.n_cal is 0"),
    (lambda e: e["settings"].update(n_test=1), "settings.n_cal + settings.n_test"),
    (lambda e: e.update(metadata=[1]), "'metadata' is list"),
])
def test_an_evaluation_of_another_shape_is_refused_naming_it(shipped, tmp_path, capsys, change, said):
    rc, evaluation = shipped
    evaluation = copy.deepcopy(evaluation)
    change(evaluation)
    path = tmp_path / "evaluation.json"
    path.write_text(json.dumps(evaluation), encoding="utf-8")
    with pytest.raises(CorruptFileError) as caught:
        write_guarantee_card(tmp_path / "model", rc, test_results=path)
    assert str(path) in str(caught.value) and said in str(caught.value)
    line = one_error_line(capsys, ["card", "--model", str(tmp_path / "model"), "--calibration",
                                   saved_calibration(rc, tmp_path), "--evaluation", str(path)])
    assert str(path) in line and said in line
    assert not (tmp_path / "model").exists()


def test_the_check_accepts_the_shipped_evaluations_and_a_bild_one():
    """The one check of an evaluation's shape is not stricter than what evaluate writes (early exit and BiLD)."""
    from pathlib import Path

    from hf_safe_exit.calibration.evaluate import validate_evaluation

    root = Path(__file__).resolve().parents[1] / "hf_safe_exit" / "default_model" / "calibration"
    for task in ("cnndm", "squad"):
        path = root / task / "evaluation.json"
        assert validate_evaluation(strict_json(path.read_text(encoding="utf-8")), path)["results"]
    table = synthetic_table("0123456789abcdef", "cnndm")
    layers = table.extras.pop("mean_exit_layer")
    table.extras.pop("layer_fraction")
    table.extras["large_calls_per_token"] = layers / 6  # a BiLD table's cost column
    bild = evaluate_table(table, eps=(0.1,), methods=("ucb",), repeats=2)
    assert validate_evaluation(bild)["results"][0]["large_calls_per_token"] > 0


# ------------------------------------------------------------------ a loss table whose extras are not numbers
@pytest.mark.parametrize("spoil", [
    pytest.param(lambda ex: {k: np.full(np.shape(v), np.nan) for k, v in ex.items()}, id="all-extras-nan"),
    pytest.param(lambda ex: {**ex, "task_loss": np.full(np.shape(ex["task_loss"]), np.nan)}, id="task-loss-nan"),
    pytest.param(lambda ex: {**ex, "wall_time": np.full(np.shape(ex["wall_time"]), np.inf)}, id="wall-time-inf"),
])
def test_a_table_with_nan_extras_is_refused_and_a_card_never_shows_nan(calibrated, tmp_path, spoil):
    _, _, good = calibrated
    table = synthetic_table(good.metadata["model_fingerprint"], "cnndm")
    with pytest.raises(ValueError, match="NaN or infinite"):  # such a table cannot be built (nor saved, nor read)
        LossTable(table.lambdas, table.losses, table.bounds, spoil(table.extras), table.metadata)
    table.extras = spoil(table.extras)  # changed in place after it was built: the card still shows no NaN
    rc = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)  # the losses are fine: it calibrates
    with pytest.raises(ValueError, match="NaN or infinite"):
        table.save(tmp_path / "t.npz")
    assert not (tmp_path / "t.npz").exists()
    path = write_guarantee_card(tmp_path, rc, table=table, model_name="m", save_calibration=False)
    text = path.read_text(encoding="utf-8")
    assert not NOT_A_NUMBER.search(text), NOT_A_NUMBER.search(text)
    values = [r.metric_value for r in ModelCard.load(path).data.eval_results]
    assert values and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
    assert our_results(ModelCard.load(path))["early_exit_threshold"].metric_value == rc.threshold
    assert "Not shown: the loss table's" in text  # what was left out is said, not hidden


@pytest.mark.parametrize("test_results, said", [({"test_risk": np.float32("nan")}, "not a finite number"),
                                                ({"test_risk": "0.05"}, "not a finite number"),
                                                ({"test_risk": 0.05, "n_test": 2.5}, "not a whole number")])
def test_held_out_numbers_that_are_not_numbers_are_refused(shipped, tmp_path, test_results, said):
    rc, _ = shipped
    with pytest.raises(ValueError, match=said):
        write_guarantee_card(tmp_path, rc, test_results=test_results)
    assert not (tmp_path / "README.md").exists()


# ------------------------------------------------------------------ evaluate never writes NaN
def test_evaluate_output_holds_no_nan_and_null_speedups_reach_card_and_plot(calibrated, tmp_path, capsys):
    from hf_safe_exit.cli import main

    _, _, good = calibrated
    table = synthetic_table(good.metadata["model_fingerprint"], "cnndm")
    table.extras["num_tokens"][:8] = 0  # below λ = 0.8 nothing was generated: no time per token to compare there
    table.save(tmp_path / "cnndm.npz")
    output = tmp_path / "evaluation.json"
    assert main(["evaluate", "--results", str(tmp_path / "cnndm.npz"), "--eps", "0.1,0.5", "--methods", "ucb,crc",
                 "--repeats", "3", "--output", str(output)]) == 0
    evaluation = strict_json(output.read_text(encoding="utf-8"))
    speedups = [r["speedup"] for r in evaluation["results"]]
    assert None in speedups and all(s is None or (math.isfinite(s) and s > 0) for s in speedups)
    assert all((r["speedup"] is None) == (r["speedup_std"] is None) for r in evaluation["results"])
    assert "—" in capsys.readouterr().out  # the printed table shows none, not nan

    rc = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    assert next(r for r in evaluation["results"] if r["method"] == "ucb" and r["eps"] == 0.1)["speedup"] is None
    plots = plot_evaluation(evaluation, tmp_path / "plots")
    path = write_guarantee_card(tmp_path / "model", rc, test_results=str(output), plots=plots, model_name="m")
    text = path.read_text(encoding="utf-8")
    assert not NOT_A_NUMBER.search(text) and "No speed-up is shown for the splits" in text
    strict_json((tmp_path / "model" / "calibration" / "cnndm" / "evaluation.json").read_text(encoding="utf-8"))


def test_evaluate_refuses_a_table_with_nan_extras_naming_it(calibrated, tmp_path, capsys):
    _, _, good = calibrated
    table = synthetic_table(good.metadata["model_fingerprint"], "cnndm")
    table.save(tmp_path / "cnndm.npz")
    # a file written by hand (no digest): LossTable.save writes no NaN
    with np.load(tmp_path / "cnndm.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(str(arrays["header_json"]))
    del header["digest"]
    arrays["header_json"] = np.array(json.dumps(header))
    arrays["extra__mean_exit_layer"] = np.full(np.shape(arrays["extra__mean_exit_layer"]), np.nan)
    np.savez(tmp_path / "cnndm.npz", **arrays)
    table.extras["mean_exit_layer"] = arrays["extra__mean_exit_layer"]  # in place: refused by evaluate itself
    line = one_error_line(capsys, ["evaluate", "--results", str(tmp_path / "cnndm.npz"), "--output",
                                   str(tmp_path / "evaluation.json"), "--repeats", "2"])
    assert str(tmp_path / "cnndm.npz") in line and "extras['mean_exit_layer']" in line and "collect" in line
    assert not (tmp_path / "evaluation.json").exists()
    with pytest.raises(CorruptFileError, match="mean_exit_layer"):
        evaluate_table(table, repeats=2)


# ------------------------------------------------------------------ a card path that cannot be a card
def test_a_card_path_that_is_a_directory_is_refused_naming_it(shipped, tmp_path, capsys):
    rc, _ = shipped
    (tmp_path / "card.md").mkdir()
    with pytest.raises(CorruptFileError, match="a directory, not a model card file") as caught:
        write_guarantee_card(tmp_path / "card.md", rc)
    assert str(tmp_path / "card.md") in str(caught.value)
    model = tmp_path / "model"
    (model / "README.md").mkdir(parents=True)
    line = one_error_line(capsys, ["card", "--model", str(model), "--calibration", saved_calibration(rc, tmp_path)])
    assert str(model / "README.md") in line and "a directory" in line and "Errno" not in line
    assert [p.name for p in model.iterdir()] == ["README.md"]  # no calibration or custom_generate/ written


def test_a_card_path_that_is_a_symlink_loop_is_refused_naming_it(shipped, tmp_path, capsys):
    rc, _ = shipped
    model = tmp_path / "model"
    model.mkdir()
    os.symlink("README.md", model / "README.md")  # points at itself
    with pytest.raises(CorruptFileError, match="symbolic link that loops") as caught:
        write_guarantee_card(model, rc)
    assert str(model / "README.md") in str(caught.value)
    line = one_error_line(capsys, ["card", "--model", str(model), "--calibration", saved_calibration(rc, tmp_path)])
    assert str(model / "README.md") in line and "loops" in line and "Errno" not in line
    assert [p.name for p in model.iterdir()] == ["README.md"]
