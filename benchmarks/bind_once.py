"""Does ``generate(early_exit=RiskControlled(eps))`` cost more than passing the fitted threshold? (issue 25, item 4)

On the flan-t5-large shape (random weights, ``speed_shapes.build_model``), with a loss table attached to the model
(``model.early_exit_calibration``, fingerprinted for it), ``--calls`` generate calls with an unfitted
``RiskControlled(eps)`` (which finds the stored table, fits λ̂ once and fingerprints the model) against the same
calls with the fitted threshold passed directly (``EarlyExit(λ̂, config=...)``), interleaved call by call, after one
warm-up of each. Reported: total seconds of each side and their ratio (target ≤ 1.01), the median of the paired
per-call ratios, the work that differs between the sides timed alone (resolving the request vs binding the
threshold, as a fraction of a call: whole calls vary by more than 1% from call to call), and, as the cost that
caching removes, the time of one uncached fingerprint. End to end (encoder included), batch 1, one thread.

    OMP_NUM_THREADS=1 python benchmarks/bind_once.py   # writes benchmarks/results/bind_once.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed_shapes  # noqa: E402  (sibling benchmark script: the real shapes)

from hf_safe_exit import EarlyExit, EarlyExitConfig, LossTable, RiskControlled, enable  # noqa: E402
from hf_safe_exit import fingerprint as fp  # noqa: E402


def attach_table(model, config: EarlyExitConfig, seed: int = 0) -> LossTable:
    """A loss table for ``model`` whose λ̂ lies inside the grid (losses fall with λ), attached as its calibration."""
    rng = np.random.default_rng(seed)
    lam = np.linspace(0.0, 1.0, 11)
    task = np.clip(0.5 + 0.3 * (1 - lam)[:, None] * rng.random((1, 200)), 0.0, 1.0)
    table = LossTable.from_task_losses(lam, task, metadata={"model_fingerprint": fp.model_fingerprint(model),
                                                            "task": "cnndm", **config.to_dict()})
    model.early_exit_calibration = table
    return table


def timed_many(fn, repeats: int = 50) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="large", choices=sorted(speed_shapes.SHAPES))
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--input-length", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bind_once.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = enable(speed_shapes.build_model(speed_shapes.SHAPES[args.shape]))
    config = EarlyExitConfig(measure="saturation")
    attach_table(model, config)
    ids = torch.randint(2, model.config.vocab_size, (1, args.input_length), generator=torch.Generator().manual_seed(1))
    common = dict(input_ids=ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    threshold = RiskControlled(args.eps).fit_table(model.early_exit_calibration).threshold
    sides = {"risk_controlled": lambda: model.generate(**common, early_exit=RiskControlled(args.eps)),
             "threshold": lambda: model.generate(**common, early_exit=EarlyExit(threshold, config=config))}
    outputs = {name: fn() for name, fn in sides.items()}  # warm-up: the fit and the first fingerprint happen here
    assert torch.equal(outputs["risk_controlled"], outputs["threshold"]), "both sides must decode the same tokens"
    seconds = {name: [] for name in sides}
    order = list(sides.items())
    for i in range(args.calls):  # interleaved, and the order alternated: drifts and going first hit both alike
        for name, fn in (order if i % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    # what differs between the two sides, timed alone (whole calls vary by ±15% here, which a 20-call sum cannot
    # resolve to 1%): the request's resolution (fingerprint key, cached fit, policy) against binding the threshold
    dispatch = {name: timed_many(fn) for name, fn in (
        ("risk_controlled", lambda: RiskControlled(args.eps).policy_for(model)[1].bind(model)),
        ("threshold", lambda: EarlyExit(threshold, config=config).bind(model)))}
    fp.clear_fingerprint_cache()
    start = time.perf_counter()
    fp.model_fingerprint(model)
    uncached = time.perf_counter() - start
    totals = {name: float(sum(v)) for name, v in seconds.items()}
    doc = {
        "what": "generate(early_exit=RiskControlled(eps)) vs the fitted threshold passed directly, end to end",
        "shape": args.shape, "batch": 1, "input_length": args.input_length, "new_tokens": args.new_tokens,
        "calls": args.calls, "threads": args.threads, "eps": args.eps, "threshold": threshold,
        "total_seconds": totals, "ratio": totals["risk_controlled"] / totals["threshold"],
        "ratio_paired_median": statistics.median(a / b for a, b in zip(seconds["risk_controlled"],
                                                                       seconds["threshold"])),
        "dispatch_seconds_per_call": dispatch,
        "dispatch_overhead_fraction": (dispatch["risk_controlled"] - dispatch["threshold"])
        / statistics.median(seconds["threshold"]),
        "seconds_per_call": seconds, "uncached_fingerprint_seconds": uncached,
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "loadavg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "git_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip(),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2)
    print(f"{args.calls} calls, {args.shape} shape: RiskControlled {totals['risk_controlled']:.2f} s, threshold "
          f"{totals['threshold']:.2f} s, ratio {doc['ratio']:.4f} (median paired {doc['ratio_paired_median']:.4f}); "
          f"dispatch {1000 * dispatch['risk_controlled']:.2f} vs {1000 * dispatch['threshold']:.2f} ms per call = "
          f"{100 * doc['dispatch_overhead_fraction']:.2f}% of a call; one uncached fingerprint {uncached:.3f} s")
    return doc


if __name__ == "__main__":
    main()
