"""The card of a ``method="pareto"`` calibration: the configuration chosen, its guarantee, and the front it came from.

Pareto Testing (Laufer-Goldshtein et al., ICLR 2023, Algorithm 1; :mod:`hf_safe_exit.risk.pareto`) finds a front of
configurations on one part of the calibration examples (D_opt) and tests it on the other (D_test). The section
states the guarantee for the configuration chosen, its settings, the split, the front's size and how much of it
passed; the figure (:func:`pareto_front_figure`) draws the front (risk against cost on D_opt, the certificate's own
numbers), the configurations that passed the test, the one chosen and, when the configuration table is at hand, the
λ path of the table's default configuration on the same D_opt rows: what a scalar-λ calibration of that one
configuration chooses among.

The table (``early_exit_configurations.npz``) is only used when it reproduces the certificate
(:func:`~hf_safe_exit.risk.pareto_integrity.refit_problem`); a table that does not is refused, naming the file.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import InconsistentCalibrationError
from ..risk.configuration_table import ConfigurationTable
from ..risk.pareto import split_examples
from ..risk.pareto_integrity import refit_problem
from .render import dataset_words, decoding_rows, plot_lines, section_markers, section_title, use_it_snippet
from .vocabulary import guarantee_statement, risk_definition, risk_words, task_info

__all__ = ["PARETO_PLOT_NAME", "check_configuration_table", "default_path", "pareto_front_figure",
           "render_pareto_section"]

PARETO_PLOT_NAME = "pareto_front.png"


def check_configuration_table(table: ConfigurationTable, controlled, where) -> None:
    """``InconsistentCalibrationError`` naming ``where`` unless refitting the calibration's request on ``table``
    gives its certificate (so the figure draws the table the guarantee came from)."""
    try:
        problem = refit_problem(controlled.controller().get_params(), controlled.certificate.to_dict(), table)
    except ValueError as err:  # another risk or cost than the table has
        raise InconsistentCalibrationError(f"{where}: the calibration cannot be refitted on this configuration "
                                           f"table ({err}): pass the table it was fitted on, or none.") from None
    if problem is not None:
        what, refit, stored = problem
        raise InconsistentCalibrationError(
            f"{where}: refitting the calibration on this configuration table gives {what} = {refit!r}, but the "
            f"calibration states {stored!r}: it is not the table this calibration was fitted on. Pass the table it "
            "was fitted on, or none (the figure then draws the front from the certificate alone).")


def default_path(table: ConfigurationTable) -> np.ndarray:
    """Rows of the table's default configuration (that of its full-model row, the threshold aside: the first
    configuration collected, e.g. the model's own), by threshold ascending: the λ path a scalar method calibrates on
    that configuration."""
    def plain(setting):
        return {k: v for k, v in setting.items() if k != "threshold"}

    default = plain(table.settings[table.full_model_index])
    rows = [g for g, s in enumerate(table.settings) if plain(s) == default or g == table.full_model_index]
    return np.array(sorted(rows, key=lambda g: table.settings[g]["threshold"]), dtype=int)


def pareto_front_figure(certificate, table: ConfigurationTable | None = None):
    """A matplotlib figure: the front on D_opt (estimated cost against estimated risk), the configurations that
    passed the test filled, the one decoded starred, ε as a line; with ``table``, the default configuration's λ
    path on the same D_opt rows (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = certificate
    risk, cost = np.asarray(c.front_risk, dtype=float), np.asarray(c.front_cost, dtype=float)
    k = c.num_rejected
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    order = np.argsort(cost)
    ax.step(cost[order], risk[order], "k-", where="post", lw=0.8, alpha=0.6)
    ax.scatter(cost[k:], risk[k:], s=22, facecolors="none", edgecolors="C0", label="front, not certified")
    ax.scatter(cost[:k], risk[:k], s=22, color="C0", label="front, certified (p ≤ δ on D_test)")
    if table is not None:
        rows = default_path(table)
        opt = split_examples(table.n, c.opt_fraction, c.seed)[0]
        losses, costs = table.losses[c.risk], np.asarray(table.costs[c.cost], dtype=float)
        path_risk = losses[rows][:, opt].mean(axis=1)
        path_cost = costs[rows] if costs.ndim == 1 else costs[rows][:, opt].mean(axis=1)
        first = table.settings[rows[0]]
        ax.plot(path_cost, path_risk, "--", color="C3", marker=".", lw=1,
                label=f"λ path of the table's first configuration ({first['measure']}, {first['schedule']})")
    if c.feasible:
        at = c.front.index(c.configuration_index)
        ax.scatter([cost[at]], [risk[at]], marker="*", s=180, color="C1", zorder=3,
                   label=f"decoded: row {c.configuration_index}, λ = {c.threshold:.3g}")
    ax.axhline(c.eps, color="grey", lw=0.8, ls=":", label=f"ε = {c.eps:g}")
    ax.set(xlabel=f"{c.cost} (estimated on D_opt, n = {c.n_opt})", ylabel=f"mean {c.risk} (D_opt)",
           title=f"Pareto Testing: {len(c.front)} on the front of {c.num_configurations} configurations, δ = {c.delta:g}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _configuration_words(setting: dict) -> str:
    schedule = setting["schedule"] + (f" (τ = {setting['decay_tau']:g})" if setting["schedule"] == "decaying" else "")
    layers = setting.get("exit_layers")
    return (f"measure {setting['measure']}, schedule {schedule}, first exit layer {setting['min_exit_layer']}"
            + (f", confidence checked after layers {', '.join(map(str, layers))}" if layers else "")
            + f", λ = {setting['threshold']:.6g}")


def _settings(controlled, rows: str | None, dataset_name: str | None) -> list[str]:
    c = controlled.certificate
    info = task_info(c.task)
    data = dataset_words(c.task, dataset_name)
    certified = "" if c.feasible else " (nothing below the full model certified: no early exit)"
    lines = ["| | |", "|---|---|",
             f"| Method | Pareto Testing (Laufer-Goldshtein et al. 2023), {c.bound} p-values, fixed-sequence testing |",
             f"| Target risk | ε = {c.eps:g}, δ = {c.delta:g} |",
             f"| Risk | {risk_definition(c.risk, info.metric)}; loss range [{c.loss_bounds[0]:g}, {c.loss_bounds[1]:g}] |",
             f"| Calibration data | {data}" + (f": {rows}" if rows else "") + f"; n = {c.n}, split at random (seed "
             f"{c.seed}) into n_opt = {c.n_opt} that find the front and n_test = {c.n_test} that test it |",
             f"| Configurations | {c.num_configurations}; {len(c.front)} on the front, the first {c.num_rejected} in "
             f"testing order certified; cost minimised: {c.cost} |",
             f"| Configuration decoded | {_configuration_words(c.configuration)}{certified} |",
             f"| Test-part risk of it | {c.empirical_risk:+.4f} (mean over the n_test = {c.n_test} examples) |"]
    if c.feasible:
        lines.append(f"| Risk bound of it | {c.risk_bound:+.4f} (p-value {c.p_value:.3g} ≤ δ = {c.delta:g}) |")
    return lines + decoding_rows(controlled) + [""]


def _front_words(c) -> str:
    """The front's distinct (risk, cost) points in testing order, with how many configurations share each (several
    configurations that exit alike, e.g. every λ below the lowest confidence, give one point)."""
    points: list[list] = []
    for r, k in zip(c.front_risk, c.front_cost):
        if points and points[-1][:2] == [r, k]:
            points[-1][2] += 1
        else:
            points.append([r, k, 1])
    shown = points if len(points) <= 12 else points[:6] + [None] + points[-5:]
    words = ", ".join("…" if p is None else f"{p[0]:+.3f} at {p[1]:.3f}" + (f" (×{p[2]})" if p[2] > 1 else "")
                      for p in shown)
    return (f"Estimated mean {c.risk} at estimated {c.cost} on the n_opt = {c.n_opt} examples, in testing order "
            f"({len(c.front)} configurations, {len(points)} distinct points; the first {c.num_rejected} certified): "
            f"{words}.")


def render_pareto_section(controlled, *, plots: Sequence[str] = (), rows: str | None = None,
                          dataset_name: str | None = None, repo_id: str | None = None,
                          calibration_subfolder: str | None = None) -> str:
    """The Markdown of a Pareto calibration's guarantee section, between the markers of its task."""
    c = controlled.certificate
    start, end = section_markers(c.task)
    metric = task_info(c.task).metric
    lines = [start, section_title(c.task), "",
             "This model can decode with token-level early exit (the `hf_safe_exit` library). The whole early-exit "
             "configuration (confidence measure, threshold schedule, exit layers and threshold λ) was chosen on "
             f"calibration data among {c.num_configurations} so that the {risk_words(c.risk, metric)} (the *full "
             "model* runs every decoder layer) is controlled:", "",
             "> **Guarantee.** " + guarantee_statement(c, metric), "",
             "It assumes that the examples you decode are exchangeable with the calibration examples and holds for "
             "this model (fingerprint below) decoded with the configuration below.", ""]
    lines += _settings(controlled, rows, dataset_name)
    lines += ["### The front", "", _front_words(c), ""]
    lines += plot_lines(plots)
    lines += use_it_snippet(controlled, repo_id, calibration_subfolder) + [end]
    return "\n".join(lines) + "\n"
