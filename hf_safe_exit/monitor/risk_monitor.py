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
about the λ̂ deployed, given its calibration draw, and the calibration does not make R(λ̂) ≤ ε certain: ``crc``
bounds it in expectation over calibration draws, ``ucb``/``ltt`` with probability 1 − δ. So on traffic exactly like
the calibration's, alarms come with probability up to P(R(λ̂) > ε) + α (≤ δ + α for ucb/ltt), and an alarm there is
correct about the λ̂ deployed (docs/monitor.md measures 12.5 % with crc at ε = 0.2, α = 0.05).

Only greedy calls are monitored (``do_sample=True`` is refused): the calibration measured greedy outputs, and a
sampled output against an independent sample of the full model is no draw of the deployed risk.

Where the losses come from:

* ``risk="consistency"`` (default, no labels): each row of each call is sampled independently with probability
  ``sample_rate`` (``sample="call"``: all rows of a call together, at that probability); the sampled rows are decoded
  again by the full model (λ = 1: HF's own loop), and for each the task's ``consistency_loss(early-exit text,
  full-model text)`` (the consistency risk of Jazbec, Timans et al. 2024) is fed to the test, in row order.
  ``record(predictions, full_predictions=...)`` feeds the same loss for outputs you paired yourself.
* ``risk="performance_gap"`` / ``"performance_gap_bounded"`` (needs labels): the sampled pairs wait in
  ``monitor.samples``; :meth:`RiskMonitor.take_samples` hands them over once (and empties the list), and
  ``record(predictions, references, full_predictions)`` feeds the gap ``loss(prediction) − loss(full prediction)``
  (resp. its positive part), losses in [−1, 1] (resp. [0, 1]). Record each pair once (a loss fed twice breaks the
  test's validity), and label pairs chosen regardless of their loss: all of them, or a random subset.

Cost: the shadow decode (plus the task's loss on the sampled texts) is the only extra work: one full-model decode of a
call's sampled rows whenever it has any (``sample="row"``: with probability 1 − (1 − p)^B for B rows; a call with its
own ``logits_processor``/``stopping_criteria`` decodes its whole batch); measured in docs/monitor.md, "Cost". If it
raises, the call still returns its output, with a :class:`~hf_safe_exit.monitor.ShadowDecodeWarning`: its rows are
not monitored.

Validity of ``sample="call"``: sampling is independent of the inputs in both modes, and i.i.d. rows make a row's
loss independent of its batch-mates', so the α bound holds; rows of one batch that depend on each other (one
document's paragraphs) can break it, and ``sample="call"`` feeds such batches whole (docs/monitor.md).

After an alarm (a :class:`~hf_safe_exit.monitor.RiskAlarmWarning`, once, and ``monitor.alarm``), with
``fallback=True`` every later call decodes with the full model (its output is the full model's, bit for bit) and no
shadow decode runs, until :meth:`RiskMonitor.reset` after recalibration.
"""

from __future__ import annotations

import sys
import warnings
from collections import deque

import numpy as np

from ..policy import EarlyExit
from ..risk.sequential_test import SequentialRiskTest
from .alarm import RiskAlarm, RiskAlarmWarning, alarm_message
from .monitored_call import MonitoredCall
from .settings import (MONITORED_RISKS, SAMPLING, check_level, check_policy, check_references, check_settings,
                       check_texts, monitored_eps)
from .shadow import (ShadowDecodeWarning, batch_size, check_greedy, check_one_output_per_input, isolated_rng,
                     sequences_of, shadow_inputs, shadow_kwargs, texts_of)
from .state import (MonitorStateMismatchError, calibration_digest, check_evidence, check_request,
                    generator_from_state, read_state, write_state)

__all__ = ["RiskMonitor", "MONITORED_RISKS", "MAX_SAMPLES", "SAMPLING"]

#: how many unlabelled (prediction, full prediction) pairs a performance-gap monitor keeps (the oldest are dropped)
MAX_SAMPLES = 1000


class RiskMonitor:
    """A risk-controlled policy with an anytime-valid test of its risk on live traffic (module docstring).

    Args:
        policy: a :class:`~hf_safe_exit.RiskControlled` (unfitted: fitted at the first call on the model's stored
            calibration, as ``generate`` does).
        tokenizer: the model's tokenizer (outputs are compared as text, special tokens skipped).
        sample_rate: the probability p ∈ (0, 1] that a row is decoded again by the full model.
        sample: ``"row"`` (default: each row of a call independently with probability p) or ``"call"`` (all rows of
            a call together with probability p: the same expected rows, a shadow decode on a fraction p of calls;
            docs/monitor.md, "Cost" and "Is sample='call' still a valid test?").
        alpha: the test's level α ∈ (0, 1): P(any alarm | risk ≤ ε) ≤ α.
        eps: the risk level tested; default the policy's ε when the policy controls ``risk``.
        risk: ``"consistency"`` (label-free), ``"performance_gap"`` or ``"performance_gap_bounded"`` (fed by record()).
        task: the task whose losses are used (name or :class:`~hf_safe_exit.tasks.Task`); default the calibration's.
        fallback: after an alarm, decode with the full model (λ = 1) until :meth:`reset`.
        seed: seed of the sampling decisions (numpy ``default_rng``); its state is saved with the monitor.

    Attributes: ``test`` (the :class:`~hf_safe_exit.risk.sequential_test.SequentialRiskTest`), ``alarm`` (a
    :class:`~hf_safe_exit.monitor.RiskAlarm` or None), ``last_call`` (a :class:`~hf_safe_exit.monitor.MonitoredCall`:
    what the last ``generate`` call sampled, decoded and fed; None before the first call and after :meth:`reset`;
    not saved), ``calls``, ``rows_seen``, ``rows_sampled`` (rows shadow-decoded and scored), ``recorded`` (losses fed
    by :meth:`record`), ``eps``, and, for a performance-gap monitor, ``samples`` (the pairs waiting for labels:
    :meth:`take_samples`; not saved by :meth:`save`).
    """

    def __init__(self, policy, *, tokenizer, sample_rate: float = 0.05, alpha: float = 0.05, eps=None,
                 risk: str = "consistency", task=None, fallback: bool = True, seed: int | None = None,
                 sample: str = "row"):
        self.policy = check_policy(policy)
        if not callable(getattr(tokenizer, "batch_decode", None)):
            raise TypeError("RiskMonitor needs the model's tokenizer to compare outputs as text: pass "
                            f"tokenizer=<a transformers tokenizer> (got {type(tokenizer).__name__}).")
        check_settings(sample_rate, sample, risk, fallback, seed)
        self.tokenizer, self.sample_rate, self.alpha = tokenizer, float(sample_rate), check_level("alpha", alpha)
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
        self.calls = self.rows_seen = self.rows_sampled = self.recorded = 0
        self.alarm: RiskAlarm | None = None
        self.last_call: MonitoredCall | None = None
        self.samples: deque = deque(maxlen=MAX_SAMPLES)
        # what the evidence is about, known at the first call: λ̂ and the digest of its calibration
        self._threshold = self._calibration_digest = None
        self._calibration_seen = None  # the Calibration object last checked (its digest is computed once)

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
        fallback, the full model's output (λ = 1, HF's own loop; ``certificate`` None: no early exit ran). A sampling
        call (``do_sample=True``, from the call, its ``generation_config`` or the model's) raises ``ValueError``.
        """
        self.last_call = None  # a call that raises leaves no record of an earlier one behind
        check_greedy(model, kwargs)
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
        monitor's evidence is about: the same λ̂ and the same calibration (its digest)."""
        calibration = self.policy.calibration_for(model)
        if calibration.is_bild:
            raise ValueError("RiskMonitor watches early exit; this RiskControlled was calibrated for BiLD: monitor an "
                             "early-exit calibration.")
        if calibration is not self._calibration_seen:
            digest = calibration_digest(calibration)
            if self._threshold is not None and calibration.threshold != self._threshold:
                self._refuse_other_calibration(f"λ̂={self._threshold}, but the policy now decodes at "
                                               f"λ̂={calibration.threshold} (recalibrated, or another model)")
            if self._calibration_digest is not None and digest != self._calibration_digest:
                self._refuse_other_calibration(f"the calibration with digest {self._calibration_digest[:12]}…, but "
                                               f"the policy now decodes with another one ({digest[:12]}…, at the same "
                                               f"λ̂={calibration.threshold}: recalibrated on other data, or other "
                                               "settings)")
            self._threshold, self._calibration_digest = calibration.threshold, digest
            self._calibration_seen = calibration
        self._resolve_task(calibration.task)
        return calibration

    def _refuse_other_calibration(self, what: str) -> None:
        problem = f"this monitor's evidence is about {what}"
        fix = "Call monitor.reset(policy) to start a fresh test for the new calibration"
        if self._source is not None:
            raise MonitorStateMismatchError.about(self._source, problem, fix)
        raise ValueError(f"{problem}. {fix}.")

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
        """Decode ``rows`` of the call with the full model and feed (or keep, for labels) the sampled pairs. A
        failure of the decode or the scoring warns and leaves the rows unmonitored: the caller still gets ``out``."""
        try:
            predictions, full_predictions, losses = self._decode_and_score(model, inputs, kwargs, out, rows, batch,
                                                                           calibration, decode)
        except Exception as err:  # noqa: BLE001 - the caller's output must not be lost to the monitor's own decode
            first_line = (str(err).splitlines() or [""])[0]
            error = f"{type(err).__name__}: {first_line}"
            self.last_call = MonitoredCall(self.calls - 1, batch, unmonitored_rows=tuple(int(r) for r in rows),
                                           shadow_error=error)
            warnings.warn(f"RiskMonitor: the shadow decode of call {self.calls - 1} failed ({error}); its sampled rows "
                          f"{[int(r) for r in rows]} were not monitored (nothing fed to the test); the call's output "
                          "is returned as decoded.", ShadowDecodeWarning, stacklevel=4)
            return
        first_id = self.rows_sampled
        self.rows_sampled += int(rows.size)
        # recorded before feeding: an alarm's warning, raised as an error, still finds this call's record
        self.last_call = MonitoredCall(self.calls - 1, batch, tuple(int(r) for r in rows), tuple(predictions),
                                       tuple(full_predictions), tuple(losses))
        if self.risk == "consistency":
            # the warning points at the caller of generate (frames: _warn, _shadow, this generate, generate)
            self._warn(self._feed(losses), stacklevel=5)
        else:
            self.samples.extend({"id": first_id + j, "call": self.calls - 1, "row": int(r), "prediction": p,
                                 "full_prediction": f}
                                for j, (r, p, f) in enumerate(zip(rows, predictions, full_predictions)))

    def _decode_and_score(self, model, inputs, kwargs, out, rows, batch, calibration, decode) -> tuple:
        """The sampled rows' early-exit texts, the full model's texts, and (consistency) their losses."""
        shadow_in, shadow_kw, take = shadow_inputs(inputs, kwargs, rows, batch)
        with isolated_rng(model):  # whatever a caller's processor draws, the caller's later draws are unchanged
            full = decode(model, shadow_in, early_exit=self._full_model(calibration), **shadow_kwargs(shadow_kw))
        predictions = texts_of(self.tokenizer, sequences_of(out)[rows.tolist()])
        full_predictions = texts_of(self.tokenizer, sequences_of(full)[take])
        losses = ([float(self.task.consistency_loss(p, f)) for p, f in zip(predictions, full_predictions)]
                  if self.risk == "consistency" else [])
        return predictions, full_predictions, losses

    # ------------------------------------------------------------------ evidence
    def take_samples(self) -> list[dict]:
        """The pairs waiting for labels (performance-gap monitors), oldest first, and empties the list.

        Each is a dict: ``id`` (the pair's index among all rows this monitor sampled), ``call``, ``row``,
        ``prediction``, ``full_prediction``. Label them and :meth:`record` each pair once: a loss fed twice breaks
        the test's α. Which pairs you label must not depend on their losses (all of them, or a random subset), else
        the fed losses are not draws of the deployed risk. At most :data:`MAX_SAMPLES` wait (the oldest are
        dropped)."""
        taken = list(self.samples)
        self.samples.clear()
        return taken

    def record(self, predictions, references=None, full_predictions=None) -> np.ndarray:
        """Feed losses of outputs you paired yourself; returns them.

        A performance-gap monitor feeds ``task.loss(prediction, reference) − task.loss(full_prediction, reference)``
        (``"performance_gap_bounded"``: its positive part): pass all three (e.g. from :meth:`take_samples`, labelled;
        each pair once). A consistency monitor feeds ``task.consistency_loss(prediction, full_prediction)`` and
        takes no references.
        """
        predictions = check_texts("predictions", predictions)
        if full_predictions is None:
            raise ValueError("record() needs full_predictions: the full model's outputs for the same inputs (e.g. "
                             "the 'full_prediction' of each pair monitor.take_samples() returns).")
        full_predictions = check_texts("full_predictions", full_predictions, len(predictions))
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
            references = check_references(references, len(predictions), self.risk)
            losses = [self.task.loss(p, r) - self.task.loss(f, r)
                      for p, r, f in zip(predictions, references, full_predictions)]
            if self.risk == "performance_gap_bounded":
                losses = [max(v, 0.0) for v in losses]
        alarm = self._feed(losses)
        self.recorded += len(losses)
        self._warn(alarm, stacklevel=3)
        return np.asarray(losses, dtype=np.float64)

    def _feed(self, losses) -> RiskAlarm | None:
        """Feed ``losses`` one at a time (the same test state as one chunk, bit for bit), the chunk checked whole
        first; returns the alarm if one of them fired it, built at that loss (the e-value and interval then)."""
        fired = None
        for loss in self.test.check_losses(losses):
            self.test.update(loss)
            if self.alarm is None and self.test.alarmed:
                lo, hi = self.test.confidence_interval()
                self.alarm = fired = RiskAlarm(int(self.test.alarm_index), self.calls, _finite(self.test.max_e_value),
                                               (float(lo), float(hi)), self.eps, self.alpha)
        return fired

    def _warn(self, alarm: RiskAlarm | None, stacklevel: int) -> None:
        # after the whole chunk is fed: a warning raised as an error leaves the test and the counters consistent
        if alarm is not None:
            warnings.warn(alarm_message(alarm, self.risk, self.fallback), RiskAlarmWarning, stacklevel=stacklevel)

    def reset(self, policy=None) -> "RiskMonitor":
        """Start a fresh test (after recalibrating): no alarm, no evidence, counters at zero; ``policy`` replaces
        the watched one (its ε is then the monitored one unless ``eps=`` was given). The sampling generator
        continues."""
        if policy is not None:
            eps = monitored_eps(check_policy(policy), self.risk, self._eps_given)
            self.policy, self.eps = policy, eps
        self._source, self.task = None, self._task_given  # a task read from the old calibration is read again
        self._start()
        return self

    def state(self) -> dict:
        """What the monitor has seen and concluded so far (JSON-able)."""
        lo, hi = self.test.confidence_interval()
        return {"calls": self.calls, "rows_seen": self.rows_seen, "rows_sampled": self.rows_sampled,
                "recorded": self.recorded, "risk": self.risk, "eps": self.eps, "alpha": self.alpha,
                "sample_rate": self.sample_rate, "sample": self.sample, "threshold": self._threshold,
                "calibration": self._calibration_digest, "n": self.test.n,
                "mean": self.test.mean if self.test.n else None,
                "confidence_interval": [float(lo), float(hi)], "e_value": _finite(self.test.e_value),
                "log_e_value": self.test.log_e_value, "max_e_value": _finite(self.test.max_e_value),
                "alarm": None if self.alarm is None else self.alarm.to_dict(), "fallback_active": self.fallback_active}

    # ------------------------------------------------------------------ the file
    def save(self, path, *, overwrite: bool = False) -> str:
        """Write the monitor's state to ``path`` (small JSON, written whole); an existing file needs ``overwrite``."""
        return write_state(path, {
            "hf_safe_exit_version": _version(), "risk": self.risk, "eps": self.eps, "alpha": self.alpha,
            "sample_rate": self.sample_rate, "sample": self.sample, "fallback": self.fallback, "calls": self.calls,
            "rows_seen": self.rows_seen, "rows_sampled": self.rows_sampled, "recorded": self.recorded,
            "threshold": self._threshold, "calibration": self._calibration_digest,
            "rng": self._rng.bit_generator.state, "test": self.test.to_dict(),
            "alarm": None if self.alarm is None else self.alarm.to_dict()}, overwrite=overwrite)

    @classmethod
    def load(cls, path, policy, **kwargs) -> "RiskMonitor":
        """The monitor saved at ``path``, continued: ``RiskMonitor(policy, **kwargs)`` (the keywords you built it
        with) with the saved test state, counters, sampling generator and alarm. A file saved with another ε, α,
        risk, ``sample_rate``, ``sample`` or ``fallback`` raises
        :class:`~hf_safe_exit.monitor.MonitorStateMismatchError` (so does, at the first call, a policy whose
        calibration is not the saved one: :meth:`reset`); a malformed,
        edited or inconsistent one :class:`~hf_safe_exit.errors.CorruptFileError`, naming the file."""
        from ..errors import CorruptFileError

        monitor = cls(policy, **kwargs)
        data = read_state(path)
        check_request(data, path, risk=monitor.risk, eps=monitor.eps, alpha=monitor.alpha,
                      sample_rate=monitor.sample_rate, sample=monitor.sample, fallback=monitor.fallback)
        try:
            test = SequentialRiskTest.from_dict(data["test"])
            alarm = None if data["alarm"] is None else RiskAlarm.from_dict(data["alarm"])
        except (ValueError, TypeError, KeyError, OverflowError) as err:
            raise CorruptFileError.about(path, f"not a usable RiskMonitor state: {err}",
                                         "Save it again with monitor.save(path, overwrite=True)") from None
        check_evidence(data, path, test, alarm, MONITORED_RISKS[monitor.risk])
        monitor.test, monitor.alarm, monitor._rng = test, alarm, generator_from_state(data["rng"], path)
        monitor.calls, monitor.rows_seen, monitor.rows_sampled = data["calls"], data["rows_seen"], data["rows_sampled"]
        monitor.recorded = data["recorded"]
        monitor._threshold, monitor._calibration_digest = data["threshold"], data["calibration"]
        monitor._source = str(path)
        return monitor


def _finite(e_value: float) -> float:
    """An e-value for JSON: the wealth keeps growing after an alarm and overflows a float (log K > 709) under a long
    shift; it is then reported as the largest float (``log_e_value`` keeps the exact evidence)."""
    return min(float(e_value), sys.float_info.max)


def _version() -> str:
    from .. import __version__

    return __version__
