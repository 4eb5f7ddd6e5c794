"""Which calibration the demo runs under, and at which ε (:func:`demo_eps`: sized to what the model scores)."""

from __future__ import annotations

from .result import METRIC, DemoError

__all__ = ["DEMO_EPS_FRACTION", "demo_eps", "find_task_calibration", "full_model_score", "task_calibration"]

DEMO_EPS_FRACTION = 0.25  # the demo's ε: this fraction of the full model's score on the calibration rows
_EXAMPLES = {"cnndm": "articles", "squad": "questions"}


def full_model_score(table) -> float | None:
    """The full model's (λ = 1) mean task score on the calibration rows of ``table``, or None when the table does
    not record it (``collect`` stores the per-example task loss, 1 − score, as the extra ``task_loss``)."""
    import numpy as np

    task_loss = (table.extras or {}).get("task_loss")
    if task_loss is None:
        return None
    at_one = np.flatnonzero(np.isclose(np.asarray(table.lambdas, dtype=float), 1.0))
    if at_one.size == 0:
        return None
    return float(1.0 - np.mean(np.asarray(task_loss)[at_one[0]]))


def demo_eps(table, task: str) -> tuple[float, str] | None:
    """The ε the demo runs ``task`` at, and why: about a quarter of the full model's score on its calibration rows.

    The guarantee bounds the mean loss of quality against the full model by ε, so ε only means something when it
    is small next to what the model scores: at ε = 0.05 a model whose full ROUGE-L is 0.08 may lose most of it. A
    quarter, rounded to one significant digit: the shipped model gets ε = 0.02 on CNN/DM (ROUGE-L 0.076) and
    ε = 0.004 on SQuAD (F1 0.017). None when the table does not record the full model's score.
    """
    score = full_model_score(table)
    if score is None or score <= 0:
        return None
    eps = float(f"{DEMO_EPS_FRACTION * score:.1g}")
    metric = METRIC.get(task, "task score")
    return eps, (f"ε = {eps:g}: about a quarter of the full model's {metric} of {score:.2g} on its {table.n} "
                 f"calibration {_EXAMPLES.get(task, 'examples')}, so that early exit may lose at most about a "
                 "quarter of what the model scores")


def find_task_calibration(model_dir, task: str, *, eps: float | None = None, delta: float | None = 0.1,
                          method: str = "ucb"):
    """The fitted ``RiskControlled`` for ``task`` stored with the model in ``model_dir``, and where it came from.

    ``eps=None``: the stored ``risk_control.json`` (λ̂ at the calibrated ε) when there is one, else the stored loss
    table fitted at :func:`demo_eps` (0.1 when the table records no full-model score). A given ``eps``: the loss
    table fitted with ``eps``/``delta``/``method`` (a ``risk_control.json`` alone serves only its own ε). The
    layout is :mod:`hf_safe_exit.risk.store`'s. A fit that finds no feasible λ < 1 warns (λ̂ = 1); the warning
    is never silenced here.
    """
    rc, source, _ = task_calibration(model_dir, task, eps=eps, delta=delta, method=method, prefer_stored=True)
    return rc, source


def task_calibration(model_dir, task: str, *, eps: float | None, delta: float | None, method: str,
                      prefer_stored: bool) -> tuple:
    """(fitted RiskControlled, where it came from, why this ε) for ``task``; see :func:`find_task_calibration`.

    ``prefer_stored=False`` (the demo): with ``eps=None`` the loss table is fitted at :func:`demo_eps` whenever the
    table records the full model's score, and the stored ``risk_control.json`` is used only otherwise.
    """
    from ..risk import MissingCalibrationError, RiskControlled, find_stored

    try:
        stored = find_stored(model_dir, task)
    except MissingCalibrationError as err:
        raise DemoError(f"no calibration for task {task!r} with the model in {model_dir}: {err}") from None
    json_eps = None if stored.controlled_json is None else stored.controlled_json.get("params", {}).get("eps")

    def from_json():
        why = f"ε = {json_eps:g}: the ε this calibration was stored with"
        if stored.table is None:
            why += " (no loss table is stored beside it to fit another ε from)"
        path = str(stored.controlled_path)
        return RiskControlled.from_dict(stored.controlled_json, path), path, why

    if eps is None:
        if stored.controlled_json is not None and prefer_stored:
            return from_json()
        chosen = demo_eps(stored.table, task) if stored.table is not None else None
        if chosen is not None:
            eps, why = chosen
        elif stored.controlled_json is not None:
            return from_json()
        else:
            eps, why = 0.1, "ε = 0.1: the loss table records no full-model score to size ε against"
    elif stored.table is not None:
        why = f"ε = {eps:g}, as asked"
    elif json_eps == eps:
        return from_json()
    else:
        raise DemoError(f"the calibration of task {task!r} in {model_dir} stores λ̂ at ε = {json_eps} but no loss "
                        f"table, which fitting ε = {eps} needs: store it with `hf-safe-exit calibrate "
                        "--store-in-model`, or run the demo without --eps.")
    rc = RiskControlled(eps, delta=delta if method in ("ucb", "ltt") else None, method=method).fit_table(stored.table)
    return rc, str(stored.table_path), why
