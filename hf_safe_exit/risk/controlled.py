"""``RiskControlled``: an ``early_exit=`` policy whose threshold carries a statistical guarantee.

>>> rc = RiskControlled(eps=0.05, delta=0.1, method="ucb").fit_table(LossTable.load(path))
>>> rc.lambda_, rc.certificate.feasible
>>> model.generate(**inputs, early_exit=rc)
>>> model.generate(**inputs, early_exit=RiskControlled(eps=0.05))   # fits from the model's stored table

BiLD's rollback threshold (a table from ``collect(..., policy_factory=bild_policy_factory(small))``
or ``hf-safe-exit collect --strategy bild``; λ = exp(−α_RB)) is calibrated the same way:

>>> rc = RiskControlled(eps=0.05, small_model=small).fit_table(bild_table)
>>> rc.bild()                                   # BiLD(small, rollback=-log λ̂, fallback=<the table's>)
>>> large.generate(**inputs, early_exit=rc)     # runs that BiLD policy

Guarantees (Jazbec, Timans et al. 2024, "Fast yet Safe", Sec. 3), for the chosen risk R(λ):
``crc``: E[R_test(λ̂)] ≤ ε; ``ucb`` / ``ltt``: P(R(λ̂) ≤ ε) ≥ 1 − δ; ``naive``: none.
"""

from __future__ import annotations

import json
import os
import warnings

from ..confidence import AUTO, ConfidenceMeasure, get_measure, measure_name
from ..decoding.poe import resolve_anytime
from ..errors import CorruptFileError
from ..fingerprint import model_fingerprint
from ..policy import SCHEDULES, EarlyExit, check_exit_layers
from .bounds import _check_level, hoeffding_bentkus_ucb
from .certificate import RiskCertificate, guarantee_text, infeasible_message
from .integrity import FORMAT_VERSION, check_calibration_dict
from .loss_table import CALIBRATION_FILENAME, DEFAULT_LOSS_BOUNDS, RISKS, LossTable
from .selection import BOUNDS, MONOTONIZE, check_method_and_delta, select
from .provenance import check_fingerprint
from .store import HOW_TO_CALIBRATE, RISK_CONTROL_FILENAME, MissingCalibrationError, check_task_name, find_stored, \
    read_calibration_json
from .stored_fit import clear_cache, find_calibration, fit_from_stored

__all__ = ["RiskControlled", "RiskCertificate", "MissingCalibrationError", "find_calibration",
           "RISK_CONTROL_FILENAME", "clear_cache"]

_HOW_TO_CALIBRATE = HOW_TO_CALIBRATE


class RiskControlled:
    """Pick the exit threshold λ̂ with a distribution-free risk guarantee, then act as an ``early_exit=`` policy.

    Args:
        eps: target risk ε in (0, 1).
        delta: failure probability δ in (0, 1); required by ``ucb``/``ltt``, refused by ``crc``/``naive``.
        method: ``"crc"`` (in expectation), ``"ucb"`` or ``"ltt"`` (with probability 1 − δ), ``"naive"``.
        bound: UCB bound for ``method="ucb"``: ``"wsr"`` (default), ``"hoeffding"``, ``"hoeffding_bentkus"``.
        risk: ``"performance_gap"`` (unrestricted, default), ``"performance_gap_bounded"``, ``"consistency"``.
        monotonize: ``None`` or ``"per_example"`` (see :mod:`hf_safe_exit.risk.selection`).
        measure, schedule, min_exit_layer, decay_tau, exit_layers: the early-exit settings the losses were
            computed with. ``None`` takes them from the loss table's metadata (``fit_table``);
            a value that contradicts the table raises. Defaults when neither says:
            schedule ``"constant"``, min_exit_layer 1, decay_tau 4, exit_layers None (every layer checked); the
            measure must be known.
        anytime: ``None``, ``"poe"`` or a :class:`~hf_safe_exit.PoEConfig`: whether the losses were
            computed with Product-of-Experts anytime predictions (Jazbec et al. 2023). ``None``
            takes the table's setting (plain early exit if it has none); a value that contradicts
            the table raises, since λ̂ holds only for the decoder it was calibrated with.
        task: which of the model's stored calibrations an unfitted policy uses (``calibration/<task>/``, see
            :mod:`hf_safe_exit.risk.store`); ``None`` takes the model's primary task. For a fitted policy, a
            task that contradicts the table's raises.
        small_model: the small (draft) model, for a BiLD calibration (a table whose metadata says
            ``strategy: "bild"``); it must be the model the table was collected with (same
            fingerprint). It can also be passed to :meth:`bild` later. Not saved by ``save_pretrained``.
        allow_missing_fingerprint: a calibration or loss table that does not record the model it was made for
            (no ``model_fingerprint``) is refused when bound to a model, since nothing shows that its guarantee
            belongs to that model; ``True`` accepts it (your responsibility). A recorded fingerprint of another
            model is refused always. Not saved by ``save_pretrained``.

    A BiLD calibration's λ̂ is a rollback threshold: :meth:`bild` (or ``bind(large_model)``) returns
    ``BiLD.from_lambda(small_model, λ̂, fallback=..., max_draft_len=...)`` with the table's fallback and
    draft length, and ``generate(early_exit=rc)`` decodes with it.

    Fitted attributes: ``lambda_`` (λ̂) and ``certificate`` (:class:`RiskCertificate`).
    """

    def __init__(self, eps: float, delta: float | None = None, method: str = "crc", bound: str = "wsr",
                 risk: str = "performance_gap", monotonize: str | None = None,
                 measure: str | ConfidenceMeasure | None = None, schedule: str | None = None,
                 min_exit_layer: int | None = None, decay_tau: float | None = None, anytime=None,
                 exit_layers=None, task: str | None = None, small_model=None, allow_missing_fingerprint: bool = False):
        self.eps = _check_level(eps, "eps")
        if not isinstance(allow_missing_fingerprint, bool):
            raise ValueError(f"allow_missing_fingerprint={allow_missing_fingerprint!r} must be True or False.")
        delta = check_method_and_delta(method, delta)
        if bound not in BOUNDS:
            raise ValueError(f"bound={bound!r} is unknown: use one of {BOUNDS}.")
        if risk not in RISKS:
            raise ValueError(f"risk={risk!r} is unknown: use one of {RISKS}.")
        if monotonize not in MONOTONIZE:
            raise ValueError(f"monotonize={monotonize!r} is unknown: use None or 'per_example'.")
        if isinstance(measure, str) and measure == AUTO:
            measure = None  # a calibration records the measure "auto" resolved to: "auto" asks for that one
        if measure is not None:
            get_measure(measure)
        if schedule is not None and schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is unknown: use one of {SCHEDULES}.")
        if min_exit_layer is not None and (isinstance(min_exit_layer, bool) or not isinstance(min_exit_layer, int)
                                           or min_exit_layer < 1):
            raise ValueError(f"min_exit_layer={min_exit_layer!r} must be a positive integer (1-based layer).")
        exit_layers = check_exit_layers(exit_layers)
        if decay_tau is not None and not decay_tau > 0:
            raise ValueError(f"decay_tau={decay_tau!r} must be > 0.")
        self.delta, self.method, self.bound, self.risk, self.monotonize = delta, method, bound, risk, monotonize
        self.measure, self.schedule, self.min_exit_layer, self.decay_tau = measure, schedule, min_exit_layer, decay_tau
        self.anytime = resolve_anytime(anytime)
        self.exit_layers = exit_layers
        self.task = None if task is None else check_task_name(task)
        self.small_model = small_model
        self.allow_missing_fingerprint = allow_missing_fingerprint
        self.lambda_: float | None = None
        self.certificate: RiskCertificate | None = None
        self._calibration: dict = {}

    # ------------------------------------------------------------------ sklearn-style plumbing
    def get_params(self) -> dict:
        return {"eps": self.eps, "delta": self.delta, "method": self.method, "bound": self.bound, "risk": self.risk,
                "monotonize": self.monotonize, "measure": self.measure, "schedule": self.schedule,
                "min_exit_layer": self.min_exit_layer, "decay_tau": self.decay_tau, "anytime": self.anytime,
                "exit_layers": self.exit_layers,
                "task": self.task, "allow_missing_fingerprint": self.allow_missing_fingerprint}

    @property
    def is_fitted(self) -> bool:
        return self.lambda_ is not None

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items() if v is not None and v is not False)
        fitted = f", lambda_={self.lambda_:.4g}" if self.is_fitted else ""
        return f"RiskControlled({params}{fitted})"

    # ------------------------------------------------------------------ fitting
    def fit(self, lambdas, losses, loss_bounds=None) -> "RiskControlled":
        """Choose λ̂ from a loss matrix, ``losses[k, j]`` = loss of example j at ``lambdas[k]``.

        ``loss_bounds`` defaults to the range of ``risk`` ((−1, 1) for the unrestricted gap,
        (0, 1) otherwise). Returns ``self`` with ``lambda_`` and ``certificate``.
        """
        return self._fit(lambdas, losses, loss_bounds, metadata={})

    def fit_table(self, table: LossTable) -> "RiskControlled":
        """Choose λ̂ from a :class:`LossTable`, recording its model fingerprint, task and early-exit settings."""
        if not isinstance(table, LossTable):
            raise ValueError(f"fit_table expects a LossTable, got {type(table).__name__}; use fit(lambdas, losses) "
                             "for a raw matrix.")
        if self.risk not in table.losses:
            raise ValueError(f"This loss table has no {self.risk!r} losses (it has {sorted(table.losses)}): pick one "
                             "of those with risk=..., or rebuild the table with them.")
        return self._fit(table.lambdas, table.losses[self.risk], table.bounds[self.risk], metadata=table.metadata)

    def _settings(self, metadata: dict) -> dict:
        """Early-exit settings: the table's metadata, checked against what the user passed."""
        out = {}
        user_measure = None if self.measure is None else measure_name(self.measure)
        for key, user, default in (("measure", user_measure, None), ("schedule", self.schedule, "constant"),
                                   ("min_exit_layer", self.min_exit_layer, 1), ("decay_tau", self.decay_tau, 4.0)):
            stored = metadata.get(key)
            if stored is not None and user is not None and stored != user:
                raise ValueError(f"The losses were computed with {key}={stored!r} but this RiskControlled asks for "
                                 f"{key}={user!r}: a threshold calibrated for one setting is not valid for another. "
                                 f"Drop {key}= or recalibrate with {key}={user!r}.")
            out[key] = user if user is not None else (stored if stored is not None else default)
        stored_anytime = metadata.get("anytime")
        user_anytime = None if self.anytime is None else self.anytime.to_dict()
        if user_anytime is not None and metadata and stored_anytime != user_anytime:
            raise ValueError(f"The losses were computed with anytime={stored_anytime!r} but this RiskControlled asks "
                             f"for anytime={user_anytime!r}: a threshold calibrated for one decoder is not valid for "
                             "another. Drop anytime= or recollect with `collect --anytime poe`.")
        out["anytime"] = user_anytime if user_anytime is not None else stored_anytime
        # None = every layer checked (also what a table without the key was collected with)
        stored_layers, user_layers = metadata.get("exit_layers"), self.exit_layers
        if user_layers is not None and metadata and stored_layers != list(user_layers):
            raise ValueError(f"The losses were computed with exit_layers={stored_layers!r} but this RiskControlled "
                             f"asks for exit_layers={list(user_layers)!r}: λ̂ holds only for the exits it was "
                             "calibrated with. Drop exit_layers= or recollect with `collect --exit-layers ...`.")
        out["exit_layers"] = list(user_layers) if user_layers is not None else stored_layers
        return out

    def _fit(self, lambdas, losses, loss_bounds, metadata: dict) -> "RiskControlled":
        if self.task is not None and metadata.get("task") not in (None, self.task):
            raise ValueError(f"task={self.task!r} but these losses were collected on task {metadata['task']!r}: a "
                             "threshold calibrated on one task carries no guarantee on another. Drop task= or use "
                             f"{self.task!r}'s table.")
        strategy = metadata.get("strategy")
        if strategy not in (None, "early_exit", "bild"):
            raise ValueError(f"This loss table calibrates a {strategy!r} decoding threshold, which RiskControlled "
                             "cannot turn into a policy: it supports early exit and BiLD.")
        if strategy == "bild":
            given = [k for k in ("measure", "schedule", "min_exit_layer", "decay_tau", "anytime", "exit_layers")
                     if getattr(self, k) is not None]
            if given:
                raise ValueError(f"This loss table calibrates BiLD's rollback threshold, but {', '.join(given)}= "
                                 "(early-exit settings) were given: drop them.")
            settings = {"measure": None, "strategy": "bild", "policy": dict(metadata["policy"])}
        else:
            settings = self._settings(metadata)
        bounds = tuple(loss_bounds) if loss_bounds is not None else DEFAULT_LOSS_BOUNDS[self.risk]
        # the lengths the losses were decoded with: the guarantee is for outputs made the same way
        lengths = {k: int(metadata[k]) for k in ("max_new_tokens", "max_input_length") if metadata.get(k) is not None}
        sel = select(self.method, lambdas, losses, self.eps, self.delta, bound=self.bound, loss_bounds=bounds,
                     monotonize=self.monotonize)
        pos = sel.position
        emp, stat = float(sel.empirical_risk[pos]), float(sel.statistic[pos])
        p_value = None
        risk_bound = stat
        if self.method == "ltt":
            p_value = stat
            risk_bound = float(hoeffding_bentkus_ucb(emp, sel.n, self.delta, *bounds))
        bound_name = {"ucb": self.bound, "ltt": "hoeffding_bentkus"}.get(self.method)
        asc = slice(None, None, -1)
        self.certificate = RiskCertificate(
            eps=self.eps, delta=self.delta, method=self.method, bound=bound_name, risk=self.risk,
            monotonize=self.monotonize, n=sel.n, lambda_hat=sel.lambda_hat, empirical_risk=emp,
            risk_bound=risk_bound, p_value=p_value, feasible=sel.feasible,
            guarantee=guarantee_text(self.method, self.eps, self.delta, self.risk), loss_bounds=bounds,
            grid=sel.lambdas[asc].tolist(), grid_empirical_risk=sel.empirical_risk[asc].tolist(),
            grid_statistic=sel.statistic[asc].tolist(), model_fingerprint=metadata.get("model_fingerprint"),
            task=metadata.get("task"), measure=settings["measure"], **lengths)
        self.lambda_ = sel.lambda_hat
        self._calibration = {**settings, "model_fingerprint": metadata.get("model_fingerprint"),
                             "task": metadata.get("task"), **lengths}
        if not sel.feasible:
            warnings.warn(infeasible_message(self.method, self.eps, self.delta, sel, bounds[1]), UserWarning,
                          stacklevel=3)
        return self

    # ------------------------------------------------------------------ the early_exit= protocol
    def bind(self, model):
        """Return the bound :class:`~hf_safe_exit.policy.EarlyExit` with threshold λ̂ for ``model``.

        Fitted: checks the model fingerprint (if calibrated with one). Unfitted: finds the
        model's stored :class:`LossTable` (see :func:`find_calibration`), fits for this
        (ε, δ, method, bound, risk, monotonize) and caches the fit per model and table.

        A fitted BiLD calibration returns :meth:`bild` instead (``model`` is the large model).
        """
        fingerprint = model_fingerprint(model)
        if self.is_bild:
            self._check_fingerprint(fingerprint)
            return self.bild()
        fitted = self if self.is_fitted else fit_from_stored(self, model, fingerprint)
        if fitted.is_bild:
            raise ValueError("The calibration stored with this model is for BiLD's rollback threshold: fit it "
                             "with RiskControlled(eps=..., small_model=small).fit_table(table) and pass that as "
                             "early_exit=.")
        return fitted._bind_fitted(model, fingerprint)

    @property
    def generation_settings(self) -> dict:
        """``max_new_tokens`` / ``max_input_length`` the calibration decoded with (empty if unknown).

        The guarantee is stated for outputs produced the same way: decode with these lengths.
        """
        return {k: self._calibration[k] for k in ("max_new_tokens", "max_input_length") if k in self._calibration}

    # ------------------------------------------------------------------ BiLD's rollback threshold
    @property
    def is_bild(self) -> bool:
        """Whether this was fitted on a BiLD table (λ̂ is a rollback threshold, λ = exp(−α_RB))."""
        return self.is_fitted and self._calibration.get("strategy") == "bild"

    def bild(self, small_model=None, *, small_tokenizer=None):
        """The calibrated BiLD policy: ``BiLD.from_lambda(small_model, λ̂, ...)`` (the table's fallback, draft length).

        ``small_model`` defaults to the one given to the constructor; its fingerprint must match the
        small model the losses were collected with.
        """
        from ..decoding.bild import BiLD

        if not self.is_fitted:
            raise ValueError("This RiskControlled is not fitted: call fit_table(table) on a BiLD loss table (from "
                             "`hf-safe-exit collect --strategy bild`) first.")
        if not self.is_bild:
            raise ValueError("This RiskControlled was calibrated for early exit, not for BiLD: use it as "
                             "early_exit=rc (or rc.bind(model)), or fit it on a table from `collect --strategy bild`.")
        small = self.small_model if small_model is None else small_model
        policy = self._calibration["policy"]
        expected = policy.get("small_model")
        if small is None:
            raise ValueError(f"This is a BiLD calibration: it needs the small (draft) model it was collected with "
                             f"(fingerprint {expected}): pass RiskControlled(..., small_model=small) or "
                             "rc.bild(small).")
        check_fingerprint(expected, model_fingerprint(small), self.allow_missing_fingerprint, "The BiLD calibration",
                          role="small model", other_fix="Pass that small model, or recollect with `hf-safe-exit "
                          "collect --strategy bild --small-model ...`")
        return BiLD.from_lambda(small, float(self.lambda_), fallback=float(policy["fallback"]),
                                max_draft_len=int(policy["max_draft_len"]), small_tokenizer=small_tokenizer)

    @property
    def decode(self):
        """For a BiLD calibration only: ``generate(large, early_exit=rc)`` decodes with :meth:`bild`.

        An early-exit calibration has no ``decode`` (``AttributeError``): ``generate`` then binds it.
        """
        if not self.is_bild:
            raise AttributeError("decode: only a fitted BiLD calibration decodes; an early-exit one is bound with "
                                 "bind(model)")

        def decode(large_model, *args, **generate_kwargs):
            return self.bind(large_model).decode(large_model, *args, **generate_kwargs)

        return decode

    def _check_fingerprint(self, fingerprint: str) -> None:
        """Raise unless the calibration was made for the model with ``fingerprint`` (or the user opted out)."""
        check_fingerprint(self._calibration.get("model_fingerprint"), fingerprint, self.allow_missing_fingerprint,
                          "This RiskControlled", other_fix="Recalibrate on this model. " + _HOW_TO_CALIBRATE)

    def _bind_fitted(self, model, fingerprint: str) -> EarlyExit:
        self._check_fingerprint(fingerprint)
        cal = self._calibration
        measure = self.measure if isinstance(self.measure, ConfidenceMeasure) else cal.get("measure")
        if measure is None:
            raise ValueError("Unknown confidence measure: the losses were given without metadata, so say which measure "
                             "they were computed with, e.g. RiskControlled(..., measure='softmax').")
        return EarlyExit(threshold=float(self.lambda_), measure=measure, schedule=cal["schedule"],
                         decay_tau=float(cal["decay_tau"]), min_exit_layer=int(cal["min_exit_layer"]),
                         anytime=resolve_anytime(cal.get("anytime")), exit_layers=cal.get("exit_layers"),
                         certificate=self.certificate).bind(model)

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        if not self.is_fitted:
            raise ValueError("This RiskControlled is not fitted: call fit(...) or fit_table(...) before saving it.")
        params = self.get_params()
        params["measure"] = None if self.measure is None else measure_name(self.measure)
        params["anytime"] = None if self.anytime is None else self.anytime.to_dict()
        params["exit_layers"] = None if self.exit_layers is None else list(self.exit_layers)
        params.pop("allow_missing_fingerprint")  # a choice of whoever loads it, not part of the calibration
        from .. import __version__
        return {"format_version": FORMAT_VERSION, "hf_safe_exit_version": __version__, "params": params,
                "lambda_": self.lambda_, "calibration": dict(self._calibration),
                "certificate": self.certificate.to_dict()}

    def save_pretrained(self, save_directory) -> str:
        """Write ``save_directory/risk_control.json`` (λ̂, certificate, settings, model fingerprint)."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(os.fspath(save_directory), RISK_CONTROL_FILENAME)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, ensure_ascii=False)
        return path

    @classmethod
    def from_dict(cls, data: dict, path=None, *, allow_missing_fingerprint: bool = False) -> "RiskControlled":
        """The fitted policy a ``risk_control.json`` (``data``, read from ``path``) describes, after checking it.

        Raises :class:`~hf_safe_exit.errors.CorruptFileError` for an incomplete or malformed calibration and
        :class:`~hf_safe_exit.errors.InconsistentCalibrationError` for one that contradicts itself (λ̂ other than
        its certificate's; see :mod:`hf_safe_exit.risk.integrity`), naming ``path``.
        """
        certificate = check_calibration_dict(data, path)
        try:
            obj = cls(**{**data["params"], "allow_missing_fingerprint": allow_missing_fingerprint})
        except (TypeError, ValueError) as err:
            raise CorruptFileError.about(path if path is not None else RISK_CONTROL_FILENAME,
                                         f"its params are not those of a RiskControlled ({err})",
                                         "Write it again with `hf-safe-exit calibrate` or RiskControlled.save_pretrained"
                                         ) from None
        obj.lambda_ = float(data["lambda_"])
        obj.certificate = certificate
        obj._calibration = dict(data["calibration"])
        return obj

    @classmethod
    def from_pretrained(cls, path_or_repo_id, task: str | None = None, *, allow_missing_fingerprint: bool = False,
                        **hub_kwargs) -> "RiskControlled":
        """Load a fitted calibration: a directory holding ``risk_control.json`` (or the file itself), a model folder
        (its ``calibration/<task>/risk_control.json``; ``task`` defaults to the model's primary task, see
        :mod:`hf_safe_exit.risk.store`), else a Hub repo's ``risk_control.json`` (``subfolder=`` as in HF).

        The file is checked (:meth:`from_dict`); where the loss table is stored beside it
        (``early_exit_calibration.npz``), refitting that table must give the file's λ̂, else
        :class:`~hf_safe_exit.errors.InconsistentCalibrationError`. ``allow_missing_fingerprint``: see the class.
        """
        path = os.fspath(path_or_repo_id)
        if os.path.isdir(path):
            path = os.path.join(path, RISK_CONTROL_FILENAME)
            if task is not None or not os.path.isfile(path):
                stored = find_stored(os.fspath(path_or_repo_id), task)  # checks the file and its table
                if stored.controlled_json is None:
                    raise MissingCalibrationError(
                        f"No {RISK_CONTROL_FILENAME} in {path_or_repo_id!r} for task {stored.task!r} (only its loss "
                        "table): fit one with RiskControlled(eps, ...).fit_table(LossTable.load(...)).")
                return cls.from_dict(stored.controlled_json, stored.controlled_path,
                                     allow_missing_fingerprint=allow_missing_fingerprint)
        elif not os.path.isfile(path):
            try:
                from huggingface_hub import hf_hub_download

                path = hf_hub_download(repo_id=path, filename=RISK_CONTROL_FILENAME, **hub_kwargs)
            except Exception as err:  # network, missing repo or file, invalid id: all mean "not found"
                raise MissingCalibrationError(
                    f"Could not load a risk control from {path_or_repo_id!r}: it is not a local directory or file, "
                    f"and downloading {RISK_CONTROL_FILENAME} from the Hub repo failed ({type(err).__name__}: {err}). "
                    "Pass the directory you gave save_pretrained(), or a Hub repo id that holds the file.") from err
        beside = os.path.join(os.path.dirname(path), CALIBRATION_FILENAME)
        table = LossTable.load(beside) if os.path.isfile(beside) else None
        data = read_calibration_json(path, table, beside if table is not None else None)
        return cls.from_dict(data, path, allow_missing_fingerprint=allow_missing_fingerprint)
