"""collect's speed over a threshold grid (issue 28, "make it affordable"): one ``generate`` call per (batch, λ) cell
(``batch_thresholds=False``, the path before) against the batched grid (``batch_thresholds=True``, the default: the
encoder once per batch, the thresholds of a batch as the rows of one batch with per-row thresholds).

Basis: the shipped default model (its stored calibration's settings: the 11-point grid 0, 0.1, ..., 1, measure
``auto`` = its meta head, 160 input tokens, 64 new tokens, batch 8), the first ``--n`` CNN/DM pool rows, one
thread, CPU. Each round runs the whole ``collect`` call both ways on the same examples (fresh state folders), in
the order old, new, new, old, ... (ABBA: a drift of the machine's speed cancels); the figure is the median over
the rounds of the per-round ratio of examples per second, in wall time and in this process's CPU time (the CPU
time is what one thread costs when other processes share the cores). Every collect call pays its own warm-up and
its ROUGE scoring, both ways.

Also recorded: the decoding time alone (the tables' ``wall_time`` summed), and per λ the speed-up per generated
token over λ = 1 that each table's times give (``evaluate``'s and the card's formula): measured per λ on the old
path, apportioned on the batched one (by tokens: about 1× everywhere, by construction). ``token_speedups_by_blocks_new``
is what a share of the batched time by decoder blocks run would have claimed (the key ``grid.py`` rejects).

Equality: every cell's generated token ids (recorded from the cell decoder, ``runner.decode_cell``), its decoded
texts and per-example costs (mean exit layer, layer fraction, tokens) are compared between the two paths
(``tokens_equal``; ``cells_differing`` counts the cells whose tokens, texts or costs differ); the tables' losses too.
Equal up to float rounding is the claim (the same tokens except at float near-ties), so a difference is reported,
not hidden.

    python benchmarks/collect_speed.py              # ~2.5 min on one idle core: results/collect_speed.json
    python benchmarks/collect_speed.py --quick      # smoke run: 4 examples, batch 2, 3 thresholds, one round
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import hf_safe_exit
from hf_safe_exit.calibration import collect, runner
from hf_safe_exit.calibration.state import read_cells
from hf_safe_exit.tasks import load_split, shared_data_dir
from speed_shapes import HERE, header, write

GRID = [round(0.1 * i, 1) for i in range(11)]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=32, help="CNN/DM pool rows (the first n)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4, help="rounds of (old, new), ABBA order")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-input-length", type=int, default=160)
    p.add_argument("--lambdas", type=lambda s: [float(x) for x in s.split(",")], default=GRID)
    p.add_argument("--quick", action="store_true", help="4 examples, batch 2, grid 0,0.5,1, one round")
    p.add_argument("--output", default=os.path.join(HERE, "results", "collect_speed.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.batch_size, args.rounds, args.lambdas = 4, 2, 1, [0.0, 0.5, 1.0]
    return args


def recording_cells(tokens: dict):
    """``runner.decode_cell`` that also keeps each cell's generated token ids, by (λ, the batch's input ids)."""
    real = runner.decode_cell

    def decode(model, encoded, policy, max_new_tokens):
        out = real(model, encoded, policy, max_new_tokens)
        batch = getattr(encoded, "encoded", encoded)["input_ids"]  # a ThresholdGrid holds its tokenized batch
        key = (float(policy.threshold), tuple(map(tuple, batch.tolist())))
        pad = model.generation_config.pad_token_id
        rows = []
        for seq in out.sequences[:, 1:].tolist():  # after the decoder start token; padding after EOS dropped
            while seq and seq[-1] == pad:
                seq.pop()
            rows.append(seq)
        tokens[key] = rows
        return out

    return decode


def timed_collect(model, tokenizer, rows, args, batched: bool, state: Path):
    """One whole collect call: (wall seconds, CPU seconds of this process, table, cells by (λ index, batch), token
    ids by cell)."""
    shutil.rmtree(state, ignore_errors=True)
    tokens: dict = {}
    real, runner.decode_cell = runner.decode_cell, recording_cells(tokens)
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        table = collect(model, tokenizer, "cnndm", rows, lambdas=args.lambdas, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, max_input_length=args.max_input_length,
                        state_dir=state, progress=False, batch_thresholds=batched)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        runner.decode_cell = real
    return wall, cpu, table, read_cells(state), tokens


def differing_cells(a: dict, b: dict, tokens_a: dict, tokens_b: dict) -> int:
    """Cells whose token ids, texts or per-example costs differ (the seconds are timings: not compared). The token
    ids of the cells only: the batched path's warm-up decodes a one-example grid, the other's a whole cell."""
    assert a.keys() == b.keys()
    texts_or_costs = {key for key in a if any(a[key][name] != b[key][name] for name in a[key] if name != "seconds")}
    common = tokens_a.keys() & tokens_b.keys()
    assert len(common) == len(a), "every cell's tokens must be recorded on both paths"
    return len(texts_or_costs) + sum(tokens_a[key] != tokens_b[key] for key in common)


def same_losses(a, b) -> bool:
    timing = ("wall_time", "example_time")
    return all(np.array_equal(a.losses[name], b.losses[name]) for name in a.losses) and all(
        np.array_equal(a.extras[name], b.extras[name]) for name in a.extras if name not in timing)


def token_speedups(table) -> list[float]:
    """Per λ, the speed-up per generated token over λ = 1 that the table's times give (as evaluate and the card
    compute it): measured per λ on the old path, apportioned on the batched one."""
    wall, tokens = table.extras["wall_time"], table.extras["num_tokens"].sum(axis=1)
    full = int(np.flatnonzero(table.lambdas == 1.0)[0])
    return [float((wall[full] / tokens[full]) / (wall[k] / tokens[k])) for k in range(table.lambdas.size)]


def block_speedups(table) -> list[float]:
    """Per λ, the speed-up per generated token a share of the decode by decoder blocks run would give: the blocks per
    token at λ = 1 over those at λ (the mean exit layer over tokens), the encoder left out."""
    tokens = table.extras["num_tokens"]
    blocks = (table.extras["mean_exit_layer"] * tokens).sum(axis=1) / tokens.sum(axis=1)
    full = int(np.flatnonzero(table.lambdas == 1.0)[0])
    return [float(blocks[full] / blocks[k]) for k in range(table.lambdas.size)]


def main(argv=None) -> dict:
    args = parse_args(argv)
    data = shared_data_dir()
    if data is None:
        raise SystemExit("the offline data folder ../shared/data (or $HF_SAFE_EXIT_DATA) is absent")
    torch.set_num_threads(args.threads)
    model, tokenizer = hf_safe_exit.load_default_model()
    rows = load_split("cnndm", "pool", path=data).select(range(args.n))
    doc = {**header(args, argv), "benchmark": "collect_speed",
           "basis": {"model": "hf_safe_exit default model", "task": "cnndm", "split": "pool", "examples": args.n,
                     "batch_size": args.batch_size, "K": len(args.lambdas), "lambdas": args.lambdas,
                     "measure": "auto (meta head)", "max_new_tokens": args.max_new_tokens,
                     "max_input_length": args.max_input_length, "threads": args.threads,
                     "timed": "whole collect call (warm-up and scoring included), ABBA-interleaved rounds"},
           "rounds": []}
    work = Path(tempfile.mkdtemp(prefix="collect_speed_"))
    differing, losses_equal = 0, True
    try:
        for r in range(args.rounds):
            runs = {}
            for batched in ((False, True) if r % 2 == 0 else (True, False)):
                runs[batched] = timed_collect(model, tokenizer, rows, args, batched, work / f"state_{batched}")
            old_wall, old_cpu, old_table, old_cells, old_tokens = runs[False]
            new_wall, new_cpu, new_table, new_cells, new_tokens = runs[True]
            differing += differing_cells(old_cells, new_cells, old_tokens, new_tokens)
            losses_equal &= same_losses(old_table, new_table)
            row = {"old_wall_s": old_wall, "new_wall_s": new_wall, "old_cpu_s": old_cpu, "new_cpu_s": new_cpu,
                   "old_examples_per_s": args.n / old_wall, "new_examples_per_s": args.n / new_wall,
                   "speedup_wall": old_wall / new_wall, "speedup_cpu": old_cpu / new_cpu,
                   # the decoding alone (the tables' wall_time: warm-up, tokenizing and scoring left out)
                   "old_decode_s": float(old_table.extras["wall_time"].sum()),
                   "new_decode_s": float(new_table.extras["wall_time"].sum()),
                   "old_token_speedups": token_speedups(old_table), "new_token_speedups": token_speedups(new_table),
                   "new_block_speedups": block_speedups(new_table)}
            doc["rounds"].append(row)
            print(f"round {r}: old {old_wall:.1f} s ({old_cpu:.1f} s CPU), new {new_wall:.1f} s ({new_cpu:.1f} s CPU): "
                  f"{row['speedup_wall']:.2f}x wall, {row['speedup_cpu']:.2f}x CPU", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rounds = doc["rounds"]
    doc["summary"] = {
        "old_examples_per_s": statistics.median(r["old_examples_per_s"] for r in rounds),
        "new_examples_per_s": statistics.median(r["new_examples_per_s"] for r in rounds),
        "speedup_wall_median": statistics.median(r["speedup_wall"] for r in rounds),
        "speedup_cpu_median": statistics.median(r["speedup_cpu"] for r in rounds),
        "speedup_decode_median": statistics.median(r["old_decode_s"] / r["new_decode_s"] for r in rounds),
        "token_speedups_measured_old": np.median([r["old_token_speedups"] for r in rounds], axis=0).tolist(),
        "token_speedups_apportioned_new": np.median([r["new_token_speedups"] for r in rounds], axis=0).tolist(),
        "token_speedups_by_blocks_new": np.median([r["new_block_speedups"] for r in rounds], axis=0).tolist(),
        "tokens_equal": differing == 0, "cells_differing": differing, "losses_equal": losses_equal,
        "cells_compared": len(args.lambdas) * -(-args.n // args.batch_size) * args.rounds}
    doc["loadavg_after"] = os.getloadavg()
    print(doc["summary"])
    if not args.quick:
        write(doc, args.output)
    return doc


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
