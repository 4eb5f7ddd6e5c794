#!/usr/bin/env python
"""Speed/quality curve of early exit on the package's default model (CPU by default).

For each task (CNN/DM summarisation, SQuAD QA; held-out pool examples listed in the
model's ``heldout_eval_ids.json``), each batch size and each fixed softmax threshold,
one run records: wall time of ``generate`` over all examples, the tokens it generated, the time
per generated token, mean decoder layers per generated token, the fraction of decoder blocks
run, and the task score (ROUGE-L or SQuAD F1) -- next to stock HF ``generate`` (the full model)
on the same inputs. Speed-ups are per generated token (outputs of different lengths are never
compared call for call).

    python benchmarks/early_exit_speed.py          # writes benchmarks/results/early_exit_speed.json

Wall times on a shared or loaded machine are noisy: the JSON records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model dir (default: the shipped default model)")
    p.add_argument("--tasks", nargs="+", default=["cnndm", "squad"], choices=["cnndm", "squad"])
    p.add_argument("--n-cnndm", type=int, default=16)
    p.add_argument("--n-squad", type=int, default=48)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--thresholds", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1, 0.05, 0.0])
    p.add_argument("--measure", default="auto")
    p.add_argument("--max-source-length", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "early_exit_speed.json"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import hf_safe_exit
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from hf_safe_exit.compat import cache_kwargs
    from hf_safe_exit.decoding.early_exit_loop import new_decoder_cache
    from hf_safe_exit.models import default_model_path
    from hf_safe_exit.training.data import load_cnndm, load_squad, qa_example, summarization_example
    from hf_safe_exit.training.evaluation import rouge_l, squad_f1

    path = Path(args.model) if args.model else default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = T5ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    hf_safe_exit.enable(model)
    info = json.loads((path / "training_results.json").read_text()) if (path / "training_results.json").exists() else {}
    msl = args.max_source_length or (info.get("args", {}) or {}).get("max_source_length") or 192
    held = json.loads((path / "heldout_eval_ids.json").read_text())

    tasks = {}
    if "cnndm" in args.tasks:
        pool = {r["id"]: r for r in load_cnndm("pool")}
        rows = [pool[i] for i in held["cnndm_ids"][: args.n_cnndm]]
        src, ref = zip(*(summarization_example(r) for r in rows))
        tasks["cnndm"] = (list(src), list(ref), 48, lambda p, r: rouge_l(p, r) * 100, "rougeL")
    if "squad" in args.tasks:
        pool = {q["id"]: q for q in load_squad("pool")}
        qs = [pool[i] for i in held["squad_ids"][: args.n_squad]]
        tasks["squad"] = ([qa_example(q)[0] for q in qs], [q["answers"] for q in qs], 16,
                          lambda p, a: squad_f1(p, a) * 100, "squad_f1")

    L = model.config.num_decoder_layers
    from hf_safe_exit.cards import describe_hardware

    results = {"model": str(path), "model_fingerprint": hf_safe_exit.model_fingerprint(model),
               "measure": args.measure, "threads": args.threads, "device": "cpu", "hardware": describe_hardware(),
               "versions": {"torch": torch.__version__, "hf_safe_exit": hf_safe_exit.__version__},
               "num_decoder_layers": L, "load_average_start": os.getloadavg(), "runs": []}

    def run(src, max_new, bs, threshold):
        preds, layers_tok, n_tok = [], 0.0, 0
        t0 = time.perf_counter()
        for s in range(0, len(src), bs):
            enc = tok(src[s:s + bs], max_length=msl, truncation=True, padding=True, return_tensors="pt")
            with torch.no_grad():
                if threshold is None:  # stock HF generate, full model
                    seq = model.generate(**enc, max_new_tokens=max_new, do_sample=False,
                                         **cache_kwargs(new_decoder_cache(model)))
                    n_tok += int((seq[:, 1:] != tok.pad_token_id).sum())  # up to and including EOS, as below
                else:
                    out = model.generate(**enc, max_new_tokens=max_new, do_sample=False,
                                         early_exit=hf_safe_exit.EarlyExit(threshold=threshold, measure=args.measure),
                                         return_dict_in_generate=True)
                    seq = out.sequences
                    real = out.exit_layers > 0
                    layers_tok += out.exit_layers[real].float().sum().item()
                    n_tok += int(real.sum())
            preds.extend(t.strip() for t in tok.batch_decode(seq, skip_special_tokens=True))
        wall = time.perf_counter() - t0
        return preds, wall, (layers_tok / n_tok if threshold is not None and n_tok else float(L)), n_tok

    for name, (src, ref, max_new, score_fn, metric) in tasks.items():
        for bs in args.batch_sizes:
            run(src[:bs], max_new, bs, 0.9), run(src[:bs], max_new, bs, None)  # warm-up, both paths
            base_preds, base_wall, _, base_tok = run(src, max_new, bs, None)
            base_per_tok = base_wall / base_tok
            base_score = sum(score_fn(p, r) for p, r in zip(base_preds, ref)) / len(ref)
            results["runs"].append({"task": name, "batch_size": bs, "threshold": None, "system": "hf_generate_full",
                                    "wall_s": base_wall, "tokens": base_tok, "ms_per_token": 1e3 * base_per_tok,
                                    "mean_layers": float(L), metric: base_score, "n": len(src)})
            print(f"{name} bs={bs} HF full: {base_wall:.2f}s, {base_tok} tokens, {1e3 * base_per_tok:.1f} ms/token "
                  f"{metric} {base_score:.2f}", flush=True)
            for t in args.thresholds:
                preds, wall, mean_layers, n_tok = run(src, max_new, bs, t)
                speedup = base_per_tok / (wall / n_tok)
                score = sum(score_fn(p, r) for p, r in zip(preds, ref)) / len(ref)
                agree = sum(p == b for p, b in zip(preds, base_preds)) / len(preds)
                results["runs"].append({"task": name, "batch_size": bs, "threshold": t, "system": "early_exit",
                                        "wall_s": wall, "tokens": n_tok, "ms_per_token": 1e3 * wall / n_tok,
                                        "per_token_speedup_vs_hf_full": speedup,
                                        "mean_layers": mean_layers, "layer_fraction": mean_layers / L, metric: score,
                                        "same_output_as_full": agree, "n": len(src)})
                print(f"{name} bs={bs} λ={t}: {wall:.2f}s, {n_tok} tokens, per token x{speedup:.2f}, "
                      f"layers {mean_layers:.2f}/{L} "
                      f"{metric} {score:.2f} same-as-full {agree:.2f}", flush=True)
    results["load_average_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
