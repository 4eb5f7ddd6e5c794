"""GPU ms/token of HF ``generate`` and of early exit, and host synchronisations per token (issue "Speed", item 7).

The flan-t5-large shape (random weights, the published config; see ``speed_shapes.py``) in bfloat16 on one
CUDA device, greedy, every run emitting exactly ``--new-tokens`` tokens, at batch 1 and 8, input 128 tokens.
Both loops decode from the same precomputed encoder output, so ms/token is decode time / N.

Rows per batch size:

* ``lambda1``: ``EarlyExit(threshold=1.0)``: λ = 1 runs HF's own loop (decoding/full_model.py);
* ``full_depth``: ``ForcedExit(L)``, every token through every layer of our loop;
* ``forced``: ``ForcedExit(k)`` for k in ``--exit-layers`` (no confidence computed);
* one per measure and k in ``--measure-layers``: the real measure runs at layers 1..k and the token exits at k
  (``speed_shapes.AtLayer``: what exiting at k costs with that measure);
* ``mixed`` (batch > 1): every step the rows exit at spread-out layers (``speed_shapes.mixed_table``), the table
  looked up on the device; with the device's default steps (dense off the CPU, ``hf_safe_exit.decoding.dense_rows``)
  and, as ``mixed_rowwise``, with the row-wise steps the CPU uses.

Timing: HF and ours interleaved ``--repeats`` times after a warm-up, ``torch.cuda.synchronize()`` around each
call; medians, and the median of the per-pair ratios. Host synchronisations: one extra run of each side under
``torch.cuda.set_sync_debug_mode("warn")``, which warns once per synchronising call (``.item()``,
``bool(tensor)``, ``nonzero``, a device-to-host copy); counted per generated token (= per step). Early exit
needs one per layer where a confidence is checked (does any row exit?), HF's loop one per step (are all rows
finished?).

    PYTHONPATH=. python benchmarks/speed_gpu.py          # on a CUDA machine: results/speed_gpu.json
    python benchmarks/speed_gpu.py --device cpu --quick  # smoke run anywhere (no synchronisation counts)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
import warnings

import torch
from transformers.modeling_outputs import BaseModelOutput

import hf_safe_exit
from hf_safe_exit import EarlyExit, ForcedExit
from hf_safe_exit.confidence import MEASURES
from hf_safe_exit.decoding import dense_rows

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("speed_shapes", os.path.join(HERE, "speed_shapes.py"))
shapes_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shapes_bench)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="large", choices=list(shapes_bench.SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--input-length", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--exit-layers", nargs="+", type=int, default=[6, 12, 18])
    p.add_argument("--measures", nargs="+", default=list(MEASURES), choices=list(MEASURES))
    p.add_argument("--measure-layers", nargs="+", type=int, default=[6, 12])
    p.add_argument("--rows", nargs="+", default=["lambda1", "full_depth", "forced", "measure", "mixed", "mixed_rowwise"],
                   help="which rows to run (default: all)")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 1, 4 tokens, 1 repeat, layer 1 only")
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/speed_gpu[_quick].json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--git-commit", default=None, help="the commit that runs, where the copy has no usable .git")
    p.add_argument("--shape-override", default=None, help=argparse.SUPPRESS)  # JSON T5Config kwargs
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.new_tokens, args.repeats = args.batch_sizes[:1], 4, 1
        args.exit_layers = args.measure_layers = [1]
    args.out = args.out or os.path.join(HERE, "results", "speed_gpu_quick.json" if args.quick else "speed_gpu.json")
    args.threads = torch.get_num_threads()
    return args


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def count_syncs(fn, device: torch.device) -> int | None:
    """Synchronising CUDA calls made by ``fn()`` (torch's sync debug mode warns once per call); None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def device_header(device: torch.device, dtype: str) -> dict:
    info = {"device": str(device), "dtype": dtype}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    spec = json.loads(args.shape_override) if args.shape_override else shapes_bench.SHAPES[args.shape]
    doc = {**shapes_bench.header(args, argv), "benchmark": "speed_gpu", **device_header(device, args.dtype),
           "shape": {**shapes_bench.COMMON, **spec}, "rows": []}
    doc["git_commit"] = args.git_commit or doc["git_commit"]
    torch.manual_seed(args.seed)
    model = shapes_bench.build_model(spec).to(device=device, dtype=dtype)
    L, vocab = model.config.num_decoder_layers, model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    shape = "custom" if args.shape_override else args.shape
    print(f"{doc.get('gpu', doc['cpu'])}: {shape} shape, {L} decoder layers, {args.dtype}", flush=True)
    print(f"{'row':<14}{'b':>3} {'measure':<18}{'k':>5}{'HF ms/t':>9}{'ours ms/t':>10}{'ours/HF':>8}"
          f"{'syncs/t HF':>11}{'ours':>6}", flush=True)
    default_dense = dense_rows.DENSE_ROWS.get(device.type, True)
    with torch.inference_mode():
        for batch in args.batch_sizes:
            ids = torch.randint(2, vocab, (batch, args.input_length), generator=gen).to(device)
            mask = torch.ones_like(ids)
            kwargs = dict(attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                          do_sample=False, num_beams=1, encoder_outputs=BaseModelOutput(
                              last_hidden_state=model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state))
            hf = lambda: type(model).generate(model, input_ids=ids, **kwargs)  # noqa: E731
            reference = hf()
            hf_syncs = count_syncs(hf, device)
            rows = [("lambda1", "lambda1", L, EarlyExit(threshold=1.0)), ("full_depth", "forced", L, ForcedExit(L))]
            rows += [("forced", "forced", k, ForcedExit(k)) for k in args.exit_layers if k <= L]
            rows += [("measure", m, k, EarlyExit(threshold=0.5, measure=shapes_bench.AtLayer(m, k)))
                     for k in args.measure_layers if k <= L for m in args.measures]
            if batch > 1:  # dense steps (the default off the CPU) and the CPU's row-wise steps, same schedule
                table = shapes_bench.mixed_table(batch, args.new_tokens, L, gen).to(device)
                rows += [(name, "forced", table, ForcedExit(lambda step, r, t=table: t[r, min(step, t.shape[1] - 1)]))
                         for name in ("mixed", "mixed_rowwise")]
            for name, measure, k, policy in [r for r in rows if r[0] in args.rows]:
                # row-wise steps only where asked for; everything else with the device's default
                dense_rows.DENSE_ROWS[device.type] = name != "mixed_rowwise" and default_dense
                ours = lambda p=policy: hf_safe_exit.generate(model, input_ids=ids, **kwargs, early_exit=p)  # noqa
                out = hf_safe_exit.generate(model, input_ids=ids, **kwargs, early_exit=policy,
                                            return_dict_in_generate=True)  # warm-up; check exits and tokens
                expected = k if isinstance(k, torch.Tensor) else torch.full_like(out.exit_layers, k)
                assert out.sequences.shape[1] - 1 == reference.shape[1] - 1 == args.new_tokens
                assert torch.equal(out.exit_layers, expected), f"{name} {measure}: tokens did not exit at {k}"
                hf_s, ours_s = [], []
                for _ in range(args.repeats):  # interleaved: drifts hit both alike
                    hf_s.append(timed(hf, device)[0])
                    ours_s.append(timed(ours, device)[0])
                syncs = count_syncs(ours, device)
                hf_ms, ours_ms = (1000 * statistics.median(t) / args.new_tokens for t in (hf_s, ours_s))
                r = {"row": name, "measure": measure, "batch": batch, "input_length": args.input_length,
                     "new_tokens": args.new_tokens, "generated_tokens_hf": reference.shape[1] - 1,
                     "generated_tokens_ours": out.sequences.shape[1] - 1, "num_decoder_layers": L,
                     "exit_layer": k if isinstance(k, int) else "table",
                     "mean_exit_layer": float(out.exit_layers.float().mean()),
                     "same_tokens_as_hf": bool(torch.equal(out.sequences, reference)),
                     "ms_per_token_hf": hf_ms, "ms_per_token_ours": ours_ms, "ratio": ours_ms / hf_ms,
                     "ratio_paired": shapes_bench.paired_ratio(hf_s, ours_s),
                     "syncs_per_token_hf": None if hf_syncs is None else hf_syncs / args.new_tokens,
                     "syncs_per_token_ours": None if syncs is None else syncs / args.new_tokens,
                     "seconds_hf": hf_s, "seconds_ours": ours_s}
                doc["rows"].append(r)
                shapes_bench.write(doc, args.out)
                kk = str(k) if isinstance(k, int) else f"~{r['mean_exit_layer']:.1f}"
                fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
                print(f"{name:<14}{batch:>3} {measure:<18}{kk:>5}{hf_ms:>9.2f}{ours_ms:>10.2f}{r['ratio_paired']:>8.3f}"
                      f"{fmt(r['syncs_per_token_hf']):>11}{fmt(r['syncs_per_token_ours']):>6}", flush=True)
    dense_rows.DENSE_ROWS[device.type] = default_dense
    doc["loadavg_after"] = os.getloadavg()
    shapes_bench.write(doc, args.out)
    return doc


if __name__ == "__main__":
    main()
