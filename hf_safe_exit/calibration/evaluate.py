"""Held-out evaluation of risk-controlled early exit from one collected results file (the paper's protocol).

The examples of a :class:`~hf_safe_exit.risk.loss_table.LossTable` (collected on the
calibration/test pool) are split at random into a calibration part of ``n_cal`` examples
and a test part (the rest), ``repeats`` times. On each split and for each method and ε, λ̂
is chosen on the calibration part (:func:`hf_safe_exit.risk.select`) and measured on the test
part: test risk (mean loss of the chosen risk at λ̂), mean exit layer, fraction of decoder
layers executed, task loss, and the speed-up per generated token,
``(wall_time[λ=1] / tokens[λ=1]) / (wall_time[λ̂] / tokens[λ̂])`` (wall times and generated tokens of the
whole pool at each λ, measured in the same collect run; outputs of different lengths are compared per
token, never call for call). Reported per (method, ε):
means and standard deviations over the splits, the rate of splits whose test risk exceeds
ε (violations), the mean λ̂ and the rate of splits with no early exit (λ̂ = 1).

CRC controls the mean test risk (≤ ε in expectation); UCB and LTT control the violation
rate (≤ δ).

Every number in an evaluation is finite: a loss table whose extras hold NaN, infinity or out-of-range values
(a failed measurement) is refused, and ``speedup``/``speedup_std`` are ``null`` when some split's threshold
has no time per generated token (its whole pool generated no token, or took no time): a mean over the other
splits would describe another procedure. :func:`validate_evaluation` checks the whole shape and every value;
:func:`read_evaluation` and every reader of an evaluation (cards, plots) go through it. The evaluation records
the digest of the table it evaluated (``table_digest``), and :func:`write_evaluation` writes it with its own
content digest (see :mod:`hf_safe_exit.calibration.evaluation_file`).

A BiLD results file (``collect --strategy bild``: λ = exp(−rollback)) is evaluated the same way;
its cost column is ``large_calls_per_token`` (large-model passes per generated token, 1 = the large
model alone) instead of the exit layer and layer fraction, and "no exit" means λ̂ = 1 (rollback 0).
"""

from __future__ import annotations

import os

import numpy as np

from ..config import config_fields
from ..errors import CorruptFileError
from .evaluation_file import BASES, evaluation_problem, read_evaluation, validate_evaluation, write_evaluation
from .grid import BATCHED_TIMING

__all__ = ["evaluate_table", "format_table", "read_evaluation", "validate_evaluation", "write_evaluation",
           "DEFAULT_EPS", "DEFAULT_METHODS", "BASES"]

DEFAULT_EPS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2)
DEFAULT_METHODS = ("crc", "ucb", "ltt")


def _check_extras(table, keys, source) -> None:
    """Refuse extras that hold a value that is not a finite number in range: a measurement that failed in collect."""
    for key in keys:
        values = np.asarray(table.extras[key], dtype=np.float64)
        if key == "task_loss":  # a task's own loss: any finite number
            good, words = np.isfinite(values), "finite numbers"
        elif key == "layer_fraction":
            good, words = np.isfinite(values) & (values >= 0) & (values <= 1), "finite numbers in [0, 1]"
        else:  # layers, large-model calls, tokens and seconds
            good, words = np.isfinite(values) & (values >= 0), "finite numbers >= 0"
        if not good.all():
            k = int(np.argwhere(~good)[0][0])
            raise CorruptFileError.about(
                source, f"the results file's extras[{key!r}] holds {int((~good).sum())} value(s) that are not {words} "
                f"(the first at λ = {table.lambdas[k]:g}: {float(values[~good][0])!r}); collect did not measure them",
                "Recollect it with `hf-safe-exit collect`")


def evaluate_table(table, eps=DEFAULT_EPS, methods=DEFAULT_METHODS, delta: float = 0.1, bound: str = "wsr",
                   risk: str = "performance_gap", n_cal: int | None = None, repeats: int = 100, seed: int = 0,
                   monotonize: str | None = None, *, source: str | os.PathLike | None = None) -> dict:
    """Repeated random calibration/test splits of ``table``; returns a JSON-able dict (see the module docstring).

    ``n_cal`` defaults to half the examples. ``delta`` applies to ``ucb`` and ``ltt`` only. ``source`` is the
    table's file, named when its extras are refused. The dict passes :func:`validate_evaluation`: every number
    in it is finite (``json.dumps(..., allow_nan=False)`` writes it).
    """
    from ..risk.provenance import PROVENANCE_KEYS
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
    if delta is not None and not 0.0 < float(delta) < 1.0:
        raise ValueError(f"delta={delta!r} must lie in (0, 1).")
    bild = "large_calls_per_token" in table.extras and "mean_exit_layer" not in table.extras
    costs = ("large_calls_per_token",) if bild else ("mean_exit_layer", "layer_fraction")
    for key in (*costs, "wall_time", "task_loss"):
        if key not in table.extras:
            raise ValueError(f"the results file lacks extras[{key!r}]: it was not written by `hf-safe-exit collect`; "
                             "recollect it.")
    _check_extras(table, (*costs, "wall_time", "task_loss", *(("num_tokens",) if "num_tokens" in table.extras else ())),
                  source)

    lam = table.lambdas
    losses = table.losses[risk]
    bounds = table.bounds[risk]
    task_loss, wall = table.extras["task_loss"], np.asarray(table.extras["wall_time"], dtype=np.float64)
    full = int(np.argmin(np.abs(lam - 1.0)))
    # seconds per generated token at each λ: early exit can change the output length, so whole-pool times
    # of two thresholds are only comparable per token (tables without token counts: per call, as recorded)
    tokens = (np.asarray(table.extras["num_tokens"], dtype=np.float64).sum(axis=1) if "num_tokens" in table.extras
              else np.ones_like(wall))
    per_token = np.divide(wall, tokens, out=np.full_like(wall, np.nan), where=tokens > 0)
    timed = table.metadata.get("timing") != BATCHED_TIMING  # a batched collect measured no time per threshold
    if not timed:
        per_token[:] = np.nan  # every speed-up null: a time apportioned across the batch's rows is no measurement
    rng = np.random.default_rng(seed)
    splits = [rng.permutation(n) for _ in range(repeats)]

    rows = []
    for method in methods:
        for e in eps:
            rec = {k: [] for k in ("test_risk", "lambda_hat", "feasible", *costs, "task_loss", "speedup")}
            for perm in splits:
                cal, test = perm[:n_cal], perm[n_cal:]
                sel = select(method, lam, losses[:, cal], e, delta if method in ("ucb", "ltt") else None,
                             bound=bound, loss_bounds=bounds, monotonize=monotonize)
                k = sel.index
                rec["test_risk"].append(losses[k, test].mean())
                rec["lambda_hat"].append(sel.threshold)
                rec["feasible"].append(sel.feasible)
                for key in costs:
                    rec[key].append(table.extras[key][k, test].mean())
                rec["task_loss"].append(task_loss[k, test].mean())
                rec["speedup"].append(per_token[full] / per_token[k] if per_token[k] > 0 and per_token[full] > 0
                                      else float("nan"))
            arr = {k: np.asarray(v, dtype=np.float64) for k, v in rec.items()}
            first = costs[0]
            cost_stats = {first: float(arr[first].mean()), f"{first}_std": float(arr[first].std()),
                          **{key: float(arr[key].mean()) for key in costs[1:]}}
            rows.append({
                "method": method, "eps": e, "delta": delta if method in ("ucb", "ltt") else None,
                "bound": bound if method == "ucb" else ("hoeffding_bentkus" if method == "ltt" else None),
                "test_risk_mean": float(arr["test_risk"].mean()), "test_risk_std": float(arr["test_risk"].std()),
                "violation_rate": float((arr["test_risk"] > e).mean()),
                "lambda_hat_mean": float(arr["lambda_hat"].mean()),
                "no_exit_rate": float(1.0 - arr["feasible"].mean()),
                **cost_stats,
                "task_loss": float(arr["task_loss"].mean()),
                **_speedup(arr["speedup"]),
            })
    meta = table.metadata
    # the early-exit configuration as the table records it (every setting), so a card can check it against its own
    meta_keys = ("task", *PROVENANCE_KEYS, *(() if bild else config_fields()), "num_decoder_layers",
                 "max_new_tokens", "versions") + (("strategy", "policy") if bild else ())
    result = {
        "settings": {"eps": list(eps), "methods": list(methods), "delta": delta, "bound": bound, "risk": risk,
                     "n": n, "n_cal": n_cal, "n_test": n - n_cal, "repeats": repeats, "seed": seed,
                     "monotonize": monotonize, "loss_bounds": list(bounds)},
        "metadata": {k: meta.get(k) for k in meta_keys},
        "full_model": {costs[0]: float(table.extras[costs[0]][full].mean()),
                       "task_loss": float(task_loss[full].mean()), "wall_time": float(wall[full]),
                       "generated_tokens": float(tokens[full]) if "num_tokens" in table.extras else None},
        "speedup_basis": BASES[2] if not timed else BASES[0] if "num_tokens" in table.extras else BASES[1],
        "table_digest": table.digest(),  # which table it evaluated: a card checks it against the one it shows
        "results": rows,
    }
    problem = evaluation_problem(result)  # what readers refuse is never written; only the metadata can fail here
    if problem is not None:
        raise CorruptFileError.about(source, f"the results file gives an evaluation that is not usable: {problem}",
                                     "Recollect it with `hf-safe-exit collect`")
    return result


def _speedup(per_split: np.ndarray) -> dict:
    """The mean and sd of the splits' speed-ups; null when a split has none (its threshold has no time per token)."""
    if not np.isfinite(per_split).all():
        return {"speedup": None, "speedup_std": None}
    return {"speedup": float(per_split.mean()), "speedup_std": float(per_split.std())}


def format_table(evaluation: dict) -> str:
    """A readable fixed-width table of :func:`evaluate_table`'s results."""
    s = evaluation["settings"]
    meta = evaluation.get("metadata", {})
    full = evaluation["full_model"]
    bild = "large_calls_per_token" in full
    if bild:  # BiLD: the large model alone is the reference; cost = large-model passes per token
        head = (f"task={meta.get('task')} risk={s['risk']} strategy=bild n_cal={s['n_cal']} n_test={s['n_test']} "
                f"repeats={s['repeats']} delta={s['delta']} | large model: task loss {full['task_loss']:.4f}")
        cost_cols = ("large/tok",)
    else:
        head = (f"task={meta.get('task')} risk={s['risk']} measure={meta.get('measure')} n_cal={s['n_cal']} "
                f"n_test={s['n_test']} repeats={s['repeats']} delta={s['delta']} | full model: task loss "
                f"{full['task_loss']:.4f}, exit layer {full['mean_exit_layer']:.2f}")
        cost_cols = ("exit layer", "layers")
    cols = ("method", "eps", "test risk", "viol.", "λ̂", "no exit", *cost_cols, "speedup", "task loss")
    lines = [head, " ".join(f"{c:>10}" for c in cols)]
    for r in evaluation["results"]:
        if bild:
            cost = [f"{r['large_calls_per_token']:>10.3f}"]
        else:
            cost = [f"{r['mean_exit_layer']:>10.2f}", f"{r['layer_fraction']:>10.3f}"]
        lines.append(" ".join([
            f"{r['method']:>10}", f"{r['eps']:>10.3g}", f"{r['test_risk_mean']:>+10.4f}", f"{r['violation_rate']:>10.2f}",
            f"{r['lambda_hat_mean']:>10.4f}", f"{r['no_exit_rate']:>10.2f}", *cost,
            f"{r['speedup']:>10.2f}" if r["speedup"] is not None else f"{'—':>10}", f"{r['task_loss']:>10.4f}"]))
    return "\n".join(lines)
