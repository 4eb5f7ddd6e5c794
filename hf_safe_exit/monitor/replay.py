"""Replay a stream of task inputs, then a shifted one, through a :class:`~hf_safe_exit.monitor.RiskMonitor`, and log
the evidence call by call (``hf-safe-exit monitor``; issue 29).

>>> stream = build_stream("cnndm", "../shared/data", n=150, shift="other-task", exclude_ids=calibration_ids)
>>> log = replay(model, tokenizer, RiskMonitor(RiskControlled(0.2, risk="consistency"), tokenizer=tokenizer), stream)
>>> plot_replay(log, "replay.png")

The stream (:func:`build_stream`): the task's pool rows in a seeded random order (rows the calibration table lists are
left out when their ids are given: they are the data λ̂ was fitted on, not new traffic), then a shifted phase:

* ``"other-task"``: the other task's pool inputs, prompted as that task prompts them (SQuAD questions fed to a CNN/DM
  summariser, or articles to a QA model);
* ``"noise"``: the same task's rows with a word-level perturbation (:func:`perturb_words`): a fraction
  :data:`NOISE_RATE` of the words of the article (SQuAD: of the context; the question is kept) is replaced by words
  drawn uniformly from the same text. The vocabulary stays the text's own, so the shift is in coherence and word
  order, not in unknown tokens;
* ``"lowercase"``: the same task's rows with the article (SQuAD: the context) lowercased, as a text-normalising
  pipeline in front of the model would feed them (the model's tokenizer is case-sensitive);
* ``"none"``: no second phase.

:func:`replay` decodes the stream in batches with ``generate(model, early_exit=monitor)`` (greedy, inputs truncated to
the calibration's ``max_input_length`` and decoded to its ``max_new_tokens``). Per call it logs, from the monitor's
record of the call (``monitor.last_call``, a :class:`~hf_safe_exit.monitor.MonitoredCall`), the sampled rows and the
losses the test was fed (a consistency monitor: each sampled row's ``task.consistency_loss(early-exit text,
full-model text)``; a performance-gap monitor: the gap against the row's reference, which replay feeds through
:meth:`RiskMonitor.record`), and the monitor's state after it: losses seen, running mean and its (1 − α) confidence
sequence, e-value, alarm.

This module imports :func:`hf_safe_exit.decoding.generate` inside the function that decodes, and the monitor package
does not import this module: the decoding code's import of the monitor package meets no cycle (see
:mod:`hf_safe_exit.monitor`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

__all__ = ["NOISE_RATE", "SHIFTS", "StreamRow", "perturb_words", "build_stream", "replay", "write_log",
           "plot_replay", "replay_from_args"]

#: the fraction of an input's words the ``"noise"`` shift replaces
NOISE_RATE = 0.3
SHIFTS = ("other-task", "noise", "lowercase", "none")
_OTHER = {"cnndm": "squad", "squad": "cnndm"}
_SHIFTED_FIELD = {"cnndm": "article", "squad": "context"}  # the text noise/lowercase change (not the question)
_FORMAT, _VERSION = "hf_safe_exit.monitor_replay", 1
IN_DISTRIBUTION = "in-distribution"


@dataclass(frozen=True)
class StreamRow:
    """One input of a replayed stream: its phase, the dataset row it came from, its prompt and gold reference (in
    the form the monitored task scores against)."""

    phase: str
    source: str
    id: str
    prompt: str
    reference: Any


# ---------------------------------------------------------------------------------------------- the stream
def perturb_words(text: str, rate: float, rng: np.random.Generator) -> str:
    """``text`` with ``round(rate × words)`` of its whitespace-separated words, at distinct positions drawn uniformly,
    each replaced by a word drawn uniformly from the same text (it may draw the word it replaces); the result is
    joined by single spaces. Deterministic given ``rng``'s state."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate={rate!r} must be in [0, 1]: the fraction of words replaced.")
    words = text.split()
    k = int(round(rate * len(words)))
    if k == 0:
        return " ".join(words)
    out = list(words)
    for position, source in zip(rng.choice(len(words), size=k, replace=False), rng.integers(len(words), size=k)):
        out[int(position)] = words[int(source)]
    return " ".join(out)


def _reference(monitored, source, example):
    """``example``'s gold text in the form ``monitored`` scores against (another task's: its first reference)."""
    if source.name == monitored.name:
        return source.reference(example)
    ref = source.reference(example)
    return monitored.as_reference(ref if isinstance(ref, str) else (list(ref) or [""])[0])


def _rows(monitored, source, data, index, phase, change=None) -> list[StreamRow]:
    rows = []
    for i in index:
        example = data[int(i)]
        if change is not None:
            field = _SHIFTED_FIELD[source.name]
            example = {**example, field: change(example[field])}
        rows.append(StreamRow(phase, source.name, source.example_id(example), source.prompt(example),
                              _reference(monitored, source, example)))
    return rows


def build_stream(task, data=None, *, n: int = 100, shift: str = "other-task", shift_n: int | None = None,
                 seed: int = 0, exclude_ids=()) -> list[StreamRow]:
    """``n`` rows of ``task``'s pool split (from ``data``: a local path, or None for the Hub) in a seeded random order,
    without the rows whose ids are in ``exclude_ids``; then ``shift_n`` (default ``n``) rows of the ``shift`` phase
    (module docstring). The noise and lowercase phases take the rows that follow the first ``n`` in the same order,
    wrapping round to reuse rows only when the pool has too few."""
    from ..tasks import get_task, load_split

    task = get_task(task)
    if shift not in SHIFTS:
        raise ValueError(f"shift={shift!r} is unknown: use one of {', '.join(SHIFTS)}.")
    shift_n = n if shift_n is None else shift_n
    for name, value in (("n", n), ("shift_n", shift_n)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "n" else 0):
            raise ValueError(f"{name}={value!r} must be a whole number >= {1 if name == 'n' else 0}.")
    pool = load_split(task, "pool", path=data)
    drop = {str(i) for i in exclude_ids}
    keep = [i for i, example_id in enumerate(pool["id"]) if str(example_id) not in drop]
    if n > len(keep):
        raise ValueError(f"n={n} exceeds the {len(keep)} {task.name} pool rows left after excluding {len(drop)} "
                         f"calibration rows: pass n <= {len(keep)}.")
    order = np.random.default_rng([seed, 0]).permutation(np.asarray(keep, dtype=np.int64))
    stream = _rows(task, task, pool, order[:n], IN_DISTRIBUTION)
    if shift in ("noise", "lowercase") and shift_n:
        index = order[(n + np.arange(shift_n)) % len(order)]
        noise_rng = np.random.default_rng([seed, 1])
        change = str.lower if shift == "lowercase" else (lambda text: perturb_words(text, NOISE_RATE, noise_rng))
        stream += _rows(task, task, pool, index, shift, change)
    elif shift == "other-task" and shift_n:
        other = get_task(_OTHER[task.name])
        other_pool = load_split(other, "pool", path=data)
        if shift_n > len(other_pool):
            raise ValueError(f"shift_n={shift_n} exceeds the {len(other_pool)} {other.name} pool rows: pass fewer.")
        index = np.random.default_rng([seed, 2]).permutation(len(other_pool))[:shift_n]
        stream += _rows(task, other, other_pool, index, shift)
    return stream


# ---------------------------------------------------------------------------------------------- the replay
def _batches(stream: list[StreamRow], batch_size: int):
    """Consecutive batches of at most ``batch_size`` rows, never across a phase boundary."""
    start = 0
    while start < len(stream):
        end = start
        while end < len(stream) and end - start < batch_size and stream[end].phase == stream[start].phase:
            end += 1
        yield stream[start:end]
        start = end


def _decode_call(model, tokenizer, monitor, batch: list[StreamRow], max_input_length: int):
    """One monitored call; returns its sampled rows and the losses the monitor's test was fed for them (a
    performance-gap monitor: fed here, through ``record``, with the rows' references)."""
    import torch

    from ..decoding import generate  # here, not at import: the decoding code imports the monitor package

    enc = tokenizer([r.prompt for r in batch], return_tensors="pt", padding=True, truncation=True,
                    max_length=max_input_length)
    with torch.inference_mode():
        generate(model, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], early_exit=monitor,
                 do_sample=False, num_beams=1)
    call = monitor.last_call
    if monitor.risk == "consistency":
        return list(call.sampled_rows), list(call.losses)
    pairs = monitor.take_samples()  # this call's pairs, handed over once: each is recorded once, whatever its loss
    if not pairs:
        return [], []
    fed = monitor.record([p["prediction"] for p in pairs], [batch[p["row"]].reference for p in pairs],
                         [p["full_prediction"] for p in pairs])
    return [p["row"] for p in pairs], fed.tolist()


def _snapshot(monitor) -> dict:
    state = monitor.state()
    log_e = float(monitor.test.log_e_value)
    return {"rows_seen": state["rows_seen"], "rows_sampled": state["rows_sampled"], "n": state["n"],
            "mean": state["mean"], "confidence_interval": state["confidence_interval"], "log_e_value": log_e,
            "e_value": math.exp(log_e) if log_e < 700 else None, "alarm": state["alarm"] is not None,
            "fallback_active": state["fallback_active"]}


def _checkpoint_line(entry: dict, eps: float, alpha: float) -> str:
    mean = "   n/a" if entry["mean"] is None else f"{entry['mean']:.4f}"
    lo, hi = entry["confidence_interval"]
    e = f"{entry['e_value']:.4g}" if entry["e_value"] is not None else f"exp({entry['log_e_value']:.1f})"
    return (f"call {entry['call'] + 1:>4} [{entry['phase']}] rows {entry['rows_seen']:>5}, sampled "
            f"{entry['rows_sampled']:>4}: mean {mean} CS [{lo:.4f}, {hi:.4f}] (eps {eps:g}), e-value {e} "
            f"(alarm at {1 / alpha:g})" + (", FALLBACK" if entry["fallback_active"] else ""))


def replay(model, tokenizer, monitor, stream: list[StreamRow], *, batch_size: int = 8,
           progress: Callable[[str], None] | None = None, every: int = 5) -> dict:
    """Decode ``stream`` through ``monitor`` in batches of ``batch_size`` (never across phases) and return the log
    (JSON-able): ``settings``, ``phases``, ``calls`` (per call: phase, row ids, sampled rows, the losses fed, and
    the monitor's counts, mean, confidence sequence, e-value and alarm after it), ``alarm`` (with the phase and how far
    into it it fired) and ``state`` (``monitor.state()`` at the end). ``progress`` gets a line every ``every`` calls,
    at the end of each phase and at the alarm."""
    from .alarm import RiskAlarmWarning

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a whole number >= 1.")
    if not stream:
        raise ValueError("the stream is empty: give at least one row to replay.")
    from ..tasks import get_task

    calibration = monitor.policy.calibration_for(model)
    max_input_length = (calibration.generation_settings.get("max_input_length")
                        or get_task(monitor.task or calibration.task).max_input_length)  # the task's, as collect's
    calls, phases, message = [], [], None
    batches = list(_batches(stream, batch_size))
    for b, batch in enumerate(batches):
        if not phases or phases[-1]["name"] != batch[0].phase:
            phases.append({"name": batch[0].phase, "source": batch[0].source, "first_call": b, "rows": 0})
        phases[-1]["rows"] += len(batch)
        had_alarm = monitor.alarm is not None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RiskAlarmWarning)
            rows, losses = _decode_call(model, tokenizer, monitor, batch, max_input_length)
        message = message or next((str(w.message) for w in caught if issubclass(w.category, RiskAlarmWarning)), None)
        for w in caught:
            if not issubclass(w.category, RiskAlarmWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        entry = {"call": b, "phase": batch[0].phase, "ids": [r.id for r in batch], "sampled_rows": rows,
                 "losses": losses, **_snapshot(monitor)}
        calls.append(entry)
        last_of_phase = b + 1 == len(batches) or batches[b + 1][0].phase != batch[0].phase
        if progress is not None and ((b + 1) % every == 0 or last_of_phase or entry["alarm"] != had_alarm):
            progress(_checkpoint_line(entry, monitor.eps, monitor.alpha))
    return {"format": _FORMAT, "version": _VERSION, "threshold": calibration.threshold,
            "settings": {"risk": monitor.risk, "eps": monitor.eps, "alpha": monitor.alpha,
                         "sample_rate": monitor.sample_rate, "sample": monitor.sample, "fallback": monitor.fallback,
                         "batch_size": batch_size,
                         "task": monitor.task.name, "max_input_length": max_input_length,
                         "max_new_tokens": calibration.generation_settings.get("max_new_tokens")},
            "phases": _phase_summaries(phases, calls), "calls": calls, "alarm": _alarm_record(monitor, calls, message),
            "state": monitor.state()}


def _phase_summaries(phases: list[dict], calls: list[dict]) -> list[dict]:
    for phase in phases:
        losses = [v for c in calls if c["phase"] == phase["name"] for v in c["losses"]]
        phase.update(calls=sum(c["phase"] == phase["name"] for c in calls), losses_fed=len(losses),
                     mean_loss=float(np.mean(losses)) if losses else None)
    return phases


def _alarm_record(monitor, calls: list[dict], message: str | None) -> dict | None:
    """The alarm with where it fired: the call, its phase, and the calls and losses of that phase up to it."""
    if monitor.alarm is None:
        return None
    call = next(c for c in calls if c["alarm"])
    phase_calls = [c for c in calls if c["phase"] == call["phase"] and c["call"] <= call["call"]]
    return {**monitor.alarm.to_dict(), "call": call["call"], "phase": call["phase"],
            "calls_into_phase": len(phase_calls), "losses_into_phase": sum(len(c["losses"]) for c in phase_calls),
            "message": message}


# ---------------------------------------------------------------------------------------------- files
def write_log(log: dict, path, *, overwrite: bool = False) -> str:
    """Write the replay log as JSON (whole: :func:`hf_safe_exit.atomic.atomic_write`); an existing file needs
    ``overwrite``."""
    from ..atomic import atomic_write
    from ..errors import WouldOverwriteError

    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise WouldOverwriteError(f"'{path}' exists (a replay log): pass overwrite=True (--overwrite) to replace it.")
    with atomic_write(path, encoding="utf-8") as fh:
        json.dump(log, fh, indent=1, allow_nan=False)
        fh.write("\n")
    return path


def plot_replay(log: dict, path, *, title: str | None = None) -> str:
    """A PNG of the replay: the running mean of the monitored losses with its (1 − α) confidence sequence and ε
    (top), and the e-value against 1/α on a log scale (bottom), over calls; phase starts dotted, the alarm red.
    ``log`` must be what :func:`replay` returned (or its JSON, read back)."""
    from ..lazy import require

    needed = {"settings", "calls", "phases", "alarm", "threshold"}
    missing = sorted(needed - set(log)) if isinstance(log, dict) else None
    if missing is None or missing or log.get("format") != _FORMAT:
        raise ValueError(f"plot_replay needs the log replay() returns (format {_FORMAT!r}), got "
                         f"{type(log).__name__ if missing is None else f'a dict missing {missing}'}: pass replay()'s "
                         "result, or json.load() of the file write_log() wrote.")

    matplotlib = require("matplotlib", "plot_replay")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    s, calls = log["settings"], log["calls"]
    x = np.arange(1, len(calls) + 1)
    mean = np.array([np.nan if c["mean"] is None else c["mean"] for c in calls])
    lo, hi = (np.array([c["confidence_interval"][i] for c in calls]) for i in (0, 1))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.fill_between(x, lo, hi, alpha=0.25, label=f"{1 - s['alpha']:g} confidence sequence")
    top.plot(x, mean, label=f"running mean {s['risk']} loss")
    top.axhline(s["eps"], color="k", ls="--", label=f"ε = {s['eps']:g}")
    top.set_ylabel(f"{s['risk']} loss")
    bottom.semilogy(x, [math.exp(min(c["log_e_value"], 700.0)) for c in calls], label="e-value")
    bottom.axhline(1 / s["alpha"], color="k", ls="--", label=f"1/α = {1 / s['alpha']:g}")
    bottom.set_ylabel("e-value")
    bottom.set_xlabel(f"generate call (batch {s['batch_size']}; each {s.get('sample', 'row')} sampled with p = "
                      f"{s['sample_rate']:g})")
    for phase in log["phases"][1:]:
        for ax in (top, bottom):
            ax.axvline(phase["first_call"] + 0.5, color="grey", ls=":")
        top.annotate(phase["name"], (phase["first_call"] + 1, 0.97), xycoords=("data", "axes fraction"), va="top")
    if log["alarm"] is not None:
        for ax in (top, bottom):
            ax.axvline(log["alarm"]["call"] + 1, color="tab:red", label="alarm" if ax is top else None)
    top.legend(fontsize=8, loc="upper left")
    bottom.legend(fontsize=8, loc="upper left")
    top.set_title(title or f"{s['task']}: λ̂ = {log['threshold']:g}, ε = {s['eps']:g}, α = {s['alpha']:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)
    return os.fspath(path)


# ---------------------------------------------------------------------------------------------- the command
def replay_from_args(args, model, tokenizer) -> int:
    """``hf-safe-exit monitor``: build the policy, the monitor and the stream from the parsed ``args``, replay it
    printing checkpoints, write ``--output`` / ``--plot`` / ``--state`` (the CLI refused existing ones already)."""
    from ..risk import RiskControlled, find_stored
    from ..tasks import get_task
    from .risk_monitor import RiskMonitor

    task = get_task(args.task)
    delta = args.delta if args.delta is not None or args.method not in ("ucb", "ltt") else 0.1
    policy = RiskControlled(args.eps, delta=delta, method=args.method, risk=args.risk, task=task.name)
    monitor = RiskMonitor(policy, tokenizer=tokenizer, sample_rate=args.sample_rate, alpha=args.alpha, risk=args.risk,
                          fallback=not args.no_fallback, seed=args.seed, sample=args.sample)
    calibration = policy.calibration_for(model)
    stored = find_stored(model, task.name)
    ids = (stored.table.metadata.get("example_ids") or ()) if stored.table is not None else ()
    stream = build_stream(task, args.data, n=args.n, shift=args.shift, shift_n=args.shift_n, seed=args.seed,
                          exclude_ids=ids)
    print(f"λ̂ = {calibration.threshold:g} ({args.method}, {args.risk}, eps {args.eps:g}): "
          f"{calibration.certificate.guarantee}")
    print(f"stream: {args.n} {task.name} pool rows ({len(ids)} calibration rows left out), then "
          f"{len(stream) - args.n} rows of shift '{args.shift}'; p = {args.sample_rate:g} per {args.sample}, "
          f"alpha = {args.alpha:g}")
    log = replay(model, tokenizer, monitor, stream, batch_size=args.batch_size, progress=print,
                 every=max(1, math.ceil(len(stream) / args.batch_size / 20)))
    log["settings"].update(method=args.method, delta=delta, shift=args.shift, n=args.n, shift_n=len(stream) - args.n,
                           seed=args.seed, data=None if args.data is None else os.fspath(args.data),
                           excluded_calibration_rows=len(ids), noise_rate=NOISE_RATE)
    alarm = log["alarm"]
    print("no alarm" if alarm is None else
          f"ALARM at call {alarm['call'] + 1} ({alarm['phase']} phase, its call {alarm['calls_into_phase']}, "
          f"{alarm['losses_into_phase']} monitored losses into it): {alarm['message']}")
    for phase in log["phases"]:
        mean = "n/a" if phase["mean_loss"] is None else f"{phase['mean_loss']:.4f}"
        print(f"phase {phase['name']}: {phase['rows']} rows, {phase['losses_fed']} monitored losses, mean {mean}")
    if args.output:
        print(f"wrote {write_log(log, args.output, overwrite=args.overwrite)}")
    if args.plot:
        print(f"wrote {plot_replay(log, args.plot)}")
    if args.state:
        print(f"wrote {monitor.save(args.state, overwrite=args.overwrite)}")
    return 0
