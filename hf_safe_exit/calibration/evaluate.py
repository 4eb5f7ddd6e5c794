"""Held-out evaluation of risk-controlled early exit from one collected results file (the paper's protocol).

The examples of a :class:`~hf_safe_exit.risk.loss_table.LossTable` (collected on the
calibration/test pool) are split at random into a calibration part of ``n_cal`` examples
and a test part (the rest), ``repeats`` times. On each split and for each method and ε, λ̂
is chosen on the calibration part (:func:`hf_safe_exit.risk.select`) and measured on the test
part: test risk (mean loss of the chosen risk at λ̂), mean exit layer, fraction of decoder
layers executed, task loss, and the speed-up ``wall_time[λ=1] / wall_time[λ̂]`` (wall times
of the whole pool at each λ, measured in the same collect run). Reported per (method, ε):
means and standard deviations over the splits, the rate of splits whose test risk exceeds
ε (violations), the mean λ̂ and the rate of splits with no early exit (λ̂ = 1).

CRC controls the mean test risk (≤ ε in expectation); UCB and LTT control the violation
rate (≤ δ).
"""

from __future__ import annotations

import numpy as np

__all__ = ["evaluate_table", "format_table", "DEFAULT_EPS", "DEFAULT_METHODS"]

DEFAULT_EPS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2)
DEFAULT_METHODS = ("crc", "ucb", "ltt")


def evaluate_table(table, eps=DEFAULT_EPS, methods=DEFAULT_METHODS, delta: float = 0.1, bound: str = "wsr",
                   risk: str = "performance_gap", n_cal: int | None = None, repeats: int = 100, seed: int = 0,
                   monotonize: str | None = None) -> dict:
    """Repeated random calibration/test splits of ``table``; returns a JSON-able dict (see the module docstring).

    ``n_cal`` defaults to half the examples. ``delta`` applies to ``ucb`` and ``ltt`` only.
    """
    from ..risk.selection import METHODS, select

    if risk not in table.losses:
        raise ValueError(f"the results file has no {risk!r} losses (it has {sorted(table.losses)}): pick one with --risk.")
    methods = tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown}: use some of {METHODS}.")
    eps = tuple(float(e) for e in eps)
    if not eps or not all(0.0 < e < 1.0 for e in eps):
        raise ValueError(f"eps values must lie in (0, 1), got {list(eps)}.")
    n = table.n
    n_cal = n // 2 if n_cal is None else int(n_cal)
    if not 1 <= n_cal < n:
        raise ValueError(f"n_cal={n_cal} must leave at least one test example: use 1 <= n_cal < {n} (the number of "
                         "examples in the results file).")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} must be a positive integer.")
    for key in ("mean_exit_layer", "layer_fraction", "wall_time", "task_loss"):
        if key not in table.extras:
            raise ValueError(f"the results file lacks extras[{key!r}]: it was not written by `hf-safe-exit collect`; "
                             "recollect it.")

    lam = table.lambdas
    losses = table.losses[risk]
    bounds = table.bounds[risk]
    exit_layer, fraction = table.extras["mean_exit_layer"], table.extras["layer_fraction"]
    task_loss, wall = table.extras["task_loss"], np.asarray(table.extras["wall_time"], dtype=np.float64)
    full = int(np.argmin(np.abs(lam - 1.0)))
    rng = np.random.default_rng(seed)
    splits = [rng.permutation(n) for _ in range(repeats)]

    rows = []
    for method in methods:
        for e in eps:
            rec = {k: [] for k in ("test_risk", "lambda_hat", "feasible", "mean_exit_layer", "layer_fraction",
                                   "task_loss", "speedup")}
            for perm in splits:
                cal, test = perm[:n_cal], perm[n_cal:]
                sel = select(method, lam, losses[:, cal], e, delta if method in ("ucb", "ltt") else None,
                             bound=bound, loss_bounds=bounds, monotonize=monotonize)
                k = sel.index
                rec["test_risk"].append(losses[k, test].mean())
                rec["lambda_hat"].append(sel.lambda_hat)
                rec["feasible"].append(sel.feasible)
                rec["mean_exit_layer"].append(exit_layer[k, test].mean())
                rec["layer_fraction"].append(fraction[k, test].mean())
                rec["task_loss"].append(task_loss[k, test].mean())
                rec["speedup"].append(wall[full] / wall[k] if wall[k] > 0 else float("nan"))
            arr = {k: np.asarray(v, dtype=np.float64) for k, v in rec.items()}
            rows.append({
                "method": method, "eps": e, "delta": delta if method in ("ucb", "ltt") else None,
                "bound": bound if method == "ucb" else ("hoeffding_bentkus" if method == "ltt" else None),
                "test_risk_mean": float(arr["test_risk"].mean()), "test_risk_std": float(arr["test_risk"].std()),
                "violation_rate": float((arr["test_risk"] > e).mean()),
                "lambda_hat_mean": float(arr["lambda_hat"].mean()),
                "no_exit_rate": float(1.0 - arr["feasible"].mean()),
                "mean_exit_layer": float(arr["mean_exit_layer"].mean()),
                "mean_exit_layer_std": float(arr["mean_exit_layer"].std()),
                "layer_fraction": float(arr["layer_fraction"].mean()),
                "task_loss": float(arr["task_loss"].mean()),
                "speedup": float(np.nanmean(arr["speedup"])), "speedup_std": float(np.nanstd(arr["speedup"])),
            })
    meta = table.metadata
    return {
        "settings": {"eps": list(eps), "methods": list(methods), "delta": delta, "bound": bound, "risk": risk,
                     "n": n, "n_cal": n_cal, "n_test": n - n_cal, "repeats": repeats, "seed": seed,
                     "monotonize": monotonize, "loss_bounds": list(bounds)},
        "metadata": {k: meta.get(k) for k in ("task", "model_fingerprint", "measure", "schedule", "min_exit_layer",
                                              "num_decoder_layers", "max_new_tokens", "versions")},
        "full_model": {"mean_exit_layer": float(exit_layer[full].mean()), "task_loss": float(task_loss[full].mean()),
                       "wall_time": float(wall[full])},
        "results": rows,
    }


def format_table(evaluation: dict) -> str:
    """A readable fixed-width table of :func:`evaluate_table`'s results."""
    s = evaluation["settings"]
    meta = evaluation.get("metadata", {})
    full = evaluation["full_model"]
    head = (f"task={meta.get('task')} risk={s['risk']} measure={meta.get('measure')} n_cal={s['n_cal']} "
            f"n_test={s['n_test']} repeats={s['repeats']} delta={s['delta']} | full model: task loss "
            f"{full['task_loss']:.4f}, exit layer {full['mean_exit_layer']:.2f}")
    cols = ("method", "eps", "test risk", "viol.", "λ̂", "no exit", "exit layer", "layers", "speedup", "task loss")
    lines = [head, " ".join(f"{c:>10}" for c in cols)]
    for r in evaluation["results"]:
        lines.append(" ".join([
            f"{r['method']:>10}", f"{r['eps']:>10.3g}", f"{r['test_risk_mean']:>+10.4f}", f"{r['violation_rate']:>10.2f}",
            f"{r['lambda_hat_mean']:>10.4f}", f"{r['no_exit_rate']:>10.2f}", f"{r['mean_exit_layer']:>10.2f}",
            f"{r['layer_fraction']:>10.3f}", f"{r['speedup']:>10.2f}", f"{r['task_loss']:>10.4f}"]))
    return "\n".join(lines)
