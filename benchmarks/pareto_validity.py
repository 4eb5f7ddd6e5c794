"""Pareto Testing (``hf_safe_exit.risk.pareto_test``, issue 28): validity and efficiency.

Part 1, synthetic validity: G ∈ {100, 1000, 5000} configurations with true risks spread uniformly on
[ε/2, 2ε] (ε = 0.1, so about a third are above ε and many sit near it) and costs falling linearly with the
risk (1 at ε/2, 0.25 at 2ε). Each draw: n = 2000 examples, every loss drawn independently, either
Bernoulli(r_g) (p-value: Hoeffding–Bentkus, exact binomial tail for 0/1 losses) or 2·r_g·U with U uniform
(bounded real losses with mean r_g; HB and WSR p-values). Over the draws: the violation rate
P(R(chosen) > ε) with a 95% Clopper–Pearson interval (the guarantee: ≤ δ), the mean cost of the choice
(the full model, cost 1, when nothing is certified) and the oracle (the cheapest configuration with R ≤ ε).

Part 2, real tables: the default model's pool tables ``results/measure_choice_tables/{task}_{measure}.npz``
(11 λ each) stacked into one configuration set (measure × λ), risk ``performance_gap`` in [−1, 1], per-example
cost ``layer_fraction`` (decoder blocks run / blocks of the full model). Over random half/half
calibration/test splits of the pool rows: Pareto Testing on the calibration half (which it splits again,
D_opt/D_test) against the scalar-λ methods on the default configuration (meta, the shipped calibration) on
the same calibration half, UCB-WSR and LTT (``hf_safe_exit.risk.select``). Reported on the test half: the
violation rate (empirical test risk > ε: an empirical check, the test half is finite) and the mean decoder-block
fraction.

    OMP_NUM_THREADS=1 python benchmarks/pareto_validity.py                    # about 8 minutes on one core
    OMP_NUM_THREADS=1 python benchmarks/pareto_validity.py --draws 50 --splits 20 --configs 100   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np

from hf_safe_exit.risk import LossTable, pareto_test, select

HERE = Path(__file__).resolve().parent
TABLES = HERE / "results" / "measure_choice_tables"
DEFAULT_CALIBRATION = HERE.parent / "hf_safe_exit" / "default_model" / "calibration"
MEASURES = ("meta", "saturation", "softmax", "softmax_shortlist")
SYN_EPS, SYN_N = 0.1, 2000
DELTAS = (0.05, 0.1, 0.2)
REAL_EPS, REAL_DELTA = (0.02, 0.05, 0.1), 0.1
# name: (p-value, share of the calibration half used to find the front); 0.25 leaves D_test more examples
PARETO_VARIANTS = {"pareto_hoeffding_bentkus": ("hoeffding_bentkus", 0.5), "pareto_wsr": ("wsr", 0.5),
                   "pareto_wsr_opt0.25": ("wsr", 0.25)}


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for k successes in n trials (scipy's beta quantiles)."""
    from scipy.stats import beta

    a = (1 - level) / 2
    low = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return low, high


# ---------------------------------------------------------------- part 1: synthetic

def synthetic_configs(G: int, seed: int):
    """True risks on [ε/2, 2ε] (sorted), costs falling linearly from 1 to 0.25 with the risk."""
    rng = np.random.default_rng(seed)
    risks = np.sort(rng.uniform(SYN_EPS / 2, 2 * SYN_EPS, G))
    while np.min(np.abs(risks - SYN_EPS)) < 1e-6:  # keep "R > ε" clear of float32 rounding (never in practice)
        risks = np.sort(rng.uniform(SYN_EPS / 2, 2 * SYN_EPS, G))
    costs = 1.0 - 0.75 * (risks - SYN_EPS / 2) / (1.5 * SYN_EPS)
    return risks, costs


def synthetic_draw(rng, risks):
    """(Bernoulli losses, real losses) of one draw from one uniform field U (float32, k·2⁻²⁴):
    1{U < r} has mean ⌈r·2²⁴⌉/2²⁴ (returned), 2·r·U has mean r(1 − 2⁻²⁴) up to float32 rounding."""
    u = rng.random((risks.size, SYN_N), dtype=np.float32)
    bern = u < risks[:, None]
    u *= (2 * risks).astype(np.float32)[:, None]
    return bern, u


def synthetic_rows(G: int, draws: int, seed: int) -> list[dict]:
    risks, costs = synthetic_configs(G, seed)
    true = {"bernoulli": np.ceil(risks * 2.0 ** 24) / 2.0 ** 24, "real": risks}
    runs = [("bernoulli", "hoeffding_bentkus"), ("real", "hoeffding_bentkus"), ("real", "wsr")]
    stats = {(k, p, d): {"violations": 0, "cost": 0.0, "none": 0, "front": 0} for k, p in runs for d in DELTAS}
    rng = np.random.default_rng(seed + 1)
    for draw in range(draws):
        losses = dict(zip(("bernoulli", "real"), synthetic_draw(rng, risks)))
        for kind, p_value in runs:
            for delta in DELTAS:
                res = pareto_test(losses[kind], costs, SYN_EPS, delta, p_value=p_value, seed=draw)
                s = stats[(kind, p_value, delta)]
                s["violations"] += res.index is not None and true[kind][res.index] > SYN_EPS
                s["cost"] += 1.0 if res.index is None else costs[res.index]
                s["none"] += res.index is None
                s["front"] += res.front_size
    oracle = float(costs[risks <= SYN_EPS].min())
    return [_synthetic_row(G, kind, p, d, s, draws, oracle) for (kind, p, d), s in stats.items()]


def _synthetic_row(G, kind, p_value, delta, s, draws, oracle) -> dict:
    low, high = clopper_pearson(int(s["violations"]), draws)
    return {"G": G, "losses": kind, "p_value": p_value, "delta": delta, "draws": draws,
            "violations": int(s["violations"]), "violation_rate": s["violations"] / draws,
            "violation_ci95": [low, high], "holds": low <= delta, "mean_cost": s["cost"] / draws,
            "oracle_cost": oracle, "none_rate": s["none"] / draws, "mean_front_size": s["front"] / draws}


# ---------------------------------------------------------------- part 2: real tables

def load_task(task: str) -> dict:
    """The stacked (measure × λ) gap and layer-fraction tables of one task, and the default calibration."""
    gaps, fractions, names, lam, ids = [], [], [], None, None
    for measure in MEASURES:
        path = TABLES / f"{task}_{measure}.npz"
        if not path.exists() and measure != MEASURES[0]:  # the default measure's table must be there (meta_only)
            continue
        table = LossTable.load(path)
        if lam is None:
            lam, ids = table.lambdas, table.metadata.get("example_ids")
        if not np.array_equal(table.lambdas, lam) or table.metadata.get("example_ids") != ids:
            raise SystemExit(f"{path}: another grid or other rows than the {MEASURES[0]} table")
        gaps.append(table.losses["performance_gap"])
        fractions.append(table.extras["layer_fraction"])
        names += [(measure, float(v)) for v in table.lambdas]
    default = LossTable.load(DEFAULT_CALIBRATION / task / "early_exit_calibration.npz")
    if default.metadata.get("example_ids") != ids or not np.array_equal(default.lambdas, lam):
        raise SystemExit(f"the default {task} calibration covers other rows or another grid than the pool tables")
    return {"losses": np.vstack(gaps), "cost": np.vstack(fractions), "names": names, "lambdas": lam,
            "default_losses": default.losses["performance_gap"], "default_cost": default.extras["layer_fraction"],
            "default_equals_meta_table": bool(np.array_equal(default.losses["performance_gap"], gaps[0]))}


def _outcome(losses, cost, index, test) -> tuple[float, float]:
    return float(losses[index, test].mean()), float(cost[index, test].mean())


def real_split(data: dict, cal, test, eps: float, seed: int) -> dict:
    """Test-half (risk, cost) of each method fitted on the calibration half; Pareto's choice by name too."""
    out = {}
    full = int(np.flatnonzero(data["lambdas"] == 1.0)[0])  # λ = 1 of the default configuration
    for name, (p_value, opt_fraction) in PARETO_VARIANTS.items():
        res = pareto_test(data["losses"][:, cal], data["cost"][:, cal], eps, REAL_DELTA, p_value=p_value, seed=seed,
                          opt_fraction=opt_fraction, loss_range=(-1.0, 1.0))
        if res.index is None:
            out[name] = (*_outcome(data["default_losses"], data["default_cost"], full, test), None)
        else:
            out[name] = (*_outcome(data["losses"], data["cost"], res.index, test), res.index)
    for name, method, bound in (("ucb_wsr", "ucb", "wsr"), ("ltt", "ltt", "wsr")):  # LTT ignores bound (HB)
        sel = select(method, data["lambdas"], data["default_losses"][:, cal], eps, REAL_DELTA, bound=bound,
                     loss_bounds=(-1.0, 1.0))
        out[name] = (*_outcome(data["default_losses"], data["default_cost"], sel.index, test), None)
    return out


def real_rows(task: str, splits: int, seed: int) -> tuple[list[dict], dict]:
    data = load_task(task)
    n = data["losses"].shape[1]
    rng = np.random.default_rng(seed)
    collected = {eps: [] for eps in REAL_EPS}
    for s in range(splits):
        perm = rng.permutation(n)
        cal, test = np.sort(perm[: n // 2]), np.sort(perm[n // 2:])
        for eps in REAL_EPS:
            collected[eps].append(real_split(data, cal, test, eps, seed=s))
    rows = [_real_row(task, eps, data, results) for eps, results in collected.items()]
    info = {"task": task, "n": n, "configurations": len(data["names"]),
            "measures": sorted({m for m, _ in data["names"]}),
            "default_equals_meta_table": data["default_equals_meta_table"]}
    return rows, info


def pool_oracle(data: dict, eps: float) -> dict:
    """The cheapest configuration whose mean gap over *all* pool rows is ≤ ε, among all measures and the default
    one alone: what the extra dimensions could buy here, before any statistics (no guarantee)."""
    risk, cost = data["losses"].mean(axis=1), data["cost"].mean(axis=1)
    out = {}
    for name, rows in (("all_measures", np.arange(risk.size)), ("meta_only", np.arange(data["lambdas"].size))):
        ok = rows[risk[rows] <= eps]
        g = int(ok[np.argmin(cost[ok])])
        out[name] = {"measure": data["names"][g][0], "lambda": data["names"][g][1], "block_fraction": float(cost[g])}
    return out


def _real_row(task, eps, data, results) -> dict:
    row = {"task": task, "eps": eps, "delta": REAL_DELTA, "splits": len(results), "pool_oracle": pool_oracle(data, eps)}
    for method in results[0]:
        risk = np.array([r[method][0] for r in results])
        cost = np.array([r[method][1] for r in results])
        row[method] = {"mean_block_fraction": float(cost.mean()), "violation_rate": float(np.mean(risk > eps)),
                       "mean_test_risk": float(risk.mean()), "exits_rate": float(np.mean(cost < 1.0 - 1e-12))}
        chosen = [r[method][2] for r in results if r[method][2] is not None]
        if method.startswith("pareto"):
            row[method]["none_rate"] = 1.0 - len(chosen) / len(results)
            names = [data["names"][g][0] for g in chosen]
            row[method]["measure_counts"] = {m: names.count(m) for m in sorted(set(names))}
    best = min(("ucb_wsr", "ltt"), key=lambda m: row[m]["mean_block_fraction"])
    for name in PARETO_VARIANTS:
        diff = np.array([r[name][1] - r[best][1] for r in results])
        row[name]["minus_best_scalar"] = {"best_scalar": best, "mean": float(diff.mean()),
                                                         "se": float(diff.std(ddof=1) / math.sqrt(diff.size))}
    return row


# ---------------------------------------------------------------- report

def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key in sorted({(r["G"], r["losses"], r["p_value"]) for r in result["synthetic"]}):
        rows = [r for r in result["synthetic"] if (r["G"], r["losses"], r["p_value"]) == key]
        d = [r["delta"] for r in rows]
        rate = np.array([r["violation_rate"] for r in rows])
        ci = np.array([r["violation_ci95"] for r in rows]).T
        left.errorbar(d, rate, yerr=[rate - ci[0], ci[1] - rate], marker="o", capsize=3,
                      label=f"G={key[0]} {key[1]} {'HB' if key[2] == 'hoeffding_bentkus' else 'WSR'}")
    left.plot(DELTAS, DELTAS, "k--", label="δ (the bound)")
    left.set(xlabel="δ", ylabel="P(R(chosen) > ε)", title=f"Synthetic, ε={SYN_EPS}, n={SYN_N}")
    left.legend(fontsize=6)
    styles = {"pareto_hoeffding_bentkus": "Pareto HB", "pareto_wsr": "Pareto WSR",
              "pareto_wsr_opt0.25": "Pareto WSR, D_opt 1/4", "ucb_wsr": "UCB-WSR (meta λ)", "ltt": "LTT (meta λ)"}
    for task, ls in (("cnndm", "-"), ("squad", "--")):
        rows = [r for r in result["real"] if r["task"] == task]
        for (method, label), color in zip(styles.items(), ("C0", "C1", "C4", "C2", "C3")):
            right.plot([r["eps"] for r in rows], [r[method]["mean_block_fraction"] for r in rows], ls, color=color,
                       marker="o", label=f"{task}: {label}")
    for task, marker in (("cnndm", "x"), ("squad", "+")):
        rows = [r for r in result["real"] if r["task"] == task]
        oracle = [r["pool_oracle"]["all_measures"]["block_fraction"] for r in rows]
        right.scatter([r["eps"] for r in rows], oracle, color="k", marker=marker, zorder=3,
                      label=f"{task}: cheapest with pool risk ≤ ε (no guarantee)")
    right.set(xlabel="ε", ylabel="mean decoder-block fraction (test half)",
              title=f"Default model pools, δ={REAL_DELTA}")
    right.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(configs, draws: int, splits: int, seed: int) -> dict:
    synthetic = [row for G in configs for row in synthetic_rows(G, draws, seed + G)]
    real, info = [], []
    for task in ("cnndm", "squad"):
        rows, meta = real_rows(task, splits, seed)
        real += rows
        info.append(meta)
    return {"synthetic_eps": SYN_EPS, "synthetic_n": SYN_N, "synthetic": synthetic, "real": real, "tables": info,
            "machine": platform.processor() or platform.machine(), "seed": seed}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--splits", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(HERE / "results" / "pareto_validity.json"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = run(args.configs, args.draws, args.splits, args.seed)
    result["total_seconds"] = time.perf_counter() - start
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {result['total_seconds']:.0f} s")
    return 0 if all(r["holds"] for r in result["synthetic"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
