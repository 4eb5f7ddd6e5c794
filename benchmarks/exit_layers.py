"""What checking the confidence only at chosen layers (``EarlyExit(exit_layers=...)``) saves, on a real T5 shape.

For each measure and exit layer k: the token exits at k either with the measure computed after *every* layer
1..k (``every``: what ``EarlyExit()`` pays) or only at the grid's layers up to k (``grid``, ``--grid``, which must
contain k). Same model, inputs, tokens and timing as ``speed_shapes.py`` (random weights with the real config,
equal lengths, HF and ours interleaved, ratio = median of the per-pair ours/HF ratios); JSON to
``benchmarks/results/exit_layers.json``.

    python benchmarks/exit_layers.py                      # flan-t5-base, grid 3 6 9, softmax and shortlist
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed_shapes import SHAPES, AtLayer, Context, build_model, floor_parts, header, isolated, write  # noqa: E402

from hf_safe_exit import EarlyExit  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="base", choices=sorted(SHAPES))
    p.add_argument("--grid", nargs="+", type=int, default=[3, 6, 9], help="the layers where the confidence is checked")
    p.add_argument("--exit-layers", nargs="+", type=int, default=None, help="k (default: the grid)")
    p.add_argument("--measures", nargs="+", default=["softmax", "softmax_shortlist"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--input-length", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "exit_layers.json"))
    args = p.parse_args(argv)
    args.end_to_end, args.micro_seconds = False, 0.05  # what Context and floor_parts read
    grid = tuple(sorted(set(args.grid)))
    ks = args.exit_layers or list(grid)
    if not set(ks) <= set(grid):
        raise SystemExit(f"--exit-layers {ks} must lie in --grid {list(grid)}: a token can only exit at a checked layer")
    doc = {**header(args, argv), "shape": {**SHAPES[args.shape]}, "grid": list(grid), "rows": []}
    with isolated(args.threads, args.seed):
        model = build_model(SHAPES[args.shape])
        gen = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(2, model.config.vocab_size, (args.batch, args.input_length), generator=gen)
        mask = torch.ones_like(ids)
        parts = floor_parts(model, ids, mask, args.new_tokens, 3, args.micro_seconds)
        ctx = Context(model, args.shape, ids, mask, args.new_tokens, parts, args, doc)
        for k in ks:
            const = torch.full((args.batch, args.new_tokens), k)
            for m in args.measures:
                ctx.row("every", m, k, EarlyExit(threshold=0.5, measure=AtLayer(m, k)), const)
                ctx.row("grid", m, k, EarlyExit(threshold=0.5, measure=AtLayer(m, k), exit_layers=grid), const)
    doc["loadavg_after"] = os.getloadavg()
    write(doc, args.out)
    return doc


if __name__ == "__main__":
    main()
