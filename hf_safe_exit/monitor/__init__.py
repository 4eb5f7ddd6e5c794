"""Deployment monitoring: :class:`RiskMonitor` watches a risk-controlled early exit on live traffic with an
anytime-valid test, and falls back to the full model when it finds evidence that the risk exceeds ε.

>>> monitor = hf_safe_exit.RiskMonitor(RiskControlled(eps=0.05, risk="consistency"), tokenizer=tokenizer)
>>> model.generate(**inputs, early_exit=monitor)
>>> monitor.last_call          # what this call sampled, decoded and fed to the test (a MonitoredCall)

The import graph: :mod:`hf_safe_exit.decoding` imports this package, to dispatch ``early_exit=monitor``, so no
module imported here (``alarm``, ``monitored_call``, ``risk_monitor``, ``settings``, ``shadow``, ``state``) imports
the decoding code: ``generate`` hands itself to :meth:`RiskMonitor.generate` as ``decode``. The stream replay behind
``hf-safe-exit monitor`` (:mod:`hf_safe_exit.monitor.replay`, which this package does not import) does call
:func:`hf_safe_exit.decoding.generate`, importing it inside the function that decodes. That is no cycle, at import
time or later: nothing on the path decoding → monitor → (the modules above) leads back to ``replay``
(``tests/test_import_graph.py`` reads function-level imports too).
"""

from .alarm import RiskAlarm, RiskAlarmWarning
from .monitored_call import MonitoredCall
from .risk_monitor import MAX_SAMPLES, MONITORED_RISKS, SAMPLING, RiskMonitor
from .shadow import ShadowDecodeWarning
from .state import MonitorStateMismatchError

__all__ = ["RiskMonitor", "RiskAlarm", "RiskAlarmWarning", "ShadowDecodeWarning", "MonitoredCall",
           "MonitorStateMismatchError", "MONITORED_RISKS", "MAX_SAMPLES", "SAMPLING"]
