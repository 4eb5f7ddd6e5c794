"""Which confidence measure is fastest at equal risk? (issue "Speed", item 4: the default chosen by measurement)

Part 1, risk (no timing): for every (task, measure) loss table collected on the default model's pool with the
same settings (``examples/calibrate_default_model.sh``: grid 0..1 step 0.1, 160 input tokens, 64/16 new
tokens, the selection rows left out), λ̂ at ``--eps`` with CRC and UCB-WSR (``--delta``) on all rows, and the mean
exit layer there: per example, and per generated token (the number that sets decode time). Repeated random
splits (n_cal = half, ``--repeats``) give the test risk and mean exit of the same procedure on unseen rows.

Part 2, wall clock (``--shapes``): the default model has 4 decoder layers; a token exiting at layer k of 4 is
mapped to relative depth k/4 of each real shape (t5-small 6, flan-t5-base 12, flan-t5-large 24 layers, random
weights, ``speed_shapes.build_model``). Each calibrated row is decoded on that shape with the *real* measure
running at every layer up to the token's exit (``speed_shapes.AtLayer``), the per-token exit layers drawn so
that their mean is the row's per-token mean exit, against HF ``generate`` interleaved (``speed_shapes.Context``:
same encoder output, exactly N tokens each, medians of ``--repeats``). At batch 1 a token's cost depends only
on its own exit layer and is linear in it for every measure (a fixed cost per layer run, plus one vocabulary
projection for the read-out, plus softmax_shortlist's one full projection at the first layer allowed to
exit), so the mean exit determines the expected time per token; the table spreads it over floor/ceil layers.

Ratios are ``ratio_paired`` (the median over interleaved repeats of ours/HF within each pair). The measure with
the lowest mean ratio at equal ε, over shapes, tasks and methods, is the default; measures that
need a trained meta head only where one exists (see ``hf_safe_exit.confidence.DEFAULT_MEASURE``).

    python benchmarks/measure_choice.py --table cnndm softmax TABLES/cnndm_softmax.npz --table ...
    (one --table per task and measure; TABLES = benchmarks/results/measure_choice_tables; see speed_acceptance.sh)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed_shapes  # noqa: E402  (sibling benchmark script: models, forced-exit measure, interleaved timing)

from hf_safe_exit import EarlyExit, LossTable, RiskControlled  # noqa: E402
from hf_safe_exit.calibration.evaluate import evaluate_table  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def risk_rows(tables, eps: float, delta: float, repeats: int) -> list[dict]:
    """λ̂ (all rows) and the mean exit layer at it, per (task, measure, method); split-procedure stats too."""
    rows = []
    for task, measure, path in tables:
        table = LossTable.load(path)
        if table.metadata.get("measure") not in (None, measure):
            raise SystemExit(f"{path} was collected with measure {table.metadata['measure']!r}, not {measure!r}")
        exits, tokens = table.extras["mean_exit_layer"], table.extras["num_tokens"].astype(np.float64)
        split = evaluate_table(table, eps=[eps], methods=("crc", "ucb"), delta=delta, repeats=repeats)["results"]
        for method in ("crc", "ucb"):
            rc = RiskControlled(eps, delta=delta if method == "ucb" else None, method=method).fit_table(table)
            k = int(np.flatnonzero(np.isclose(table.lambdas, rc.threshold))[0])
            s = next(r for r in split if r["method"] == method)
            rows.append({
                "task": task, "measure": measure, "method": method, "eps": eps,
                "delta": delta if method == "ucb" else None, "n": table.n, "table": os.path.basename(path),
                "lambda_hat": rc.threshold, "empirical_risk": rc.certificate.empirical_risk,
                "risk_bound": rc.certificate.risk_bound,
                "num_decoder_layers": int(table.metadata["num_decoder_layers"]),
                "mean_exit_layer_per_example": float(exits[k].mean()),
                "mean_exit_layer_per_token": float((exits[k] * tokens[k]).sum() / tokens[k].sum()),
                "split_procedure": {"n_cal": table.n // 2, "repeats": repeats,
                                    "test_risk_mean": s["test_risk_mean"], "lambda_hat_mean": s["lambda_hat_mean"],
                                    "mean_exit_layer": s["mean_exit_layer"]}})
    return rows


def spread_table(mean: float, n: int, L: int, gen: torch.Generator) -> torch.Tensor:
    """(1, n) exit layers in 1..L on floor/ceil of ``mean`` whose mean is ``mean`` to within 1/(2n)."""
    mean = min(max(mean, 1.0), float(L))
    total = round(mean * n)
    lo = min(int(total // n), L)
    layers = torch.full((n,), lo)
    layers[: total - lo * n] += 1
    return layers[torch.randperm(n, generator=gen)].unsqueeze(0)


def time_rows(rows: list[dict], shapes: dict, args, doc: dict) -> None:
    """Decode every calibrated row's exit profile on each shape (name -> T5Config kwargs); HF interleaved."""
    gen = torch.Generator().manual_seed(args.seed)
    for shape, spec in shapes.items():
        model = speed_shapes.build_model(spec)
        L, vocab = model.config.num_decoder_layers, model.config.vocab_size
        ids = torch.randint(2, vocab, (1, args.input_length), generator=gen)
        mask = torch.ones_like(ids)
        parts = speed_shapes.floor_parts(model, ids, mask, args.new_tokens, 3, 0.05)
        ctx = speed_shapes.Context(model, shape, ids, mask, args.new_tokens, parts, args, doc)
        ctx.row("lambda1", "lambda1", L, EarlyExit(threshold=1.0), torch.full((1, args.new_tokens), L))
        doc["rows"][-1].update(task=None, method=None)
        for r in rows:
            target = r["mean_exit_layer_per_token"] * L / r["num_decoder_layers"]
            table = spread_table(target, args.new_tokens, L, gen)
            policy = EarlyExit(threshold=0.5, measure=speed_shapes.AtLayer(r["measure"], table))
            ctx.row("calibrated", r["measure"], table, policy, table)
            doc["rows"][-1].update(task=r["task"], method=r["method"], mapped_from=target,
                                   default_model_mean_exit=r["mean_exit_layer_per_token"])
        del model


def choose(doc: dict) -> dict:
    """Per (shape, task, method): the measure with the lowest time per token relative to HF (``ratio_paired``);
    overall: the lowest mean of those ratios over all settings."""
    timed = [r for r in doc["rows"] if r["experiment"] == "calibrated"]
    best = {}
    for r in timed:
        key = f"{r['shape']}/{r['task']}/{r['method']}"
        if key not in best or r["ratio_paired"] < best[key]["ratio"]:
            best[key] = {"measure": r["measure"], "ratio": r["ratio_paired"]}
    ratio = {m: statistics.mean(r["ratio_paired"] for r in timed if r["measure"] == m)
             for m in sorted({r["measure"] for r in timed})}
    head_free = {m: v for m, v in ratio.items() if m != "meta"}
    return {"fastest_per_setting": best, "mean_ratio_to_hf": ratio,
            "fastest": min(ratio, key=ratio.get) if ratio else None,
            "fastest_without_meta_head": min(head_free, key=head_free.get) if head_free else None}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", nargs=3, action="append", required=True, metavar=("TASK", "MEASURE", "NPZ"),
                   help="a loss table from `hf-safe-exit collect --measure MEASURE` (repeat the option)")
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--delta", type=float, default=0.1, help="UCB's δ")
    p.add_argument("--split-repeats", type=int, default=200, help="random calibration/test splits per row")
    p.add_argument("--shapes", nargs="*", default=["small", "base", "large"])
    p.add_argument("--input-length", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3, help="interleaved timings per row (median)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "results", "measure_choice.json"))
    args = p.parse_args(argv)
    args.end_to_end = False  # Context: both loops decode from the same encoder output
    return args


def main(argv=None, shapes: dict | None = None) -> dict:
    args = parse_args(argv)
    shapes = {**speed_shapes.SHAPES, **(shapes or {})}
    unknown = set(args.shapes) - set(shapes)
    if unknown:
        raise SystemExit(f"unknown shapes {sorted(unknown)}: use {sorted(shapes)}")
    doc = {**speed_shapes.header(args, argv), "benchmark": "measure_choice", "floors": [], "rows": []}
    doc["risk"] = risk_rows(args.table, args.eps, args.delta, args.split_repeats)
    for r in doc["risk"]:
        print(f"{r['task']:<6}{r['measure']:<18}{r['method']:<4} λ̂ {r['lambda_hat']:<4g} risk "
              f"{r['empirical_risk']:+.4f} bound {r['risk_bound']:+.4f} exit/token "
              f"{r['mean_exit_layer_per_token']:.2f} of {r['num_decoder_layers']}", flush=True)
    with speed_shapes.isolated(args.threads, args.seed):
        time_rows(doc["risk"], {name: shapes[name] for name in args.shapes}, args, doc)
    doc["loadavg_after"] = os.getloadavg()
    doc["choice"] = choose(doc)
    speed_shapes.write(doc, args.out)
    print(doc["choice"])
    return doc


if __name__ == "__main__":
    main()
