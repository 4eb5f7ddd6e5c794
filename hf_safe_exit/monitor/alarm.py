"""The alarm a :class:`~hf_safe_exit.monitor.RiskMonitor` raises when its sequential test rejects H₀: risk ≤ ε.

The alarm is evidence, not a guess: the monitor's test (a betting e-process,
:class:`~hf_safe_exit.risk.sequential_test.SequentialRiskTest`) rejects only when its e-value reaches 1/α, which
under H₀ happens with probability at most α over the whole (unbounded) stream, by Ville's inequality (Timans, Verma,
Nalisnick, Naesseth, UAI 2025). So an alarm says the deployed risk is above ε with that confidence, not that one
unlucky batch was bad.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["RiskAlarm", "RiskAlarmWarning", "alarm_message"]


class RiskAlarmWarning(UserWarning):
    """Warned once when a :class:`~hf_safe_exit.monitor.RiskMonitor`'s test rejects H₀ (the message: the evidence)."""


@dataclass(frozen=True)
class RiskAlarm:
    """When and on what evidence the monitor's test rejected H₀: "the deployed risk is at most ε".

    Attributes:
        sample_index: 0-based index, among the monitored losses, of the loss at which the test first rejected.
        calls_seen: ``generate`` calls the monitor had seen when it fired.
        e_value: the test's largest e-value so far when it fired (≥ 1/α).
        risk_interval: the test's anytime-valid (1 − α) confidence interval for the mean risk when it fired.
        eps: the risk level ε monitored; alpha: the test's level α.
    """

    sample_index: int
    calls_seen: int
    e_value: float
    risk_interval: tuple[float, float]
    eps: float
    alpha: float

    def to_dict(self) -> dict:
        return {**asdict(self), "risk_interval": [float(v) for v in self.risk_interval]}

    @classmethod
    def from_dict(cls, data: dict) -> "RiskAlarm":
        """The alarm ``to_dict`` wrote; raises ``ValueError``/``TypeError``/``KeyError`` on anything else."""
        if not isinstance(data, dict) or set(data) != {"sample_index", "calls_seen", "e_value", "risk_interval",
                                                       "eps", "alpha"}:
            raise ValueError("an alarm must hold exactly sample_index, calls_seen, e_value, risk_interval, eps, alpha")
        lo, hi = (float(v) for v in data["risk_interval"])
        counts = (data["sample_index"], data["calls_seen"])
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in counts):
            raise ValueError("an alarm's sample_index and calls_seen must be integers >= 0")
        return cls(int(data["sample_index"]), int(data["calls_seen"]), float(data["e_value"]), (lo, hi),
                   float(data["eps"]), float(data["alpha"]))


def alarm_message(alarm: RiskAlarm, risk: str, fallback: bool) -> str:
    """The one-line warning for ``alarm``: the evidence (ε, α, losses seen, e-value, risk interval, calls) and what
    the monitor does now."""
    lo, hi = alarm.risk_interval
    then = ("every later call decodes with the full model (λ = 1) and no early exit is deployed until you recalibrate "
            "and call monitor.reset()" if fallback else
            "early exit stays on (fallback=False): recalibrate and call monitor.reset(policy)")
    return (f"RiskMonitor alarm: the deployed {risk} risk exceeds eps={alarm.eps:g} (anytime-valid test at "
            f"alpha={alarm.alpha:g}: e-value {alarm.e_value:.4g} >= 1/alpha = {1 / alarm.alpha:.4g} after "
            f"{alarm.sample_index + 1} monitored losses; risk in [{lo:.4g}, {hi:.4g}] with confidence "
            f"{1 - alarm.alpha:g}; {alarm.calls_seen} generate calls seen): {then}.")
