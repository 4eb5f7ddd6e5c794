"""``hf-safe-exit demo``: risk-controlled early exit on the shipped default model, offline, in under a minute.

It summarises an article and answers a question about it, and for each prints

* the early-exit output, each token coloured by the decoder layer it left at (``rich`` when
  installed, else ANSI colours; ``color=False`` writes the layer after each token instead);
* the guarantee the threshold λ̂ carries (from the shipped calibration) in plain words;
* the measured speed-up against the full model (stock HF ``generate``) on that input, and the
  full model's output for comparison.

Calibrations are looked up per task in the model's folder (:mod:`hf_safe_exit.risk.store`):
``<model>/calibration/<task>/risk_control.json`` (the λ̂ it ships), else that folder's loss table
``early_exit_calibration.npz`` fitted with ``eps``/``delta``/``method``. Without a
calibration the demo stops with :class:`DemoError` saying what is missing and how to make it; it
never calibrates on the fly (a guarantee needs held-out data).

    python -m hf_safe_exit.demo                       # built-in article and question
    python -m hf_safe_exit.demo --file article.txt --question "Who ...?"
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, TextIO

__all__ = ["run_demo", "find_task_calibration", "DemoError", "DemoResult", "DEMO_ARTICLE", "DEMO_QUESTION", "main"]

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

_METRIC = {"cnndm": "ROUGE-L", "squad": "F1"}
DEFAULT_MAX_NEW_TOKENS = 64  # caps the summary length (CNN/DM's task default is 128) to stay within a minute
_TASK_TITLE = {"cnndm": "Summary", "squad": "Answer"}
_DATA = {"cnndm": "CNN/DailyMail news articles", "squad": "SQuAD questions on Wikipedia paragraphs"}


class DemoError(RuntimeError):
    """The demo cannot run: the message says what is missing and how to get it."""


@dataclass
class DemoResult:
    task: str
    prompt: str
    text: str
    full_text: str
    pieces: list[str]
    exit_layers: list[int]
    num_layers: int
    lambda_hat: float
    guarantee: str
    calibration_source: str
    time_early: float
    time_full: float  # the full model made to generate exactly new_tokens_early tokens (like for like)
    new_tokens_early: int
    new_tokens_full: int  # the full model's own output length (its text is full_text)
    extra: dict = field(default_factory=dict)

    @property
    def mean_exit_layer(self) -> float:
        return sum(self.exit_layers) / max(len(self.exit_layers), 1)

    @property
    def speedup(self) -> float:
        """The full model's time over early exit's for the same number of generated tokens (``new_tokens_early``:
        the full model is timed with ``min_new_tokens = max_new_tokens`` = that count), encoder included."""
        if self.time_early <= 0 or self.time_full <= 0:
            return float("nan")
        return self.time_full / self.time_early


def find_task_calibration(model_dir, task: str, *, eps: float = 0.1, delta: float | None = 0.1,
                          method: str = "ucb"):
    """The fitted ``RiskControlled`` for ``task`` stored with the model in ``model_dir``, and where it came from.

    The stored ``risk_control.json`` (λ̂ at the calibrated ε) when there is one; else the stored loss table fitted
    with ``eps``/``delta``/``method``. The layout is :mod:`hf_safe_exit.risk.store`'s.
    """
    import warnings

    from .risk import MissingCalibrationError, RiskControlled, find_stored

    try:
        stored = find_stored(model_dir, task)
    except MissingCalibrationError as err:
        raise DemoError(f"no calibration for task {task!r} with the model in {model_dir}: {err}") from None
    if stored.controlled_json is not None:
        return RiskControlled.from_dict(stored.controlled_json), str(stored.controlled_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = RiskControlled(eps, delta=delta if method in ("ucb", "ltt") else None, method=method).fit_table(stored.table)
    return rc, str(stored.table_path)


def _load(model_dir):
    from . import enable
    from .models import default_model_available, default_model_path, load_default_model

    if model_dir is None:
        if not default_model_available():
            raise DemoError(f"the default model is not installed in {default_model_path()}: this installation was "
                            "built without it. Train it with examples/train_default_model.py, or pass model_dir= "
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


def _pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each generated token adds (decoding prefixes, so SentencePiece spaces come out right)."""
    out, prev = [], ""
    for i in range(1, len(ids) + 1):
        cur = tokenizer.decode(ids[:i], skip_special_tokens=True)
        out.append(cur[len(prev):] if cur.startswith(prev) else cur)
        prev = cur
    return out


_PALETTE = (46, 82, 118, 154, 190, 226, 220, 214, 208, 202, 196)  # ANSI 256: green -> red


def _layer_color(layer: int, num_layers: int) -> int:
    frac = (layer - 1) / max(num_layers - 1, 1)
    return _PALETTE[round(frac * (len(_PALETTE) - 1))]


def _render_tokens(pieces, layers, num_layers, color: bool, use_rich: bool) -> str:
    if not color:
        return "".join(f"{p}⟨{l}⟩" if p.strip() else p for p, l in zip(pieces, layers))
    if use_rich:
        from rich.text import Text

        text = Text()
        for p, l in zip(pieces, layers):
            text.append(p, style=f"bold color({_layer_color(l, num_layers)})")
        return text
    return "".join(f"\x1b[1;38;5;{_layer_color(l, num_layers)}m{p}\x1b[0m" for p, l in zip(pieces, layers))


def _legend(num_layers: int, color: bool, use_rich: bool):
    if not color:
        return f"(⟨n⟩ after a token = the decoder layer it exited at, of {num_layers})"
    if use_rich:
        from rich.text import Text

        text = Text("exit layer: ")
        for l in range(1, num_layers + 1):
            text.append(f" {l} ", style=f"bold black on color({_layer_color(l, num_layers)})")
        text.append(f"  ({num_layers} = full depth)")
        return text
    return "exit layer: " + "".join(f"\x1b[1;30;48;5;{_layer_color(l, num_layers)}m {l} \x1b[0m"
                                    for l in range(1, num_layers + 1)) + f"  ({num_layers} = full depth)"


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _run_task(model, tokenizer, task_name: str, example: dict, rc, source: str, *, max_new_tokens: int | None,
              repeats: int) -> DemoResult:
    import torch

    from .cards import guarantee_statement
    from .compat import cache_kwargs
    from .decoding.early_exit_loop import new_decoder_cache
    from .tasks import get_task

    task = get_task(task_name)
    prompt = task.prompt(example)
    calibrated = rc.generation_settings  # decode as the calibration did: the guarantee is for those outputs
    enc = tokenizer(prompt, return_tensors="pt", truncation=True,
                    max_length=calibrated.get("max_input_length", task.max_input_length))
    default_new = calibrated.get("max_new_tokens", min(task.max_new_tokens, DEFAULT_MAX_NEW_TOKENS))
    gen = dict(max_new_tokens=max_new_tokens or default_new, do_sample=False, num_beams=1)
    early_exit = rc.bind(model)  # checks that the calibration belongs to this model (fingerprint)
    with torch.inference_mode():
        def run_full(**over):
            return type(model).generate(model, **enc, **{**gen, **over}, **cache_kwargs(new_decoder_cache(model)))

        def run_early(**over):
            return model.generate(**enc, **{**gen, **over}, early_exit=early_exit, return_dict_in_generate=True)

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
        full_text=tokenizer.decode(full_ids, skip_special_tokens=True), pieces=_pieces(tokenizer, ids),
        exit_layers=layers[real].tolist(), num_layers=num_layers, lambda_hat=float(rc.lambda_),
        guarantee=guarantee_statement(rc.certificate, _METRIC.get(task_name, "task score")),
        calibration_source=source, time_early=t_early, time_full=t_full, new_tokens_early=len(ids),
        new_tokens_full=sum(1 for t in full_ids if t != tokenizer.pad_token_id),
        extra={"measure": rc.certificate.measure, "method": rc.certificate.method})


def _print_result(r: DemoResult, out: TextIO, color: bool, use_rich: bool) -> None:
    title = _TASK_TITLE.get(r.task, r.task)
    line = "─" * 78
    if use_rich:
        from rich.console import Console

        console = Console(file=out, force_terminal=True, color_system="256", highlight=False, soft_wrap=True)
        emit = console.print
    else:
        def emit(obj=""):
            print(obj, file=out)
    emit(line)
    emit(f"{title} ({r.task}) with early exit at λ̂ = {r.lambda_hat:.4g} "
         f"[{r.extra['method']}, {r.extra['measure']} confidence; calibration {r.calibration_source}]")
    emit(_render_tokens(r.pieces, r.exit_layers, r.num_layers, color, use_rich) or "(empty output)")
    emit(_legend(r.num_layers, color, use_rich))
    emit(f"Full model:  {r.full_text or '(empty output)'}")
    same = "identical to" if r.text == r.full_text else "differs from"
    emit(f"Mean exit layer {r.mean_exit_layer:.2f} of {r.num_layers} "
         f"({100 * r.mean_exit_layer / r.num_layers:.0f}% of the decoder); output {same} the full model's.")
    n = max(r.new_tokens_early, 1)
    emit(f"Time for the same {n} generated tokens (encoder included): {r.time_early * 1000:.1f} ms with early "
         f"exit, {r.time_full * 1000:.1f} ms with the full model (HF generate made to emit {n} tokens) → "
         f"speed-up {r.speedup:.2f}× on this input, this tiny model ({r.time_early * 1000 / n:.1f} vs "
         f"{r.time_full * 1000 / n:.1f} ms/token; real T5 shapes: README \"Speed on real T5 shapes\").")
    emit(f"Guarantee: {r.guarantee}")
    emit(f"  (It is a statement about inputs drawn like the calibration data, {_DATA.get(r.task, r.task)}; "
         "a text of another kind is outside it.)")


def run_demo(text: str | None = None, file: str | os.PathLike | None = None, question: str | None = None, *,
             model_dir: str | os.PathLike | None = None, eps: float = 0.1, delta: float | None = 0.1,
             method: str = "ucb", max_new_tokens: int | None = None, repeats: int = 1, color: bool | None = None,
             out: TextIO | None = None) -> list[DemoResult]:
    """Summarise an article and answer a question with risk-controlled early exit; print and return the results.

    Args:
        text, file: the article (a string, or a UTF-8 text file); default: a built-in article.
        question: a question about the article; default: the built-in question when the built-in article is used,
            none (no QA) for your own article unless you pass one.
        model_dir: a T5 checkpoint with its calibration(s); default: the shipped default model.
        eps, delta, method: only used when the calibration found is a stored loss table (not a risk_control.json).
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
    calibrations = {task: find_task_calibration(directory, task, eps=eps, delta=delta, method=method)
                    for task, _ in jobs}  # fail before any decoding if one is missing
    results = []
    for task, example in jobs:
        rc, source = calibrations[task]
        results.append(_run_task(model, tokenizer, task, example, rc, source, max_new_tokens=max_new_tokens,
                                 repeats=repeats))
        _print_result(results[-1], out, color, use_rich)
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
    p.add_argument("--repeats", type=int, default=1, help="timed runs per model, the fastest counts (default 1)")
    p.add_argument("--no-color", action="store_true", help="plain text: exit layers as ⟨n⟩ after each token")
    return p


def run_from_args(args) -> int:
    run_demo(text=args.text, file=args.file, question=args.question, model_dir=args.model,
             max_new_tokens=args.max_new_tokens, repeats=args.repeats, color=False if args.no_color else None)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_from_args(args)
    except DemoError as exc:
        print(f"hf-safe-exit demo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
