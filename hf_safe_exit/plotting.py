"""Figures in the style of Jazbec, Timans et al. (2024): risk and efficiency against the target risk ε.

:func:`plot_evaluation` takes the dict written by ``hf-safe-exit evaluate`` (or returned by
:func:`hf_safe_exit.calibration.evaluate.evaluate_table`) and writes three PNGs, one line
per method (CRC, UCB, LTT, ...):

* ``risk_vs_eps.png`` -- mean test risk (± one standard deviation over the splits) against
  ε, with the diagonal ``risk = ε`` that a valid method stays below (in expectation for CRC);
* ``exit_layer_vs_eps.png`` -- mean exit layer against ε (the full model's depth dashed); for a BiLD
  evaluation ``large_calls_vs_eps.png``, large-model calls per generated token;
* ``speedup_vs_eps.png`` -- wall-time speed-up over the full model against ε.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["plot_evaluation"]

_LABELS = {"crc": "CRC", "ucb": "UCB", "ltt": "LTT", "naive": "naive"}


def _series(evaluation: dict):
    by_method: dict[str, list[dict]] = {}
    for row in evaluation["results"]:
        by_method.setdefault(row["method"], []).append(row)
    for rows in by_method.values():
        rows.sort(key=lambda r: r["eps"])
    return by_method


def plot_evaluation(evaluation: dict, output_dir: str | os.PathLike) -> list[Path]:
    """Write the three figures into ``output_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not evaluation.get("results"):
        raise ValueError("the evaluation has no results to plot: run `hf-safe-exit evaluate` first.")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    series = _series(evaluation)
    settings, meta = evaluation.get("settings", {}), evaluation.get("metadata", {})
    title = f"{meta.get('task') or ''} · {settings.get('risk', '')} · {meta.get('measure') or ''}".strip(" ·")
    all_eps = sorted({r["eps"] for r in evaluation["results"]})
    paths = []

    def finish(fig, ax, ylabel, name):
        ax.set_xlabel("target risk ε")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.plot([0, max(all_eps)], [0, max(all_eps)], color="black", lw=1, ls="--", label="risk = ε")
    for method, rows in series.items():
        eps = [r["eps"] for r in rows]
        ax.errorbar(eps, [r["test_risk_mean"] for r in rows], yerr=[r["test_risk_std"] for r in rows], marker="o",
                    ms=3, capsize=2, label=_LABELS.get(method, method))
    finish(fig, ax, "test risk", "risk_vs_eps.png")

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    first = next(iter(series.values()))[0]
    if "mean_exit_layer" in first:  # early exit: mean exit layer against the decoder depth
        cost, ylabel, name, full_level = "mean_exit_layer", "mean exit layer", "exit_layer_vs_eps.png", \
            meta.get("num_decoder_layers")
    else:  # BiLD: large-model passes per generated token (1 = the large model alone)
        cost, ylabel, name, full_level = "large_calls_per_token", "large-model calls per token", \
            "large_calls_vs_eps.png", 1.0
    if full_level:
        ax.axhline(full_level, color="gray", lw=1, ls="--", label="full model")
    for method, rows in series.items():
        ax.plot([r["eps"] for r in rows], [r[cost] for r in rows], marker="o", ms=3,
                label=_LABELS.get(method, method))
    finish(fig, ax, ylabel, name)

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.axhline(1.0, color="gray", lw=1, ls="--", label="full model")
    for method, rows in series.items():
        ax.plot([r["eps"] for r in rows], [r["speedup"] for r in rows], marker="o", ms=3,
                label=_LABELS.get(method, method))
    finish(fig, ax, "speed-up (wall time, ×)", "speedup_vs_eps.png")
    return paths
