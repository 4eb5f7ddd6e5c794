"""Every figure says what it measures (the repeated-split procedure, n_cal, n_test, splits) and keeps coinciding
methods apart; the PNGs are real images, the same bytes for the same evaluation."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from hf_safe_exit import LossTable
from hf_safe_exit.calibration.evaluate import evaluate_table
from hf_safe_exit.plotting import build_figures, plot_evaluation


@pytest.fixture(scope="module")
def evaluation():
    rng = np.random.default_rng(0)
    lambdas = np.linspace(0, 1, 11)
    task_loss = np.clip(0.5 + (1 - lambdas)[:, None] * rng.normal(0.2, 0.2, (11, 240)), 0, 1)
    task_loss[-1] = 0.5
    layers = 1 + 3 * lambdas[:, None] * np.ones((1, 240))
    extras = {"mean_exit_layer": layers, "layer_fraction": layers / 4, "wall_time": 1 + lambdas,
              "num_tokens": rng.integers(5, 20, (11, 240))}
    table = LossTable.from_task_losses(lambdas, task_loss, extras=extras, metadata={
        "task": "cnndm", "measure": "softmax", "num_decoder_layers": 4})
    result = evaluate_table(table, eps=(0.05, 0.1, 0.2), methods=("crc", "ucb", "ltt"), delta=0.1, n_cal=90,
                            repeats=7)
    # make LTT coincide with UCB at every ε, as on the shipped model: the figure must still show both
    ucb = {r["eps"]: r for r in result["results"] if r["method"] == "ucb"}
    for r in result["results"]:
        if r["method"] == "ltt":
            r.update({k: v for k, v in ucb[r["eps"]].items() if k not in ("method", "bound")})
    return result


def _texts(fig) -> str:
    ax = fig.axes[0]
    return " ".join([fig._suptitle.get_text() if fig._suptitle else "", ax.get_title(), ax.get_xlabel(),
                     ax.get_ylabel()])


def test_every_figure_names_the_procedure_n_cal_n_test_and_repeats(evaluation):
    figures = dict(build_figures(evaluation))
    assert set(figures) == {"risk_vs_eps.png", "exit_layer_vs_eps.png", "speedup_vs_eps.png"}
    for name, fig in figures.items():
        text = _texts(fig)
        assert "repeated random splits: 7 splits, n_cal = 90, n_test = 150" in text, name
        assert "a λ̂ calibrated on each split" in text and "δ = 0.1" in text, name
        assert "cnndm" in text and "performance_gap" in text and "softmax" in text, name
        assert fig.axes[0].get_xlabel() == "target risk ε"
    assert "per generated token" in figures["speedup_vs_eps.png"].axes[0].get_ylabel()
    assert "mean ± sd over the splits" in figures["risk_vs_eps.png"].axes[0].get_ylabel()

    old = copy.deepcopy(evaluation)
    del old["speedup_basis"]  # an evaluation written before per-token speed-ups
    assert "per call" in dict(build_figures(old))["speedup_vs_eps.png"].axes[0].get_ylabel()


def test_coinciding_methods_stay_distinguishable(evaluation):
    for name, fig in build_figures(evaluation):
        ax = fig.axes[0]
        handles, names = ax.get_legend_handles_labels()
        # an errorbar's legend entry is its container; its first artist is the data line
        lines = {n: (h[0] if isinstance(h, tuple) else h) for h, n in zip(handles, names)}
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "LTT (= UCB)" in labels and "UCB" in labels and "CRC" in labels, (name, labels)
        methods = [lines[label] for label in ("CRC", "UCB", "LTT (= UCB)")]
        styles = [(m.get_marker(), m.get_markersize(), m.get_linestyle()) for m in methods]
        assert len({s[0] for s in styles}) == 3 and len({s[1] for s in styles}) == 3 and len({s[2] for s in styles}) == 3
        ucb, ltt = lines["UCB"], lines["LTT (= UCB)"]
        assert np.array_equal(ucb.get_ydata(), ltt.get_ydata())  # the same numbers ...
        assert ltt.get_markersize() < ucb.get_markersize() and ucb.get_markerfacecolor() == "none"  # ... both seen
        assert ltt.get_zorder() > ucb.get_zorder()  # the small filled marker drawn inside the large hollow one


def test_pngs_are_written_and_reproducible(evaluation, tmp_path):
    first = plot_evaluation(evaluation, tmp_path / "a")
    second = plot_evaluation(evaluation, tmp_path / "b")
    for p, q in zip(first, second):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert data == q.read_bytes()  # so a card can tell a changed plot from the same one


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\xff\x00", b"", b'{"settings": {"n": 4}, "results": [',
                                     b"[1, 2]", b'{"model_type": "t5"}'])
def test_cli_plot_refuses_a_bad_evaluation_naming_it(content, tmp_path, capsys, monkeypatch):
    from hf_safe_exit.cli import main
    from hf_safe_exit.errors import CorruptFileError

    from cli_lines import one_error_line

    path = tmp_path / "evaluation.json"
    path.write_bytes(content)
    argv = ["plot", "--evaluation", str(path), "--output-dir", str(tmp_path / "figures")]
    line = one_error_line(capsys, argv)
    assert str(path) in line and "hf-safe-exit evaluate" in line
    monkeypatch.setenv("HF_SAFE_EXIT_DEBUG", "1")  # the exception itself: of the family the README names
    with pytest.raises(CorruptFileError):
        main(argv)
    assert not (tmp_path / "figures").exists()
