"""Deferred state propagation (issue 27): early exit's decode time with the skipped layers' K/V filled at once
(eager, the path before) and filled only when a later token reads them (deferred), against HF ``generate``.

Basis: decode time only (the encoder runs once per context and all three get its output, as in
``speed_shapes.py``), per generated token at equal lengths (``min_new_tokens = max_new_tokens``), greedy, float32,
CPU, ``--threads`` threads, random weights with the real configs (t5-small, flan-t5-base, flan-t5-large), forced
exits (``ForcedExit``: no measure is computed, so the figures are the cost of exiting at those layers). HF, eager
and deferred run interleaved ``--repeats`` times after a warm-up; each figure is the median over the repeats of the
per-repeat ratio (a load drift slower than one repeat cancels). Cases:

* ``at_k``: every token exits at layer k = L/4 and L/2 (flan-t5-large: 6 and 12 of 24, flan-t5-base: 3 and 6 of 12;
  no later token reads the skipped layers: deferred fills vanish);
* ``rc_deep``: the RC operating point on large (exits drawn from 4..8 around 6 of 24) with one token in 6 at the
  last layer (the pending K/V are filled in one product per layer when that token comes);
* ``mixed``: t5-small shape, batch 8, 256 input tokens, rows at different layers at every step (mean 3.5 of 6);
* ``lambda1``: ``EarlyExit(1.0)``, HF's own loop (must stay <= 1.02x HF and give HF's tokens).

Two floors per token. Timed (``speed_shapes.floor_parts``, the model's own submodules): eager k·block +
(L−k)·kv_fill + projection; deferred k·block + projection (a fill merged into the product of a block's own K/V
reads no weights of its own; its extra arithmetic is not counted). Read (``weights_read``): the weights a step
reads, what bounds a read-bound decoder (batch 1 on a CPU): per step every layer up to the deepest row reads its
block once (all but the cross-attention K/V, cached per context), eager adds each layer above it its layer norm,
K and V, and the read-out reads the final layer norm and ``lm_head``; HF reads every block and the read-out. Its
ratios are what the measured ones would be if time were weights read.

    python benchmarks/deferred_fills.py            # ~15 min on one idle core: results/deferred_fills.json + .png
    python benchmarks/deferred_fills.py --quick    # smoke run (t5-small mixed batch only), ~20 s
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers.modeling_outputs import BaseModelOutput

import hf_safe_exit
from hf_safe_exit import EarlyExit, ForcedExit
from hf_safe_exit.decoding import early_exit_loop
from speed_shapes import HERE, SHAPES, build_model, exit_table, floor_parts, header, isolated, mixed_table, write


def cases(args, shapes: dict, gen):
    """(shape, case, batch, input length, new tokens, policy, exit table) in run order."""
    out = []
    n = args.new_tokens
    for shape in args.shapes:
        L = shapes[shape]["num_decoder_layers"]
        out.append((shape, "lambda1", 1, 128, n, EarlyExit(1.0), torch.full((1, n), L)))
        out += [(shape, f"at_{k}", 1, 128, n, ForcedExit(k), torch.full((1, n), k))
                for k in sorted({max(L // 4, 1), max(L // 2, 1)})]
    if args.rc_shape:
        L = shapes[args.rc_shape]["num_decoder_layers"]
        centre = max(L // 4, 1)
        table = exit_table(1, n, centre, min(2, centre - 1, L - centre), gen)
        table[:, 5::6] = L  # one token in 6 reads every layer
        out.append((args.rc_shape, "rc_deep", 1, 128, n, ForcedExit(table), table))
    if args.mixed_shape:
        L = shapes[args.mixed_shape]["num_decoder_layers"]
        for m in args.mixed_lengths:
            table = mixed_table(8, m, L, gen)
            out.append((args.mixed_shape, "mixed", 8, 256, m, ForcedExit(table), table))
    return out


def weights_read(model, table: torch.Tensor) -> dict:
    """Millions of weights read per step (see the module docstring) by HF, eager and deferred fills, for the exit
    ``table`` ``(rows, steps)``, and their ratios."""
    def count(*modules):
        return sum(p.numel() for m in modules for p in m.parameters())

    dec, L = model.decoder, model.config.num_decoder_layers
    sa, ca = dec.block[1].layer[0], dec.block[1].layer[1]  # block 1: no relative-position table of its own
    block = count(dec.block[1]) - count(ca.EncDecAttention.k, ca.EncDecAttention.v)
    fill, head = count(sa.layer_norm, sa.SelfAttention.k, sa.SelfAttention.v), count(dec.final_layer_norm,
                                                                                        model.lm_head)
    deepest = table.max(dim=0).values.double()  # per step: a layer's weights are read once for every row
    reads = {"hf": L * block + head, "eager": float((deepest * block + (L - deepest) * fill).mean()) + head,
             "deferred": float((deepest * block).mean()) + head}
    return {"weights_read_per_step_M": {k: v / 1e6 for k, v in reads.items()},
            "read_floor_ratio": {f"{a}/{b}": reads[a] / reads[b]
                                 for a, b in (("eager", "hf"), ("deferred", "hf"), ("deferred", "eager"))}}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(model, shape, case, batch, n_in, n_new, policy, table, args, gen, parts) -> dict:
    ids = torch.randint(2, model.config.vocab_size, (batch, n_in), generator=gen)
    mask = torch.ones_like(ids)
    enc = BaseModelOutput(last_hidden_state=model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state)
    kwargs = dict(encoder_outputs=enc, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                  do_sample=False, num_beams=1)

    def hf():
        return type(model).generate(model, input_ids=ids, **kwargs)

    def ours(defer: bool):
        early_exit_loop.DEFER_FILLS = defer
        return hf_safe_exit.generate(model, input_ids=ids, early_exit=policy, **kwargs)

    reference, tokens = hf(), {d: ours(d) for d in (False, True)}  # warm-up; the tokens each gives
    seconds = {"hf": [], "eager": [], "deferred": []}
    for _ in range(args.repeats):
        seconds["hf"].append(timed(hf))
        seconds["eager"].append(timed(lambda: ours(False)))
        seconds["deferred"].append(timed(lambda: ours(True)))
    early_exit_loop.DEFER_FILLS = True
    L, k = model.config.num_decoder_layers, float(table.float().mean())
    ms = {name: 1000 * statistics.median(s) / n_new for name, s in seconds.items()}
    ratio = {f"{a}/{b}": statistics.median(x / y for x, y in zip(seconds[a], seconds[b]))
             for a, b in (("eager", "hf"), ("deferred", "hf"), ("deferred", "eager"))}
    floor = {"eager": k * parts["block"] + (L - k) * parts["kv_fill"] + parts["projection"],
             "deferred": k * parts["block"] + parts["projection"]}
    row = {"shape": shape, "case": case, "batch": batch, "input_length": n_in, "new_tokens": n_new,
           "num_decoder_layers": L, "mean_exit_layer": k, "ms_per_token": ms, "ratio_paired": ratio,
           "floor_ms_per_token": {name: 1000 * v for name, v in floor.items()}, **weights_read(model, table),
           "same_tokens": {"eager_vs_deferred": bool(torch.equal(tokens[False], tokens[True])),
                           "deferred_vs_hf": bool(torch.equal(tokens[True], reference))},
           "seconds": seconds, "load1": os.getloadavg()[0], "exit_table": table.tolist()}
    print(f"{shape:<6}{case:<9}{batch:>3}{n_in:>5}{n_new:>5}{k:>6.2f}{ms['hf']:>9.2f}{ms['eager']:>9.2f}"
          f"{ms['deferred']:>9.2f}{ratio['eager/hf']:>8.3f}{ratio['deferred/hf']:>8.3f}"
          f"{ratio['deferred/eager']:>8.3f}{row['read_floor_ratio']['deferred/hf']:>8.3f}"
          f"{row['read_floor_ratio']['deferred/eager']:>8.3f}", flush=True)
    return row


def plot(rows: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['shape']} {r['case']}" + (f" N={r['new_tokens']}" if r["case"] == "mixed" else "") for r in rows]
    y = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    ax.barh([i + 0.2 for i in y], [r["ratio_paired"]["eager/hf"] for r in rows], 0.4, label="eager fills (before)")
    ax.barh([i - 0.2 for i in y], [r["ratio_paired"]["deferred/hf"] for r in rows], 0.4, label="deferred fills")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set(yticks=list(y), yticklabels=labels, xlabel="ours / HF generate, decode time per token (lower is faster)")
    ax.invert_yaxis()
    ax.set_title("forced exits, random weights, float32, CPU, 1 thread; batch 1 (mixed: 8); encoder excluded",
                 fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None, shapes: dict | None = None) -> dict:
    shapes = {**SHAPES, **(shapes or {})}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=["large", "base"], help="λ = 1 and every token at L/4 and L/2")
    p.add_argument("--rc-shape", default="large", help="exits around L/4, one token in 6 at L ('' for none)")
    p.add_argument("--mixed-shape", default="small", help="batch 8, 256 input tokens ('' for none)")
    p.add_argument("--mixed-lengths", nargs="*", type=int, default=[32, 128, 256])
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="t5-small mixed batch only, 8 new tokens, 1 repeat")
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/deferred_fills[_quick].json)")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.rc_shape, args.mixed_lengths, args.repeats = [], "", [8], 1
    args.out = args.out or os.path.join(HERE, "results", "deferred_fills_quick.json" if args.quick else
                                        "deferred_fills.json")
    doc = {**header(args, argv), "benchmark": "deferred_fills", "basis": "decode time per generated token (encoder "
           "excluded), greedy, float32, CPU, random weights with the real configs, forced exits", "rows": []}
    print(f"{'shape':<6}{'case':<9}{'b':>3}{'in':>5}{'N':>5}{'k':>6}{'HF ms':>9}{'eager':>9}{'defer':>9}"
          f"{'e/HF':>8}{'d/HF':>8}{'d/e':>8}{'read d/HF':>10}{'d/e':>6}", flush=True)
    with isolated(args.threads, args.seed):
        gen = torch.Generator().manual_seed(args.seed)
        todo = cases(args, shapes, gen)
        for shape in dict.fromkeys(c[0] for c in todo):
            model = build_model(shapes[shape])
            for case in (c for c in todo if c[0] == shape):
                ids = torch.randint(2, model.config.vocab_size, (case[2], case[3]), generator=gen)
                parts = floor_parts(model, ids, torch.ones_like(ids), case[4], 3, 0.05)
                doc["rows"].append(run_case(model, *case, args, gen, parts))
                write(doc, args.out)
            del model
    doc["loadavg_after"] = os.getloadavg()
    write(doc, args.out)
    plot(doc["rows"], os.path.splitext(args.out)[0] + ".png")
    return doc


if __name__ == "__main__":
    main()
