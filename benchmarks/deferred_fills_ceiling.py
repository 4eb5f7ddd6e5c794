"""What bounds deferred fills at the RC operating point (issue 27): the time with the fills made free, and what a
product of a few rows costs against one row on this CPU.

Two measurements, one thread, float32, CPU:

* ``rc_point``: the RC schedule of ``deferred_fills.py`` (flan-t5-large shape, random weights, 128 input tokens, 24
  new tokens at equal lengths, exits drawn from 4..8 with one token in 6 at layer 24; decode time only, the encoder
  output given) decoded three ways, interleaved: eager fills, deferred fills, and a **timing-only** run whose pending
  K/V are never computed (``DeferredFills.take`` returns nothing; its outputs are wrong and not used). The last is
  the most any way of filling could save; medians of the per-repeat ratios to eager.
* ``product_rows``: ``F.linear`` of m rows on 48 different 1024 × 1024 weights (the K and V of 24 layers, out of
  cache as in decoding), µs per product, for m = 1, 2, 6, 12, 24: a deep token after 5 shallow ones fills in a
  product of 6 rows.

    python benchmarks/deferred_fills_ceiling.py   # ~2 min on one idle core: results/deferred_fills_ceiling.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers.modeling_outputs import BaseModelOutput

import hf_safe_exit
from hf_safe_exit import ForcedExit
from hf_safe_exit.decoding import deferred_kv, early_exit_loop
from speed_shapes import HERE, SHAPES, build_model, exit_table, header, write


def rc_point(repeats: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    model = hf_safe_exit.enable(build_model(SHAPES["large"]).eval())
    L, n = model.config.num_decoder_layers, 24
    table = exit_table(1, n, L // 4, 2, gen)
    table[:, 5::6] = L
    ids = torch.randint(2, model.config.vocab_size, (1, 128), generator=gen)
    mask = torch.ones_like(ids)
    enc = BaseModelOutput(last_hidden_state=model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state)
    kwargs = dict(encoder_outputs=enc, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    real_take = deferred_kv.DeferredFills.take

    def never_filled(self, idx, position):  # clears the range but computes nothing: timing only
        real_take(self, idx, position)
        return None

    def run(mode: str) -> float:
        early_exit_loop.DEFER_FILLS = mode != "eager"
        deferred_kv.DeferredFills.take = never_filled if mode == "free_fills" else real_take
        try:
            start = time.perf_counter()
            with torch.no_grad():
                hf_safe_exit.generate(model, input_ids=ids, early_exit=ForcedExit(table), **kwargs)
            return time.perf_counter() - start
        finally:
            deferred_kv.DeferredFills.take, early_exit_loop.DEFER_FILLS = real_take, True

    modes = ("eager", "deferred", "free_fills")
    for mode in modes:
        run(mode)  # warm-up
    seconds = {m: [] for m in modes}
    for _ in range(repeats):
        for mode in modes:
            seconds[mode].append(run(mode))
    return {"mean_exit_layer": float(table.float().mean()), "seconds": seconds,
            "ratio_to_eager": {m: statistics.median(b / a for a, b in zip(seconds["eager"], seconds[m]))
                               for m in modes[1:]}}


def product_rows(rows=(1, 2, 6, 12, 24), rounds: int = 10) -> dict:
    weights = [torch.randn(1024, 1024) for _ in range(48)]
    out = {}
    for m in rows:
        x = torch.randn(m, 1024)
        for w in weights:
            torch.nn.functional.linear(x, w)
        start = time.perf_counter()
        for _ in range(rounds):
            for w in weights:
                torch.nn.functional.linear(x, w)
        out[str(m)] = 1e6 * (time.perf_counter() - start) / (rounds * len(weights))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(HERE, "results", "deferred_fills_ceiling.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    doc = {**header(args, argv), "benchmark": "deferred_fills_ceiling",
           "basis": "decode time (encoder excluded), batch 1, float32, CPU, random weights, forced exits"}
    doc["product_rows_us"] = product_rows()
    doc["rc_point"] = rc_point(args.repeats, args.seed)
    doc["loadavg_after"] = os.getloadavg()
    write(doc, args.out)
    print({k: round(v, 1) for k, v in doc["product_rows_us"].items()},
          {k: round(v, 3) for k, v in doc["rc_point"]["ratio_to_eager"].items()})
    return doc


if __name__ == "__main__":
    main()
