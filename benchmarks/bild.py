"""BiLD big-little decoding against the large model alone, side by side on the same inputs in one run.

For every input, and interleaved so that drifts in machine load hit all variants alike, it runs

* ``large``: the large model alone (stock HF ``generate``, greedy);
* ``small``: the small model alone (stock HF ``generate``, greedy);
* ``bild_rb=<α>``: :class:`hf_safe_exit.decoding.bild.BiLD` at each rollback threshold α of ``--rollbacks``
  (λ = exp(-α) is reported too), with ``--fallback`` and ``--max-draft-len``.

For each variant it reports the summed wall time (median over ``--reps``), the time per generated token and
``speedup`` = time per token of the large model / of the variant (real checkpoints stop at EOS, so whole-call
times of outputs of different lengths are not compared). It also reports large- and small-decoder forward calls per generated
token, counted by forward hooks on the decoders (the same count for HF generate and BiLD), and
agreement with the large model's output: the fraction of token positions that match, and of
exactly equal sequences. With ``--task`` it adds the task score (ROUGE-L for cnndm, F1 for squad)
against the gold references. Output is JSON (default ``benchmarks/results/bild.json``).

Models
    ``--large PATH --small PATH``: two local checkpoints sharing a tokenizer (the large one's
    tokenizer is used). With ``--task`` the inputs are the first ``--examples`` rows of the task's
    calibration/test pool read from ``--data`` (default ``../shared/data``).

    Without paths it uses **random weights** (``"models": "random"`` in the JSON). The large model
    has T5-small's shape (d_model 512, 6+6 layers, vocab 32128). The small model is the same
    network cut to ``--random-small-layers`` decoder layers (same weights), and the inputs are
    random token ids. This shows the mechanics: call counts, overhead, and that rollback 0 gives
    the large model's tokens. Agreement and speed-up of random networks say nothing about quality.

    python benchmarks/bild.py [--examples 4] [--new-tokens 32] [--reps 1] [--rollbacks 0,1,3,5,inf]
                              [--fallback 0.6] [--max-draft-len 10] [--threads N] [--device cpu]
                              [--large PATH --small PATH [--task cnndm|squad] [--data DIR]]
                              [--out benchmarks/results/bild.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import time

import torch
import transformers
from transformers import T5Config, T5ForConditionalGeneration

from hf_safe_exit.cards import describe_hardware
from hf_safe_exit.compat import cache_kwargs
from hf_safe_exit.decoding.bild import BiLD, rollback_to_lambda
from hf_safe_exit.decoding.early_exit_loop import new_decoder_cache


def _random_pair(small_layers: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
                   num_heads=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=2.0)
    large = T5ForConditionalGeneration(cfg).eval()
    small_cfg = copy.deepcopy(cfg)
    small_cfg.num_decoder_layers = small_layers
    small = T5ForConditionalGeneration(small_cfg).eval()
    small.load_state_dict(large.state_dict(), strict=False)
    return large, small


def _hf_generate(model, **kwargs):
    # stock generate, with a decoder cache sized by the decoder depth (transformers 5.x sizes it by the encoder's)
    return model.generate(**cache_kwargs(new_decoder_cache(model)), **kwargs)


class _CallCounter:
    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


def _parse_rollbacks(text: str) -> list[float]:
    return [math.inf if t.strip().lower() in ("inf", "infinity") else float(t) for t in text.split(",") if t.strip()]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--input-length", type=int, default=64, help="random mode: encoder input length")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--rollbacks", default="0,1,3,5,inf")
    parser.add_argument("--fallback", type=float, default=0.6)
    parser.add_argument("--max-draft-len", type=int, default=10)
    parser.add_argument("--random-small-layers", type=int, default=1)
    parser.add_argument("--large", default=None)
    parser.add_argument("--small", default=None)
    parser.add_argument("--task", default=None, choices=[None, "cnndm", "squad"])
    parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bild.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.large is None) != (args.small is None):
        parser.error("give both --large and --small, or neither (random weights)")
    if args.task and args.large is None:
        parser.error("--task needs real checkpoints (--large/--small)")

    tokenizer, task, references = None, None, None
    if args.large is None:
        large, small = _random_pair(args.random_small_layers)
        gen = torch.Generator().manual_seed(1)
        inputs = [{"input_ids": torch.randint(2, 32128, (1, args.input_length), generator=gen)}
                  for _ in range(args.examples)]
        models_label = "random"
        # no EOS on random weights: every variant generates exactly --new-tokens tokens
        gen_kwargs = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}
    else:
        from transformers import AutoTokenizer

        large = T5ForConditionalGeneration.from_pretrained(args.large, local_files_only=True).eval()
        small = T5ForConditionalGeneration.from_pretrained(args.small, local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.large, local_files_only=True)
        models_label = {"large": os.path.abspath(args.large), "small": os.path.abspath(args.small)}
        gen_kwargs = {"max_new_tokens": args.new_tokens}
        if args.task:
            from hf_safe_exit.tasks import get_task
            from hf_safe_exit.tasks.data import load_split

            task = get_task(args.task)
            rows = load_split(task, "pool", path=args.data).select(range(args.examples))
            texts = [task.prompt(row) for row in rows]
            references = [task.reference(row) for row in rows]
        else:
            texts = ["summarize: " + "The quick brown fox jumps over the lazy dog. " * 8] * args.examples
        inputs = [dict(tokenizer(t, return_tensors="pt", truncation=True, max_length=512)) for t in texts]
    large.to(args.device)
    small.to(args.device)
    inputs = [{k: v.to(args.device) for k, v in x.items()} for x in inputs]

    rollbacks = _parse_rollbacks(args.rollbacks)
    variants: dict[str, object] = {"large": None, "small": None}
    for rb in rollbacks:
        variants[f"bild_rb={rb:g}"] = BiLD(small, fallback=args.fallback, rollback=rb, max_draft_len=args.max_draft_len)

    large_calls, small_calls = _CallCounter(large.decoder), _CallCounter(small.decoder)
    load_start = os.getloadavg()
    times = {name: [0.0] * args.reps for name in variants}
    outputs: dict[str, list] = {name: [None] * len(inputs) for name in variants}
    calls = {name: {"large": 0, "small": 0} for name in variants}
    stats = {name: {} for name in variants}

    def run(name, policy, x):
        if name == "large":
            return _hf_generate(large, **x, **gen_kwargs), None
        if name == "small":
            return _hf_generate(small, **x, **gen_kwargs), None
        out = policy.decode(large, **x, **gen_kwargs, return_dict_in_generate=True)
        return out.sequences, out.stats.as_dict()

    with torch.no_grad():
        # warm-up (first-call allocations), not timed
        for name, policy in variants.items():
            run(name, policy, inputs[0])
        for rep in range(args.reps):
            for i, x in enumerate(inputs):
                for name, policy in variants.items():
                    l0, s0 = large_calls.n, small_calls.n
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    seq, st = run(name, policy, x)
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    times[name][rep] += time.perf_counter() - t0
                    if rep == 0:
                        outputs[name][i] = seq[0].tolist()
                        calls[name]["large"] += large_calls.n - l0
                        calls[name]["small"] += small_calls.n - s0
                        for k, v in (st or {}).items():
                            stats[name][k] = stats[name].get(k, 0) + v

    reference = outputs["large"]
    t_large = statistics.median(times["large"])
    # real checkpoints stop at EOS, so variants may emit different numbers of tokens: compare time per token
    per_token_large = t_large / sum(len(o) - 1 for o in reference)
    results = {}
    for name in variants:
        outs = outputs[name]
        new_tokens = sum(len(o) - 1 for o in outs)
        match = [sum(a == b for a, b in zip(o, r)) / max(len(o), len(r)) for o, r in zip(outs, reference)]
        t = statistics.median(times[name])
        entry = {
            "wall_time_s": t,
            "ms_per_token": 1000 * t / new_tokens,
            "speedup_vs_large": per_token_large / (t / new_tokens),
            "time_ratio_vs_large": (t / new_tokens) / per_token_large,
            "new_tokens": new_tokens,
            "large_calls_per_token": calls[name]["large"] / new_tokens,
            "small_calls_per_token": calls[name]["small"] / new_tokens,
            "token_agreement_with_large": sum(match) / len(match),
            "sequence_agreement_with_large": sum(o == r for o, r in zip(outs, reference)) / len(outs),
        }
        if name.startswith("bild"):
            policy = variants[name]
            entry.update({"rollback": policy.rollback if math.isfinite(policy.rollback) else "inf",
                          "lambda": rollback_to_lambda(policy.rollback), "fallback": policy.fallback,
                          "max_draft_len": policy.max_draft_len, "bild_stats": stats[name]})
        if task is not None:
            texts = tokenizer.batch_decode([o for o in outs], skip_special_tokens=True)
            entry["task_score"] = sum(task.score(p, r) for p, r in zip(texts, references)) / len(texts)
        results[name] = entry

    report = {
        "benchmark": "bild",
        "models": models_label,
        "note": ("random weights: timings and call counts show the mechanics only; agreement and speed-up of "
                 "random networks say nothing about quality" if models_label == "random" else
                 "real checkpoints"),
        "task": args.task,
        "examples": len(inputs),
        "batch_size": 1,
        "new_tokens_per_example": args.new_tokens,
        "reps": args.reps,
        "decoder_layers": {"large": large.config.num_decoder_layers, "small": small.config.num_decoder_layers},
        "device": args.device,
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "machine": platform.machine(),
        "hardware": describe_hardware(),
        "speedup_basis": "per generated token (time per token of the large model / of the variant)",
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    width = max(len(n) for n in results)
    print(f"models: {models_label if isinstance(models_label, str) else 'checkpoints'}  ({report['note']})")
    print(f"{'variant':{width}}  speedup  large/tok  small/tok  tok-agree  seq-agree" + ("  score" if task else ""))
    for name, e in results.items():
        line = (f"{name:{width}}  {e['speedup_vs_large']:7.2f}  {e['large_calls_per_token']:9.2f}  "
                f"{e['small_calls_per_token']:9.2f}  {e['token_agreement_with_large']:9.3f}  "
                f"{e['sequence_agreement_with_large']:9.3f}")
        if task:
            line += f"  {e['task_score']:.3f}"
        print(line)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
