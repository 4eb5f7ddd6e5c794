"""The card's ``model-index`` results and metadata, built with huggingface_hub's own ``EvalResult``/``ModelCardData``.

Every result names a split its dataset really has (``validation`` for both tasks: the calibration/test pools
are cut from it; which rows is in the dataset name and the section text) and says in its name what it
measures: the shipped λ̂ (``early_exit_threshold``, ``…_calibration_*``), the shipped λ̂ on the caller's
held-out examples (``early_exit_test_risk``, ``early_exit_mean_layers``, …), or the repeated-split procedure
(``early_exit_split_*``, with ``n_cal``, ``n_test``, ``repeats`` and the mean λ̂ in ``metric_args``).
"""

from __future__ import annotations

import math
from typing import Sequence

from ..risk.certificate import PARETO
from .measurements import Measurements
from .vocabulary import risk_words, task_info

__all__ = ["METRIC_TYPES", "TAGS", "REMOVED_PIPELINE_TAGS", "eval_results", "merge_eval_results", "update_metadata"]

# model-index metric types this library writes (and replaces when it updates a card); others are kept
METRIC_TYPES = ("early_exit_threshold", "early_exit_calibration_risk", "early_exit_risk_bound",
                "early_exit_calibration_score", "full_model_calibration_score", "early_exit_calibration_layers",
                "early_exit_calibration_speedup",
                "early_exit_test_risk", "early_exit_mean_layers", "early_exit_layer_fraction", "early_exit_speedup",
                "early_exit_split_test_risk", "early_exit_split_violation_rate", "early_exit_split_mean_layers",
                "early_exit_split_speedup")
TAGS = ("hf-safe-exit", "early-exit", "risk-control")
# Pipelines transformers 5 removed (`pipeline("text2text-generation")` raises KeyError there, and its
# text-generation pipeline does not run a T5: it returns the prompt): a card must not promise them. No
# transformers-5 pipeline serves a seq2seq T5, so a card of ours names none and drops these.
REMOVED_PIPELINE_TAGS = ("text2text-generation", "summarization", "translation", "question-answering")


def _dataset(c, measured: Measurements, rows: str | None, dataset_name: str | None) -> dict:
    info = task_info(c.task)
    rows = rows or (measured.at_threshold.rows if measured.at_threshold else None)
    name = (dataset_name or info.display_name) + (f", {rows}" if rows else "")
    return dict(task_type=info.task_type, dataset_type=info.dataset_id or "unknown", dataset_name=name,
                dataset_config=info.dataset_config, dataset_split=info.dataset_split)


def eval_results(controlled, measured: Measurements, *, rows: str | None = None, dataset_name: str | None = None):
    """This calibration's ``EvalResult`` list (see the module docstring for what each measures)."""
    from huggingface_hub import EvalResult

    c = controlled.certificate
    metric = task_info(c.task).metric
    ds = _dataset(c, measured, rows, dataset_name)
    level = f"ε = {c.eps:g}" + (f", δ = {c.delta:g}" if c.delta is not None else "")
    lam = f"λ̂ = {c.threshold:.6g}"
    # a pareto certificate's risk and bound are the chosen configuration's on its test part (the front came from the
    # rest), and its λ̂ belongs to that configuration
    n_risk, part = c.n, ""
    if c.method == PARETO:
        n_risk, part, chosen = c.n_test, ", the Pareto test part", c.configuration
        lam += f" ({chosen['measure']}, {chosen['schedule']} schedule, first exit layer {chosen['min_exit_layer']})"

    def result(metric_type: str, name: str, value, args: dict | None = None):
        value = float(value)
        if not math.isfinite(value):  # the inputs are checked before this: reaching here is a bug, never published
            raise ValueError(f"model-index value {metric_type} = {value!r} is not a finite number; the card is not "
                             "written.")
        return EvalResult(metric_type=metric_type, metric_name=name, metric_value=value, metric_args=args, **ds)

    out = [result("early_exit_threshold", f"Early-exit threshold λ̂ ({c.method}, {level}; n = {c.n})", c.threshold),
           result("early_exit_calibration_risk", f"Calibration risk at {lam}: mean {risk_words(c.risk, metric)} "
                  f"(n = {n_risk} calibration examples{part})", c.empirical_risk)]
    if c.risk_bound is not None:  # none when Pareto Testing certified nothing (decoded at λ = 1)
        out.append(result("early_exit_risk_bound", f"Risk bound at {lam} ({c.method}{'/' + c.bound if c.bound else ''}"
                          f", {level}; n = {n_risk}{part})", c.risk_bound))
    a = measured.at_threshold
    if a is not None:
        same = f"on the n = {a.n} calibration examples"
        if a.score is not None:
            out += [result("early_exit_calibration_score", f"{metric} with early exit at {lam}, {same}", a.score),
                    result("full_model_calibration_score", f"{metric} of the full model, {same}", a.full_score)]
        if a.layers_per_token is not None:
            out.append(result("early_exit_calibration_layers", f"Decoder layers per generated token at {lam}, {same}"
                              + (f" (of {a.num_layers})" if a.num_layers else ""), a.layers_per_token))
        if a.speedup is not None:
            out.append(result("early_exit_calibration_speedup", f"Speed-up per generated token at {lam} vs the full "
                              f"model, {same}" + (f" ({measured.hardware})" if measured.hardware else ""), a.speedup))
    h = measured.held_out
    if h is not None:
        on = f"on {h.n_test} held-out examples" if h.n_test else "on held-out examples"
        for key, mtype, name in (("test_risk", "early_exit_test_risk",
                                  f"Test risk at {lam}: mean {risk_words(c.risk, metric)} {on} (target ε = {c.eps:g})"),
                                 ("mean_exit_layer", "early_exit_mean_layers", f"Mean decoder layers per token at {lam}"),
                                 ("layer_fraction", "early_exit_layer_fraction", f"Fraction of decoder layers run at {lam}"),
                                 ("speedup", "early_exit_speedup", f"Speed-up per generated token at {lam} vs the full "
                                  "model" + (f" ({measured.hardware})" if measured.hardware else ""))):
            if getattr(h, key) is not None:
                out.append(result(mtype, name, getattr(h, key)))
    p = measured.procedure
    if p is not None:
        args = {"repeats": p.repeats, "n_cal": p.n_cal, "n_test": p.n_test, "lambda_hat_mean": p.threshold_mean,
                "method": p.method, "eps": p.eps, "delta": p.delta}
        splits = (f"{p.repeats} random splits, n_cal = {p.n_cal}, n_test = {p.n_test}, a λ̂ per split "
                  f"(mean {p.threshold_mean:.3g})")
        out.append(result("early_exit_split_test_risk", f"Repeated-split test risk: mean {risk_words(c.risk, metric)}"
                          f" over {splits}; target ε = {c.eps:g}", p.test_risk, args))
        if p.violation_rate is not None:
            out.append(result("early_exit_split_violation_rate", f"Fraction of splits with test risk above ε ({splits})",
                              p.violation_rate, args))
        if p.mean_exit_layer is not None:
            out.append(result("early_exit_split_mean_layers", f"Mean exit layer on the test examples ({splits})",
                              p.mean_exit_layer, args))
        if p.speedup is not None:
            out.append(result("early_exit_split_speedup", f"Speed-up per generated token at the splits' thresholds "
                              f"({splits})" + (f" ({measured.hardware})" if measured.hardware else ""), p.speedup,
                              args))
    return out


def merge_eval_results(existing: Sequence, ours: Sequence) -> list:
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


def update_metadata(data, ours: Sequence, model_name: str) -> None:
    """Put ``ours`` into ``data`` (a ``ModelCardData``): results merged, our tags, no removed pipeline."""
    data.model_name = model_name
    data.eval_results = merge_eval_results(getattr(data, "eval_results", None) or [], ours)
    tags = list(getattr(data, "tags", None) or [])
    data.tags = tags + [t for t in TAGS if t not in tags]
    if getattr(data, "library_name", None) is None:
        data.library_name = "transformers"
    if getattr(data, "pipeline_tag", None) in REMOVED_PIPELINE_TAGS:
        data.pipeline_tag = None
