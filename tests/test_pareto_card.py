"""The model card of a method="pareto" calibration: what it states is checked against an independent reading of the
table (the split by its documented contract, the front by brute force, the default configuration's λ path by its
settings), its files are the calibration's, a table that is not the calibration's is refused, nothing is replaced
without overwrite, and the card's snippet runs and decodes the configuration chosen (against EarlyExit at it)."""

import json
import re
import warnings

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoTokenizer, T5ForConditionalGeneration

from hf_safe_exit import EarlyExit
from hf_safe_exit.cards import WouldOverwriteError, write_guarantee_card
from hf_safe_exit.cards.pareto_card import pareto_front_figure
from hf_safe_exit.config import EarlyExitConfig
from hf_safe_exit.errors import InconsistentCalibrationError
from hf_safe_exit.risk import (CALIBRATION_FILENAME, CONFIGURATIONS_FILENAME, RISK_CONTROL_FILENAME,
                               ConfigurationTable, RiskControlled)

from tiny_calibration import save_tiny_t5
from toy_configurations import model_table, one_run

pytestmark = pytest.mark.usefixtures("fresh_risk_cache")


def _fit(seed=2, eps=0.2, n=400):
    table = ConfigurationTable.from_tables(one_run(n=n))
    rc = RiskControlled(eps, 0.1, method="pareto", seed=seed).fit_table(table)
    assert rc.certificate.feasible and rc.certificate.front_size >= 2
    return rc, table


def _split(n, seed, opt_fraction=0.5):  # the split's documented contract (risk.pareto.split_examples)
    perm = np.random.default_rng(seed).permutation(n)
    n_opt = min(max(int(round(opt_fraction * n)), 1), n - 1)
    return np.sort(perm[:n_opt]), np.sort(perm[n_opt:])


def _brute_front(risk, cost):
    return [g for g in range(risk.size) if not any(
        risk[h] <= risk[g] and cost[h] <= cost[g] and (risk[h] < risk[g] or cost[h] < cost[g])
        for h in range(risk.size))]


def test_the_card_states_the_certificate_as_the_table_gives_it(tmp_path):
    rc, table = _fit()
    c = rc.certificate
    path = write_guarantee_card(tmp_path, rc, table=table)
    card = ModelCard.load(path)
    opt, test = _split(table.n, seed=2)
    losses = table.losses["performance_gap"]
    cost = np.asarray(table.costs["layer_fraction"], dtype=float)
    by_type = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert by_type["early_exit_threshold"] == c.threshold == table.settings[c.configuration_index]["threshold"]
    assert by_type["early_exit_calibration_risk"] == pytest.approx(losses[c.configuration_index, test].mean())
    risk_opt = losses[:, opt].mean(axis=1)
    cost_opt = cost if cost.ndim == 1 else cost[:, opt].mean(axis=1)
    front = _brute_front(risk_opt, cost_opt)
    text = card.text
    assert f"n_opt = {opt.size} that find the front and n_test = {test.size} that test it" in text
    assert f"{table.num_configurations}; {len(front)} on the front" in text
    distinct = {(round(risk_opt[g], 12), round(cost_opt[g], 12)) for g in front}
    assert f"{len(front)} configurations, {len(distinct)} distinct points" in text
    chosen = table.settings[c.configuration_index]
    assert f"measure {chosen['measure']}, schedule {chosen['schedule']}" in text and "1 − δ = 0.9" in text
    assert "Pareto Testing" in text and "None:" not in text  # not the naive method's words
    # its files: the figure, the calibration and the table it was fitted on
    assert (tmp_path / "hf_safe_exit_plots/toy/pareto_front.png").read_bytes()[:4] == b"\x89PNG"
    assert "](hf_safe_exit_plots/toy/pareto_front.png)" in text
    assert ConfigurationTable.load(tmp_path / "calibration/toy" / CONFIGURATIONS_FILENAME) == table
    again = RiskControlled.from_pretrained(tmp_path / "calibration/toy")
    assert again.certificate == c


def test_the_figure_draws_the_front_and_the_default_path_on_d_opt():
    rc, table = _fit()
    c = rc.certificate
    opt, _ = _split(table.n, seed=2)
    losses = table.losses["performance_gap"]
    # the default configuration (that of the full-model row) at every threshold, by threshold
    default = {k: v for k, v in table.settings[table.full_model_index].items() if k != "threshold"}
    rows = sorted((g for g, s in enumerate(table.settings)
                   if {k: v for k, v in s.items() if k != "threshold"} == default or s["threshold"] == 1.0),
                  key=lambda g: table.settings[g]["threshold"])
    figure = pareto_front_figure(c, table)
    (path_line,) = [line for line in figure.axes[0].lines if line.get_linestyle() == "--"]
    np.testing.assert_allclose(path_line.get_ydata(), losses[rows][:, opt].mean(axis=1), rtol=1e-12)
    cost = table.costs["layer_fraction"][:, opt].mean(axis=1)
    np.testing.assert_allclose(path_line.get_xdata(), cost[rows], rtol=1e-12)
    star = [coll for coll in figure.axes[0].collections if "decoded" in coll.get_label()]
    (x, y), = star[0].get_offsets()
    assert y == pytest.approx(losses[c.configuration_index, opt].mean()) and x == pytest.approx(cost[c.configuration_index])
    # filled: the first num_rejected of the front in testing order (p ≤ δ), at their D_opt estimates
    (filled,) = [coll for coll in figure.axes[0].collections if coll.get_label().startswith("front, certified")]
    order = sorted(_brute_front(losses[:, opt].mean(axis=1), cost), key=lambda g: (losses[g, opt].mean(), g))
    passed = [g for g, p in zip(order, c.front_p_value)][: c.num_rejected]
    np.testing.assert_allclose(filled.get_offsets()[:, 0], cost[passed], rtol=1e-12)
    assert not [line for line in pareto_front_figure(c).axes[0].lines if line.get_linestyle() == "--"]  # no table


def test_a_table_that_is_not_the_calibrations_is_refused_naming_it(tmp_path):
    rc, _ = _fit()
    other = ConfigurationTable.from_tables(one_run(n=400, seed=1))
    other.save(tmp_path / "other.npz")
    with pytest.raises(InconsistentCalibrationError, match="other.npz.*not the table this calibration was fitted on"):
        write_guarantee_card(tmp_path / "card", rc, table=tmp_path / "other.npz")
    assert not (tmp_path / "card").exists()
    # the same refusal for a wrong table stored beside the calibration, which the card would otherwise draw
    rc.save_pretrained(tmp_path / "card/calibration/toy")
    other.save(tmp_path / "card/calibration/toy")
    with pytest.raises(InconsistentCalibrationError, match=CONFIGURATIONS_FILENAME):
        write_guarantee_card(tmp_path / "card", rc)
    assert not (tmp_path / "card/README.md").exists()


def test_nothing_is_replaced_without_overwrite_and_the_1d_table_stays(tmp_path):
    rc, table = _fit()
    write_guarantee_card(tmp_path, rc, table=table)
    one_run(n=400)[0].save(tmp_path / "calibration/toy" / CALIBRATION_FILENAME)  # the scalar methods' 1-D table
    other, _ = _fit(seed=5, eps=0.25)
    assert other.certificate != rc.certificate
    before = (tmp_path / "calibration/toy" / RISK_CONTROL_FILENAME).read_bytes()
    with pytest.raises(WouldOverwriteError, match=RISK_CONTROL_FILENAME):
        write_guarantee_card(tmp_path, other, table=table)
    assert (tmp_path / "calibration/toy" / RISK_CONTROL_FILENAME).read_bytes() == before
    write_guarantee_card(tmp_path, other, table=table, overwrite=True)
    assert RiskControlled.from_pretrained(tmp_path / "calibration/toy").certificate == other.certificate
    assert (tmp_path / "calibration/toy" / CALIBRATION_FILENAME).is_file()  # a pareto card never removes it
    with pytest.raises(ValueError, match="pareto"):  # a scalar evaluation does not describe a Pareto choice
        write_guarantee_card(tmp_path, other, test_results={"test_risk": 0.01}, overwrite=True)


def test_the_cards_snippet_runs_and_decodes_the_configuration_chosen(tmp_path, one_thread):
    base = save_tiny_t5(tmp_path / "model", ["the council voted on the old depot", "a library for the town"], seed=0,
                        num_layers=3, num_decoder_layers=3)
    model = T5ForConditionalGeneration.from_pretrained(base).eval()
    table = model_table(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rc = RiskControlled(0.1, 0.1, method="pareto", risk="consistency").fit_table(table)
    write_guarantee_card(base, rc, table=table)
    text = (tmp_path / "model/README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1).replace("<this repo or directory>", base)
    assert "method='pareto'" in code
    namespace: dict = {}
    exec(compile(code, "card-snippet", "exec"), namespace)  # noqa: S102 - the card's own snippet, as a user runs it
    chosen = EarlyExitConfig(measure="saturation", schedule="decaying")
    assert rc.certificate.configuration == {**chosen.to_dict(), "threshold": 0.4}
    import hf_safe_exit

    reference = hf_safe_exit.enable(T5ForConditionalGeneration.from_pretrained(base).eval())
    expected = reference.generate(**namespace["inputs"], early_exit=EarlyExit(0.4, config=chosen), max_new_tokens=5)
    assert torch.equal(namespace["outputs"], expected)
    assert isinstance(AutoTokenizer.from_pretrained(base).batch_decode(expected), list)
    assert json.loads((tmp_path / "model/calibration/toy" / RISK_CONTROL_FILENAME).read_text())["params"]["method"] \
        == "pareto"


def test_the_cli_card_draws_the_configuration_table_stored_beside(tmp_path, capsys):
    from hf_safe_exit.cli import main

    rc, table = _fit()
    rc.save_pretrained(tmp_path / "cal")
    table.save(tmp_path / "cal")
    assert main(["card", "--model", str(tmp_path / "card"), "--calibration", str(tmp_path / "cal")]) == 0
    assert ConfigurationTable.load(tmp_path / "card/calibration/toy" / CONFIGURATIONS_FILENAME) == table
    assert "pareto_front.png" in capsys.readouterr().out
    text = (tmp_path / "card/README.md").read_text()
    opt, _ = _split(table.n, seed=2)
    cost = np.asarray(table.costs["layer_fraction"], dtype=float)
    front = _brute_front(table.losses["performance_gap"][:, opt].mean(axis=1),
                         cost if cost.ndim == 1 else cost[:, opt].mean(axis=1))
    assert f"{table.num_configurations}; {len(front)} on the front" in text


def test_a_calibration_that_certified_nothing_gets_a_card_that_says_so(tmp_path):
    table = ConfigurationTable.from_tables(one_run(n=40))
    with pytest.warns(UserWarning, match="λ̂ = 1"):
        rc = RiskControlled(0.001, 0.1, method="pareto").fit_table(table)
    c = rc.certificate
    assert not c.feasible and c.risk_bound is None
    path = write_guarantee_card(tmp_path, rc, table=table)
    card = ModelCard.load(path)
    by_type = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert by_type["early_exit_threshold"] == 1.0 and "early_exit_risk_bound" not in by_type
    assert table.settings[c.configuration_index]["threshold"] == 1.0
    assert "nothing below the full model certified" in card.text and "no speed-up" in card.text
    assert (tmp_path / "hf_safe_exit_plots/toy/pareto_front.png").is_file()


def test_to_model_card_and_the_section_alone_describe_the_pareto_choice():
    from hf_safe_exit.cards import render_guarantee_section, to_model_card

    rc, table = _fit()
    section = render_guarantee_section(rc)
    card = to_model_card(rc)
    for text in (section, card.text):
        assert "Pareto Testing" in text and f"n_test = {rc.certificate.n_test}" in text
        assert "leaves the decoder at the first layer whose confidence exceeds a threshold λ̂" not in text
    with pytest.raises(ValueError, match="pareto"):
        to_model_card(rc, test_results={"test_risk": 0.01})
    with pytest.raises(TypeError, match="ConfigurationTable"):
        write_guarantee_card("/nonexistent-card-dir", rc, table=one_run(n=400)[0])


def test_a_hub_push_compares_the_configuration_table_and_the_figure():
    from hf_safe_exit.cards.hub import _targets

    rc, _ = _fit()
    targets = _targets(rc, [])
    assert "calibration/toy/" + CONFIGURATIONS_FILENAME in targets
    assert "hf_safe_exit_plots/toy/pareto_front.png" in targets
