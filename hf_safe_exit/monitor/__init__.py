"""Deployment monitoring: :class:`RiskMonitor` watches a risk-controlled early exit on live traffic with an
anytime-valid test, and falls back to the full model when it finds evidence that the risk exceeds ε.

>>> monitor = hf_safe_exit.RiskMonitor(RiskControlled(eps=0.05, risk="consistency"), tokenizer=tokenizer)
>>> model.generate(**inputs, early_exit=monitor)

The monitor's modules do not import :mod:`hf_safe_exit.decoding` (which imports them, to dispatch
``early_exit=monitor``): ``generate`` hands itself to :meth:`RiskMonitor.generate` as ``decode``.
"""

from .alarm import RiskAlarm, RiskAlarmWarning
from .risk_monitor import MAX_SAMPLES, MONITORED_RISKS, RiskMonitor
from .state import MonitorStateMismatchError

__all__ = ["RiskMonitor", "RiskAlarm", "RiskAlarmWarning", "MonitorStateMismatchError", "MONITORED_RISKS",
           "MAX_SAMPLES"]
