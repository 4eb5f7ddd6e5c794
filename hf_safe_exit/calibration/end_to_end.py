"""The whole risk-controlled path on one task: collect → calibrate → generate → compare.

Shared by ``examples/summarize_cnndm.py`` and ``examples/squad_qa.py``:

1. **collect** ``n`` pool examples at every threshold of the grid (resumable);
2. **calibrate** on a random half with ``RiskControlled(eps, method=...)``, saved with ``save_pretrained``;
3. **generate** the other half with ``RiskControlled.from_pretrained(...)`` and with the full model (λ = 1);
4. return both outputs, exit layers and wall times for the caller to score and report.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["example_parser", "EndToEndRun", "run_end_to_end"]


def example_parser(description: str, default_output: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True, help="local model directory (weights + tokenizer)")
    p.add_argument("--data", default=None, help="local data (e.g. ../shared/data); default: the Hub")
    p.add_argument("--n", type=int, default=200, help="pool examples to use (half calibration, half test)")
    p.add_argument("--eps", type=float, default=0.05, help="target risk ε")
    p.add_argument("--method", default="crc", help="crc, ucb or ltt")
    p.add_argument("--delta", type=float, default=None, help="δ for ucb / ltt (e.g. 0.1)")
    p.add_argument("--measure", default="auto", help="confidence measure (default auto: see EarlyExit)")
    p.add_argument("--lambdas", default=None, help="comma-separated grid incl. 1 (default: 20 levels)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--max-input-length", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=default_output, help="results, risk_control.json")
    return p


@dataclass
class EndToEndRun:
    task: object
    controlled: object  # the RiskControlled loaded back with from_pretrained
    test_rows: list
    references: list
    early_texts: list[str]
    full_texts: list[str]
    early_exit_layers: np.ndarray
    seconds_early: float
    seconds_full: float
    n_cal: int
    num_decoder_layers: int
    tokens_early: int = 0
    tokens_full: int = 0

    @property
    def speedup(self) -> float:
        """The full model's time per generated token over early exit's (the outputs may differ in length)."""
        if not (self.seconds_early > 0 and self.tokens_early and self.tokens_full):
            return float("nan")
        return (self.seconds_full / self.tokens_full) / (self.seconds_early / self.tokens_early)

    def summary(self, args) -> dict:
        rc = self.controlled
        return {"task": self.task.name, "n_cal": self.n_cal, "n_test": len(self.test_rows), "eps": args.eps,
                "method": args.method, "threshold": rc.threshold, "guarantee": rc.certificate.guarantee,
                "mean_exit_layer": float(self.early_exit_layers.mean()),
                "num_decoder_layers": self.num_decoder_layers, "speedup": self.speedup,
                "speedup_basis": "per generated token", "tokens_early": self.tokens_early,
                "tokens_full": self.tokens_full}


def _generate_all(model, tokenizer, prompts, policies: dict, batch_size, max_new_tokens, max_input_length) -> dict:
    """Decode ``prompts`` with every policy, batch by batch and interleaved (load drifts hit all alike).

    Returns, per policy name: texts, mean exit layer per example, seconds and generated tokens (summed).
    """
    import torch

    res = {name: {"texts": [], "exits": [], "seconds": 0.0, "tokens": 0} for name in policies}
    for s in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[s:s + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_input_length).to(model.device)
        for name, early_exit in policies.items():
            r = res[name]
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(**enc, early_exit=early_exit, max_new_tokens=max_new_tokens, do_sample=False,
                                     return_dict_in_generate=True)
            r["seconds"] += time.perf_counter() - start
            r["texts"] += [t.strip() for t in tokenizer.batch_decode(out.sequences, skip_special_tokens=True)]
            r["exits"] += out.mean_exit_layer.tolist()
            r["tokens"] += int((out.exit_layers > 0).sum())
    return res


def run_end_to_end(task_name: str, args: argparse.Namespace) -> EndToEndRun:
    """Run steps 1–3 above with the options of :func:`example_parser`."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    import hf_safe_exit
    from ..config import EarlyExitConfig
    from ..risk import RiskControlled
    from ..tasks import get_task, load_split
    from .runner import collect

    task = get_task(task_name)
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
    table = collect(model, tokenizer, task, examples, lambdas=lambdas, config=EarlyExitConfig(measure=args.measure),
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
    full_model = hf_safe_exit.EarlyExit(threshold=1.0, measure=args.measure)
    policies = {"early": rc, "full": full_model}
    _generate_all(model, tokenizer, prompts[:1], policies, 1, max_new, max_in)  # warm-up, not timed
    res = _generate_all(model, tokenizer, prompts, policies, args.batch_size, max_new, max_in)
    early, full = res["early"], res["full"]
    return EndToEndRun(task=task, controlled=rc, test_rows=list(test_rows),
                       references=[task.reference(r) for r in test_rows], early_texts=early["texts"],
                       full_texts=full["texts"], early_exit_layers=np.array(early["exits"]),
                       seconds_early=early["seconds"], seconds_full=full["seconds"], n_cal=int(cal.size),
                       num_decoder_layers=model.config.num_decoder_layers, tokens_early=early["tokens"],
                       tokens_full=full["tokens"])
