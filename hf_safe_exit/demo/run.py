"""``hf-safe-exit demo``: risk-controlled early exit on the shipped default model, offline, in under a minute.

It summarises an article and answers a question about it, and for each prints

* the input (the article, shortened, or the question);
* the ε it runs at and why (:func:`demo_eps`: about a quarter of what the full model scores on its calibration
  rows, so that the guarantee means something for a model as weak as the shipped one);
* the early-exit output, each token coloured by the decoder layer it left at (``rich`` when
  installed, else ANSI colours; ``color=False`` writes the layer after each token instead);
* the guarantee the threshold λ̂ carries (fitted on the shipped calibration) in plain words;
* the measured speed-up against the full model (stock HF ``generate``) on that input, and the
  full model's output for comparison.

Calibrations are looked up per task in the model's folder (:mod:`hf_safe_exit.risk.store`): the loss table
``<model>/calibration/<task>/early_exit_calibration.npz`` is fitted at the demo's ε (UCB, δ = 0.1); a folder
that stores only ``risk_control.json`` runs at the λ̂ it ships. Without a
calibration the demo stops with :class:`DemoError` saying what is missing and how to make it; it
never calibrates on the fly (a guarantee needs held-out data).

    python -m hf_safe_exit.demo                       # built-in article and question (demo/__main__.py)
    python -m hf_safe_exit.demo --file article.txt --question "Who ...?"
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from ..errors import CalibrationFileError
from .calibration import task_calibration
from .render import pieces, print_result
from .result import DEFAULT_MAX_NEW_TOKENS, METRIC, DemoError, DemoResult

__all__ = ["run_demo", "DEMO_ARTICLE", "DEMO_QUESTION", "build_parser", "run_from_args", "main"]

# Written for this demo (not taken from any dataset).
DEMO_ARTICLE = (
    "The city council of Northfield voted on Tuesday to turn the old railway depot into a public library. "
    "The building, which has stood empty since the last freight train left in 1998, will be restored over the "
    "next two years at a cost of 12 million dollars. Mayor Elena Ruiz said the project would give the town's "
    "children a quiet place to read and study, and that the library would stay open until ten o'clock every "
    "night. Local historians welcomed the decision, because the depot's brick hall and its clock tower are among "
    "the oldest structures in the region. Construction is expected to begin in the spring, and the council will "
    "hold a public meeting next month to collect ideas for the reading rooms."
)
DEMO_QUESTION = "How much will the restoration of the depot cost?"




def _load(model_dir):
    from ..decoding.enable import enable
    from ..models import default_model_available, default_model_path, load_default_model

    if model_dir is None:
        if not default_model_available():
            raise DemoError(f"the default model is not installed in {default_model_path()}: this installation was "
                            "built without it. Train it with scripts/train_default_model.py, or pass model_dir= "
                            "(--model) with your own T5 checkpoint and its calibration.")
        # Without the meta head: an attached head changes model_fingerprint, and calibrations made with the CLI
        # (which loads the plain checkpoint) carry the plain model's fingerprint.
        model, tokenizer = load_default_model(with_meta_head=False)
        return enable(model), tokenizer, default_model_path()
    import torch
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise DemoError(f"no model in {path}: pass a local T5 checkpoint directory (config.json, weights, tokenizer).")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = T5ForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()
    return enable(model), tokenizer, path


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _shorten(text: str, words: int) -> str:
    """``text`` on one line, cut after ``words`` words (saying how many there were)."""
    parts = text.split()
    if len(parts) <= words:
        return " ".join(parts)
    return " ".join(parts[:words]) + f" … [{len(parts) - words} more words; {len(parts)} in all]"


SHOWN_ARTICLE_WORDS = 60  # how much of the article the demo prints before its summary


def _shown_input(task_name: str, example: dict) -> str:
    if task_name == "squad":
        return f"Question: {example['question']}  (context: the article above)"
    return f"Article: {_shorten(example['article'], SHOWN_ARTICLE_WORDS)}"


def _run_task(model, tokenizer, task_name: str, example: dict, rc, source: str, *, max_new_tokens: int | None,
              repeats: int, eps_reason: str = "") -> DemoResult:
    import torch

    from ..cards import guarantee_statement
    from ..compat import cache_kwargs
    from ..decoding.early_exit_loop import new_decoder_cache, no_cache_returned
    from ..tasks import get_task

    task = get_task(task_name)
    prompt = task.prompt(example)
    calibrated = rc.generation_settings  # decode as the calibration did: the guarantee is for those outputs
    enc = tokenizer(prompt, return_tensors="pt", truncation=True,
                    max_length=calibrated.get("max_input_length", task.max_input_length))
    default_new = calibrated.get("max_new_tokens", min(task.max_new_tokens, DEFAULT_MAX_NEW_TOKENS))
    gen = dict(max_new_tokens=max_new_tokens or default_new, do_sample=False, num_beams=1)
    early_exit = rc.resolve(model)  # the bound EarlyExit at λ̂; checks that the calibration is this model's
    with torch.inference_mode():
        def run_full(**over):
            return type(model).generate(model, **enc, **{**gen, **over}, **cache_kwargs(new_decoder_cache(model)))

        def run_early(**over):
            return model.generate(**enc, **{**gen, **no_cache_returned(early_exit), **over}, early_exit=early_exit,
                                  return_dict_in_generate=True)

        full = run_full()  # the full model's own output, shown beside early exit's; also the warm-up
        out = run_early()  # (first-call allocations): neither is timed
        real = out.exit_layers[0] > 0
        n = max(int(real.sum()), 1)
        # like for like: the full model timed on exactly as many tokens as early exit made, interleaved, best of
        # `repeats` each (outputs of different lengths would make a per-call ratio meaningless)
        t_early, t_full = float("inf"), float("inf")
        for _ in range(repeats):
            t_early = min(t_early, _seconds(run_early))
            t_full = min(t_full, _seconds(lambda: run_full(max_new_tokens=n, min_new_tokens=n)))
    seq = out.sequences[0, 1:]
    layers = out.exit_layers[0]
    ids = seq[real].tolist()
    full_ids = full[0, 1:].tolist()
    num_layers = int(out.num_decoder_layers)
    return DemoResult(
        task=task_name, prompt=prompt, text=tokenizer.decode(ids, skip_special_tokens=True),
        full_text=tokenizer.decode(full_ids, skip_special_tokens=True), pieces=pieces(tokenizer, ids),
        exit_layers=layers[real].tolist(), num_layers=num_layers, threshold=float(early_exit.threshold),
        guarantee=guarantee_statement(rc.certificate, METRIC.get(task_name, "task score")),
        calibration_source=source, time_early=t_early, time_full=t_full, new_tokens_early=len(ids),
        new_tokens_full=sum(1 for t in full_ids if t != tokenizer.pad_token_id), eps_reason=eps_reason,
        shown_input=_shown_input(task_name, example),
        extra={"measure": rc.certificate.measure, "method": rc.certificate.method})


def run_demo(text: str | None = None, file: str | os.PathLike | None = None, question: str | None = None, *,
             model_dir: str | os.PathLike | None = None, eps: float | None = None, delta: float | None = 0.1,
             method: str = "ucb", max_new_tokens: int | None = None, repeats: int = 1, color: bool | None = None,
             out: TextIO | None = None) -> list[DemoResult]:
    """Summarise an article and answer a question with risk-controlled early exit; print and return the results.

    Args:
        text, file: the article (a string, or a UTF-8 text file); default: a built-in article.
        question: a question about the article; default: the built-in question when the built-in article is used,
            none (no QA) for your own article unless you pass one.
        model_dir: a T5 checkpoint with its calibration(s); default: the shipped default model.
        eps: the target risk for every task; default (None): per task, :func:`demo_eps` of the stored loss table
            (about a quarter of the full model's score on its calibration rows), else the stored risk_control.json.
        delta, method: how the loss table is fitted (default: UCB with δ = 0.1, as the shipped calibrations).
        max_new_tokens: default: the calibration's (else the task's, at most 64). Inputs are truncated to the
            calibration's ``max_input_length`` (else the task's).
        repeats: timed runs per model (the fastest counts; default 1), after a short untimed warm-up.
        color: colour tokens by exit layer (default: when ``out`` is a terminal and NO_COLOR is unset).
        out: where to print (default stdout).
    Raises:
        DemoError: the model or a calibration is missing (the message says how to make it).
    """
    out = out if out is not None else sys.stdout
    if text is not None and file is not None:
        raise DemoError("pass either text or file, not both.")
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise DemoError(f"no file at '{path}'.")
        text = path.read_text(encoding="utf-8")
    if text is not None and not text.strip():
        raise DemoError("the article is empty.")
    if text is None:
        text, question = DEMO_ARTICLE, question or DEMO_QUESTION
    if not isinstance(repeats, int) or repeats < 1:
        raise DemoError(f"repeats={repeats!r} must be a positive integer.")
    if color is None:
        color = bool(getattr(out, "isatty", lambda: False)()) and "NO_COLOR" not in os.environ
    try:
        import rich  # noqa: F401

        use_rich = color
    except ImportError:
        use_rich = False

    model, tokenizer, directory = _load(model_dir)
    jobs = [("cnndm", {"article": text, "highlights": "", "id": "demo"})]
    if question:
        jobs.append(("squad", {"question": question, "context": text, "answers": {"text": [""]}, "id": "demo-q"}))
    calibrations = {task: task_calibration(directory, task, eps=eps, delta=delta, method=method,
                                            prefer_stored=False)
                    for task, _ in jobs}  # fail before any decoding if one is missing
    if model_dir is None:
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"The shipped default model: a {params:.1f} M-parameter T5 trained from scratch on a CPU. It is weak "
              "(its summaries are broken English, its answers rarely right): the demo shows the mechanism, tokens "
              "leaving the decoder early under a guarantee stated against this model's own full output, not "
              "summary quality.", file=out)
    results = []
    for task, example in jobs:
        rc, source, why = calibrations[task]
        results.append(_run_task(model, tokenizer, task, example, rc, source, max_new_tokens=max_new_tokens,
                                 repeats=repeats, eps_reason=why))
        print_result(results[-1], out, color, use_rich)
    if not question:
        print("(no question given: pass --question to also answer one about your article)", file=out)
    return results


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="hf-safe-exit demo", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", default=None, help="your article (default: a built-in one)")
    src.add_argument("--file", default=None, help="a UTF-8 text file with your article")
    p.add_argument("--question", default=None, help="a question about the article (built-in one by default)")
    p.add_argument("--model", default=None, help="a T5 checkpoint directory with its calibration "
                                                 "(default: the shipped default model)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate per answer (default: the "
                   "calibration's max_new_tokens, else the task's, at most 64); another value than the "
                   "calibration's warns, since the guarantee is for the calibrated length")
    p.add_argument("--eps", type=float, default=None, help="target risk ε for every task (default: per task, about "
                   "a quarter of the full model's score on its calibration rows, fitted from the stored loss table)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per model, the fastest counts (default 1)")
    p.add_argument("--no-color", action="store_true", help="plain text: exit layers as ⟨n⟩ after each token")
    return p


def run_from_args(args) -> int:
    run_demo(text=args.text, file=args.file, question=args.question, model_dir=args.model, eps=args.eps,
             max_new_tokens=args.max_new_tokens, repeats=args.repeats, color=False if args.no_color else None)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_from_args(args)
    except (DemoError, CalibrationFileError) as exc:  # a file that cannot be used: one line naming it, as the CLI
        print(f"hf-safe-exit demo: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
