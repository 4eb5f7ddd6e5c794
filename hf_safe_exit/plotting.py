"""Figures in the style of Jazbec, Timans et al. (2024): risk and efficiency against the target risk ε.

:func:`plot_evaluation` takes the dict written by ``hf-safe-exit evaluate`` (or returned by
:func:`hf_safe_exit.calibration.evaluate.evaluate_table`) and writes three PNGs, one line per method
(CRC, UCB, LTT, ...):

* ``risk_vs_eps.png`` -- mean test risk (± one standard deviation over the splits) against ε, with the
  diagonal ``risk = ε`` that a valid method stays below (in expectation for CRC);
* ``exit_layer_vs_eps.png`` -- mean exit layer against ε (the full model's depth dashed); for a BiLD
  evaluation ``large_calls_vs_eps.png``, large-model calls per generated token;
* ``speedup_vs_eps.png`` -- speed-up over the full model against ε, per generated token (per call for
  an evaluation that records no token counts: the axis says which).

Every figure says what it measures: the repeated-split procedure (a λ̂ calibrated on each split), with
n_cal, n_test and the number of splits. Methods that give the same numbers (UCB and LTT often do) stay
distinguishable: each has its own marker, marker size and dash pattern, drawn from the largest hollow
marker to the smallest filled one, and the legend says which coincide.

Only finite numbers are drawn: an evaluation with a NaN, an infinity or a value out of range is refused
(:func:`~hf_safe_exit.calibration.evaluate.validate_evaluation`), and a speed-up the evaluation records as
null (no time per generated token) is left out, the figure saying how many points are missing.
"""

from __future__ import annotations

import os
from pathlib import Path

from .calibration.evaluate import BASES, validate_evaluation
from .lazy import require

__all__ = ["plot_evaluation", "build_figures", "METHOD_STYLES"]

_LABELS = {"crc": "CRC", "ucb": "UCB", "ltt": "LTT", "naive": "naive"}
# (marker, marker size, line style, hollow): sizes fall in drawing order, so a later line sits inside an earlier one
METHOD_STYLES = {"crc": ("o", 9, "-", True), "ucb": ("s", 7, "--", True), "ltt": ("^", 5, ":", False),
                 "naive": ("x", 5, "-.", False)}
_OTHER_STYLES = (("D", 6, (0, (5, 1, 1, 1)), True), ("v", 4, (0, (1, 1)), False))
_PER_TOKEN = "per generated token"


def _series(evaluation: dict) -> dict[str, list[dict]]:
    by_method: dict[str, list[dict]] = {}
    for row in evaluation["results"]:
        by_method.setdefault(row["method"], []).append(row)
    for rows in by_method.values():
        rows.sort(key=lambda r: r["eps"])
    return by_method


def _style(method: str, i: int) -> tuple:
    return METHOD_STYLES.get(method, _OTHER_STYLES[i % len(_OTHER_STYLES)])


def _labels(series: dict, key: str) -> dict[str, str]:
    """Legend labels; a method whose values equal an earlier method's at every ε says so ("LTT (= UCB)")."""
    out, seen = {}, {}
    for method, rows in series.items():
        values = tuple((r["eps"], None if r[key] is None else round(float(r[key]), 12)) for r in rows)
        label = _LABELS.get(method, method)
        out[method] = label + (f" (= {seen[values]})" if values in seen else "")
        seen.setdefault(values, label)
    return out


def _procedure_line(evaluation: dict) -> str:
    s = evaluation.get("settings", {})
    delta = f"; δ = {s['delta']:g} for UCB and LTT" if s.get("delta") is not None else ""
    return (f"repeated random splits: {s.get('repeats', '?')} splits, n_cal = {s.get('n_cal', '?')}, "
            f"n_test = {s.get('n_test', '?')}\na λ̂ calibrated on each split's n_cal examples{delta}")


def build_figures(evaluation: dict) -> list:
    """The three figures as ``(file name, matplotlib Figure)`` pairs (not saved; see :func:`plot_evaluation`)."""
    matplotlib = require("matplotlib", "plotting")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not evaluation.get("results"):
        raise ValueError("the evaluation has no results to plot: run `hf-safe-exit evaluate` first.")
    validate_evaluation(evaluation)  # a CorruptFileError for a NaN, an infinity or a malformed row
    series = _series(evaluation)
    settings, meta = evaluation.get("settings", {}), evaluation.get("metadata", {})
    title = " · ".join(str(x) for x in (meta.get("task"), settings.get("risk"), meta.get("measure")) if x)
    subtitle = _procedure_line(evaluation)
    all_eps = sorted({r["eps"] for r in evaluation["results"]})
    figures = []

    def draw(ax, key, err=None):
        labels = _labels(series, key)
        for i, (method, rows) in enumerate(series.items()):
            marker, size, dashes, hollow = _style(method, i)
            rows = [r for r in rows if r[key] is not None]  # a null speed-up: not measured, not drawn
            if not rows:
                continue
            eps, values = [r["eps"] for r in rows], [r[key] for r in rows]
            style = dict(marker=marker, ms=size, ls=dashes, lw=1.4, label=labels[method], zorder=2 + i)
            if hollow:
                style["mfc"] = "none"
            if err is not None:
                ax.errorbar(eps, values, yerr=[r[err] for r in rows], capsize=2, **style)
            else:
                ax.plot(eps, values, **style)

    def figure(ylabel, name, key, err=None, level=None, level_label=None):
        fig, ax = plt.subplots(figsize=(5.2, 4.0))
        if level is not None:
            ax.axhline(level, color="gray", lw=1, ls="--", label=level_label, zorder=1)
        if name == "risk_vs_eps.png":
            ax.plot([0, max(all_eps)], [0, max(all_eps)], color="black", lw=1, ls="--", label="risk = ε", zorder=1)
        draw(ax, key, err)
        missing = sum(r[key] is None for r in evaluation["results"])
        if missing:  # said on the figure: a point left out is not a point measured elsewhere
            why = ("collect decoded the thresholds as one batch;\n`collect --time-each-threshold` measures them"
                   if evaluation.get("speedup_basis") == BASES[2] else
                   "(no time per generated token at some split's threshold)")
            ax.text(0.02, 0.02, f"{missing} of {len(evaluation['results'])} points not measured: the evaluation "
                    f"records none\n{why}", ha="left", va="bottom",
                    transform=ax.transAxes, fontsize=7)
        ax.set_xlabel("target risk ε")
        ax.set_ylabel(ylabel)
        fig.suptitle(title, fontsize=9)
        ax.set_title(subtitle, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        figures.append((name, fig))

    figure("test risk\n(mean ± sd over the splits)", "risk_vs_eps.png", "test_risk_mean", err="test_risk_std")
    first = next(iter(series.values()))[0]
    if "mean_exit_layer" in first:  # early exit: mean exit layer against the decoder depth
        figure("mean exit layer on the test examples", "exit_layer_vs_eps.png", "mean_exit_layer",
               level=meta.get("num_decoder_layers"), level_label="full model")
    else:  # BiLD: large-model passes per generated token (1 = the large model alone)
        figure("large-model calls per token", "large_calls_vs_eps.png", "large_calls_per_token", level=1.0,
               level_label="large model alone")
    basis = evaluation.get("speedup_basis") or "per call (basis not recorded)"
    figure(f"speed-up vs the full model (×)\n{basis}", "speedup_vs_eps.png", "speedup", level=1.0,
           level_label="full model")
    return figures


def plot_evaluation(evaluation: dict, output_dir: str | os.PathLike) -> list[Path]:
    """Write the three figures into ``output_dir``; returns their paths."""
    figures = build_figures(evaluation)  # imports matplotlib, or names the extra that installs it
    import matplotlib.pyplot as plt

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures:
        # no timestamp in the PNG: the same evaluation gives the same bytes, so a card can tell a changed plot
        fig.savefig(out / name, dpi=120, metadata={"Software": None})
        plt.close(fig)
        paths.append(out / name)
    return paths
