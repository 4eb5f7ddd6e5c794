"""Does the deployment monitor see a real shift on the shipped model? (issue 29, detection "for real").

The shipped default model (4 decoder layers, weak) is calibrated on its stored consistency table; the monitor replays
``--n`` pool rows the calibration did not use (the rows its table lists are left out), then ``--shift-n`` shifted rows
(:mod:`hf_safe_exit.monitor.replay`):

* ``cnndm_to_squad``: CNN/DM calibration (ucb, ε = 0.2, δ = 0.1: λ̂ = 0.8), then SQuAD inputs;
* ``cnndm_to_noise``: the same λ̂, then CNN/DM rows with 30 % of the article's words replaced by words of the article;
* ``squad_to_cnndm``: SQuAD calibration (ucb, ε = 0.2, δ = 0.1: λ̂ = 0.7), then CNN/DM articles;
* ``cnndm_to_lowercase``: the CNN/DM λ̂ = 0.8, then CNN/DM rows with the article lowercased. None of the three shifts
  above violates ε on this model, so a throwaway probe (48 non-calibration rows, another order) tried six more
  perturbations at λ = 0.8 (:data:`PROBE`); lowercasing was the only one above ε = 0.2. It is replayed here on this
  benchmark's stream (the 200 non-calibration rows are all there are, so the probe's rows and these overlap).

Every row is monitored (p = 1) and fallback is off, so each phase's true consistency risk at λ̂ is the mean over all
its rows, and the alarm (if any) is the monitor's own. p = 1 because at p = 0.2 the ~150 rows of a phase give ~30
losses, fewer than any detection here needs; for p < 1 the expected number of rows to the alarm is the expected number
of losses divided by p (Wald), reported below.

Per experiment: λ̂ and its guarantee, each phase's true risk (mean ± standard error over its rows), whether the shift
violates ε, the alarm (call, phase, losses into the shifted phase), Wald's closed form
``expected_samples_to_alarm(shifted losses, ε, α)`` (a fresh test on i.i.d. draws from those losses), the same test
run on 500 such i.i.d. resampled streams (median and quartiles), fresh and after the phase's real in-distribution losses
(the monitor's own situation: its cumulative bettor bets nothing until the running mean of all losses, pre-shift
losses included, passes ε; its discounted bettor forgets the history within a few dozen losses), and the test re-run at a tighter ε that has the same λ̂
(crc, ε = 0.1 for CNN/DM): with p = 1 and fallback off the monitor feeds exactly the rows' losses in order, so the
re-run is what that monitor would have done (tests/test_monitor_replay.py checks this equality).

    OMP_NUM_THREADS=1 python benchmarks/monitor_shift.py          # about 10 minutes on one core
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import hf_safe_exit
from hf_safe_exit import RiskControlled, RiskMonitor
from hf_safe_exit.monitor.replay import NOISE_RATE, build_stream, replay
from hf_safe_exit.risk import SequentialRiskTest, expected_samples_to_alarm, find_stored, first_alarm

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "monitor_shift.json"
ALPHA, DELTA, RESAMPLED, MAX_LEN = 0.05, 0.1, 500, 20_000
EXPERIMENTS = {
    "cnndm_to_squad": dict(task="cnndm", eps=0.2, method="ucb", shift="other-task", tighter=(0.1, "crc")),
    "cnndm_to_noise": dict(task="cnndm", eps=0.2, method="ucb", shift="noise", tighter=(0.1, "crc")),
    "squad_to_cnndm": dict(task="squad", eps=0.2, method="ucb", shift="other-task", tighter=None),
    "cnndm_to_lowercase": dict(task="cnndm", eps=0.2, method="ucb", shift="lowercase", tighter=(0.1, "crc")),
}
#: the probe that chose the lowercase shift: mean consistency loss at λ = 0.7 / 0.8 on 48 non-calibration CNN/DM rows
PROBE = {"rows": 48, "lambda_0.8": {"squad_context_as_summary": 0.05, "lee_news_articles": 0.077, "no_prefix": 0.09,
                                    "noise_0.7": 0.095, "shuffled_sentences": 0.144, "lowercase": 0.327},
         "lambda_0.7": {"squad_context_as_summary": 0.088, "lee_news_articles": 0.175, "no_prefix": 0.163,
                        "noise_0.7": 0.227, "shuffled_sentences": 0.232, "lowercase": 0.421}}


def phase_losses(log: dict) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for call in log["calls"]:
        out.setdefault(call["phase"], []).extend(call["losses"])
    return out


def resampled_delays(losses, eps: float, rng, prefix=()) -> dict:
    """The test on ``RESAMPLED`` streams: ``prefix`` (losses already fed), then i.i.d. draws from ``losses``; the
    number of drawn losses to the alarm (1-based; an alarm inside the prefix counts as 0)."""
    delays = []
    for _ in range(RESAMPLED):
        index = first_alarm(np.concatenate([np.asarray(prefix, dtype=float), rng.choice(losses, size=MAX_LEN)]), eps,
                            ALPHA)
        delays.append(math.inf if index is None else max(index + 1 - len(prefix), 0))
    d = np.asarray(delays)
    q = np.percentile(d, [25, 50, 75])
    return {"streams": RESAMPLED, "max_losses": MAX_LEN, "share_alarmed": float(np.isfinite(d).mean()),
            "quartiles": [None if not np.isfinite(v) else float(v) for v in q]}


def detection(prefix: list[float], losses: list[float], eps: float, seed: int) -> dict:
    """Wald's closed form for a fresh test on i.i.d. draws from the shifted phase's ``losses``, that test run on
    resampled streams, and the same with the in-distribution losses fed first (the monitor's own situation)."""
    x = np.asarray(losses)
    closed = expected_samples_to_alarm(x, eps, ALPHA)
    out = {"eps": eps, "true_risk": float(x.mean()), "violates_eps": bool(x.mean() > eps),
           "closed_form_expected_losses": None if math.isinf(closed) else closed,
           "expected_rows_at_p": {str(p): None if math.isinf(closed) else closed / p for p in (0.2, 0.05)},
           "resampled_fresh": None, "resampled_after_in_distribution": None}
    if x.mean() > eps:
        out["resampled_fresh"] = resampled_delays(x, eps, np.random.default_rng(seed))
        out["resampled_after_in_distribution"] = resampled_delays(x, eps, np.random.default_rng(seed), prefix)
    return out


def analyse(r: dict) -> dict:
    """The detection numbers from the recorded losses (re-run with --reanalyse, no decoding)."""
    losses = r["losses"]
    before = losses["in-distribution"]
    shifted = [p for p in losses if p != "in-distribution"][0]
    r["detection"] = detection(before, losses[shifted], r["eps"], r["seed"])
    if r.get("tighter_eps"):
        t = r["tighter_eps"]
        index = first_alarm(before + losses[shifted], t["eps"], ALPHA)  # p = 1, no fallback: the monitor's alarm
        t["trajectory"] = tighter_trajectory(r["trajectory"], before + losses[shifted], t["eps"])
        t.update(alarm_loss_index=index, in_phase=None if index is None else
                 ("in-distribution" if index < len(before) else shifted),
                 losses_into_shift=None if index is None or index < len(before) else index - len(before) + 1,
                 detection=detection(before, losses[shifted], t["eps"], r["seed"]))
    return r


def tighter_trajectory(calls: list[dict], losses: list[float], eps: float) -> list[dict]:
    """The test at ``eps`` fed the recorded losses call by call (the calls' counts ``n``): the monitor's trajectory
    had it tested that ε."""
    test, out, fed = SequentialRiskTest(eps, ALPHA), [], 0
    for c in calls:
        test.update(losses[fed:c["n"]])
        fed = c["n"]
        out.append({"call": c["call"], "phase": c["phase"], "n": test.n, "mean": test.mean,
                    "confidence_interval": list(test.confidence_interval()), "log_e_value": test.log_e_value,
                    "alarm": test.alarmed})
    return out


def run(name: str, spec: dict, model, tokenizer, data: str, n: int, shift_n: int, batch: int, seed: int) -> dict:
    policy = RiskControlled(spec["eps"], delta=DELTA, method=spec["method"], risk="consistency", task=spec["task"])
    monitor = RiskMonitor(policy, tokenizer=tokenizer, sample_rate=1.0, alpha=ALPHA, fallback=False, seed=seed)
    table = find_stored(model, spec["task"]).table
    stream = build_stream(spec["task"], data, n=n, shift=spec["shift"], shift_n=shift_n, seed=seed,
                          exclude_ids=table.metadata.get("example_ids") or ())
    start = time.perf_counter()
    log = replay(model, tokenizer, monitor, stream, batch_size=batch, progress=lambda line: print(f"  {line}"),
                 every=10)
    wall = time.perf_counter() - start
    losses = phase_losses(log)
    result = {"task": spec["task"], "method": spec["method"], "delta": DELTA, "eps": spec["eps"],
              "lambda_hat": log["threshold"], "guarantee": policy.calibration_for(model).certificate.guarantee,
              "shift": spec["shift"], "sample_rate": 1.0, "alpha": ALPHA, "batch_size": batch, "seed": seed,
              "wall_seconds": round(wall, 1),
              "phases": {p: {"rows": len(v), "true_risk": float(np.mean(v)),
                             "standard_error": float(np.std(v, ddof=1) / math.sqrt(len(v))),
                             "share_nonzero": float(np.mean(np.asarray(v) > 0))} for p, v in losses.items()},
              "alarm": log["alarm"], "losses": losses,
              "trajectory": [{k: c[k] for k in ("call", "phase", "n", "mean", "confidence_interval", "log_e_value")}
                             for c in log["calls"]]}
    if spec["tighter"] is not None:  # a tighter ε whose λ̂ is the same: the recorded losses are that policy's too
        eps, method = spec["tighter"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            same = RiskControlled(eps, delta=None if method == "crc" else DELTA, method=method, risk="consistency",
                                  task=spec["task"]).fit_table(table).threshold
        result["tighter_eps"] = {"eps": eps, "method": method, "lambda_hat": same,
                                 "same_lambda": same == log["threshold"]}
    return analyse(result)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for name, r in results.items():
        panels.append((name, r, r["trajectory"], r["eps"], r["method"],
                       None if r["alarm"] is None else r["alarm"]["call"]))
        t = r.get("tighter_eps")
        if t and t["alarm_loss_index"] is not None:  # the same losses, tested at the tighter ε (same λ̂)
            panels.append((name, r, t["trajectory"], t["eps"], t["method"],
                           next(c["call"] for c in t["trajectory"] if c["alarm"])))
    fig, axes = plt.subplots(2, len(panels), figsize=(4.5 * len(panels), 6), sharex="col", squeeze=False)
    for j, (name, r, traj, eps, method, alarm) in enumerate(panels):
        x = np.arange(1, len(traj) + 1)
        top, bottom = axes[0, j], axes[1, j]
        top.fill_between(x, *zip(*[c["confidence_interval"] for c in traj]), alpha=0.25, label="95% CS")
        top.plot(x, [c["mean"] for c in traj], label="running mean")
        top.axhline(eps, color="k", ls="--", label=f"ε = {eps:g}")
        first = 1
        for phase, info in r["phases"].items():
            calls = sum(c["phase"] == phase for c in traj)
            top.hlines(info["true_risk"], first, first + calls - 1, color="tab:green", lw=2,
                       label="phase's true risk" if first == 1 else None)
            if first > 1:
                for ax in (top, bottom):
                    ax.axvline(first - 0.5, color="grey", ls=":")
            first += calls
        bottom.semilogy(x, [math.exp(min(c["log_e_value"], 700)) for c in traj], label="e-value")
        bottom.axhline(1 / r["alpha"], color="k", ls="--", label=f"1/α = {1 / r['alpha']:g}")
        if alarm is not None:
            for ax in (top, bottom):
                ax.axvline(alarm + 1, color="tab:red", label="alarm" if ax is top else None)
        top.set_title(f"{name}: λ̂ = {r['lambda_hat']:g} ({method}, ε = {eps:g})", fontsize=10)
        top.set_ylabel("consistency loss")
        bottom.set_ylabel("e-value")
        bottom.set_xlabel(f"call (batch {r['batch_size']}, p = 1)")
        top.legend(fontsize=7, loc="upper left")
        bottom.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the offline data folder")
    parser.add_argument("--n", type=int, default=150, help="in-distribution rows")
    parser.add_argument("--shift-n", type=int, default=150, help="shifted rows")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per generate call")
    parser.add_argument("--seed", type=int, default=0, help="stream order, noise and resampling")
    parser.add_argument("--only", nargs="*", default=list(EXPERIMENTS), help="experiments to run")
    parser.add_argument("--out", type=Path, default=OUT, help="JSON result (the PNG beside it)")
    parser.add_argument("--reanalyse", action="store_true", help="recompute the detection numbers and the plot from "
                        "the losses recorded in --out, without decoding")
    args = parser.parse_args()
    if args.reanalyse:
        out = json.loads(args.out.read_text(encoding="utf-8"))
        out["experiments"] = {k: analyse(v) for k, v in out["experiments"].items()}
        return write(out, args.out)
    torch.set_num_threads(1)
    model, tokenizer = hf_safe_exit.load_default_model()
    results = {}
    for name in args.only:
        print(name, flush=True)
        results[name] = run(name, EXPERIMENTS[name], model, tokenizer, args.data, args.n, args.shift_n,
                            args.batch_size, args.seed)
        r = results[name]
        print(f"  λ̂ {r['lambda_hat']}: " + ", ".join(f"{p} risk {v['true_risk']:.4f} ± {v['standard_error']:.4f}"
                                                   for p, v in r["phases"].items())
              + f"; alarm: {None if r['alarm'] is None else (r['alarm']['phase'], r['alarm']['losses_into_phase'])}",
              flush=True)
    out = {"what": "RiskMonitor on real shifts of the shipped default model (benchmarks/monitor_shift.py)",
           "basis": {"model": "hf_safe_exit default model (4 decoder layers, weak)", "risk": "consistency",
                     "calibration": "the model's stored consistency tables (their rows left out of the streams)",
                     "noise_rate": NOISE_RATE, "lowercase_chosen_by": PROBE, "threads": torch.get_num_threads(),
                     "torch": torch.__version__,
                     "machine": f"{platform.machine()} {platform.processor() or ''} ({os.cpu_count()} CPUs)".strip(),
                     "python": platform.python_version()},
           "experiments": results}
    write(out, args.out)


def summary(experiments: dict) -> dict:
    """One line of numbers per experiment (and per tighter ε): the risks, the alarm, the expected delays."""
    def line(r, d, alarm_into):
        fresh, carried = d["resampled_fresh"], d["resampled_after_in_distribution"]
        return {"eps": d["eps"], "risk_in_distribution": r["phases"]["in-distribution"]["true_risk"],
                "risk_shifted": d["true_risk"], "violates_eps": d["violates_eps"],
                "alarm_losses_into_shift": alarm_into, "closed_form_expected_losses": d["closed_form_expected_losses"],
                "median_losses_fresh_iid": fresh and fresh["quartiles"][1],
                "median_losses_after_in_distribution": carried and carried["quartiles"][1]}

    out = {}
    for name, r in experiments.items():
        alarm = r["alarm"]
        out[name] = line(r, r["detection"], None if alarm is None or alarm["phase"] == "in-distribution"
                         else alarm["losses_into_phase"])
        if r.get("tighter_eps"):
            t = r["tighter_eps"]
            out[f"{name} at eps={t['eps']:g} ({t['method']}, same λ̂)"] = line(r, t["detection"],
                                                                               t["losses_into_shift"])
    return out


def write(out: dict, path: Path) -> None:
    out["summary"] = summary(out["experiments"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    plot(out["experiments"], path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
