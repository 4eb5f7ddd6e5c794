"""What a :class:`~hf_safe_exit.monitor.RiskMonitor` did on one ``generate`` call: ``monitor.last_call``.

A record, not evidence: the evidence is the monitor's test (``monitor.test``), which the record's ``losses`` were
fed to, in the order listed, right after the record was made. It lets a caller log, audit or replay the monitor call
by call (``hf-safe-exit monitor`` logs it: :mod:`hf_safe_exit.monitor.replay`) without pairing outputs itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["MonitoredCall"]


@dataclass(frozen=True)
class MonitoredCall:
    """One ``generate`` call as the monitor saw it.

    Attributes:
        call: 0-based index of the call among the monitor's calls (``monitor.calls - 1`` right after it).
        rows: the rows of the call's batch.
        sampled_rows: 0-based rows of the batch decoded again by the full model (the shadow decode), ascending.
        predictions: the early-exit output of each sampled row, as text (special tokens skipped).
        full_predictions: the full model's output of each sampled row, as text.
        losses: what this call fed to the test, one per sampled row: ``task.consistency_loss(prediction,
            full_prediction)`` for a consistency monitor; empty for a performance-gap monitor, whose losses need
            labels and are fed by :meth:`~hf_safe_exit.monitor.RiskMonitor.record` (the pairs are also kept in
            ``monitor.samples``).
        fallback: the call decoded with the full model after an alarm (nothing sampled, nothing fed).
        unmonitored_rows: rows drawn for the shadow decode whose decode or scoring raised (``shadow_error`` says
            what): not monitored, not counted in ``rows_sampled``, nothing fed (a
            :class:`~hf_safe_exit.monitor.ShadowDecodeWarning` was warned).
        shadow_error: that error as ``"Type: message"`` (its first line), or None.
    """

    call: int
    rows: int
    sampled_rows: tuple[int, ...] = ()
    predictions: tuple[str, ...] = ()
    full_predictions: tuple[str, ...] = ()
    losses: tuple[float, ...] = ()
    fallback: bool = False
    unmonitored_rows: tuple[int, ...] = ()
    shadow_error: str | None = None

    def to_dict(self) -> dict:
        """The record as JSON-able lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
