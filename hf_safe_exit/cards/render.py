"""The Markdown of a guarantee section, its markers, and putting it into a card's text.

A card holds one section per calibration task, between ``<!-- hf_safe_exit:guarantee:<task>:start -->`` and
``<!-- hf_safe_exit:guarantee:<task>:end -->`` (:func:`section_markers`). A section with the generic markers
:data:`SECTION_START` / :data:`SECTION_END` (cards written before sections carried a task, or certificates
without a task) is replaced by the next write of any task that has no section of its own.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from ..risk.store import check_task_name
from .measurements import PER_TOKEN, AtThreshold, HeldOut, Measurements, Procedure
from .vocabulary import BOUND_WORDS, METHOD_WORDS, guarantee_statement, risk_definition, risk_words, task_info

__all__ = ["SECTION_START", "SECTION_END", "section_markers", "render_section", "replace_section", "check_fitted",
           "use_it_snippet", "section_title", "dataset_words", "decoding_rows", "plot_lines"]

SECTION_START = "<!-- hf_safe_exit:guarantee:start -->"
SECTION_END = "<!-- hf_safe_exit:guarantee:end -->"
_MARKER = "<!-- hf_safe_exit:guarantee:{}{} -->"
_ANY_SECTION_END = re.compile(r"<!-- hf_safe_exit:guarantee:(?:[^\s:>]+:)?end -->")

_EXAMPLE_INPUT = {"cnndm": "summarize: The council voted on Tuesday to turn the old railway depot into a library.",
                  "squad": "question: What will the depot become? context: The council voted on Tuesday to turn the "
                           "old railway depot into a library."}


def check_fitted(controlled) -> None:
    if not getattr(controlled, "is_fitted", False):
        raise ValueError("the RiskControlled is not fitted: call fit_table(...) (or load a fitted one with "
                         "RiskControlled.from_pretrained) before writing its card.")


def section_markers(task: str | None) -> tuple[str, str]:
    """The start and end markers of the guarantee section for ``task``: the generic ones for None."""
    if task is None:
        return SECTION_START, SECTION_END
    check_task_name(task)
    return _MARKER.format(task + ":", "start"), _MARKER.format(task + ":", "end")


def section_title(task: str | None) -> str:
    title = "## Early exit with a risk guarantee"
    if task is None:
        return title
    info = task_info(task)
    return f"{title}: {info.display_name.replace(' 3.0.0', '')}" + (f" {info.kind}" if info.kind else "") + \
        f" ({info.metric})"


def use_it_snippet(controlled, where: str | None, calibration_subfolder: str | None) -> list[str]:
    """The code snippet: load the model with its ``custom_generate/`` and decode as the calibration did.

    The lengths are the calibration's (``generation_settings``): the guarantee is for outputs decoded that way.
    """
    params = controlled.get_params()
    args = [f"eps={params['eps']:g}"] + [f"{k}={params[k]!r}" for k in ("delta", "method") if params[k] is not None]
    args += [f"{k}={params[k]!r}" for k, default in (("bound", "wsr"), ("risk", "performance_gap"), ("monotonize", None))
             if k in params and params[k] != default and (k != "bound" or params["method"] == "ucb")]
    # a pareto request names its p-value, split share and seed where they differ from RiskControlled's defaults
    args += [f"{k}={params[k]!r}" for k, default in (("p_value", "hoeffding_bentkus"), ("opt_fraction", 0.5),
                                                    ("seed", 0)) if params.get(k) not in (None, default)]
    task = controlled.certificate.task
    if task is not None and calibration_subfolder:
        args.append(f"task={task!r}")
    lengths = controlled.generation_settings
    text = _EXAMPLE_INPUT.get(task, "<your input, formatted as for calibration>")
    truncate = (f", truncation=True, max_length={lengths['max_input_length']}" if "max_input_length" in lengths else "")
    new_tokens = f", max_new_tokens={lengths['max_new_tokens']}" if "max_new_tokens" in lengths else ""
    said = [f"inputs truncated to {lengths['max_input_length']} tokens"] if truncate else []
    said += [f"at most {lengths['max_new_tokens']} new tokens"] if new_tokens else []
    return ["### Use it", "", "The guarantee holds for outputs decoded as the calibration decoded them (greedy"
            + (", " + " and ".join(said) if said else "") + "); the snippet does so.", "", "```python",
            "import hf_safe_exit", "from transformers import AutoTokenizer, T5ForConditionalGeneration", "",
            f'path = "{where or "<this repo or directory>"}"',
            "# trust_remote_code runs custom_generate/generate.py, which adds early_exit= to generate",
            "model = T5ForConditionalGeneration.from_pretrained(path, trust_remote_code=True)",
            "tokenizer = AutoTokenizer.from_pretrained(path)",
            f'inputs = tokenizer([{text!r}], return_tensors="pt"{truncate})',
            f"early_exit = hf_safe_exit.RiskControlled({', '.join(args)})",
            f"outputs = model.generate(**inputs, early_exit=early_exit{new_tokens})",
            "print(tokenizer.batch_decode(outputs, skip_special_tokens=True))", "```", ""]


def _settings_table(controlled, rows: str | None, dataset_name: str | None, anytime: str | None) -> list[str]:
    c, config = controlled.certificate, controlled.calibration.config  # None for BiLD
    info = task_info(c.task)
    method = METHOD_WORDS.get(c.method, c.method)
    if c.method == "ucb" and c.bound:
        method += f", {BOUND_WORDS.get(c.bound, c.bound)}"
    data = dataset_words(c.task, dataset_name)
    lines = ["| | |", "|---|---|", f"| Method | {method} |",
             f"| Target risk | ε = {c.eps:g}" + (f", δ = {c.delta:g}" if c.delta is not None else "") + " |",
             f"| Risk | {risk_definition(c.risk, info.metric)}; loss range [{c.loss_bounds[0]:g}, {c.loss_bounds[1]:g}] |",
             f"| Calibration data | {data}" + (f": {rows}" if rows else "") + f"; n = {c.n} |",
             f"| Threshold λ̂ | {c.threshold:.6g}" + ("" if c.feasible else " (no early exit)") + " |",
             f"| Calibration risk at λ̂ | {c.empirical_risk:+.4f} (mean over the n = {c.n} calibration examples) |"]
    if c.feasible:
        lines.append(f"| Risk bound at λ̂ | {c.risk_bound:+.4f}" + (f" (p-value {c.p_value:.3g})" if c.p_value is not None
                                                                 else "") + f" ≤ ε = {c.eps:g} |")
    else:
        lines.append(f"| Risk bound at λ̂ | {c.risk_bound:+.4f} |")
    if config is not None:
        lines += [f"| Confidence measure | {c.measure or config.measure_name} |",
                  f"| Threshold schedule | {config.schedule}"
                  + (f" (τ = {config.decay_tau:g})" if config.schedule == "decaying" else "")
                  + f", first exit layer {config.min_exit_layer}"
                  + (f", confidence checked after layers {', '.join(map(str, config.exit_layers))}"
                     if config.exit_layers else "") + " |"]
    if config is not None:  # settings the rows above do not describe (added later): listed as they are
        described = {"measure", "schedule", "decay_tau", "min_exit_layer", "exit_layers", "anytime"}
        default = type(config)().to_dict()
        rest = {k: v for k, v in config.to_dict().items() if k not in described and v != default.get(k)}
        if rest:
            lines.append("| Other early-exit settings | " + ", ".join(f"{k} = {v}" for k, v in rest.items()) + " |")
    lines += decoding_rows(controlled, fingerprint=False)
    if not anytime and config is not None and config.anytime is not None:  # decoded with PoE predictions
        poe = config.anytime
        anytime = (f"Product-of-Experts over the exits so far (Jazbec et al. 2023): {poe.activation} activation, "
                   f"{poe.weights if isinstance(poe.weights, str) else list(poe.weights)} weights")
    if anytime:
        lines.append(f"| Anytime predictions | {anytime} |")
    if c.monotonize:
        lines.append(f"| Monotonised losses | {c.monotonize} |")
    if c.model_fingerprint:
        lines.append(f"| Model fingerprint | `{c.model_fingerprint}` |")
    return lines + [""]


def dataset_words(task: str | None, dataset_name: str | None) -> str:
    """The calibration dataset's name for a settings table, with its Hub id and split when known."""
    info = task_info(task)
    data = dataset_name or info.display_name
    if info.dataset_id and info.dataset_split:
        data += f" (`{info.dataset_id}`, split `{info.dataset_split}`)"
    return data


def decoding_rows(controlled, *, fingerprint: bool = True) -> list[str]:
    """Settings-table rows: how the calibration decoded (greedy, its lengths) and, with ``fingerprint``, the model's
    fingerprint."""
    c, lengths = controlled.certificate, controlled.generation_settings
    rows = ["| Decoding | greedy" + "".join(f", {k.replace('_', ' ')} {v}" for k, v in lengths.items()) + " |"] \
        if lengths else []
    return rows + ([f"| Model fingerprint | `{c.model_fingerprint}` |"] if fingerprint and c.model_fingerprint else [])


def plot_lines(plots: Sequence[str]) -> list[str]:
    """The Markdown images of ``plots`` (paths relative to the card), then a blank line; none: nothing."""
    return [f"![{Path(p).stem.replace('_', ' ')}]({Path(p).as_posix()})" for p in plots] + [""] if plots else []


def _layers(value: float, total: int | None) -> str:
    return f"{value:.2f}" + (f" of {total} ({100 * value / total:.1f}%)" if total else "")


def _at_threshold(a: AtThreshold, metric: str, risk: str, hardware: str | None) -> list[str]:
    lines = [f"### What the shipped λ̂ = {a.threshold:.6g} does on its {a.n} calibration examples", "",
             f"Every calibration example ({a.rows}) was decoded at every threshold in one run, so early exit at λ̂ and "
             "the full model (λ = 1) are compared on the same examples. These are the examples λ̂ was chosen on: "
             "the numbers show what the threshold does; they do not test the guarantee (the next part does).", "",
             f"| same {a.n} examples | early exit, λ̂ = {a.threshold:.6g} | full model |", "|---|---|---|",
             f"| mean {risk_words(risk, metric)} | {a.risk:+.4f} | 0 |"]
    if a.score is not None:
        lines.append(f"| {metric} (mean per example) | {a.score:.4f} | {a.full_score:.4f} |")
    if a.tokens is not None:
        lines.append(f"| tokens generated | {a.tokens:,} | {a.full_tokens:,} |")
    if a.layers_per_token is not None:
        lines.append(f"| decoder layers per generated token | {_layers(a.layers_per_token, a.num_layers)} | "
                     f"{a.num_layers if a.num_layers else '—'} |")
    if a.ms_per_token is not None:
        lines.append(f"| wall time per generated token | {a.ms_per_token:.2f} ms | {a.full_ms_per_token:.2f} ms |")
        lines.append(f"| speed-up per generated token | **{a.speedup:.2f}×** | 1× |")
    lines.append("")
    notes = []
    if a.unmeasured:  # said, not hidden: the rows these extras give are missing from the table above
        names = ", ".join(f"`{k}`" for k in a.unmeasured)
        notes.append(f"Not shown: the loss table's {names} hold values that are not finite numbers (a measurement "
                     "that failed in collect); recollect the table to show what they measure.")
    if a.ms_per_token is not None:
        notes.append("Times: the whole set decoded at each threshold" + (f", batch size {a.batch_size}"
                                                                        if a.batch_size else "")
                     + (f", on {hardware}" if hardware else "") + "; divided by the tokens generated, since early "
                     "exit can change the output length.")
    elif a.tokens is None and "num_tokens" not in a.unmeasured:
        notes.append("The loss table records no token counts, so no speed-up per generated token is shown.")
    elif a.tokens is not None and "wall_time" not in a.unmeasured:
        notes.append("No speed-up per generated token is shown: the loss table records no times, or no token or no "
                     "time at λ̂ or at λ = 1.")
    return lines + ([" ".join(notes), ""] if notes else [])


def _procedure(p: Procedure, c, metric: str, hardware: str | None) -> list[str]:
    level = f"ε = {p.eps:g}" + (f", δ = {p.delta:g}" if p.delta is not None else "")
    lines = [f"### The calibration procedure on {p.repeats} random splits", "",
             f"To test the guarantee, the same {p.n_cal + p.n_test} examples were split at random {p.repeats} times "
             f"into n_cal = {p.n_cal} calibration and n_test = {p.n_test} test examples. Each split calibrated its "
             f"own threshold ({p.method}, {level}) on its n_cal examples (mean λ̂ over the splits: "
             f"{p.threshold_mean:.3g}) and was measured on its n_test examples. These numbers describe the procedure "
             f"with n_cal = {p.n_cal}; the shipped λ̂ = {c.threshold:.6g} was calibrated once, on all n = {c.n}.", "",
             f"* Test risk (mean {risk_words(c.risk, metric)}, on each split's test examples): **{p.test_risk:+.4f}**"
             + (f" ± {p.test_risk_std:.4f}" if p.test_risk_std is not None else "")
             + f" (mean ± sd over the {p.repeats} splits; target ε = {p.eps:g})."]
    if p.violation_rate is not None:
        lines.append(f"* Splits with test risk above ε: {100 * p.violation_rate:.1f}%"
                     + (f" (allowed: δ = {100 * p.delta:g}%)" if p.delta is not None else "") + ".")
    if p.mean_exit_layer is not None:
        lines.append(f"* Mean exit layer on the test examples: {_layers(p.mean_exit_layer, p.num_layers)} "
                     "(mean over the splits).")
    if p.speedup is not None:
        lines.append(f"* Speed-up per generated token at the splits' thresholds: {p.speedup:.2f}× (mean over the "
                     "splits; each threshold's time from decoding all the examples at it"
                     + (f", on {hardware}" if hardware else "") + ").")
    elif p.speedup_basis != PER_TOKEN:
        basis = p.speedup_basis or "per call (the evaluation records no basis)"
        lines.append(f"* No speed-up is shown for the splits: this evaluation's is {basis}, not per generated token "
                     "(rerun `hf-safe-exit evaluate` on a loss table with token counts).")
    else:  # evaluate records null where a split's threshold has no time per generated token
        lines.append("* No speed-up is shown for the splits: the evaluation records none (at some split's threshold "
                     "no token was generated, so there is no time per token to compare).")
    return lines + [""]


def _held_out(h: HeldOut, c, metric: str, hardware: str | None) -> list[str]:
    lines = [f"### The shipped λ̂ = {c.threshold:.6g} on held-out examples", ""]
    where = (f" on {h.n_test} held-out examples" if h.n_test else " on held-out examples") + \
        (f" ({h.split})" if h.split else "")
    if h.test_risk is not None:
        lines.append(f"* Test risk{where}: **{h.test_risk:+.4f}**" + (f" ± {h.test_risk_std:.4f}" if h.test_risk_std
                                                                        is not None else "")
                     + f" (mean {risk_words(c.risk, metric)}; target ε = {c.eps:g}).")
    if h.task_loss is not None and h.full_task_loss is not None:
        lines.append(f"* {metric} on those examples: {1 - h.task_loss:.4f} with early exit, "
                     f"{1 - h.full_task_loss:.4f} with the full model.")
    if h.mean_exit_layer is not None:
        total = h.num_decoder_layers
        lines.append(f"* Mean decoder layers per token: **{h.mean_exit_layer:.2f}**" + (f" of {total}" if total else "")
                     + (f" ({100 * h.layer_fraction:.1f}% of the decoder layers run)" if h.layer_fraction is not None
                        else "") + ".")
    if h.speedup is not None:
        lines.append(f"* Speed-up per generated token against the full model: **{h.speedup:.2f}×**"
                     + (f" (batch size {h.batch_size})" if h.batch_size else "")
                     + (f" on {hardware}" if hardware else "") + ".")
    return lines + [""]


def render_section(controlled, measured: Measurements, *, plots: Sequence[str] = (), rows: str | None = None,
                   dataset_name: str | None = None, repo_id: str | None = None, anytime: str | None = None,
                   calibration_subfolder: str | None = None) -> str:
    """The Markdown of the guarantee section, between the markers of its certificate's task.

    ``rows`` says which rows calibrated it (default: the loss table's, when ``measured`` has one);
    ``calibration_subfolder`` is where the calibration lies relative to the card, for the snippet.
    """
    check_fitted(controlled)
    c = controlled.certificate
    start, end = section_markers(c.task)
    metric = task_info(c.task).metric
    rows = rows or (measured.at_threshold.rows if measured.at_threshold else None)
    lines = [start, section_title(c.task), "",
             "This model can decode with token-level early exit (the `hf_safe_exit` library): each "
             "generated token leaves the decoder at the first layer whose confidence exceeds a threshold λ̂. The "
             "threshold was chosen on held-out calibration data so that the quality lost against running every "
             "decoder layer (the *full model*) is controlled:", "",
             "> **Guarantee.** " + guarantee_statement(c, metric), "",
             "It assumes that the examples you decode are exchangeable with the calibration examples (drawn from the "
             "same distribution) and holds for this model (fingerprint below) with the settings listed here; "
             "another model, task or confidence measure needs its own calibration.", ""]
    lines += _settings_table(controlled, rows, dataset_name, anytime)
    if measured.at_threshold is not None:
        lines += _at_threshold(measured.at_threshold, metric, c.risk, measured.hardware)
    if measured.procedure is not None:
        lines += _procedure(measured.procedure, c, metric, measured.hardware)
    if measured.held_out is not None:
        lines += _held_out(measured.held_out, c, metric, measured.hardware)
    if plots:
        lines += ["### Plots", ""]
        if measured.procedure is not None:
            p = measured.procedure
            lines += [f"The figures show the procedure on {p.repeats} random splits (n_cal = {p.n_cal}, "
                      f"n_test = {p.n_test}) at each target ε, not the shipped λ̂.", ""]
        lines += plot_lines(plots)
    lines += use_it_snippet(controlled, repo_id, calibration_subfolder) + [end]
    return "\n".join(lines) + "\n"


def _find_section(text: str, start: str, end: str) -> tuple[int, int] | None:
    """The span of the section between ``start`` and ``end`` in ``text`` (None if absent); one of each, in order."""
    n_start, n_end = text.count(start), text.count(end)
    if n_start == 0 and n_end == 0:
        return None
    if n_start == 0 or n_end == 0:
        raise ValueError(f"the card has only one of the markers {start!r} / {end!r}: restore or remove it by hand, "
                         "then write the card again.")
    i, j = text.find(start), text.find(end)
    if n_start > 1 or n_end > 1 or j < i:
        raise ValueError(f"the card has {n_start} {start!r} and {n_end} {end!r} markers (one section expected, start "
                         "before end): remove the extra section by hand, then write the card again.")
    return i, j + len(end)


def replace_section(text: str, section: str, task: str | None = None) -> str:
    """``text`` with the guarantee section of ``task`` replaced by ``section`` (which carries that task's markers).

    The task's own section is replaced; without one, a generic section (old cards) is; without either, ``section``
    goes right after the last guarantee section of any task, else at the end of the text.
    """
    span = _find_section(text, *section_markers(task))
    if span is None and task is not None:
        span = _find_section(text, SECTION_START, SECTION_END)  # an old card's section: migrate it to this task
    body = section.rstrip("\n")
    if span is not None:
        return text[:span[0]] + body + text[span[1]:]
    ends = list(_ANY_SECTION_END.finditer(text))
    if ends:
        at = ends[-1].end()
        return text[:at] + "\n\n" + body + text[at:]
    if not text.strip():
        return section
    return text.rstrip("\n") + "\n\n" + section
