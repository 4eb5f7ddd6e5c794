"""The risk guarantee in a HuggingFace model card (README.md), with ``model-index`` results the Hub renders.

>>> rc = RiskControlled(eps=0.05, delta=0.1, method="ucb").fit_table(table)
>>> write_guarantee_card("my-model/", rc, test_results={"test_risk": 0.031, "n_test": 400},
...                      efficiency={"mean_exit_layer": 3.1, "num_decoder_layers": 6, "speedup": 1.6},
...                      hardware="1× Intel Xeon core, torch 2.5 CPU", plots=["plots/risk.png"])

writes (or updates) ``my-model/README.md`` through :class:`huggingface_hub.ModelCard`:

* one section per calibration task, between ``<!-- hf_safe_exit:guarantee:<task>:start -->`` and
  ``<!-- hf_safe_exit:guarantee:<task>:end -->`` (:func:`section_markers`; the task is the
  certificate's, e.g. ``cnndm``), that states the guarantee in plain words, the method and bound,
  the calibration task, split and n, λ̂, the confidence measure and schedule, the measured test
  risk and efficiency (mean decoder layers, speed-up, hardware) when given, the plots, and how
  to load it. Writing a card for task T replaces only T's section (a new one goes after the
  other guarantee sections): the other tasks' sections, the rest of the text and the user's
  metadata stay. A section with the generic markers :data:`SECTION_START` / :data:`SECTION_END`
  (cards written before sections carried a task, or certificates without a task) is replaced by
  the next write of any task that has no section of its own, so old cards migrate;
* ``model-index`` results (:class:`huggingface_hub.EvalResult`, metric types
  :data:`METRIC_TYPES`): λ̂, the calibration risk and its bound and, when given, the test
  risk, mean exit layer, layer fraction and speed-up. They replace only this library's earlier
  results for the same task and dataset; other tasks' and other sources' results are kept;
* the calibration (``risk_control.json``, ``save_calibration=True``) where the card's snippet and
  ``hf-safe-exit demo`` find it: ``<dir>/calibration/<task>/`` (:mod:`hf_safe_exit.risk.store`).

:func:`push_to_hub` does the same for a Hub repo (it updates an existing README rather than
replacing it).
"""

from __future__ import annotations

import json
import math
import platform
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from .decoding.enable import write_custom_generate
from .risk.store import CALIBRATION_SUBDIR, check_task_name  # noqa: F401 - CALIBRATION_SUBDIR re-exported
from .risk.store import calibration_dir as store_calibration_dir

__all__ = ["write_guarantee_card", "render_guarantee_section", "guarantee_statement", "to_model_card",
           "push_to_hub", "describe_hardware", "section_markers", "calibration_directory", "METRIC_TYPES",
           "SECTION_START", "SECTION_END", "CALIBRATION_SUBDIR"]

# the generic markers: sections of certificates without a task, and of cards written before sections had one
SECTION_START = "<!-- hf_safe_exit:guarantee:start -->"
SECTION_END = "<!-- hf_safe_exit:guarantee:end -->"
_MARKER = "<!-- hf_safe_exit:guarantee:{}{} -->"
_ANY_SECTION_END = re.compile(r"<!-- hf_safe_exit:guarantee:(?:[^\s:>]+:)?end -->")
# model-index metric types this library writes (and replaces when it updates a card); others are kept
METRIC_TYPES = ("early_exit_threshold", "early_exit_calibration_risk", "early_exit_risk_bound", "early_exit_test_risk",
                "early_exit_mean_layers", "early_exit_layer_fraction", "early_exit_speedup")
_PLOTS_DIR = "hf_safe_exit_plots"

# task registry name -> (metric shown in words, model-index task type, dataset id, dataset display name)
_TASKS = {
    "cnndm": ("ROUGE-L", "summarization", "abisee/cnn_dailymail", "CNN/DailyMail"),
    "squad": ("F1", "question-answering", "rajpurkar/squad", "SQuAD v1.1"),
}
_METHODS = {
    "crc": "conformal risk control (CRC; Angelopoulos et al. 2022), a guarantee in expectation",
    "ucb": "upper confidence bound (RCPS; Bates et al. 2021), a guarantee with probability 1 − δ",
    "ltt": "Learn then Test (Angelopoulos et al. 2021) with Hoeffding–Bentkus p-values and fixed-sequence testing",
    "naive": "naive empirical risk (no guarantee; for comparison only)",
}
_BOUNDS = {"wsr": "Waudby-Smith–Ramdas betting bound", "hoeffding": "Hoeffding bound",
           "hoeffding_bentkus": "Hoeffding–Bentkus bound"}


_TASK_KINDS = {"summarization": "summarisation", "question-answering": "question answering"}


def _task_info(task: str | None) -> tuple[str, str, str | None, str]:
    if task in _TASKS:
        return _TASKS[task]
    return ("task score", "text2text-generation", task, task or "unknown task")


def section_markers(task: str | None) -> tuple[str, str]:
    """The start and end markers of the guarantee section for ``task``: the generic ones for None."""
    if task is None:
        return SECTION_START, SECTION_END
    check_task_name(task)
    return _MARKER.format(task + ":", "start"), _MARKER.format(task + ":", "end")


def _section_title(task: str | None) -> str:
    """The section heading; it names the task (and its metric) when the certificate has one."""
    title = "## Early exit with a risk guarantee"
    if task is None:
        return title
    metric, task_type, _, name = _task_info(task)
    kind = _TASK_KINDS.get(task_type)
    return f"{title}: {name}" + (f" {kind}" if kind else "") + f" ({metric})"


def _risk_words(risk: str, metric: str) -> str:
    if risk == "performance_gap":
        return f"{metric} drop against the full model"
    if risk == "performance_gap_bounded":
        return f"{metric} drop against the full model, counted as 0 where early exit does better"
    if risk == "consistency":
        return f"1 − {metric} of the early-exit output measured against the full model's own output"
    return risk


def _risk_definition(risk: str, metric: str) -> str:
    if risk == "performance_gap":
        return (f"per example, {metric}(full model) − {metric}(early exit) against the reference; may be negative "
                "where early exit does better (Jazbec, Timans et al. 2024, the unrestricted performance gap)")
    if risk == "performance_gap_bounded":
        return f"per example, max{{{metric}(full model) − {metric}(early exit), 0}} (CALM's bounded gap)"
    if risk == "consistency":
        return f"per example, 1 − {metric}(early exit, with the full model's output as the reference); needs no labels"
    return risk


def guarantee_statement(certificate, metric: str = "ROUGE-L") -> str:
    """The guarantee of a :class:`~hf_safe_exit.risk.RiskCertificate` in one plain-words paragraph."""
    c = certificate
    what = _risk_words(c.risk, metric)
    n = f"{c.n} calibration examples"
    if not c.feasible:
        tail = (f" No threshold below 1 passed the test with these {c.n} examples, so λ̂ = 1: the model always runs "
                "every decoder layer (the guarantee holds trivially, with no speed-up).")
    else:
        tail = ""
    if c.method in ("ucb", "ltt"):
        return (f"With probability at least 1 − δ = {1 - c.delta:.4g} over the random draw of the {n}, the expected "
                f"{what} on a new example from the same distribution is at most ε = {c.eps:g}." + tail)
    if c.method == "crc":
        return (f"In expectation over the random draw of the {n} and a new example from the same distribution, the "
                f"{what} is at most ε = {c.eps:g} (a guarantee on average over calibration draws, not for every "
                "draw)." + tail)
    return (f"None: λ̂ was chosen by the naive empirical risk on {n} (mean {what} ≤ ε = {c.eps:g} on those examples "
            "only), which carries no guarantee for new examples." + tail)


def describe_hardware() -> str:
    """A short description of this machine (for the speed-up's hardware line)."""
    import torch

    if torch.cuda.is_available():
        dev = f"GPU {torch.cuda.get_device_name(0)}"
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        cpu = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        dev = f"CPU {cpu}, {torch.get_num_threads()} torch thread(s)"
    return f"{dev}, torch {torch.__version__}"


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "—"
        return f"{x:.{digits}g}"
    return str(x)


def _pick_evaluation_row(evaluation: Mapping, certificate) -> dict:
    """The row of an ``evaluate_table`` result for the certificate's method and ε (and δ, risk)."""
    rows = [r for r in evaluation["results"] if r["method"] == certificate.method
            and math.isclose(float(r["eps"]), certificate.eps, rel_tol=1e-9)
            and (certificate.delta is None or r.get("delta") is None
                 or math.isclose(float(r["delta"]), certificate.delta, rel_tol=1e-9))]
    if not rows:
        raise ValueError(f"the evaluation has no result for method={certificate.method!r}, eps={certificate.eps:g}: "
                         "evaluate with that method and ε, or pass test_results as a dict of numbers.")
    settings = evaluation.get("settings", {})
    if settings.get("risk") not in (None, certificate.risk):
        raise ValueError(f"the evaluation measured risk {settings.get('risk')!r} but the certificate controls "
                         f"{certificate.risk!r}.")
    r = rows[0]
    return {"test_risk": r["test_risk_mean"], "test_risk_std": r.get("test_risk_std"),
            "violation_rate": r.get("violation_rate"), "n_test": settings.get("n_test"), "n_cal": settings.get("n_cal"),
            "repeats": settings.get("repeats"), "lambda_hat_mean": r.get("lambda_hat_mean"),
            "task_loss": r.get("task_loss"), "full_task_loss": evaluation.get("full_model", {}).get("task_loss"),
            "mean_exit_layer": r.get("mean_exit_layer"), "layer_fraction": r.get("layer_fraction"),
            "speedup": r.get("speedup"),
            "num_decoder_layers": evaluation.get("metadata", {}).get("num_decoder_layers")}


_TEST_KEYS = ("test_risk", "test_risk_std", "violation_rate", "n_test", "n_cal", "repeats", "lambda_hat_mean",
              "task_loss", "full_task_loss", "split")
_EFF_KEYS = ("mean_exit_layer", "num_decoder_layers", "layer_fraction", "speedup", "hardware", "batch_size",
             "wall_time_full", "wall_time")


def _normalise_results(test_results: Mapping | None, efficiency: Mapping | None, certificate,
                       hardware: str | None) -> tuple[dict, dict]:
    test, eff = {}, {}
    if test_results is not None:
        if "results" in test_results:  # an hf-safe-exit evaluate output
            row = _pick_evaluation_row(test_results, certificate)
            test = {k: row[k] for k in _TEST_KEYS if row.get(k) is not None}
            eff = {k: row[k] for k in _EFF_KEYS if row.get(k) is not None}
        else:
            unknown = set(test_results) - set(_TEST_KEYS)
            if unknown:
                raise ValueError(f"test_results has unknown keys {sorted(unknown)}: use {_TEST_KEYS}, or pass the "
                                 "JSON written by `hf-safe-exit evaluate`.")
            if "test_risk" not in test_results:
                raise ValueError("test_results needs at least 'test_risk' (the mean risk on held-out examples).")
            test = dict(test_results)
    if efficiency is not None:
        unknown = set(efficiency) - set(_EFF_KEYS)
        if unknown:
            raise ValueError(f"efficiency has unknown keys {sorted(unknown)}: use {_EFF_KEYS}.")
        eff.update(efficiency)
    if hardware is not None:
        eff["hardware"] = describe_hardware() if hardware == "auto" else hardware
    for k, v in list(test.items()) + list(eff.items()):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{k}={v!r} is not a finite number.")
    return test, eff


def _check_fitted(controlled) -> None:
    if not getattr(controlled, "is_fitted", False):
        raise ValueError("the RiskControlled is not fitted: call fit_table(...) (or load a fitted one with "
                         "RiskControlled.from_pretrained) before writing its card.")


_EXAMPLE_INPUT = {"cnndm": "summarize: The council voted on Tuesday to turn the old railway depot into a library.",
                  "squad": "question: What will the depot become? context: The council voted on Tuesday to turn the "
                           "old railway depot into a library."}


def _use_it(controlled, where: str | None, calibration_subfolder: str | None) -> list[str]:
    """The section's code snippet: load the model with its ``custom_generate/`` and decode under this guarantee.

    ``RiskControlled(<the calibrated request>, task=...)`` finds the stored calibration by itself
    (:mod:`hf_safe_exit.risk.store`); the lengths are the ones the losses were decoded with.
    """
    params = controlled.get_params()
    args = [f"eps={params['eps']:g}"] + [f"{k}={params[k]!r}" for k in ("delta", "method") if params[k] is not None]
    args += [f"{k}={params[k]!r}" for k, default in (("bound", "wsr"), ("risk", "performance_gap"), ("monotonize", None))
             if params[k] != default and (k != "bound" or params["method"] == "ucb")]
    task = controlled.certificate.task
    if task is not None and calibration_subfolder:
        args.append(f"task={task!r}")
    lengths = getattr(controlled, "generation_settings", {}) or {}
    text = _EXAMPLE_INPUT.get(task, "<your input, formatted as for calibration>")
    truncate = (f", truncation=True, max_length={lengths['max_input_length']}" if "max_input_length" in lengths else "")
    new_tokens = f", max_new_tokens={lengths['max_new_tokens']}" if "max_new_tokens" in lengths else ""
    return ["### Use it", "", "```python", "import hf_safe_exit",
            "from transformers import AutoTokenizer, T5ForConditionalGeneration", "",
            f'path = "{where or "<this repo or directory>"}"',
            "# trust_remote_code runs custom_generate/generate.py, which adds early_exit= to generate",
            "model = T5ForConditionalGeneration.from_pretrained(path, trust_remote_code=True)",
            "tokenizer = AutoTokenizer.from_pretrained(path)",
            f'inputs = tokenizer([{text!r}], return_tensors="pt"{truncate})',
            f"early_exit = hf_safe_exit.RiskControlled({', '.join(args)})",
            f"outputs = model.generate(**inputs, early_exit=early_exit{new_tokens})",
            "print(tokenizer.batch_decode(outputs, skip_special_tokens=True))", "```", ""]


def render_guarantee_section(controlled, *, test_results: Mapping | None = None, efficiency: Mapping | None = None,
                             plots: Sequence[str] = (), hardware: str | None = None,
                             calibration_split: str | None = None, dataset_name: str | None = None,
                             repo_id: str | None = None, anytime: str | None = None,
                             calibration_subfolder: str | None = None) -> str:
    """The Markdown of the guarantee section, between the markers of its certificate's task.

    ``calibration_subfolder`` is where the calibration lies relative to the card (e.g. ``"calibration/cnndm"``;
    None: ``risk_control.json`` next to it), for the code snippet. See :func:`write_guarantee_card`.
    """
    _check_fitted(controlled)
    c = controlled.certificate
    start, end = section_markers(c.task)
    cal = getattr(controlled, "_calibration", {}) or {}
    metric, _, _, task_name = _task_info(c.task)
    test, eff = _normalise_results(test_results, efficiency, c, hardware)
    dataset = dataset_name or task_name

    method = _METHODS.get(c.method, c.method)
    if c.method == "ucb" and c.bound:
        method += f", {_BOUNDS.get(c.bound, c.bound)}"
    lines = [start, _section_title(c.task), "",
             "This model can decode with token-level early exit (the `hf_safe_exit` library): each "
             "generated token leaves the decoder at the first layer whose confidence exceeds a threshold λ̂. The "
             "threshold was chosen on held-out calibration data so that the quality lost against running every "
             "decoder layer (the *full model*) is controlled:", "",
             "> **Guarantee.** " + guarantee_statement(c, metric), "",
             "It assumes that the examples you decode are exchangeable with the calibration examples (drawn from the "
             "same distribution) and holds for this model (fingerprint below) with the settings listed here; "
             "another model, task or confidence measure needs its own calibration.", "",
             "| | |", "|---|---|",
             f"| Method | {method} |",
             f"| Target risk | ε = {c.eps:g}" + (f", δ = {c.delta:g}" if c.delta is not None else "") + " |",
             f"| Risk | {_risk_definition(c.risk, metric)}; loss range [{c.loss_bounds[0]:g}, {c.loss_bounds[1]:g}] |",
             f"| Calibration data | {dataset}" + (f", split `{calibration_split}`" if calibration_split else "")
             + f", n = {c.n} |",
             f"| Threshold λ̂ | {c.lambda_hat:.6g}" + ("" if c.feasible else " (no early exit)") + " |",
             f"| Calibration risk at λ̂ | {c.empirical_risk:+.4f} (empirical mean) |",
             f"| Risk bound at λ̂ | {c.risk_bound:+.4f}" + (f" (p-value {c.p_value:.3g})" if c.p_value is not None
                                                           else "") + f" ≤ ε = {c.eps:g} |"
             if c.feasible else f"| Risk bound at λ̂ | {c.risk_bound:+.4f} |",
             f"| Confidence measure | {c.measure or cal.get('measure')} |",
             f"| Threshold schedule | {cal.get('schedule', 'constant')}"
             + (f" (τ = {cal.get('decay_tau'):g})" if cal.get("schedule") == "decaying" else "")
             + f", first exit layer {cal.get('min_exit_layer', 1)} |"]
    if not anytime and cal.get("anytime"):  # the calibration decoded with Product-of-Experts predictions
        poe = cal["anytime"]
        anytime = (f"Product-of-Experts over the exits so far (Jazbec et al. 2023): {poe.get('activation')} "
                   f"activation, {poe.get('weights')} weights")
    if anytime:
        lines.append(f"| Anytime predictions | {anytime} |")
    if c.monotonize:
        lines.append(f"| Monotonised losses | {c.monotonize} |")
    if c.model_fingerprint:
        lines.append(f"| Model fingerprint | `{c.model_fingerprint}` |")
    lines.append("")

    if test or eff:
        lines += ["### Measured on held-out data", ""]
        if test.get("repeats"):
            # repeated splits measure the *procedure* (a fresh λ̂ per split, on fewer examples), not the λ̂ above
            n_cal = f"n_cal = {test['n_cal']}" if test.get("n_cal") else "part of the"
            mean_lam = (f" (mean λ̂ {test['lambda_hat_mean']:.3g})" if test.get("lambda_hat_mean") is not None
                        else "")
            lines += [f"These numbers measure the calibration procedure: each of {test['repeats']} random splits "
                      f"calibrates its own threshold on {n_cal} examples{mean_lam} and tests it on the rest. "
                      f"The threshold λ̂ = {c.lambda_hat:.6g} above was calibrated once, on all n = {c.n}; with more "
                      "calibration examples the bound is tighter, so it may exit earlier than the split "
                      "thresholds.", ""]
        if test:
            split = f" ({test['split']})" if test.get("split") else ""
            n_test = f" on {test['n_test']} test examples" if test.get("n_test") else ""
            reps = (f", mean over {test['repeats']} random calibration/test splits" if test.get("repeats") else "")
            lines.append(f"* Test risk{split}: **{test['test_risk']:+.4f}**" +
                         (f" ± {test['test_risk_std']:.4f}" if test.get("test_risk_std") is not None else "") +
                         f"{n_test}{reps} (target ε = {c.eps:g}).")
            if test.get("violation_rate") is not None:
                lines.append(f"* Splits with test risk above ε: {100 * test['violation_rate']:.1f}%"
                             + (f" (allowed: δ = {100 * c.delta:g}%)" if c.delta is not None else "") + ".")
            if test.get("task_loss") is not None and test.get("full_task_loss") is not None:
                lines.append(f"* {metric}: {1 - test['task_loss']:.4f} with early exit, "
                             f"{1 - test['full_task_loss']:.4f} with the full model.")
        if eff.get("mean_exit_layer") is not None:
            total = eff.get("num_decoder_layers")
            frac = eff.get("layer_fraction")
            lines.append(f"* Mean decoder layers per token: **{eff['mean_exit_layer']:.2f}**"
                         + (f" of {total}" if total else "")
                         + (f" ({100 * frac:.1f}% of the decoder layers run)" if frac is not None else "") + ".")
        if eff.get("speedup") is not None:
            lines.append(f"* Speed-up per generated token against the full model: **{eff['speedup']:.2f}×**"
                         + (f" (batch size {eff['batch_size']})" if eff.get("batch_size") else "")
                         + (f" on {eff['hardware']}" if eff.get("hardware") else "") + ".")
        elif eff.get("hardware"):
            lines.append(f"* Hardware: {eff['hardware']}.")
        lines.append("")

    if plots:
        lines += ["### Plots", ""]
        for p in plots:
            lines.append(f"![{Path(p).stem.replace('_', ' ')}]({Path(p).as_posix()})")
        lines.append("")

    lines += _use_it(controlled, repo_id, calibration_subfolder) + [end]
    return "\n".join(lines) + "\n"


def _eval_results(controlled, test: dict, eff: dict, model_name: str, calibration_split: str | None,
                  dataset_name: str | None):
    from huggingface_hub import EvalResult

    c = controlled.certificate
    metric, task_type, dataset_id, task_name = _task_info(c.task)
    dataset_id = dataset_id or "unknown"
    name = dataset_name or task_name
    level = f"ε = {c.eps:g}" + (f", δ = {c.delta:g}" if c.delta is not None else "")
    common = dict(task_type=task_type, dataset_type=dataset_id)
    cal_split = calibration_split or "calibration"
    out = [
        EvalResult(dataset_name=f"{name} (calibration)", dataset_split=cal_split, metric_type="early_exit_threshold",
                   metric_name=f"Early-exit threshold λ̂ ({c.method}, {level})", metric_value=float(c.lambda_hat),
                   **common),
        EvalResult(dataset_name=f"{name} (calibration)", dataset_split=cal_split,
                   metric_type="early_exit_calibration_risk",
                   metric_name=f"Calibration risk at λ̂: mean {_risk_words(c.risk, metric)} (n = {c.n})",
                   metric_value=float(c.empirical_risk), **common),
        EvalResult(dataset_name=f"{name} (calibration)", dataset_split=cal_split, metric_type="early_exit_risk_bound",
                   metric_name=f"Risk bound at λ̂ ({c.method}{'/' + c.bound if c.bound else ''}, {level})",
                   metric_value=float(c.risk_bound), **common),
    ]
    test_split = test.get("split") or "test"
    if "test_risk" in test:
        out.append(EvalResult(dataset_name=f"{name} (test)", dataset_split=test_split,
                              metric_type="early_exit_test_risk",
                              metric_name=f"Test risk at λ̂: mean {_risk_words(c.risk, metric)} (target ε = {c.eps:g})",
                              metric_value=float(test["test_risk"]), **common))
    for key, mtype, mname in (("mean_exit_layer", "early_exit_mean_layers", "Mean decoder layers per token"),
                              ("layer_fraction", "early_exit_layer_fraction", "Fraction of decoder layers run"),
                              ("speedup", "early_exit_speedup", "Generation speed-up vs the full model")):
        if eff.get(key) is not None:
            suffix = f" ({eff['hardware']})" if key == "speedup" and eff.get("hardware") else ""
            out.append(EvalResult(dataset_name=f"{name} (test)", dataset_split=test_split, metric_type=mtype,
                                  metric_name=mname + suffix, metric_value=float(eff[key]), **common))
    return out


def _merge_eval_results(existing: Sequence, ours: Sequence) -> list:
    """``existing`` with this library's earlier results for the task and dataset of ``ours`` replaced by ``ours``.

    Only results with a metric type of :data:`METRIC_TYPES` and the same (task type, dataset type) as one of ``ours``
    are dropped; other tasks' results and other sources' results stay, in their order. ``ours`` take the place of
    the first result they replace (else they go last).
    """
    keys = {(r.task_type, r.dataset_type) for r in ours}
    replaced = {i for i, r in enumerate(existing)
                if r.metric_type in METRIC_TYPES and (r.task_type, r.dataset_type) in keys}
    kept = [r for i, r in enumerate(existing) if i not in replaced]
    at = min(replaced) if replaced else len(kept)  # nothing before the first replaced result was dropped
    return kept[:at] + list(ours) + kept[at:]


def _card_path(model_dir_or_card_path) -> Path:
    path = Path(model_dir_or_card_path)
    if path.suffix.lower() == ".md":
        return path
    return path / "README.md"


def _place_plots(plots: Sequence[str], card_dir: Path, task: str | None = None) -> list[str]:
    """Plot paths relative to the card; plots outside its directory are copied into it (the Hub needs them there).

    Copies go to ``hf_safe_exit_plots/<task>/`` (``hf_safe_exit_plots/`` without a task), so that the plots of
    one task's section never overwrite another's of the same file name.
    """
    out = []
    for p in plots:
        src = Path(p)
        if not src.is_absolute() and not src.exists() and (card_dir / src).is_file():
            src = card_dir / src
        if not src.is_file():
            raise FileNotFoundError(f"plot '{p}' does not exist: write it with `hf-safe-exit plot` first.")
        src = src.resolve()
        try:
            rel = src.relative_to(card_dir.resolve())
        except ValueError:
            dest = card_dir / _PLOTS_DIR / (task or "") / src.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            rel = dest.relative_to(card_dir)
        out.append(rel.as_posix())
    return out


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


def _replace_section(text: str, section: str, task: str | None = None) -> str:
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


def to_model_card(controlled, card=None, *, test_results: Mapping | None = None, efficiency: Mapping | None = None,
                  plots: Sequence[str] = (), hardware: str | None = None, model_name: str | None = None,
                  calibration_split: str | None = None, dataset_name: str | None = None, repo_id: str | None = None,
                  anytime: str | None = None, calibration_subfolder: str | None = None):
    """A :class:`huggingface_hub.ModelCard` with the guarantee section of the certificate's task and its results.

    ``card`` is an existing ``ModelCard`` to update: only the section of this task (or a generic one, see
    :func:`_replace_section`) and this library's ``model-index`` results for this task's dataset change; other
    tasks' sections and results, the other text, metadata and other sources' eval results are kept. None: a new
    card. ``plots`` are written into the card as given (relative paths); ``calibration_subfolder``: see
    :func:`render_guarantee_section`.
    """
    from huggingface_hub import ModelCard, ModelCardData

    _check_fitted(controlled)
    section = render_guarantee_section(controlled, test_results=test_results, efficiency=efficiency, plots=plots,
                                       hardware=hardware, calibration_split=calibration_split,
                                       dataset_name=dataset_name, repo_id=repo_id, anytime=anytime,
                                       calibration_subfolder=calibration_subfolder)
    test, eff = _normalise_results(test_results, efficiency, controlled.certificate, hardware)
    if card is None:
        name = model_name or (repo_id.split("/")[-1] if repo_id else "model")
        data = ModelCardData(model_name=name, library_name="transformers")
        card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {name}\n\n")
    data = card.data
    name = model_name or getattr(data, "model_name", None) or (repo_id.split("/")[-1] if repo_id else "model")
    ours = _eval_results(controlled, test, eff, name, calibration_split, dataset_name)
    data.model_name = name
    data.eval_results = _merge_eval_results(getattr(data, "eval_results", None) or [], ours)
    tags = list(getattr(data, "tags", None) or [])
    for tag in ("hf-safe-exit", "early-exit", "risk-control"):
        if tag not in tags:
            tags.append(tag)
    data.tags = tags
    if getattr(data, "library_name", None) is None:
        data.library_name = "transformers"
    card.text = _replace_section(card.text, section, controlled.certificate.task)
    # round-trip through the YAML once, so that an invalid combination fails here rather than on the Hub
    ModelCard(card.content)
    return card


def calibration_directory(model_dir, task: str | None) -> Path:
    """Where :func:`write_guarantee_card` (``save_calibration=True``) saves ``task``'s calibration for ``model_dir``.

    ``<model_dir>/calibration/<task>/``: the one layout of :mod:`hf_safe_exit.risk.store`, which
    ``RiskControlled(eps, task=...)``, ``hf-safe-exit demo`` and the examples read. A certificate without a task
    (fitted on a raw loss matrix) can only go to ``model_dir`` itself. The card's snippet loads from the directory
    chosen here: ``RiskControlled.from_pretrained("<model_dir>/calibration/<task>")``, or from a Hub repo
    ``RiskControlled.from_pretrained(repo_id, subfolder="calibration/<task>")``.
    """
    if task is None:
        return Path(model_dir)
    return store_calibration_dir(model_dir, task)


def write_guarantee_card(model_dir_or_card_path, controlled, *, test_results: Mapping | None = None,
                         efficiency: Mapping | None = None, plots: Sequence[str] = (), hardware: str | None = None,
                         model_name: str | None = None, calibration_split: str | None = None,
                         dataset_name: str | None = None, repo_id: str | None = None, anytime: str | None = None,
                         save_calibration: bool = True) -> Path:
    """Write or update the model card ``README.md`` with the guarantee of ``controlled`` (a fitted ``RiskControlled``).

    The card gets (or updates) the section of the certificate's task and that task's ``model-index`` results; the
    sections and results of other tasks stay, so one card can state one guarantee per calibration task (write it
    once per task). See the module docstring.

    Args:
        model_dir_or_card_path: the model directory (its ``README.md`` is written) or a ``.md`` path.
        controlled: a fitted :class:`~hf_safe_exit.risk.RiskControlled`.
        test_results: held-out results: the JSON dict written by ``hf-safe-exit evaluate`` (the row of this
            method and ε is used, with its efficiency numbers), or a dict with ``test_risk`` and optionally
            ``test_risk_std``, ``violation_rate``, ``n_test``, ``repeats``, ``task_loss``, ``full_task_loss``, ``split``.
        efficiency: ``mean_exit_layer``, ``num_decoder_layers``, ``layer_fraction``, ``speedup``, ``batch_size``
            (override those of ``test_results``).
        plots: image files (e.g. from ``hf-safe-exit plot``); files outside the card's directory are copied into
            ``<dir>/hf_safe_exit_plots/<task>/`` so that the Hub can show them.
        hardware: where the speed-up was measured (``"auto"`` describes this machine).
        model_name: the name in ``model-index`` (default: the card's, else the directory name).
        calibration_split, dataset_name: how the card names the calibration data (e.g. ``"pool"``).
        repo_id: the Hub repo id used in the card's code snippet.
        anytime: a description of anytime predictions (e.g. ``"Product-of-Experts"``) if the policy used them.
        save_calibration: also write ``custom_generate/`` (the snippet loads the model with it) and
            ``risk_control.json`` (default True) into
            :func:`calibration_directory` of the card's directory, ``<dir>/calibration/<task>/``, where the
            snippet's ``RiskControlled(..., task=...)`` finds it.

    Returns the path of the card.
    """
    from huggingface_hub import ModelCard

    _check_fitted(controlled)
    path = _card_path(model_dir_or_card_path)
    task = controlled.certificate.task
    cal_dir = calibration_directory(path.parent, task)  # also checks the task name, before anything is written
    path.parent.mkdir(parents=True, exist_ok=True)
    card = ModelCard.load(path) if path.is_file() else None  # a file path: never goes to the Hub
    rel_plots = _place_plots(plots, path.parent, task)
    name = model_name or (getattr(card.data, "model_name", None) if card is not None else None) \
        or Path(path.parent).resolve().name
    subfolder = None if cal_dir == path.parent else cal_dir.relative_to(path.parent).as_posix()
    card = to_model_card(controlled, card, test_results=test_results, efficiency=efficiency, plots=rel_plots,
                         hardware=hardware, model_name=name, calibration_split=calibration_split,
                         dataset_name=dataset_name, repo_id=repo_id, anytime=anytime, calibration_subfolder=subfolder)
    card.save(path)
    if save_calibration:
        controlled.save_pretrained(cal_dir)
        write_custom_generate(path.parent)  # the card's snippet loads the model with it
    return path


def _fetch_hub_card(repo_id: str, directory: Path, revision: str | None, token: str | None) -> None:
    """Copy the Hub repo's README.md into ``directory`` (the only file :func:`write_guarantee_card` reads there).

    A repo, revision or file that does not exist fetches nothing.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        shutil.copyfile(hf_hub_download(repo_id, "README.md", revision=revision, token=token), directory / "README.md")
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError):
        pass


def push_to_hub(controlled, repo_id: str, *, test_results: Mapping | None = None, efficiency: Mapping | None = None,
                plots: Sequence[str] = (), hardware: str | None = None, model_name: str | None = None,
                calibration_split: str | None = None, dataset_name: str | None = None, anytime: str | None = None,
                token: str | None = None, revision: str | None = None, private: bool | None = None,
                commit_message: str = "hf_safe_exit: risk-controlled early-exit calibration and card") -> str:
    """Upload ``risk_control.json``, the plots and an updated README.md to the Hub repo ``repo_id`` in one commit.

    An existing README of the repo is downloaded and updated (only this task's guarantee section and this library's
    eval results for its dataset change). The calibration goes to ``calibration/<task>/`` (:func:`calibration_directory`),
    with ``custom_generate/``; other files of the repo are left as they are. Returns the commit URL.
    """
    from huggingface_hub import HfApi

    _check_fitted(controlled)
    task = controlled.certificate.task
    if task is not None:
        check_task_name(task)
    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True, private=private)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        _fetch_hub_card(repo_id, tmp_dir, revision, token)
        write_guarantee_card(tmp_dir, controlled, test_results=test_results, efficiency=efficiency, plots=plots,
                             hardware=hardware, model_name=model_name or repo_id.split("/")[-1],
                             calibration_split=calibration_split, dataset_name=dataset_name, repo_id=repo_id,
                             anytime=anytime, save_calibration=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, commit_message=commit_message)
    return str(info)
