"""False alarms and detection delay of the deployment monitor's test (issue 29), driven offline by the stored loss
tables of the shipped model.

For each task (cnndm, squad) and risk (consistency, performance_gap) the deployed threshold λ̂ is fitted as the
library fits it (``RiskController``, ε = 0.05, δ = 0.1, ``ucb`` with the WSR bound) on the stored table; the losses
of λ̂ on the table's rows are the population a live stream samples from. A stream is a sequence of calls; each call
is sampled for the shadow decode with probability p, independently (the gaps between sampled calls are geometric),
and a sampled call contributes one loss drawn with replacement from the rows, with weights w:

* ``exchangeable``: w uniform (the calibration distribution: true risk = the rows' mean, ≤ ε under H₀);
* ``worst_null``: w tilted so that the mean is exactly ε, the boundary of H₀ (where the test's error is largest);
* ``shifted``: w tilted so that the mean is 2ε (detection);
* ``history_then_shift``: ``--history-calls`` calls weighted uniformly (in distribution), then the ``shifted``
  weights: the delay of a monitor that has run a while, the case the test's discounted bettor is for. The same
  streams go to the test and to the cumulative-only bettor (version 1 of the test, reimplemented here with NumPy
  cumulative sums: :func:`cumulative_only_alarms`), whose bet turns positive only once the running mean of all
  losses, history included, passes ε.

Tilting is exponential, w_j ∝ exp(θ ℓ_j), θ found by root finding: among all re-weightings of the rows with the
required mean it is the one closest to uniform in Kullback–Leibler divergence, and it shifts weight towards the
high-loss rows smoothly rather than onto one row. A table whose losses at λ̂ never exceed the target mean cannot
be tilted there: that case is recorded and skipped.

Reported: P(any alarm within ``calls`` calls) with a Clopper–Pearson 95 % interval (scipy) for α ∈ {0.05, 0.01};
for ``shifted``, the number of calls to the alarm (median, quartiles, share alarmed within ``calls``) against
Wald's closed form ``expected_samples_to_alarm(...) / p`` (Wald's identity turns expected sampled losses into
expected calls); for ``history_then_shift`` (α = 0.05), the calls from the shift to the alarm against the same
fresh closed form, and the cumulative bettor's lag: after N losses at mean m₀ its mean needs N(ε − m₀)/(2ε − ε)
losses at 2ε before it bets at all, i.e. about history_calls·(ε − m₀)/ε calls.

    OMP_NUM_THREADS=1 python benchmarks/monitor_validity.py   # defaults: about 80 s on one core (77.9 s recorded)
    python benchmarks/monitor_validity.py --streams 200 --out /tmp/mv.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np

from hf_safe_exit.risk import LossTable, RiskController, expected_samples_to_alarm, first_alarm
from hf_safe_exit.risk.sequential_test import DISCOUNT, MIXTURE_WEIGHT

ROOT = Path(__file__).resolve().parents[1]
TABLE = "hf_safe_exit/default_model/calibration/{task}/early_exit_calibration.npz"
TASKS, RISKS = ("cnndm", "squad"), ("consistency", "performance_gap")
EPS, DELTA, METHOD, ALPHAS = 0.05, 0.1, "ucb", (0.05, 0.01)
OUT = ROOT / "benchmarks" / "results" / "monitor_validity.json"


def tilt(losses: np.ndarray, target: float) -> tuple[np.ndarray, float] | None:
    """Weights w ∝ exp(θ·losses) with Σ w·losses = target, and θ; None when no weighting reaches target."""
    from scipy.optimize import brentq

    if not losses.min() < target < losses.max():
        return None
    scale = losses.max() - losses.min()

    def weights(theta):
        z = theta * (losses - losses.max())  # shifted: exp never overflows
        w = np.exp(z)
        return w / w.sum()

    def gap(theta):
        return float(weights(theta) @ losses) - target

    hi = 1.0 / scale
    while gap(hi) < 0:  # the tilted mean grows with θ towards max(losses)
        hi *= 2.0
    lo = -1.0 / scale
    while gap(lo) > 0:
        lo *= 2.0
    theta = brentq(gap, lo, hi, xtol=1e-13, rtol=1e-13)
    return weights(theta), theta


def sampled_positions(rng, p: float, max_calls: int, cap: int) -> np.ndarray:
    """1-based call numbers of the sampled calls within ``max_calls`` (at most ``cap`` of them)."""
    pos = np.cumsum(rng.geometric(p, size=cap))
    return pos[pos <= max_calls]


def run_streams(rng, losses, weights, bounds, p, calls, streams, alpha, cap):
    """Per stream: the call at which the alarm fired (None if it did not within ``calls``)."""
    out = []
    for _ in range(streams):
        pos = sampled_positions(rng, p, calls, cap)
        draws = losses[rng.choice(losses.size, size=pos.size, p=weights)]
        k = first_alarm(draws, EPS, alpha, loss_range=bounds)
        out.append(None if k is None else int(pos[k]))
    return out


def cumulative_only_alarms(x: np.ndarray, eps: float, alpha: float) -> int | None:
    """The first index at which the cumulative aGRAPA bettor alone (c = 1/2, WSR's priors) reaches 1/alpha, on
    losses ``x`` already scaled to [0, 1] against ``eps`` scaled; None if it never does. Its bets are functions
    of prefix sums only, so the whole wealth path is cumulative sums."""
    t = np.arange(1, x.size + 1)
    mu = (0.5 + np.cumsum(x)) / (t + 1)  # μ̂_t
    var = (0.25 + np.cumsum((x - mu) ** 2)) / (t + 1)  # σ̂²_t
    mu_prev, var_prev = np.r_[0.5, mu[:-1]], np.r_[0.25, var[:-1]]
    edge = mu_prev - eps
    bet = np.where(edge > 0, np.minimum(edge / (var_prev + edge ** 2), 0.5 / eps), 0.0)
    crossed = np.flatnonzero(np.cumsum(np.log1p(bet * (x - eps))) >= math.log(1 / alpha))
    return int(crossed[0]) if crossed.size else None


def history_then_shift(rng, losses, shifted_weights, bounds, args, history_calls: int) -> dict:
    """Streams of ``history_calls`` in-distribution calls then the shift: calls from the shift to the alarm,
    for the test and the cumulative-only bettor on the same streams (α = 0.05)."""
    alpha, horizon = ALPHAS[0], history_calls + args.detect_calls
    cap = int(horizon * args.p + 20 * math.sqrt(horizon * args.p) + 50)
    (a, b), uniform = bounds, np.full(losses.size, 1.0 / losses.size)
    delays = {"test": [], "cumulative_only": []}
    early = {"test": 0, "cumulative_only": 0}
    for _ in range(args.history_streams):
        pos = sampled_positions(rng, args.p, horizon, cap)
        before = int(np.searchsorted(pos, history_calls, side="right"))  # sampled losses in the history
        draws = np.r_[losses[rng.choice(losses.size, size=before, p=uniform)],
                      losses[rng.choice(losses.size, size=pos.size - before, p=shifted_weights)]]
        x = (draws - a) / (b - a)
        for name, k in (("test", first_alarm(draws, EPS, alpha, loss_range=bounds)),
                        ("cumulative_only", cumulative_only_alarms(x, (EPS - a) / (b - a), alpha))):
            early[name] += k is not None and k < before  # a false alarm inside the history
            delays[name].append(math.inf if k is None else max(int(pos[k]) - history_calls, 0))
    fresh = expected_samples_to_alarm(losses, EPS, alpha, weights=shifted_weights, loss_range=bounds) / args.p
    out = {"history_calls": history_calls, "streams": args.history_streams, "alpha": alpha,
           "closed_form_calls": fresh,
           "cumulative_lag_calls": history_calls * (EPS - float(losses.mean())) / EPS}
    for name, d in delays.items():
        q1, med, q3 = (float(v) for v in np.quantile(np.asarray(d), [0.25, 0.5, 0.75]))
        out[name] = {"median_calls_after_shift": _finite(med), "quartile_calls": [_finite(q1), _finite(q3)],
                     "median_over_closed_form": _finite(med / fresh), "alarms_in_history": early[name],
                     "alarmed_within_horizon": float(np.mean(np.isfinite(d)))}
    return out


def clopper_pearson(k: int, n: int, level: float = 0.95) -> list[float]:
    from scipy.stats import beta

    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return [lo, hi]


def deployed_losses(task: str, risk: str):
    table = LossTable.load(ROOT / TABLE.format(task=task))
    rc = RiskController(EPS, DELTA, METHOD, risk=risk).fit_table(table)
    k = int(np.flatnonzero(table.lambdas == rc.threshold)[0])
    return table, rc, table.losses[risk][k].copy(), tuple(table.bounds[risk])


def false_alarms(rng, losses, weights, bounds, args) -> dict:
    rows = {}
    cap = int(args.calls * args.p + 20 * math.sqrt(args.calls * args.p) + 50)
    for alpha in ALPHAS:
        fired = run_streams(rng, losses, weights, bounds, args.p, args.calls, args.streams, alpha, cap)
        k = sum(f is not None for f in fired)
        rows[str(alpha)] = {"alarms": k, "rate": k / args.streams, "clopper_pearson_95": clopper_pearson(k, args.streams),
                            "at_most_alpha": k / args.streams <= alpha}
    return rows


def detection(rng, losses, weights, bounds, args) -> dict:
    rows = {}
    horizon = args.detect_calls
    cap = int(horizon * args.p + 20 * math.sqrt(horizon * args.p) + 50)
    for alpha in ALPHAS:
        fired = run_streams(rng, losses, weights, bounds, args.p, horizon, args.streams, alpha, cap)
        calls = np.array([math.inf if f is None else f for f in fired])
        samples = expected_samples_to_alarm(losses, EPS, alpha, weights=weights, loss_range=bounds)
        q1, med, q3 = (float(v) for v in np.quantile(calls, [0.25, 0.5, 0.75]))
        rows[str(alpha)] = {"median_calls": _finite(med), "quartile_calls": [_finite(q1), _finite(q3)],
                            "closed_form_calls": _finite(samples / args.p),
                            "median_over_closed_form": _finite(med / (samples / args.p)),
                            "alarmed_within_calls": float(np.mean(calls <= args.calls)),
                            "alarmed_within_horizon": float(np.mean(np.isfinite(calls)))}
    return rows


def one_case(task, risk, args, seed) -> dict:
    _, rc, losses, bounds = deployed_losses(task, risk)
    case = {"task": task, "risk": risk, "table": TABLE.format(task=task), "n_rows": int(losses.size),
            "lambda_hat": rc.threshold, "feasible": bool(rc.certificate.feasible), "loss_range": list(bounds),
            "true_risk": float(losses.mean()), "loss_min": float(losses.min()), "loss_max": float(losses.max()),
            "rows_nonzero": int(np.count_nonzero(losses)), "distinct_losses": int(np.unique(losses).size),
            "seed": seed, "notes": []}
    if case["distinct_losses"] <= 2:
        case["notes"].append(f"degenerate: the losses at λ̂ take {case['distinct_losses']} values "
                             f"({case['rows_nonzero']} of {losses.size} rows nonzero): tilted streams are Bernoulli")
    rng = np.random.default_rng(seed)
    uniform = np.full(losses.size, 1.0 / losses.size)
    case["exchangeable"] = false_alarms(rng, losses, uniform, bounds, args)
    for name, target, run in (("worst_null", EPS, false_alarms), ("shifted", 2 * EPS, detection)):
        tilted = tilt(losses, target)
        if tilted is None:
            case["notes"].append(f"{name}: no row has a loss above {target:g}, so no re-weighting has mean {target:g}")
            case[name] = None
            continue
        weights, theta = tilted
        case[name] = {"target_mean": target, "theta": theta, "weighted_mean": float(weights @ losses),
                      "max_weight": float(weights.max()), **run(rng, losses, weights, bounds, args)}
    if case["shifted"] is not None:
        weights = tilt(losses, 2 * EPS)[0]
        case["history_then_shift"] = [history_then_shift(rng, losses, weights, bounds, args, h)
                                      for h in args.history_calls]
    return case


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = doc["cases"]
    labels = [f"{c['task']}\n{c['risk'].replace('performance_gap', 'gap')}" for c in cases]
    fig, (left, right, after) = plt.subplots(1, 3, figsize=(16, 4))
    for j, (scenario, marker) in enumerate((("exchangeable", "o"), ("worst_null", "s"))):
        for a, colour in zip(ALPHAS, ("C0", "C1")):
            xs, ys, err = [], [], []
            for i, c in enumerate(cases):
                if c.get(scenario):
                    r = c[scenario][str(a)]
                    xs.append(i + 0.1 * (2 * j - 1) + 0.05 * (a == 0.01))
                    ys.append(r["rate"])
                    err.append([r["rate"] - r["clopper_pearson_95"][0], r["clopper_pearson_95"][1] - r["rate"]])
            left.errorbar(xs, ys, yerr=np.array(err).T if err else None, fmt=marker, color=colour,
                          label=f"{scenario}, α={a}")
        left.axhline(ALPHAS[j], color=f"C{j}", ls="--", lw=0.8)
    left.set_xticks(range(len(cases)), labels, fontsize=8)
    left.set_ylabel(f"P(any alarm in {doc['basis']['calls']} calls)")
    left.set_title("false alarms (dashed: α)")
    left.legend(fontsize=7)
    for i, c in enumerate(cases):
        if not c.get("shifted"):
            continue
        for a, colour in zip(ALPHAS, ("C0", "C1")):
            r = c["shifted"][str(a)]
            x = i + (0.12 if a == 0.01 else -0.12)
            right.errorbar([x], [r["median_calls"]], yerr=[[r["median_calls"] - r["quartile_calls"][0]],
                           [r["quartile_calls"][1] - r["median_calls"]]], fmt="o", color=colour,
                           label=f"median, quartiles, α={a}" if i == 0 else None)
            right.plot([x], [r["closed_form_calls"]], "x", color="k", label="closed form" if i == 0 and a == 0.05 else None)
    right.axhline(doc["basis"]["calls"], color="grey", ls=":", lw=0.8)
    right.set_yscale("log")
    right.set_xticks(range(len(cases)), labels, fontsize=8)
    right.set_ylabel(f"calls to alarm at p = {doc['basis']['p']}")
    right.set_title(f"detection at true risk 2ε = {2 * EPS:g}")
    right.legend(fontsize=7)
    history_panel(after, cases, labels)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def history_panel(ax, cases, labels) -> None:
    """Median calls from the shift to the alarm after each history, the test against the cumulative-only bettor."""
    for i, c in enumerate(cases):
        for j, h in enumerate(c.get("history_then_shift") or []):
            x = i + 0.25 * (j - 0.5)
            for name, marker, colour in (("test", "o", "C2"), ("cumulative_only", "s", "C3")):
                ax.plot([x], [h[name]["median_calls_after_shift"] or np.nan], marker, color=colour, alpha=0.5 + 0.5 * j,
                        label=f"{name.replace('_', ' ')}, {h['history_calls']:,} calls first" if i == 0 else None)
            ax.plot([x], [h["closed_form_calls"]], "x", color="k", label="closed form (fresh)" if i == j == 0 else None)
    ax.set_yscale("log")
    ax.set_xticks(range(len(cases)), labels, fontsize=8)
    ax.set_ylabel("median calls from the shift to the alarm")
    ax.set_title(f"in-distribution history, then risk 2ε (α = {ALPHAS[0]})")
    ax.legend(fontsize=7)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--calls", type=int, default=10_000, help="calls per stream for the false-alarm rate")
    p.add_argument("--detect-calls", type=int, default=200_000, help="horizon of the detection streams")
    p.add_argument("--history-calls", type=int, nargs="+", default=[5_000, 50_000],
                   help="in-distribution calls before the shift (history_then_shift)")
    p.add_argument("--history-streams", type=int, default=500, help="streams per history_then_shift case")
    p.add_argument("--p", type=float, default=0.05, help="sample rate of the shadow decode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    start = time.perf_counter()
    cases = [one_case(task, risk, args, args.seed + 10 * i + j)
             for i, task in enumerate(TASKS) for j, risk in enumerate(RISKS)]
    doc = {"benchmark": "monitor_validity", "issue": 29,
           "basis": {"eps": EPS, "delta": DELTA, "method": METHOD, "bound": "wsr", "alphas": list(ALPHAS), "p": args.p,
                     "calls": args.calls, "detect_calls": args.detect_calls, "streams": args.streams,
                     "history_calls": args.history_calls, "history_streams": args.history_streams,
                     "seed": args.seed, "test": "hf_safe_exit.risk.first_alarm (mixture of a cumulative and a "
                                               f"discounted aGRAPA bettor, c = 1/2, gamma = {DISCOUNT}, "
                                               f"w = {MIXTURE_WEIGHT})",
                     "sampling": "each call sampled with probability p independently; a sampled call draws one row "
                                 "with replacement with the scenario's weights",
                     "weighting": "exponential tilting w_j ∝ exp(θ·loss_j), θ by brentq: worst_null mean = eps, "
                                  "shifted mean = 2 eps; exchangeable: uniform"},
           "cases": cases, "seconds": round(time.perf_counter() - start, 1),
           "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, allow_nan=False, default=_json_default) + "\n")
    plot(doc, args.out.with_suffix(".png"))
    return doc


def _finite(value: float) -> float | None:
    """JSON has no inf: a median beyond the horizon (or an infinite closed form) is null."""
    return value if math.isfinite(value) else None


def _json_default(value):
    raise TypeError(f"not JSON-able: {value!r}")


if __name__ == "__main__":
    main()
