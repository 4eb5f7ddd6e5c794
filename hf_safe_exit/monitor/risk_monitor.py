"""``RiskMonitor``: watch a risk-controlled early exit on live traffic, and fall back to the full model on evidence.

>>> monitor = RiskMonitor(RiskControlled(eps=0.05, risk="consistency"), tokenizer=tokenizer, sample_rate=0.05)
>>> out = model.generate(**inputs, early_exit=monitor)     # what generate(early_exit=policy) returns
>>> monitor.last_call            # this call: its sampled rows, their two outputs and the losses fed (MonitoredCall)
>>> monitor.state()["e_value"], monitor.alarm                # the evidence so far; an alarm once the test rejects
>>> monitor.save("monitor.json")       # a restarted service: RiskMonitor.load("monitor.json", policy, ...)

The guarantee of λ̂ holds for inputs drawn like the calibration's. The monitor tests, on the traffic it is given,
H₀: "the deployed risk R(λ̂) ≤ ε", with an anytime-valid sequential test (a betting e-process, Timans, Verma,
Nalisnick, Naesseth, UAI 2025: :class:`~hf_safe_exit.risk.sequential_test.SequentialRiskTest`). While the traffic is
exchangeable with the calibration data and R(λ̂) ≤ ε, the probability that it ever raises an alarm is at most α,
however long it runs (Ville's inequality); when the risk is above ε it raises one eventually (i.i.d. traffic). H₀ is
about the λ̂ deployed, given its calibration draw: a ``crc`` guarantee holds on average over calibration draws, so a
λ̂ whose own risk is somewhat above ε can be alarmed at correctly.

Where the losses come from:

* ``risk="consistency"`` (default, no labels): each row of each call is sampled independently with probability
  ``sample_rate`` (``sample="call"``: all rows of a call together, at that probability); the sampled rows are decoded
  again by the full model (λ = 1: HF's own loop), and for each the task's ``consistency_loss(early-exit text,
  full-model text)`` (the consistency risk of Jazbec, Timans et al. 2024) is fed to the test, in row order.
  ``record(predictions, full_predictions=...)`` feeds the same loss for outputs you paired yourself.
* ``risk="performance_gap"`` / ``"performance_gap_bounded"`` (needs labels): the sampled pairs are kept in
  ``monitor.samples`` for you to label; ``record(predictions, references, full_predictions)`` feeds the gap
  ``loss(prediction) − loss(full prediction)`` (resp. its positive part), losses in [−1, 1] (resp. [0, 1]).

Cost: the shadow decode (plus the task's loss on the sampled texts) is the only extra work. With ``sample="row"``
(default) a call of B rows pays one full-model decode of its sampled rows whenever it has any, i.e. with probability
1 − (1 − p)^B, and that decode takes about as long as decoding those rows alone. At batch 1 this is p × the full
model's time. At batch B it is more than p × the batch's full-model time wherever decoding a few rows costs more than
their share of a batch: on a GPU, and on a CPU for a small model, where the per-step overhead dominates. Measured on
a 2-core CPU (default model, p = 0.05; ``benchmarks/results/monitor_overhead.json``): at batch 1, an overhead of
0.11 of the early exit's time (8 % of rows sampled; p × full time: 0.06); at batch 8, 0.29 (7 % sampled; p × full
time: 0.05). With ``sample="call"`` every row of a call is sampled, together, with probability p: the same expected
number of sampled rows (p × B per call), and an expected overhead of p × one full-model decode of the batch.

Validity of ``sample="call"``: the test needs each fed loss to have conditional mean ≤ ε given the losses fed before
it (under H₀). Sampling is independent of the inputs in both modes, and i.i.d. rows make a row's loss independent of
its batch-mates', so the α bound holds. Rows of one batch that depend on each other (one document's paragraphs) can
break it, and ``sample="call"`` feeds such batches whole (``sample="row"`` at a small p seldom feeds two rows of one).

After an alarm (a :class:`~hf_safe_exit.monitor.RiskAlarmWarning`, once, and ``monitor.alarm``), with
``fallback=True`` every later call decodes with the full model (its output is the full model's, bit for bit) and no
shadow decode runs, until :meth:`RiskMonitor.reset` after recalibration.
"""

from __future__ import annotations

import numbers
import sys
import warnings
from collections import deque

import numpy as np

from ..policy import EarlyExit
from ..risk.controlled import RiskControlled
from ..risk.sequential_test import SequentialRiskTest
from .alarm import RiskAlarm, RiskAlarmWarning, alarm_message
from .monitored_call import MonitoredCall
from .shadow import (batch_size, check_one_output_per_input, isolated_rng, select_rows, sequences_of, shadow_kwargs,
                     texts_of)
from .state import MonitorStateMismatchError, check_request, generator_from_state, read_state, write_state

__all__ = ["RiskMonitor", "MONITORED_RISKS", "MAX_SAMPLES", "SAMPLING"]

#: the risk a monitor tests -> the range of its per-example loss
MONITORED_RISKS = {"consistency": (0.0, 1.0), "performance_gap": (-1.0, 1.0), "performance_gap_bounded": (0.0, 1.0)}
#: how many unlabelled (prediction, full prediction) pairs a performance-gap monitor keeps (the oldest are dropped)
MAX_SAMPLES = 1000
#: what ``sample_rate`` applies to: each row independently, or each call (all its rows together)
SAMPLING = ("row", "call")


def _check_policy(policy) -> RiskControlled:
    if not isinstance(policy, RiskControlled):
        raise TypeError(f"RiskMonitor watches a risk-controlled policy, got {type(policy).__name__}: pass "
                        "hf_safe_exit.RiskControlled(eps, ...) (fitted or not), which says the risk and ε to watch.")
    return policy


def _check_level(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value < 1.0:
        raise ValueError(f"{name}={value!r} must be a number in (0, 1).")
    return float(value)


def _check_settings(sample_rate, sample, risk, fallback, seed) -> None:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) or not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate={sample_rate!r} must be in (0, 1]: the probability that a row (sample='call': a "
                         "call) is also decoded by the full model (e.g. 0.05).")
    if sample not in SAMPLING:
        raise ValueError(f"sample={sample!r} is unknown: use 'row' (each row with probability sample_rate) or 'call' "
                         "(all rows of a call together, with probability sample_rate).")
    if risk not in MONITORED_RISKS:
        raise ValueError(f"risk={risk!r} is unknown: use one of {sorted(MONITORED_RISKS)}.")
    if not isinstance(fallback, bool):
        raise ValueError(f"fallback={fallback!r} must be True or False.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
        raise ValueError(f"seed={seed!r} must be an integer >= 0 or None.")


def monitored_eps(policy: RiskControlled, risk: str, eps) -> float:
    """The ε a monitor of ``risk`` tests: ``eps`` if given, else the policy's when it controls that same risk."""
    if eps is not None:
        return _check_level("eps", eps)
    if policy.risk == risk:
        return float(policy.eps)
    if risk == "consistency":
        raise ValueError(
            f"the policy controls risk={policy.risk!r}, which needs labels, but the shadow decodes measure consistency "
            "l(y_lambda, y_1): calibrate with RiskControlled(..., risk='consistency'), or pass eps= for the "
            "consistency level you accept, or monitor with risk='performance_gap' and feed labels with record().")
    raise ValueError(f"the policy controls risk={policy.risk!r} at eps={policy.eps}, not {risk!r}: pass eps= for the "
                     f"{risk} level you accept, or monitor risk={policy.risk!r}.")


class RiskMonitor:
    """A risk-controlled policy with an anytime-valid test of its risk on live traffic (module docstring).

    Args:
        policy: a :class:`~hf_safe_exit.RiskControlled` (unfitted: fitted at the first call on the model's stored
            calibration, as ``generate`` does).
        tokenizer: the model's tokenizer (outputs are compared as text, special tokens skipped).
        sample_rate: the probability p ∈ (0, 1] that a row is decoded again by the full model.
        sample: ``"row"`` (default: each row of a call independently with probability p) or ``"call"`` (all rows of
            a call together with probability p: the same expected rows, a shadow decode on a fraction p of calls;
            module docstring, "Cost" and "Validity").
        alpha: the test's level α ∈ (0, 1): P(any alarm | risk ≤ ε) ≤ α.
        eps: the risk level tested; default the policy's ε when the policy controls ``risk``.
        risk: ``"consistency"`` (label-free), ``"performance_gap"`` or ``"performance_gap_bounded"`` (fed by record()).
        task: the task whose losses are used (name or :class:`~hf_safe_exit.tasks.Task`); default the calibration's.
        fallback: after an alarm, decode with the full model (λ = 1) until :meth:`reset`.
        seed: seed of the sampling decisions (numpy ``default_rng``); its state is saved with the monitor.

    Attributes: ``test`` (the :class:`~hf_safe_exit.risk.sequential_test.SequentialRiskTest`), ``alarm`` (a
    :class:`~hf_safe_exit.monitor.RiskAlarm` or None), ``last_call`` (a :class:`~hf_safe_exit.monitor.MonitoredCall`:
    what the last ``generate`` call sampled, decoded and fed; None before the first call and after :meth:`reset`;
    not saved), ``calls``, ``rows_seen``, ``rows_sampled``, ``eps``, and, for
    a performance-gap monitor, ``samples`` (the last :data:`MAX_SAMPLES` sampled pairs, dicts with ``call``, ``row``,
    ``prediction``, ``full_prediction``: label them and pass them to :meth:`record`; not saved by :meth:`save`).
    """

    def __init__(self, policy, *, tokenizer, sample_rate: float = 0.05, alpha: float = 0.05, eps=None,
                 risk: str = "consistency", task=None, fallback: bool = True, seed: int | None = None,
                 sample: str = "row"):
        self.policy = _check_policy(policy)
        if not callable(getattr(tokenizer, "batch_decode", None)):
            raise TypeError("RiskMonitor needs the model's tokenizer to compare outputs as text: pass "
                            f"tokenizer=<a transformers tokenizer> (got {type(tokenizer).__name__}).")
        _check_settings(sample_rate, sample, risk, fallback, seed)
        self.tokenizer, self.sample_rate, self.alpha = tokenizer, float(sample_rate), _check_level("alpha", alpha)
        self.sample = sample
        self.risk, self.fallback, self._eps_given = risk, fallback, eps
        self.eps = monitored_eps(policy, risk, eps)
        self._task_given = None
        if task is not None:
            from ..tasks import get_task

            self._task_given = get_task(task)  # an unknown name raises now, not at the first sampled row
        self.task = self._task_given
        self._rng = np.random.default_rng(seed)
        self._source = None  # the file this monitor's evidence was loaded from, for refusals to name
        self._start()

    def _start(self) -> None:
        """A fresh test, counters at zero, no alarm (the sampling generator continues)."""
        self.test = SequentialRiskTest(self.eps, self.alpha, loss_range=MONITORED_RISKS[self.risk])
        self.calls = self.rows_seen = self.rows_sampled = 0
        self.alarm: RiskAlarm | None = None
        self.last_call: MonitoredCall | None = None
        self.samples: deque = deque(maxlen=MAX_SAMPLES)
        self._threshold = None  # λ̂ the evidence is about, known at the first call

    def __repr__(self) -> str:
        return (f"RiskMonitor({self.policy!r}, risk={self.risk!r}, eps={self.eps}, alpha={self.alpha}, "
                f"sample_rate={self.sample_rate}, sample={self.sample!r}, n={self.test.n}, "
                f"alarm={self.alarm is not None})")

    @property
    def fallback_active(self) -> bool:
        """Whether calls decode with the full model (an alarm was raised and ``fallback=True``)."""
        return self.alarm is not None and self.fallback

    # ------------------------------------------------------------------ decoding
    def generate(self, model, inputs=None, *, decode, **kwargs):
        """Decode as ``decode(model, inputs, early_exit=self.policy, **kwargs)`` and monitor it (module docstring).

        ``decode`` is :func:`hf_safe_exit.generate` (which calls this for ``early_exit=monitor``: passing it keeps
        this package free of the decoding code). Returns exactly what ``decode`` returns; after an alarm with
        fallback, the full model's output (λ = 1, HF's own loop; ``certificate`` None: no early exit ran).
        """
        self.last_call = None  # a call that raises leaves no record of an earlier one behind
        calibration = self._calibration_for(model)
        batch = batch_size(inputs, kwargs)
        if self.fallback_active:
            out = decode(model, inputs, early_exit=self._full_model(calibration), **kwargs)
            self.calls += 1
            self.rows_seen += batch
            self.last_call = MonitoredCall(self.calls - 1, batch, fallback=True)
            if hasattr(out, "certificate"):
                out.certificate = None  # the full model ran: no risk-controlled threshold stands behind this output
            return out
        check_one_output_per_input(kwargs)
        out = decode(model, inputs, early_exit=self.policy, **kwargs)
        self.calls += 1
        self.rows_seen += batch
        rows = self._sampled_rows(batch)
        if rows.size:
            self._shadow(model, inputs, kwargs, out, rows, batch, calibration, decode)
        else:
            self.last_call = MonitoredCall(self.calls - 1, batch)
        return out

    def _sampled_rows(self, batch: int) -> np.ndarray:
        """The rows to shadow-decode: each with probability p (``"row"``), or all with probability p (``"call"``).
        One uniform draw per row, resp. per call, from the monitor's generator: independent of the inputs."""
        if self.sample == "call":
            return np.arange(batch) if self._rng.random() < self.sample_rate else np.arange(0)
        return np.flatnonzero(self._rng.random(batch) < self.sample_rate)

    def _calibration_for(self, model):
        """The policy's calibration for ``model`` (fitted from its stored one if need be), checked to be the one this
        monitor's evidence is about."""
        calibration = self.policy.calibration_for(model)
        if calibration.is_bild:
            raise ValueError("RiskMonitor watches early exit; this RiskControlled was calibrated for BiLD: monitor an "
                             "early-exit calibration.")
        if self._threshold is not None and calibration.threshold != self._threshold:
            problem = (f"this monitor's evidence is about λ̂={self._threshold}, but the policy now decodes at "
                       f"λ̂={calibration.threshold} (recalibrated, or another model)")
            fix = "Call monitor.reset(policy) to start a fresh test for the new threshold"
            if self._source is not None:
                raise MonitorStateMismatchError.about(self._source, problem, fix)
            raise ValueError(f"{problem}. {fix}.")
        self._threshold = calibration.threshold
        self._resolve_task(calibration.task)
        return calibration

    def _resolve_task(self, recorded: str | None) -> None:
        from ..tasks import TASKS, get_task

        if self.task is not None:
            if recorded is not None and self.task.name != recorded:
                raise ValueError(f"task={self.task.name!r} but the policy was calibrated on task {recorded!r}: the "
                                 "monitored loss must be the calibration's. Drop task= or recalibrate on it.")
            return
        if recorded is None or recorded not in TASKS:
            raise ValueError(f"the calibration records task {recorded!r}, for which hf_safe_exit has no loss: pass "
                             "RiskMonitor(..., task=<a task name or hf_safe_exit.tasks.Task>).")
        self.task = get_task(recorded)

    @staticmethod
    def _full_model(calibration) -> EarlyExit:
        # λ = 1 in the calibration's configuration is what its losses compared against; the certificate carries the
        # calibration's lengths, so that the full model decodes as many tokens as the early exit did
        return EarlyExit(1.0, config=calibration.config, certificate=calibration.certificate)

    def _shadow(self, model, inputs, kwargs, out, rows, batch, calibration, decode) -> None:
        """Decode ``rows`` of the call with the full model and feed (or keep, for labels) the sampled pairs."""
        sub_inputs, sub_kwargs = select_rows(inputs, kwargs, rows, batch)
        with isolated_rng(model):  # a sampling call's later draws are those it would make without the monitor
            full = decode(model, sub_inputs, early_exit=self._full_model(calibration), **shadow_kwargs(sub_kwargs))
        early = sequences_of(out)
        predictions = texts_of(self.tokenizer, early[rows.tolist()])
        full_predictions = texts_of(self.tokenizer, sequences_of(full))
        self.rows_sampled += int(rows.size)
        losses = ([float(self.task.consistency_loss(p, f)) for p, f in zip(predictions, full_predictions)]
                  if self.risk == "consistency" else [])
        # recorded before feeding: an alarm's warning, raised as an error, still finds this call's record
        self.last_call = MonitoredCall(self.calls - 1, batch, tuple(int(r) for r in rows), tuple(predictions),
                                       tuple(full_predictions), tuple(losses))
        if self.risk == "consistency":
            # the warning points at the caller of generate (frames: _feed, _shadow, this generate, generate)
            self._feed(losses, stacklevel=5)
        else:
            self.samples.extend({"call": self.calls - 1, "row": int(r), "prediction": p, "full_prediction": f}
                                for r, p, f in zip(rows, predictions, full_predictions))

    # ------------------------------------------------------------------ evidence
    def record(self, predictions, references=None, full_predictions=None) -> np.ndarray:
        """Feed losses of outputs you paired yourself; returns them.

        A performance-gap monitor feeds ``task.loss(prediction, reference) − task.loss(full_prediction, reference)``
        (``"performance_gap_bounded"``: its positive part): pass all three (e.g. from ``monitor.samples``, labelled).
        A consistency monitor feeds ``task.consistency_loss(prediction, full_prediction)`` and takes no references.
        """
        predictions = self._texts("predictions", predictions)
        if full_predictions is None:
            raise ValueError("record() needs full_predictions: the full model's outputs for the same inputs (e.g. "
                             "monitor.samples[i]['full_prediction']).")
        full_predictions = self._texts("full_predictions", full_predictions, len(predictions))
        if self.task is None and self.policy.calibration is not None:
            self._resolve_task(self.policy.calibration.task)
        if self.task is None:
            raise ValueError("record() needs the task before the first call: pass RiskMonitor(..., task=...).")
        if self.risk == "consistency":
            if references is not None:
                raise ValueError("a consistency monitor compares outputs with the full model's and takes no "
                                 "references: drop them, or monitor risk='performance_gap' to use labels.")
            losses = [self.task.consistency_loss(p, f) for p, f in zip(predictions, full_predictions)]
        else:
            if references is None or len(references) != len(predictions):
                raise ValueError(f"a {self.risk} monitor needs one reference per prediction ({len(predictions)}), "
                                 f"got {None if references is None else len(references)}.")
            losses = [self.task.loss(p, r) - self.task.loss(f, r)
                      for p, r, f in zip(predictions, references, full_predictions)]
            if self.risk == "performance_gap_bounded":
                losses = [max(v, 0.0) for v in losses]
        self._feed(losses, stacklevel=3)
        return np.asarray(losses, dtype=np.float64)

    @staticmethod
    def _texts(name: str, values, n: int | None = None) -> list[str]:
        if isinstance(values, str) or not all(isinstance(v, str) for v in values):
            raise TypeError(f"{name} must be a list of strings (decoded texts), got {type(values).__name__}.")
        values = list(values)
        if n is not None and len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries for {n} predictions: pass one per prediction.")
        return values

    def _feed(self, losses, stacklevel: int) -> None:
        if not len(losses):
            return
        self.test.update(np.asarray(losses, dtype=np.float64))
        if self.alarm is None and self.test.alarm_index is not None:
            self.alarm = RiskAlarm(int(self.test.alarm_index), self.calls, _finite(self.test.max_e_value),
                                   tuple(float(v) for v in self.test.confidence_interval()), self.eps, self.alpha)
            warnings.warn(alarm_message(self.alarm, self.risk, self.fallback), RiskAlarmWarning, stacklevel=stacklevel)

    def reset(self, policy=None) -> "RiskMonitor":
        """Start a fresh test (after recalibrating): no alarm, no evidence, counters at zero; ``policy`` replaces
        the watched one (its ε is then the monitored one unless ``eps=`` was given). The sampling generator
        continues."""
        if policy is not None:
            eps = monitored_eps(_check_policy(policy), self.risk, self._eps_given)
            self.policy, self.eps = policy, eps
        self._source, self.task = None, self._task_given  # a task read from the old calibration is read again
        self._start()
        return self

    def state(self) -> dict:
        """What the monitor has seen and concluded so far (JSON-able)."""
        lo, hi = self.test.confidence_interval()
        return {"calls": self.calls, "rows_seen": self.rows_seen, "rows_sampled": self.rows_sampled,
                "risk": self.risk, "eps": self.eps, "alpha": self.alpha, "sample_rate": self.sample_rate,
                "sample": self.sample,
                "threshold": self._threshold, "n": self.test.n, "mean": self.test.mean if self.test.n else None,
                "confidence_interval": [float(lo), float(hi)], "e_value": _finite(self.test.e_value),
                "log_e_value": self.test.log_e_value, "max_e_value": _finite(self.test.max_e_value),
                "alarm": None if self.alarm is None else self.alarm.to_dict(), "fallback_active": self.fallback_active}

    # ------------------------------------------------------------------ the file
    def save(self, path, *, overwrite: bool = False) -> str:
        """Write the monitor's state to ``path`` (small JSON, written whole); an existing file needs ``overwrite``."""
        return write_state(path, {
            "hf_safe_exit_version": _version(), "risk": self.risk, "eps": self.eps, "alpha": self.alpha,
            "sample_rate": self.sample_rate, "fallback": self.fallback, "calls": self.calls,
            "rows_seen": self.rows_seen, "rows_sampled": self.rows_sampled, "threshold": self._threshold,
            "rng": self._rng.bit_generator.state, "test": self.test.to_dict(),
            "alarm": None if self.alarm is None else self.alarm.to_dict()}, overwrite=overwrite)

    @classmethod
    def load(cls, path, policy, **kwargs) -> "RiskMonitor":
        """The monitor saved at ``path``, continued: ``RiskMonitor(policy, **kwargs)`` (the keywords you built it
        with) with the saved test state, counters, sampling generator and alarm. A file for another ε, α or risk
        raises :class:`~hf_safe_exit.monitor.MonitorStateMismatchError`; a malformed or edited one
        :class:`~hf_safe_exit.errors.CorruptFileError`, naming the file."""
        from ..errors import CorruptFileError

        monitor = cls(policy, **kwargs)
        data = read_state(path)
        check_request(data, path, eps=monitor.eps, alpha=monitor.alpha, risk=monitor.risk)
        try:
            test = SequentialRiskTest.from_dict(data["test"])
            alarm = None if data["alarm"] is None else RiskAlarm.from_dict(data["alarm"])
        except (ValueError, TypeError, KeyError) as err:
            raise CorruptFileError.about(path, f"not a usable RiskMonitor state: {err}",
                                         "Save it again with monitor.save(path, overwrite=True)") from None
        agrees = (test.eps, test.alpha, test.loss_range) == (monitor.eps, monitor.alpha, MONITORED_RISKS[monitor.risk])
        if not agrees or test.alarmed != (alarm is not None):
            raise CorruptFileError.about(path, "its test's eps, alpha, loss range or alarm disagree with the monitor's "
                                         "fields (edited or mixed up)", "Save it again with monitor.save(path, "
                                         "overwrite=True), or start a fresh RiskMonitor")
        monitor.test, monitor.alarm, monitor._rng = test, alarm, generator_from_state(data["rng"], path)
        monitor.calls, monitor.rows_seen, monitor.rows_sampled = data["calls"], data["rows_seen"], data["rows_sampled"]
        monitor._threshold, monitor._source = data["threshold"], str(path)
        return monitor


def _finite(e_value: float) -> float:
    """An e-value for JSON: the wealth keeps growing after an alarm and overflows a float (log K > 709) under a long
    shift; it is then reported as the largest float (``log_e_value`` keeps the exact evidence)."""
    return min(float(e_value), sys.float_info.max)


def _version() -> str:
    from .. import __version__

    return __version__
