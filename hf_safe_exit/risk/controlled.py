"""``RiskControlled``: what ``generate(early_exit=...)`` takes to decode under a statistical guarantee.

>>> model.generate(**inputs, early_exit=RiskControlled(eps=0.05))   # fits λ̂ from the model's stored table
>>> rc = RiskControlled(eps=0.05, delta=0.1, method="ucb").fit_table(LossTable.load(path))
>>> rc.threshold, rc.certificate.feasible
>>> model.generate(**inputs, early_exit=rc)

It is a request (ε, δ, method, ... for a :class:`~hf_safe_exit.risk.RiskController`) plus, once fitted, the
:class:`~hf_safe_exit.risk.Calibration` it produced. Unfitted, ``generate`` fits it on the calibration the model
stores for its task (:mod:`hf_safe_exit.risk.stored_fit`, cached per model and table). A BiLD loss table (from
``collect --strategy bild``) calibrates BiLD's rollback threshold the same way; pass ``small_model=``.
``method="pareto"`` chooses the whole configuration (measure, schedule, exit layers, ..., and λ) from a
:class:`~hf_safe_exit.risk.ConfigurationTable` by Pareto Testing (Laufer-Goldshtein et al., ICLR 2023):

>>> rc = RiskControlled(eps=0.05, delta=0.1, method="pareto").fit_table(ConfigurationTable.from_tables(tables))
>>> rc.calibration.config, rc.threshold                # the configuration chosen, at its threshold
"""

from __future__ import annotations

from ..config import EarlyExitConfig
from ..fingerprint import model_fingerprint
from ..policy import EarlyExit
from .calibration import Calibration
from .certificate import PARETO, RiskCertificate
from .configuration_table import ConfigurationTable
from .controller import RiskController
from .loss_table import LossTable
from .store import check_task_name

__all__ = ["RiskControlled"]


class RiskControlled:
    """A risk-controlled early-exit request: λ̂ chosen so that the quality loss is at most ε.

    Args:
        eps, delta, method, bound, risk, monotonize: the :class:`~hf_safe_exit.risk.RiskController` request
            (``crc``: E[R(λ̂)] ≤ ε; ``ucb`` / ``ltt``: P(R(λ̂) ≤ ε) ≥ 1 − δ).
        config: the :class:`~hf_safe_exit.EarlyExitConfig` you mean; ``None`` (default) takes the loss table's.
            A config that contradicts the table raises: λ̂ holds only for the configuration it was calibrated with.
        task: which of the model's stored calibrations an unfitted request uses (``calibration/<task>/``); ``None``
            takes the model's primary task. A task that contradicts a table's raises.
        small_model: the small (draft) model of a BiLD calibration (it must be the one the table was collected with).
        allow_missing_fingerprint: accept a calibration that does not record its model (your responsibility).
        p_value, opt_fraction, seed: ``method="pareto"`` only (see :class:`~hf_safe_exit.risk.RiskController`).

    Fitted: ``calibration`` (a :class:`~hf_safe_exit.risk.Calibration`), ``threshold`` (λ̂) and ``certificate``.
    """

    def __init__(self, eps: float, delta: float | None = None, method: str = "crc", bound: str = "wsr",
                 risk: str = "performance_gap", monotonize: str | None = None, *, config: EarlyExitConfig | None = None,
                 task: str | None = None, small_model=None, allow_missing_fingerprint: bool = False,
                 p_value: str | None = None, opt_fraction: float | None = None, seed: int | None = None):
        request = RiskController(eps, delta, method, bound, risk, monotonize, p_value=p_value,
                                 opt_fraction=opt_fraction, seed=seed)  # validates the request
        self.eps, self.delta, self.method = request.eps, request.delta, request.method
        self.bound, self.risk, self.monotonize = request.bound, request.risk, request.monotonize
        self.p_value, self.opt_fraction, self.seed = request.p_value, request.opt_fraction, request.seed
        if config is not None and not isinstance(config, EarlyExitConfig):
            raise TypeError(f"config must be an hf_safe_exit.EarlyExitConfig or None, got {type(config).__name__}.")
        if config is not None and method == PARETO:
            raise ValueError("config= names one early-exit configuration, but method='pareto' chooses among the "
                             "configurations of the table: drop config=.")
        if not isinstance(allow_missing_fingerprint, bool):
            raise ValueError(f"allow_missing_fingerprint={allow_missing_fingerprint!r} must be True or False.")
        self.config = config
        self.task = None if task is None else check_task_name(task)
        self.small_model = small_model
        self.allow_missing_fingerprint = allow_missing_fingerprint
        self.calibration: Calibration | None = None

    def controller(self) -> RiskController:
        """A fresh, unfitted :class:`RiskController` for this request."""
        return RiskController(self.eps, self.delta, self.method, self.bound, self.risk, self.monotonize,
                              p_value=self.p_value, opt_fraction=self.opt_fraction, seed=self.seed)

    def get_params(self) -> dict:
        return {**self.controller().get_params(), "config": self.config, "task": self.task,
                "allow_missing_fingerprint": self.allow_missing_fingerprint}

    @property
    def is_fitted(self) -> bool:
        return self.calibration is not None

    @property
    def threshold(self) -> float | None:
        """λ̂ once fitted (None before)."""
        return None if self.calibration is None else self.calibration.threshold

    @property
    def certificate(self) -> RiskCertificate | None:
        return None if self.calibration is None else self.calibration.certificate

    @property
    def is_bild(self) -> bool:
        """Whether this was fitted on a BiLD table (λ̂ is a rollback threshold, λ = exp(−α_RB))."""
        return self.calibration is not None and self.calibration.is_bild

    @property
    def generation_settings(self) -> dict:
        """``max_new_tokens`` / ``max_input_length`` the calibration decoded with (empty if unknown or unfitted)."""
        return {} if self.calibration is None else self.calibration.generation_settings

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.get_params().items() if v is not None and v is not False}
        fitted = f", threshold={self.threshold:.4g}" if self.is_fitted else ""
        return f"RiskControlled({', '.join(f'{k}={v!r}' for k, v in shown.items())}{fitted})"

    # ------------------------------------------------------------------ fitting
    def fit_table(self, table, cost: str | None = None) -> "RiskControlled":
        """Choose λ̂ from ``table``, recording its model fingerprint, task, configuration and lengths. For
        ``method="pareto"``, ``table`` is a :class:`~hf_safe_exit.risk.ConfigurationTable` and ``cost`` the cost
        minimised (default ``"layer_fraction"``): the configuration chosen is ``calibration.config``."""
        if not isinstance(table, (LossTable, ConfigurationTable)):
            raise ValueError(f"fit_table expects a LossTable (or, for method='pareto', a ConfigurationTable), got "
                             f"{type(table).__name__}; use fit(thresholds, losses) for a raw matrix.")
        task = table.metadata.get("task")
        if self.task is not None and task not in (None, self.task):
            raise ValueError(f"task={self.task!r} but these losses were collected on task {task!r}: a threshold "
                             f"calibrated on one task carries no guarantee on another. Drop task= or use {self.task!r}'s "
                             "table.")
        self.calibration = Calibration.fit(self.controller(), table, self.config, cost=cost)
        return self

    def fit(self, thresholds, losses, loss_bounds=None) -> "RiskControlled":
        """Choose λ̂ from a raw loss matrix (``losses[k, j]``: example j at ``thresholds[k]``); ``config=`` must name
        the configuration the losses were computed with. ``loss_bounds``: the range of ``risk`` by default."""
        table = LossTable(thresholds, {self.risk: losses},
                          bounds={} if loss_bounds is None else {self.risk: tuple(loss_bounds)})
        return self.fit_table(table)

    # ------------------------------------------------------------------ decoding
    def calibration_for(self, model, fingerprint: str | None = None) -> Calibration:
        """The calibration this request decodes ``model`` with: its own once fitted, else the fit on ``model``'s
        stored calibration (cached per model weights, table and request). ``fingerprint``: ``model``'s, if known."""
        from .stored_fit import fit_from_stored

        return self.calibration if self.calibration is not None else fit_from_stored(self, model, fingerprint)

    def policy_for(self, model) -> tuple[Calibration, object]:
        """The calibration for ``model`` (:meth:`calibration_for`) and what it decodes with (:meth:`Calibration.policy`:
        an unbound ``EarlyExit`` at λ̂, or a BiLD), after checking that the calibration is ``model``'s."""
        fingerprint = model_fingerprint(model)  # once per call (cached per weights: hf_safe_exit.fingerprint)
        calibration = self.calibration_for(model, fingerprint)
        return calibration, calibration.policy(model, small_model=self.small_model, fingerprint=fingerprint,
                                               allow_missing_fingerprint=self.allow_missing_fingerprint)

    def resolve(self, model):
        """What ``generate`` decodes ``model`` with, ready: the :class:`~hf_safe_exit.EarlyExit` at λ̂ bound to it
        (or, for a BiLD calibration, the calibrated BiLD)."""
        policy = self.policy_for(model)[1]
        return policy.bind(model) if isinstance(policy, EarlyExit) else policy

    def bild(self, small_model=None, *, small_tokenizer=None):
        """The calibrated BiLD policy (``small_model`` defaults to the constructor's)."""
        if self.calibration is None or not self.is_bild:
            raise ValueError("bild() needs a fit on a BiLD loss table (from `hf-safe-exit collect --strategy bild`): "
                             "call fit_table(table) first." if self.calibration is None else
                             "This RiskControlled was calibrated for early exit, not for BiLD: use it as early_exit=rc.")
        return self.calibration.bild_policy(self.small_model if small_model is None else small_model,
                                            small_tokenizer=small_tokenizer,
                                            allow_missing_fingerprint=self.allow_missing_fingerprint)

    # ------------------------------------------------------------------ persistence (the Calibration's)
    def to_dict(self) -> dict:
        if self.calibration is None:
            raise ValueError("This RiskControlled is not fitted: call fit(...) or fit_table(...) before saving it.")
        return self.calibration.to_dict()

    def save_pretrained(self, save_directory) -> str:
        """Write ``save_directory/risk_control.json`` (λ̂, certificate, configuration, model fingerprint)."""
        if self.calibration is None:
            raise ValueError("This RiskControlled is not fitted: call fit(...) or fit_table(...) before saving it.")
        return self.calibration.save_pretrained(save_directory)

    @classmethod
    def from_calibration(cls, calibration: Calibration, *, small_model=None,
                         allow_missing_fingerprint: bool = False) -> "RiskControlled":
        """The fitted request a stored :class:`Calibration` answers."""
        obj = cls(**calibration.request, small_model=small_model, allow_missing_fingerprint=allow_missing_fingerprint)
        obj.calibration = calibration
        return obj

    @classmethod
    def from_dict(cls, data: dict, path=None, *, allow_missing_fingerprint: bool = False) -> "RiskControlled":
        """The fitted request a ``risk_control.json`` describes, checked (see :meth:`Calibration.from_dict`)."""
        return cls.from_calibration(Calibration.from_dict(data, path),
                                    allow_missing_fingerprint=allow_missing_fingerprint)

    @classmethod
    def from_pretrained(cls, path_or_repo_id, task: str | None = None, *, revision: str | None = None,
                        subfolder: str | None = None, allow_missing_fingerprint: bool = False) -> "RiskControlled":
        """Load a fitted calibration (see :meth:`Calibration.from_pretrained`); a Hub repo is read at ``revision``
        (a branch, tag or commit; default: its default branch), so that the calibration is that of the weights you
        loaded with the same ``revision``."""
        calibration = Calibration.from_pretrained(path_or_repo_id, task, revision=revision, subfolder=subfolder)
        return cls.from_calibration(calibration, allow_missing_fingerprint=allow_missing_fingerprint)
