"""Risk control for early exit: choose the exit threshold with a distribution-free guarantee.

Jazbec, Timans et al. (2024), "Fast yet Safe: Early-Exiting with Risk Control"; conformal
risk control (Angelopoulos et al. 2022), RCPS upper confidence bounds (Bates et al. 2021),
Learn then Test (Angelopoulos et al. 2021).

* :class:`RiskController`: the estimator (fit on losses, then read λ̂ and its certificate);
* :class:`Calibration`: a fitted λ̂ tied to the early-exit configuration, model, task and lengths it holds for,
  with its file (``risk_control.json``);
* :class:`RiskControlled`: what ``generate(early_exit=...)`` takes (a request, fitted on the model's stored
  calibration unless fitted already);
* :class:`LossTable`: the calibration losses ``collect`` writes;
* :class:`ConfigurationTable`: the losses of many configurations (settings × λ), from which ``method="pareto"``
  (Pareto Testing, Laufer-Goldshtein et al., ICLR 2023) chooses one.
"""

from .bounds import binomial_count, hoeffding_bentkus_pvalue, hoeffding_bentkus_ucb, hoeffding_ucb, wsr_ucb
from .calibration import Calibration
from .certificate import RiskCertificate
from .configuration_table import CONFIGURATIONS_FILENAME, ConfigurationTable
from .controlled import RiskControlled
from .controller import RiskController
from .loss_table import CALIBRATION_FILENAME, DEFAULT_LOSS_BOUNDS, RISKS, LossTable
from .pareto import P_VALUES, ParetoResult, pareto_front, pareto_test, select_pareto
from .alarm_delay import expected_samples_to_alarm
from .sequential_test import SequentialRiskTest, first_alarm
from .selection import (BOUNDS, METHODS, Selection, select, select_crc, select_ltt, select_naive, select_ucb)
from .store import (CALIBRATION_SUBDIR, RISK_CONTROL_FILENAME, MissingCalibrationError, calibration_dir, find_stored,
                    primary_task, store_calibration, stored_tasks)
from .stored_fit import clear_cache, find_calibration

__all__ = [
    "RiskControlled", "RiskController", "Calibration", "RiskCertificate", "LossTable", "MissingCalibrationError", "find_calibration", "clear_cache",
    "CALIBRATION_FILENAME", "RISK_CONTROL_FILENAME", "RISKS", "DEFAULT_LOSS_BOUNDS", "METHODS", "BOUNDS",
    "Selection", "select", "select_naive", "select_crc", "select_ucb", "select_ltt",
    "CALIBRATION_SUBDIR", "calibration_dir", "find_stored", "primary_task", "store_calibration", "stored_tasks",
    "hoeffding_ucb", "hoeffding_bentkus_pvalue", "hoeffding_bentkus_ucb", "wsr_ucb", "binomial_count",
    "select_pareto", "pareto_test", "pareto_front", "ParetoResult", "P_VALUES", "ConfigurationTable",
    "CONFIGURATIONS_FILENAME",
    "first_alarm", "SequentialRiskTest", "expected_samples_to_alarm",
]
