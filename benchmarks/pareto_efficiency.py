"""Pareto Testing on real configuration grids (issue 28, Targets "Efficiency"): does choosing the configuration pay?

Input: the default model's grid tables ``results/pareto_grid_tables/{cnndm,squad}.npz`` (``ConfigurationTable``:
measure {meta, softmax_shortlist, saturation} × schedule {constant, decaying τ = 4} × min_exit_layer {1, 2} × 11 λ on
the pool rows the shipped calibrations use), made with::

    OMP_NUM_THREADS=1 hf-safe-exit collect --model hf_safe_exit/default_model --task cnndm --data ../shared/data \\
        --split pool --n 200 --exclude-ids hf_safe_exit/default_model/selection_eval_ids.json \\
        --lambdas 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1 --max-new-tokens 64 --max-input-length 160 --batch-size 8 \\
        --measures meta,softmax_shortlist,saturation --schedules constant,decaying --decay-taus 4 \\
        --min-exit-layers 1,2 --output benchmarks/results/pareto_grid_tables/cnndm.npz
    # squad: --n 600 --max-new-tokens 16 (the stored SQuAD calibration's lengths)

Over ``--splits`` random half/half calibration/test splits of the pool rows, at ε ∈ {0.02, 0.05, 0.1} and δ = 0.1,
risk ``performance_gap`` in [−1, 1]: Pareto Testing (``pareto_test``: Hoeffding–Bentkus or WSR p-values, D_opt a half
or a quarter of the calibration half) on the calibration half of the whole grid, against UCB-WSR and LTT on the
default configuration's λ grid (meta, constant, min_exit_layer 1: the shipped calibration). Reported on the test half:
mean decoder-block fraction (``layer_fraction``; 1 = the full model) and the violation rate (test-half mean gap > ε:
an empirical check on a finite half). Also, on all pool rows and without any statistics, the cheapest configuration
whose mean gap is ≤ ε (what the extra dimensions could buy at best), over the whole grid and over the default
configuration alone.

    OMP_NUM_THREADS=1 python benchmarks/pareto_efficiency.py             # about a minute
    OMP_NUM_THREADS=1 python benchmarks/pareto_efficiency.py --splits 10  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np

from hf_safe_exit import EarlyExitConfig
from hf_safe_exit.risk import ConfigurationTable, LossTable, pareto_front, pareto_test, select

HERE = Path(__file__).resolve().parent
TABLES = HERE / "results" / "pareto_grid_tables"
STORED = HERE.parent / "hf_safe_exit" / "default_model" / "calibration"
TASKS = ("cnndm", "squad")
EPS, DELTA, GAP = (0.02, 0.05, 0.1), 0.1, (-1.0, 1.0)
ORACLE_EPS = (0.0025, 0.005, 0.01, 0.02, 0.05, 0.1)  # where, on all pool rows, another configuration is cheaper
DEFAULT = EarlyExitConfig(measure="meta").to_dict()  # the shipped calibration's configuration
# name: (p-value, share of the calibration half that finds the front)
PARETO = {"pareto_hb": ("hoeffding_bentkus", 0.5), "pareto_hb_opt0.25": ("hoeffding_bentkus", 0.25),
          "pareto_wsr": ("wsr", 0.5), "pareto_wsr_opt0.25": ("wsr", 0.25)}
SCALAR = {"ucb_wsr": "ucb", "ltt": "ltt"}
# Could a valid procedure search the grid and still never cost more than UCB-WSR on the default configuration? The
# nearest one: UCB-WSR on the default λ path at δ·s (all calibration rows) and Pareto-WSR at δ·(1 − s), the cheapest
# configuration either certifies (valid by the union bound: both families err together with probability ≤ δ).
ANCHORED = {f"anchored_{s:g}": s for s in (0.5, 0.9, 0.99)}


def short(setting: dict) -> str:
    """A configuration in a few words (the λ aside)."""
    schedule = "decaying τ=%g" % setting["decay_tau"] if setting["schedule"] == "decaying" else "constant"
    layers = "" if setting["exit_layers"] is None else f", layers {setting['exit_layers']}"
    return f"{setting['measure']}, {schedule}, min_exit {setting['min_exit_layer']}{layers}"


def load(task: str) -> dict:
    """The grid table's gap and block-fraction matrices, and the rows of the default configuration's λ path."""
    table = ConfigurationTable.load(TABLES / f"{task}.npz")
    plain = [{k: v for k, v in s.items() if k != "threshold"} for s in table.settings]
    path = [g for g, s in enumerate(plain) if s == DEFAULT]  # its λ < 1 rows, and λ = 1 if the full row is its own
    if table.full_model_index not in path:
        path.append(table.full_model_index)
    path = sorted(path, key=lambda g: table.settings[g]["threshold"])
    stored = LossTable.load(STORED / task)
    same_rows = stored.metadata["example_ids"] == table.metadata["example_ids"]
    lam = table.thresholds[path]
    equal = same_rows and np.array_equal(lam, stored.lambdas) and all(
        np.array_equal(table.losses[k][path], stored.losses[k]) for k in stored.losses)
    return {"task": task, "table": table, "losses": table.losses["performance_gap"],
            "cost": np.asarray(table.costs["layer_fraction"], dtype=np.float64), "path": np.array(path),
            "lambdas": lam, "default_equals_stored": bool(equal), "names": [short(s) for s in plain]}


def outcome(data: dict, row: int, test) -> tuple[float, float]:
    return float(data["losses"][row, test].mean()), float(data["cost"][row, test].mean())


def one_split(data: dict, cal, test, eps: float, seed: int) -> dict:
    """Test-half (risk, blocks, chosen row) of every method fitted on the calibration half."""
    out, full = {}, data["table"].full_model_index
    for name, (p_value, opt_fraction) in PARETO.items():
        res = pareto_test(data["losses"][:, cal], data["cost"][:, cal], eps, DELTA, p_value=p_value,
                          opt_fraction=opt_fraction, seed=seed, loss_range=GAP)
        row = full if res.index is None else res.index
        out[name] = (*outcome(data, row, test), res.index)
    path = data["path"]
    for name, method in SCALAR.items():  # LTT tests Hoeffding–Bentkus p-values; bound= is UCB's
        sel = select(method, data["lambdas"], data["losses"][path][:, cal], eps, DELTA, bound="wsr", loss_bounds=GAP)
        out[name] = (*outcome(data, int(path[sel.index]), test), int(path[sel.index]) if sel.feasible else None)
    cal_cost = data["cost"][:, cal].mean(axis=1)
    for name, share in ANCHORED.items():
        sel = select("ucb", data["lambdas"], data["losses"][path][:, cal], eps, DELTA * share, bound="wsr",
                     loss_bounds=GAP)
        res = pareto_test(data["losses"][:, cal], data["cost"][:, cal], eps, DELTA * (1 - share), p_value="wsr",
                          seed=seed, loss_range=GAP)
        certified = [int(path[sel.index])] if sel.feasible else []
        certified += [res.index] if res.index is not None else []
        row = min(certified, key=lambda g: (cal_cost[g], g)) if certified else full
        out[name] = (*outcome(data, row, test), row if certified else None)
    return out


def pool_oracle(data: dict, eps: float) -> dict:
    """The cheapest configuration whose mean gap over all pool rows is ≤ ε: over the grid, and on the default path."""
    risk, cost = data["losses"].mean(axis=1), data["cost"].mean(axis=1)
    out = {}
    for name, rows in (("grid", np.arange(risk.size)), ("default_configuration", data["path"])):
        ok = rows[risk[rows] <= eps]
        g = int(ok[np.argmin(cost[ok])])
        out[name] = {"configuration": data["names"][g], "threshold": float(data["table"].thresholds[g]),
                     "block_fraction": float(cost[g]), "mean_gap": float(risk[g])}
    return out


def summarise(data: dict, eps: float, results: list) -> dict:
    row = {"task": data["task"], "eps": eps, "delta": DELTA, "splits": len(results), "pool_oracle": pool_oracle(data, eps)}
    for method in results[0]:
        risk = np.array([r[method][0] for r in results])
        cost = np.array([r[method][1] for r in results])
        chosen = [data["names"][r[method][2]] for r in results if r[method][2] is not None]
        row[method] = {"mean_block_fraction": float(cost.mean()), "violation_rate": float(np.mean(risk > eps)),
                       "mean_test_risk": float(risk.mean()), "certified_rate": len(chosen) / len(results),
                       "configurations_chosen": {c: chosen.count(c) for c in sorted(set(chosen))}}
    best = min(SCALAR, key=lambda m: row[m]["mean_block_fraction"])
    for name in (*PARETO, *ANCHORED):
        diff = np.array([r[name][1] - r[best][1] for r in results])
        row[name]["minus_best_scalar"] = {"best_scalar": best, "mean": float(diff.mean()),
                                          "se": float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else None}
    return row


def run_task(task: str, splits: int, seed: int, eps_list=EPS) -> tuple[list, dict]:
    data = load(task)
    n = data["losses"].shape[1]
    rng = np.random.default_rng(seed)
    collected = {eps: [] for eps in eps_list}
    for s in range(splits):
        perm = rng.permutation(n)
        cal, test = np.sort(perm[: n // 2]), np.sort(perm[n // 2:])
        for eps in eps_list:
            collected[eps].append(one_split(data, cal, test, eps, seed=s))
    table = data["table"]
    info = {"task": task, "n": n, "rows": table.num_configurations, "configurations": len(set(data["names"])),
            "lambdas": sorted(set(table.thresholds.tolist())),
            "default_path_equals_stored_calibration": data["default_equals_stored"],
            "decode_seconds": float(np.sum(table.costs["wall_time"])),
            "decode_seconds_note": "sum of the rows' apportioned seconds (thresholds batched; the λ = 1 rows of all "
                                   "but the first configuration are dropped from the table, so about 1/11 of each of "
                                   "those configurations' time is missing)",
            "pool_oracle_by_eps": {str(e): pool_oracle(data, e) for e in ORACLE_EPS}, "front": front_points(data)}
    return [summarise(data, eps, collected[eps]) for eps in eps_list], info


def front_points(data: dict) -> dict:
    """Risk and cost of every row on all pool rows, the front, and the default path (for the figure)."""
    risk, cost = data["losses"].mean(axis=1), data["cost"].mean(axis=1)
    front = pareto_front(risk, cost)
    return {"risk": risk.tolist(), "cost": cost.tolist(), "names": data["names"],
            "thresholds": data["table"].thresholds.tolist(), "front": front.tolist(), "default_path": data["path"].tolist()}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    labels = {"pareto_hb": "Pareto HB", "pareto_hb_opt0.25": "Pareto HB, D_opt 1/4", "pareto_wsr": "Pareto WSR",
              "pareto_wsr_opt0.25": "Pareto WSR, D_opt 1/4", "anchored_0.9": "UCB-WSR at 0.9δ + Pareto WSR at 0.1δ",
              "ucb_wsr": "UCB-WSR (meta λ)", "ltt": "LTT (meta λ)"}
    for col, task in enumerate(TASKS):
        rows = [r for r in result["efficiency"] if r["task"] == task]
        if not rows:
            continue
        ax = axes[0, col]
        eps = [r["eps"] for r in rows]
        for (method, label), color in zip(labels.items(), ("C0", "C9", "C1", "C4", "C5", "C2", "C3")):
            ax.plot(eps, [r[method]["mean_block_fraction"] for r in rows], "o-", color=color, label=label)
        for key, marker, label in (("grid", "x", "cheapest with pool gap ≤ ε, grid"),
                                   ("default_configuration", "+", "same, meta λ only")):
            ax.scatter(eps, [r["pool_oracle"][key]["block_fraction"] for r in rows], color="k", marker=marker,
                       zorder=3, label=label + " (no guarantee)")
        ax.set(xlabel="ε", ylabel="mean decoder-block fraction (test half)", ylim=(0, 1.05),
               title=f"{task}: {rows[0]['splits']} splits, δ = {DELTA}")
        ax.legend(fontsize=6)
        front_axis(axes[1, col], next(i for i in result["tables"] if i["task"] == task))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def front_axis(ax, info: dict) -> None:
    import matplotlib

    f = info["front"]
    risk, cost, names = np.array(f["risk"]), np.array(f["cost"]), f["names"]
    for i, name in enumerate(sorted(set(names))):
        color = matplotlib.colormaps["tab20"](i % 20)
        rows = [g for g, m in enumerate(names) if m == name]
        ax.scatter(cost[rows], risk[rows], s=10, color=color, label=name, alpha=0.7)
    front = sorted(f["front"], key=lambda g: cost[g])
    ax.step(cost[front], risk[front], "k-", where="post", lw=1, label="Pareto front (all pool rows)")
    ax.plot(cost[f["default_path"]], risk[f["default_path"]], "r--", lw=1.2, label="default: meta λ path")
    for e in EPS:
        ax.axhline(e, color="grey", lw=0.5, ls=":")
    ax.set(xlabel="mean decoder-block fraction", ylabel="mean performance gap", title=f"{info['task']}: n = {info['n']}")
    ax.legend(fontsize=5, ncol=2)


def run(splits: int, seed: int, tasks=TASKS, eps_list=EPS) -> dict:
    efficiency, tables = [], []
    for task in tasks:
        rows, info = run_task(task, splits, seed, eps_list)
        efficiency += rows
        tables.append(info)
    return {"efficiency": efficiency, "tables": tables, "eps": list(eps_list), "delta": DELTA, "risk": "performance_gap",
            "cost": "layer_fraction", "splits": splits, "seed": seed, "pareto_variants": PARETO,
            "anchored_shares": ANCHORED,
            "default_configuration": DEFAULT, "machine": platform.processor() or platform.machine()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--splits", type=int, default=500, help="random calibration/test splits (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits (default 0)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks (default cnndm,squad)")
    parser.add_argument("--eps", default=",".join(map(str, EPS)), help="comma-separated ε (default 0.02,0.05,0.1)")
    parser.add_argument("--output", default=str(HERE / "results" / "pareto_efficiency.json"), help="JSON result; "
                        "the figure goes beside it (.png)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = run(args.splits, args.seed, tuple(t for t in args.tasks.split(",") if t),
                 tuple(float(e) for e in args.eps.split(",") if e))
    result["total_seconds"] = time.perf_counter() - start
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    for r in result["efficiency"]:
        cells = "  ".join(f"{m} {r[m]['mean_block_fraction']:.3f}/{r[m]['violation_rate']:.3f}" for m in (*PARETO, *ANCHORED, *SCALAR))
        print(f"{r['task']} eps={r['eps']}: {cells}  oracle {r['pool_oracle']['grid']['block_fraction']:.3f} "
              f"({r['pool_oracle']['grid']['configuration']} λ={r['pool_oracle']['grid']['threshold']:g})")
    print(f"wrote {out} and {out.with_suffix('.png')} in {result['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
