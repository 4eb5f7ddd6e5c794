"""Risk-controlled early exit for SQuAD v1.1 question answering, end to end and offline.

    python examples/squad_qa.py --model path/to/t5-squad --data ../shared/data --n 200 --eps 0.05

1. **collect** -- decode ``n`` examples of the calibration/test pool at every threshold of the
   grid and store per-example losses (resumable: rerun the command after an interruption);
2. **calibrate** -- split them at random into a calibration and a test half and choose λ̂ on the
   calibration half with ``RiskControlled(eps, method=...)``, saved with ``save_pretrained``;
3. **generate** -- load it back with ``RiskControlled.from_pretrained`` and answer the test
   half with ``model.generate(..., early_exit=rc)``, and with the full model (λ = 1);
4. **report** -- token F1 and exact match of both, the performance gap (the controlled risk: ≤ ε in expectation
   for CRC), the mean exit layer, and the speed-up per generated token.

``--model`` is a local directory holding a fine-tuned T5-family model and its tokenizer.
"""

from __future__ import annotations

import numpy as np

from hf_safe_exit.calibration.end_to_end import example_parser, run_end_to_end


def main(argv=None) -> dict:
    args = example_parser(__doc__.splitlines()[0], default_output="early_exit_squad").parse_args(argv)
    run = run_end_to_end("squad", args)

    # 4. report
    early = [run.task.metrics(p, r) for p, r in zip(run.early_texts, run.references)]
    full = [run.task.metrics(p, r) for p, r in zip(run.full_texts, run.references)]
    mean = lambda rows, key: float(np.mean([m[key] for m in rows]))  # noqa: E731
    report = run.summary(args) | {
        "f1_early_exit": mean(early, "f1"), "f1_full": mean(full, "f1"),
        "exact_match_early_exit": mean(early, "exact_match"), "exact_match_full": mean(full, "exact_match"),
        "performance_gap": mean(full, "f1") - mean(early, "f1"),
    }
    print(f"λ̂ = {report['threshold']:.4g} ({args.method}, ε = {args.eps}: {report['guarantee']})")
    print(f"test F1: early exit {report['f1_early_exit']:.4f} vs full model {report['f1_full']:.4f} "
          f"(gap {report['performance_gap']:+.4f}); EM {report['exact_match_early_exit']:.4f} vs "
          f"{report['exact_match_full']:.4f}; mean exit layer {report['mean_exit_layer']:.2f} of "
          f"{report['num_decoder_layers']}; speed-up ×{report['speedup']:.2f} per generated token")
    for row, text in list(zip(run.test_rows, run.early_texts))[:2]:
        print(f"- Q: {row['question']}\n  A: {text!r}  (gold: {row['answers']['text'][0]!r})")
    return report


if __name__ == "__main__":
    main()
