"""Overhead of the early-exit loop against HF's own ``generate``, measured side by side in one run.

A randomly initialised T5-small-shaped model (d_model 512, 6 + 6 layers, vocab 32128),
batch 1, greedy, exactly ``--new-tokens`` new tokens (EOS disabled), on CPU by default:

* ``hf``: stock ``model.generate``;
* ``ours_full``: our loop with every token at the last layer (``ForcedExit(L)``; λ = 1 itself runs HF's own
  loop): same tokens, the overhead;
* ``ours_exit_layer1``: every token forced to exit after decoder layer 1: what skipping buys.

Repetitions are interleaved (hf, ours, forced, hf, ...) so drifts in machine load hit all
variants alike; medians are reported. Random weights: these numbers are about the loop's cost,
not about any model's quality.

    python benchmarks/overhead.py [--reps 7] [--new-tokens 64] [--device cpu] [--out benchmarks/results/overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import transformers
from transformers import T5Config, T5ForConditionalGeneration

import hf_safe_exit
from hf_safe_exit import ForcedExit
from hf_safe_exit.cards import describe_hardware


def t5_small_shaped() -> T5Config:
    return T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
                    num_heads=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--input-length", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "overhead.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = hf_safe_exit.enable(T5ForConditionalGeneration(t5_small_shaped()).eval().to(args.device))
    input_ids = torch.randint(2, 32128, (1, args.input_length), device=args.device)
    common = dict(input_ids=input_ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                  do_sample=False)
    variants = {
        "hf": lambda: model.generate(**common),
        "ours_full": lambda: model.generate(**common, early_exit=ForcedExit(model.config.num_decoder_layers)),
        "ours_exit_layer1": lambda: model.generate(**common, early_exit=ForcedExit(1)),
    }

    def timed(fn):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    load_start = os.getloadavg()
    outputs = {name: timed(fn)[1] for name, fn in variants.items()}  # warm-up
    assert torch.equal(outputs["hf"], outputs["ours_full"]), "the full depth must reproduce HF's tokens"
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.reps):
        for name, fn in variants.items():
            times[name].append(timed(fn)[0])
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    result = {
        "benchmark": "overhead",
        "model": "random T5-small-shaped (d_model 512, 6+6 layers, vocab 32128)",
        "batch_size": 1,
        "new_tokens": args.new_tokens,
        "input_length": args.input_length,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "reps": args.reps,
        "median_seconds": medians,
        "all_seconds": times,
        "ratio_ours_full_vs_hf": medians["ours_full"] / medians["hf"],
        "ratio_exit_layer1_vs_hf": medians["ours_exit_layer1"] / medians["hf"],
        "ms_per_token": {k: 1000 * v / args.new_tokens for k, v in medians.items()},
        "same_tokens_as_hf": True,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "hf_safe_exit": hf_safe_exit.__version__, "python": platform.python_version()},
        "machine": platform.platform(),
        "hardware": describe_hardware(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
    }
    print(f"{'variant':<20}{'median s':>10}{'ms/token':>10}{'vs HF':>8}")
    for name in variants:
        print(f"{name:<20}{medians[name]:>10.3f}{1000 * medians[name] / args.new_tokens:>10.2f}"
              f"{medians[name] / medians['hf']:>8.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
