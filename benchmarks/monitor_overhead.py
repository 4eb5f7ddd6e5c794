"""What a RiskMonitor costs: ``generate(early_exit=rc)`` against ``generate(early_exit=RiskMonitor(rc, sample_rate=p))``
on the shipped default model (issue 29, "Cost").

The monitor's only extra work is the shadow decode: each row of a call is sampled with probability p and the sampled
rows are decoded again by the full model (λ = 1), as one sub-batch, then scored (ROUGE-L consistency). So the expected
overhead per call is about p × the full model's time per call at batch 1; at batch B a call shadow-decodes only its
k ~ Binomial(B, p) sampled rows, and a sub-batch of k rows costs more than k/B of a B-row batch (batching amortises
less), so the overhead exceeds p × the full model's time at batch B. Both are reported, with the "exact" prediction:
the full model timed, in the same interleaved loop, on exactly the rows each monitor sampled (its draws replayed from
its seed with numpy's generator, and checked against the monitor's own count).

``RiskMonitor(sample="call")`` samples a whole call with probability p (the same expected rows): its expected
overhead is p × the full model's time on the batch. Its "exact" prediction is the full model's time on the calls it
sampled (the ``full_model`` variant's own timing of those calls, 0 on the others), for p in :data:`CALL_RATES`.

Basis: end-to-end ``generate`` time per call (tokenizer excluded; encoder, decoder, the monitor's scoring included),
greedy, inputs = CNN/DM pool rows the calibration did not use, truncated to the calibration's 160 tokens, at most 64
new tokens (the calibration's); λ̂ = the stored CNN/DM consistency calibration at ε = 0.2 (ucb, δ = 0.1);
``torch.set_num_threads(1)``; the variants run interleaved on each call's inputs, in an order that rotates per call,
so load drifts hit all alike. The machine is shared: its load average is recorded.

    OMP_NUM_THREADS=1 python benchmarks/monitor_overhead.py      # about 7 minutes on one core
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import hf_safe_exit
from hf_safe_exit import EarlyExit, RiskControlled, RiskMonitor, generate
from hf_safe_exit.cards import describe_hardware
from hf_safe_exit.risk import find_stored
from hf_safe_exit.tasks import get_task, load_split

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "monitor_overhead.json"
RATES = (0.05, 0.2, 1.0)
CALL_RATES = (0.05, 0.2)  # sample="call" at p = 1 is sample="row" at p = 1


def inputs(tokenizer, data: str, rows: int, batch: int, exclude, max_len: int) -> list[dict]:
    task = get_task("cnndm")
    pool = load_split(task, "pool", path=data)
    keep = [i for i, x in enumerate(pool["id"]) if str(x) not in exclude]
    order = np.random.default_rng(0).permutation(keep)[:rows]
    prompts = [task.prompt(pool[int(i)]) for i in order]
    return [dict(tokenizer(prompts[i:i + batch], return_tensors="pt", padding=True, truncation=True,
                           max_length=max_len)) for i in range(0, rows, batch)]


def timed(fn) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        fn()
    return time.perf_counter() - start


def measure(model, tokenizer, rc, calls: list[dict], seed: int) -> dict:
    full = EarlyExit(1.0, config=rc.calibration_for(model).config)
    monitors = {p: RiskMonitor(rc, tokenizer=tokenizer, sample_rate=p, fallback=False, seed=seed) for p in RATES}
    per_call = {p: RiskMonitor(rc, tokenizer=tokenizer, sample_rate=p, fallback=False, seed=seed, sample="call")
                for p in CALL_RATES}
    draws = {p: np.random.default_rng(seed) for p in RATES}  # the monitors' sampling decisions, replayed
    call_draws = {p: np.random.default_rng(seed) for p in CALL_RATES}  # one draw per call
    times: dict[str, list[float]] = {k: [] for k in ["early_exit", "full_model", *(f"monitor_p{p}" for p in RATES),
                                                     *(f"full_on_sampled_p{p}" for p in RATES),
                                                     *(f"monitor_call_p{p}" for p in CALL_RATES)]}
    sampled = {p: 0 for p in RATES}
    calls_sampled: dict[float, list[bool]] = {p: [] for p in CALL_RATES}
    for c, enc in enumerate(calls):
        batch = enc["input_ids"].shape[0]
        variants = {"early_exit": lambda: generate(model, **enc, early_exit=rc),
                    "full_model": lambda: generate(model, **enc, early_exit=full, max_new_tokens=64)}
        for p in RATES:
            variants[f"monitor_p{p}"] = lambda p=p: generate(model, **enc, early_exit=monitors[p])
            rows = np.flatnonzero(draws[p].random(batch) < p)
            sampled[p] += rows.size
            sub = {k: v[rows.tolist()] for k, v in enc.items()}
            variants[f"full_on_sampled_p{p}"] = (lambda sub=sub: generate(model, **sub, early_exit=full,
                                                                          max_new_tokens=64)) if rows.size else None
        for p in CALL_RATES:
            variants[f"monitor_call_p{p}"] = lambda p=p: generate(model, **enc, early_exit=per_call[p])
            calls_sampled[p].append(bool(call_draws[p].random() < p))
        names = list(variants)
        for name in names[c % len(names):] + names[:c % len(names)]:  # rotate the order per call
            if variants[name] is None:
                times[name].append(0.0)  # nothing sampled: no shadow decode
            else:
                times[name].append(timed(variants[name]))
    for p in RATES:  # the replayed draws must be the monitor's, or the "exact" prediction is about other rows
        assert monitors[p].rows_sampled == sampled[p], (p, monitors[p].rows_sampled, sampled[p])
    out = summarise(times, calls, sampled, monitors)
    out["per_rate_call_sampling"] = summarise_call_sampling(times, calls, calls_sampled, per_call)
    return out


def summarise_call_sampling(times: dict, calls: list[dict], calls_sampled: dict, monitors: dict) -> dict:
    """``sample="call"``: overhead against p × the full model's time and against its time on the sampled calls."""
    early, full = statistics.fmean(times["early_exit"]), times["full_model"]
    out = {}
    for p in CALL_RATES:
        batch_rows = [int(e["input_ids"].shape[0]) for e, hit in zip(calls, calls_sampled[p]) if hit]
        assert monitors[p].rows_sampled == sum(batch_rows), (p, monitors[p].rows_sampled, sum(batch_rows))
        overhead = statistics.fmean(times[f"monitor_call_p{p}"]) - early
        exact = statistics.fmean(t if hit else 0.0 for t, hit in zip(full, calls_sampled[p]))
        out[str(p)] = {"calls_sampled": sum(calls_sampled[p]), "rows_sampled": monitors[p].rows_sampled,
                       "overhead_seconds_per_call": overhead, "overhead_relative_to_early_exit": overhead / early,
                       "predicted_p_times_full": p * statistics.fmean(full),
                       "predicted_full_on_sampled_calls": exact, "residual_scoring_and_slicing": overhead - exact}
    return out


def summarise(times: dict, calls: list[dict], sampled: dict, monitors: dict) -> dict:
    rows = sum(int(e["input_ids"].shape[0]) for e in calls)
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    out = {"calls": len(calls), "rows": rows, "seconds_per_call_mean": mean,
           "seconds_per_call_median": {k: statistics.median(v) for k, v in times.items()}, "per_rate": {}}
    for p in RATES:
        overhead = mean[f"monitor_p{p}"] - mean["early_exit"]
        out["per_rate"][str(p)] = {
            "rows_sampled": int(sampled[p]), "share_sampled": sampled[p] / rows,
            "losses_fed": monitors[p].test.n, "alarm": monitors[p].alarm is not None,
            "overhead_seconds_per_call": overhead, "overhead_relative_to_early_exit": overhead / mean["early_exit"],
            "predicted_p_times_full": p * mean["full_model"],
            "predicted_full_on_sampled_rows": mean[f"full_on_sampled_p{p}"],
            "residual_scoring_and_slicing": overhead - mean[f"full_on_sampled_p{p}"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the offline data folder")
    parser.add_argument("--rows-batch1", type=int, default=64, help="rows (= calls) at batch 1")
    parser.add_argument("--rows-batch8", type=int, default=128, help="rows at batch 8")
    parser.add_argument("--seed", type=int, default=0, help="the monitors' sampling seed")
    parser.add_argument("--out", type=Path, default=OUT, help="JSON result")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # a monitor's alarm would warn; it is recorded instead
    model, tokenizer = hf_safe_exit.load_default_model()
    rc = RiskControlled(0.2, delta=0.1, method="ucb", risk="consistency", task="cnndm")
    lengths = rc.calibration_for(model).generation_settings  # fitted once here, not inside a timed call
    exclude = {str(i) for i in find_stored(model, "cnndm").table.metadata["example_ids"]}
    load_before = os.getloadavg()
    warm = inputs(tokenizer, args.data, 8, 8, exclude, lengths["max_input_length"])
    measure(model, tokenizer, rc, warm, args.seed + 1)  # warm-up: first-call costs are not the monitor's
    result = {}
    for batch, rows in ((1, args.rows_batch1), (8, args.rows_batch8)):
        calls = inputs(tokenizer, args.data, rows, batch, exclude, lengths["max_input_length"])
        result[f"batch_{batch}"] = measure(model, tokenizer, rc, calls, args.seed)
        print(batch, json.dumps({k: result[f"batch_{batch}"][k] for k in ("per_rate", "per_rate_call_sampling")},
                                indent=1), flush=True)
    out = {"what": "time per generate call: early exit at λ̂ vs RiskMonitor(sample_rate=p), per row and per call "
                   "(sample='call'), vs the full model",
           "basis": {"timing": "end-to-end generate per call (encoder + decoder + monitor scoring; tokenizer "
                               "excluded), mean over calls, variants interleaved with a rotating order",
                     "model": "hf_safe_exit default model (4 decoder layers)", "lambda_hat": rc.calibration_for(
                         model).threshold, "policy": "RiskControlled(0.2, delta=0.1, method='ucb', risk='consistency')",
                     "inputs": "CNN/DM pool rows not in the calibration", **lengths, "greedy": True,
                     "threads": torch.get_num_threads(), "machine": describe_hardware(),
                     "platform": platform.platform(), "torch": torch.__version__,
                     "load_average_before_after": [list(load_before), list(os.getloadavg())],
                     "note": "a shared 2-core machine: other processes ran at the same time"},
           "results": result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
