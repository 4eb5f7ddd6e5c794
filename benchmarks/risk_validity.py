"""Validity and efficiency of the risk-control methods on synthetic early-exit loss matrices.

The shape of the tables in Jazbec, Timans et al. (2024): for each target ε, calibration size
n_cal and method, the mean test risk, the violation rate P(R(λ̂) > ε) and the mean λ̂ (and the
mean exit layer it buys) over many random calibration sets.

Protocol: a population of N examples from :func:`risk_simulation.synthetic_population`
(8 decoder layers; signed, per-example non-monotone gaps) is the data distribution.
Calibration sets are drawn i.i.d. from it, so the *test risk* reported is the exact true
risk R(λ̂) (the population mean), not a noisy test-set estimate. CRC promises mean test risk
≤ ε; UCB and LTT promise a violation rate ≤ δ. Rows marked ``bounded`` calibrate on the
zero-bounded gap max(gap, 0) (CALM's choice) and report that risk.

    python benchmarks/risk_validity.py                 # defaults: < 3 min on one core
    python benchmarks/risk_validity.py --splits 2000 --population 50000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from hf_safe_exit.risk.loss_table import LossTable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from risk_simulation import mc_tolerance, simulate, synthetic_population  # noqa: E402

EPSILONS = (0.01, 0.02, 0.05, 0.1, 0.15)
N_CALS = (100, 1000)
DELTA = 0.1
UNRESTRICTED = ("naive", "crc", "ucb_hoeffding", "ucb_hoeffding_bentkus", "ucb_wsr", "ltt")
BOUNDED = ("crc", "ucb_wsr", "ltt")


def run(epsilons=EPSILONS, n_cals=N_CALS, delta=DELTA, splits=500, population=20000, seed=0) -> dict:
    lam, task, exit_layer = synthetic_population(n_examples=population, seed=seed, return_exit_layers=True)
    table = LossTable.from_task_losses(lam, task)
    mean_exit = exit_layer.mean(axis=1)
    risks = {"unrestricted": ("performance_gap", UNRESTRICTED), "bounded": ("performance_gap_bounded", BOUNDED)}
    rows = []
    for n_cal in n_cals:
        for eps in epsilons:
            for label, (risk, methods) in risks.items():
                losses = table.losses[risk]
                start = time.perf_counter()
                res = simulate(lam, losses, eps, delta, n_cal, splits, loss_bounds=table.bounds[risk],
                               methods=methods, seed=seed + n_cal + int(round(eps * 1000)))
                elapsed = time.perf_counter() - start
                for m in methods:
                    k = np.searchsorted(lam, res.threshold[m])
                    rows.append({
                        "n_cal": n_cal, "eps": eps, "risk": label, "method": m,
                        "test_risk_mean": res.mean_risk(m), "test_risk_std": float(res.true_risk[m].std()),
                        "violation_rate": res.violation_rate(m), "lambda_hat_mean": res.mean_lambda(m),
                        "no_exit_rate": float(np.mean(res.threshold[m] == 1.0)),
                        "mean_exit_layer": float(mean_exit[k].mean()),
                        "guarantee": ("mean" if m == "crc" else "none" if m == "naive" else "violation"),
                        "holds": bool(
                            res.mean_risk(m) <= eps + 4 * res.true_risk[m].std() / math.sqrt(splits) if m == "crc"
                            else True if m == "naive" else res.violation_rate(m) <= delta + mc_tolerance(delta, splits)),
                        "seconds": elapsed / len(methods),
                    })
    return {
        "settings": {"epsilons": list(epsilons), "n_cals": list(n_cals), "delta": delta, "splits": splits,
                     "population": population, "seed": seed, "num_lambdas": int(lam.size), "num_layers": 8,
                     "monte_carlo": "holds = mean ≤ ε + 4·sd/√S (crc) or violation rate ≤ δ + 4·√(δ(1−δ)/S)"},
        "true_risk_curve": {"lambdas": lam.tolist(), "performance_gap": table.losses["performance_gap"].mean(1).tolist(),
                            "performance_gap_bounded": table.losses["performance_gap_bounded"].mean(1).tolist(),
                            "mean_exit_layer": mean_exit.tolist()},
        "rows": rows,
        "platform": {"python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine()},
    }


def format_rows(result: dict) -> str:
    head = (f"{'n_cal':>6} {'eps':>5} {'risk':>12} {'method':>22} {'test risk':>10} {'viol.':>6} "
            f"{'mean λ̂':>7} {'no exit':>7} {'exit layer':>10} {'ok':>3}")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['n_cal']:>6} {r['eps']:>5.2f} {r['risk']:>12} {r['method']:>22} {r['test_risk_mean']:>+10.4f} "
                     f"{r['violation_rate']:>6.3f} {r['lambda_hat_mean']:>7.3f} {r['no_exit_rate']:>7.2f} "
                     f"{r['mean_exit_layer']:>10.2f} {'yes' if r['holds'] else 'NO':>3}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eps", type=float, nargs="+", default=list(EPSILONS))
    parser.add_argument("--n-cal", type=int, nargs="+", default=list(N_CALS))
    parser.add_argument("--delta", type=float, default=DELTA)
    parser.add_argument("--splits", type=int, default=500, help="random calibration sets per (ε, n_cal)")
    parser.add_argument("--population", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "risk_validity.json"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = run(args.eps, args.n_cal, args.delta, args.splits, args.population, args.seed)
    result["total_seconds"] = time.perf_counter() - start
    print(format_rows(result))
    print(f"\n{args.splits} splits per row, δ = {args.delta}; test risk = exact population risk at λ̂; "
          f"{result['total_seconds']:.0f} s")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0 if all(r["holds"] for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
