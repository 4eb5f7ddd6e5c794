"""Risk-controlled early exit for SQuAD v1.1 question answering, end to end and offline.

    python examples/squad_qa.py --model path/to/t5-squad --data ../shared/data --n 200 --eps 0.05

1. **collect** -- decode ``n`` examples of the calibration/test pool at every threshold of the
   grid and store per-example losses (resumable: rerun the command after an interruption);
2. **calibrate** -- split them at random into a calibration and a test half and choose λ̂ on the
   calibration half with ``RiskControlled(eps, method=...)``, saved with ``save_pretrained``;
3. **generate** -- load it back with ``RiskControlled.from_pretrained`` and answer the test
   half with ``model.generate(..., early_exit=rc)``, and with the full model (λ = 1);
4. **report** -- token F1 and exact match of both, the performance gap (the controlled risk: ≤ ε in expectation
   for CRC), the mean exit layer, and the wall-time speed-up.

``--model`` is a local directory holding a fine-tuned T5-family model and its tokenizer.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import hf_safe_exit
from hf_safe_exit.calibration import collect
from hf_safe_exit.risk import RiskControlled
from hf_safe_exit.tasks import get_task, load_split

TASK = "squad"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local model directory (weights + tokenizer)")
    p.add_argument("--data", default=None, help="local data (e.g. ../shared/data); default: the Hub")
    p.add_argument("--n", type=int, default=200, help="pool examples to use (half calibration, half test)")
    p.add_argument("--eps", type=float, default=0.05, help="target risk ε")
    p.add_argument("--method", default="crc", help="crc, ucb or ltt")
    p.add_argument("--delta", type=float, default=None, help="δ for ucb / ltt (e.g. 0.1)")
    p.add_argument("--measure", default="softmax")
    p.add_argument("--lambdas", default=None, help="comma-separated grid incl. 1 (default: 20 levels)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--max-input-length", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="early_exit_squad", help="results, risk_control.json")
    return p.parse_args(argv)


def generate_all(model, tokenizer, prompts, early_exit, batch_size, max_new_tokens, max_input_length):
    texts, exits, seconds = [], [], 0.0
    for s in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[s:s + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_input_length).to(model.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, early_exit=early_exit, max_new_tokens=max_new_tokens, do_sample=False,
                                 return_dict_in_generate=True)
        seconds += time.perf_counter() - start
        texts += [t.strip() for t in tokenizer.batch_decode(out.sequences, skip_special_tokens=True)]
        exits += out.mean_exit_layer.tolist()
    return texts, np.array(exits), seconds


def main(argv=None) -> dict:
    args = parse_args(argv)
    task = get_task(TASK)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    max_new = args.max_new_tokens or task.max_new_tokens
    max_in = args.max_input_length or task.max_input_length

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = hf_safe_exit.enable(AutoModelForSeq2SeqLM.from_pretrained(args.model).eval())
    pool = load_split(task, "pool", path=args.data)
    rng = np.random.default_rng(args.seed)
    chosen = np.sort(rng.choice(len(pool), size=min(args.n, len(pool)), replace=False))
    examples = pool.select(chosen.tolist())

    # 1. collect
    lambdas = None if args.lambdas is None else [float(v) for v in args.lambdas.split(",")]
    table = collect(model, tokenizer, task, examples, lambdas=lambdas, measure=args.measure,
                    batch_size=args.batch_size, max_new_tokens=max_new, max_input_length=max_in,
                    output=out_dir / "results.npz")

    # 2. calibrate on a random half, keep the other half for testing
    perm = rng.permutation(table.n)
    cal, test = np.sort(perm[: table.n // 2]), np.sort(perm[table.n // 2:])
    RiskControlled(args.eps, delta=args.delta, method=args.method).fit_table(table.subset(cal)).save_pretrained(out_dir)

    # 3. generate with the saved policy, and with the full model
    rc = RiskControlled.from_pretrained(out_dir)
    test_rows = examples.select(test.tolist())
    prompts = [task.prompt(r) for r in test_rows]
    refs = [task.reference(r) for r in test_rows]
    full_model = hf_safe_exit.EarlyExit(threshold=1.0, measure=args.measure)
    generate_all(model, tokenizer, prompts[:1], full_model, 1, max_new, max_in)  # warm-up, not timed
    early_texts, early_exit_layers, t_early = generate_all(model, tokenizer, prompts, rc, args.batch_size, max_new, max_in)
    full_texts, _, t_full = generate_all(model, tokenizer, prompts, full_model, args.batch_size, max_new, max_in)

    # 4. report
    early = [task.metrics(p, r) for p, r in zip(early_texts, refs)]
    full = [task.metrics(p, r) for p, r in zip(full_texts, refs)]
    mean = lambda rows, key: float(np.mean([m[key] for m in rows]))  # noqa: E731
    report = {
        "task": TASK, "n_cal": int(cal.size), "n_test": int(test.size), "eps": args.eps, "method": args.method,
        "lambda_hat": rc.lambda_, "guarantee": rc.certificate.guarantee,
        "f1_early_exit": mean(early, "f1"), "f1_full": mean(full, "f1"),
        "exact_match_early_exit": mean(early, "exact_match"), "exact_match_full": mean(full, "exact_match"),
        "performance_gap": mean(full, "f1") - mean(early, "f1"),
        "mean_exit_layer": float(early_exit_layers.mean()), "num_decoder_layers": model.config.num_decoder_layers,
        "speedup": t_full / t_early if t_early > 0 else float("nan"),
    }
    print(f"λ̂ = {rc.lambda_:.4g} ({args.method}, ε = {args.eps}: {rc.certificate.guarantee})")
    print(f"test F1: early exit {report['f1_early_exit']:.4f} vs full model {report['f1_full']:.4f} "
          f"(gap {report['performance_gap']:+.4f}); EM {report['exact_match_early_exit']:.4f} vs "
          f"{report['exact_match_full']:.4f}; mean exit layer {report['mean_exit_layer']:.2f} of "
          f"{report['num_decoder_layers']}; speed-up ×{report['speedup']:.2f}")
    for row, text in list(zip(test_rows, early_texts))[:2]:
        print(f"- Q: {row['question']}\n  A: {text!r}  (gold: {row['answers']['text'][0]!r})")
    return report


if __name__ == "__main__":
    main()
