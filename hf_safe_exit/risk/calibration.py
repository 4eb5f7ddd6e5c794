"""``Calibration``: a risk-controlled threshold tied to what it was calibrated for, and its file.

A :class:`~hf_safe_exit.risk.RiskController` knows losses only. A calibration adds what the guarantee depends on:
the decoding family the losses were collected with (an :class:`~hf_safe_exit.EarlyExitConfig`, or BiLD's settings),
the model (its fingerprint), the task and the lengths. It turns into the policy ``generate`` runs
(:meth:`Calibration.policy`), and it is stored as ``risk_control.json`` (:meth:`Calibration.save_pretrained`,
:meth:`Calibration.from_pretrained`), checked on load (:mod:`hf_safe_exit.risk.integrity`). The file carries the
digest of its content (:mod:`hf_safe_exit.digest`), so that an edit made after it was written is refused; a digest
is no defence against someone who edits the file and computes the digest again, which the content checks are for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

from ..confidence import AUTO, ConfidenceMeasure
from ..atomic import atomic_write
from ..config import EarlyExitConfig
from ..digest import with_digest
from ..errors import CalibrationFileError
from ..fingerprint import model_fingerprint
from .certificate import PARETO, RiskCertificate
from .configuration_table import CONFIGURATIONS_FILENAME, ConfigurationTable
from .controller import RiskController
from .integrity import FORMAT_VERSION, REQUEST_KEYS, check_calibration_dict
from .loss_table import CALIBRATION_FILENAME, LossTable
from .provenance import check_fingerprint, check_provenance
from .store import HOW_TO_CALIBRATE, RISK_CONTROL_FILENAME, MissingCalibrationError, find_stored, \
    read_calibration_json

__all__ = ["Calibration", "table_config"]

_LENGTHS = ("max_new_tokens", "max_input_length")
_UNKNOWN_MEASURE = ("Unknown confidence measure: these losses record no early-exit configuration, so say which one "
                    "they were computed with: RiskControlled(..., config=EarlyExitConfig(measure='softmax', ...)).")


def table_config(metadata: dict, asked: EarlyExitConfig | None = None) -> EarlyExitConfig | None:
    """The early-exit configuration a loss table's losses were collected with (None: the table does not say).

    A custom measure is recorded by its name only: when ``asked`` holds that measure's instance, the instance
    stands for the name (the caller vouches that it is the measure the losses were computed with)."""
    if metadata.get("measure") is None:
        return None
    custom = asked is not None and isinstance(asked.measure, ConfidenceMeasure) and \
        asked.measure_name == metadata["measure"]
    if custom:
        return replace(EarlyExitConfig.from_dict({**metadata, "measure": AUTO}, strict=False), measure=asked.measure)
    return EarlyExitConfig.from_dict(metadata, strict=False)


@dataclass(frozen=True)
class Calibration:
    """λ̂ (``threshold``) and its certificate, for one decoding family, model, task and lengths.

    ``config`` is the early-exit configuration (``None`` for a BiLD calibration, whose settings are ``bild``:
    ``fallback``, ``max_draft_len``, the small model's fingerprint). ``request`` is what was asked of the
    :class:`~hf_safe_exit.risk.RiskController` (ε, δ, method, bound, risk, monotonize).
    """

    threshold: float
    certificate: RiskCertificate
    request: dict
    # the decoding family the losses were collected with: one of the two is set
    config: EarlyExitConfig | None
    bild: dict | None = None
    # what else the guarantee holds for: the model (its weights, their dtype, the meta head the measure reads; see
    # hf_safe_exit.risk.provenance), the task, and the lengths decoded with (``generation_settings``)
    model_fingerprint: str | None = None
    dtype: str | None = None
    meta_head_fingerprint: str | None = None
    task: str | None = None
    lengths: dict = field(default_factory=dict)
    # where it was read from (a risk_control.json, or the loss table it was fitted on), for refusals to name: not part
    # of what it is (not compared, not written)
    source: str | None = field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, controller: RiskController, table, config: EarlyExitConfig | None = None, *,
            cost: str | None = None) -> "Calibration":
        """Fit ``controller`` on ``table`` and tie the result to the table's decoding family, model, task, lengths.

        ``config``: the configuration the caller means; it must be the table's (a threshold calibrated for one
        configuration is not valid for another), or stand in for a table that records none. A
        :class:`~hf_safe_exit.risk.ConfigurationTable` (``method="pareto"``, minimising ``cost``) gives the
        configuration Pareto Testing chose, at its threshold (Laufer-Goldshtein et al., ICLR 2023)."""
        if controller.method == PARETO or isinstance(table, ConfigurationTable):
            return cls._fit_configurations(controller, table, config, cost)
        meta = table.metadata
        strategy = meta.get("strategy")
        if strategy not in (None, "early_exit", "bild"):
            raise ValueError(f"This loss table calibrates a {strategy!r} decoding threshold, which hf_safe_exit cannot "
                             "turn into a policy: it supports early exit and BiLD.")
        bild = None
        if strategy == "bild":
            if config is not None:
                raise ValueError("This loss table calibrates BiLD's rollback threshold, but an early-exit config= was "
                                 "given: drop it.")
            bild, chosen = dict(meta["policy"]), None
        else:
            recorded = table_config(meta, config)
            if config is not None and recorded is not None and not config.accepts(recorded):
                raise ValueError(f"The losses were computed with {recorded.to_dict()} but config= asks for "
                                 f"{config.to_dict()}: a threshold calibrated for one early-exit configuration is not "
                                 "valid for another. Drop config= or recollect with it.")
            chosen = recorded if recorded is not None else config
            if chosen is not None and chosen.measure_name == "auto":
                raise ValueError(_UNKNOWN_MEASURE)
        about = {"model_fingerprint": meta.get("model_fingerprint"), "task": meta.get("task"),
                 "measure": None if chosen is None else chosen.measure_name,
                 **{k: int(meta[k]) for k in _LENGTHS if meta.get(k) is not None}}
        controller.fit_table(table, about=about)
        source = getattr(table, "source", None)  # set where a table was read from a file
        return cls(threshold=controller.threshold, certificate=controller.certificate,
                   request=controller.get_params(), config=chosen, bild=bild,
                   model_fingerprint=about["model_fingerprint"], dtype=meta.get("dtype"),
                   meta_head_fingerprint=meta.get("meta_head_fingerprint") if chosen is not None else None,
                   task=about["task"], lengths={k: about[k] for k in _LENGTHS if k in about},
                   source=None if source is None else os.fspath(source))

    @classmethod
    def _fit_configurations(cls, controller: RiskController, table, config, cost) -> "Calibration":
        """Pareto Testing's choice among ``table``'s configurations (the controller refuses any other pairing)."""
        if config is not None:
            raise ValueError("config= names one early-exit configuration, but method='pareto' chooses among the "
                             "table's configurations: drop config=.")
        meta = getattr(table, "metadata", {})
        about = {"model_fingerprint": meta.get("model_fingerprint"), "task": meta.get("task"),
                 **{k: int(meta[k]) for k in _LENGTHS if meta.get(k) is not None}}
        controller.fit_table(table, cost=cost, about=about)
        return cls(threshold=controller.threshold, certificate=controller.certificate,
                   request=controller.get_params(), config=controller.config,
                   model_fingerprint=about["model_fingerprint"], dtype=meta.get("dtype"),
                   meta_head_fingerprint=meta.get("meta_head_fingerprint"), task=about["task"],
                   lengths={k: about[k] for k in _LENGTHS if k in about}, source=getattr(table, "source", None))

    # ------------------------------------------------------------------ use
    @property
    def is_bild(self) -> bool:
        return self.bild is not None

    def check_model(self, model, *, allow_missing_fingerprint: bool = False, what: str | None = None,
                    fingerprint: str | None = None) -> None:
        """Raise unless this calibration was made for ``model``: its weights, their dtype and, for the meta measure,
        its meta head (see :mod:`hf_safe_exit.risk.provenance`); ``fingerprint``: ``model``'s, when the caller has
        it already. A refusal names the file the calibration was read from (``source``), when it was."""
        recorded = {"model_fingerprint": self.model_fingerprint, "dtype": self.dtype,
                    "meta_head_fingerprint": self.meta_head_fingerprint}
        if what is None:  # the refusal names the file first: say how the calibration comes from it
            what = "This calibration" if self.source is None else "The calibration it holds" if \
                os.path.basename(self.source) == RISK_CONTROL_FILENAME else "The calibration fitted on this loss table"
        check_provenance(recorded, model, self.config, allow_missing=allow_missing_fingerprint, what=what,
                         fingerprint=fingerprint, other_fix="Recalibrate on this model. " + HOW_TO_CALIBRATE,
                         path=self.source)

    def policy(self, model, *, small_model=None, small_tokenizer=None, allow_missing_fingerprint: bool = False,
               fingerprint: str | None = None):
        """What ``generate`` decodes ``model`` with: :class:`~hf_safe_exit.EarlyExit` at λ̂ with this certificate
        (not yet bound: ``generate`` binds it, once), or for a BiLD calibration ``BiLD.from_lambda(small_model, λ̂,
        ...)`` with the table's fallback and draft length. Checks the model's (and the small model's) fingerprint
        first."""
        self.check_model(model, allow_missing_fingerprint=allow_missing_fingerprint, fingerprint=fingerprint)
        if self.is_bild:
            return self.bild_policy(small_model, small_tokenizer=small_tokenizer,
                                    allow_missing_fingerprint=allow_missing_fingerprint)
        if self.config is None:
            raise ValueError(_UNKNOWN_MEASURE)
        from ..policy import EarlyExit

        return EarlyExit(self.threshold, config=self.config, certificate=self.certificate)

    def bild_policy(self, small_model, *, small_tokenizer=None, allow_missing_fingerprint: bool = False):
        """``BiLD.from_lambda(small_model, λ̂, ...)`` with the table's fallback and draft length, after checking that
        ``small_model`` is the one the losses were collected with."""
        from ..decoding.bild import BiLD

        expected = self.bild.get("small_model")
        if small_model is None:
            raise ValueError(f"This is a BiLD calibration: it needs the small (draft) model it was collected with "
                             f"(fingerprint {expected}): pass RiskControlled(..., small_model=small).")
        check_fingerprint(expected, model_fingerprint(small_model), allow_missing_fingerprint, "The BiLD calibration",
                          role="small model", other_fix="Pass that small model, or recollect with `hf-safe-exit "
                          "collect --strategy bild --small-model ...`")
        return BiLD.from_lambda(small_model, self.threshold, fallback=float(self.bild["fallback"]),
                                max_draft_len=int(self.bild["max_draft_len"]), small_tokenizer=small_tokenizer)

    @property
    def _provenance_extras(self) -> dict:
        """The weights' dtype and the meta head's fingerprint, where known (files before them lack them)."""
        extras = {"dtype": self.dtype, "meta_head_fingerprint": self.meta_head_fingerprint}
        return {k: v for k, v in extras.items() if v is not None}

    @property
    def generation_settings(self) -> dict:
        """``max_new_tokens`` / ``max_input_length`` the calibration decoded with (empty if unknown)."""
        return dict(self.lengths)

    # ------------------------------------------------------------------ the file
    def to_dict(self) -> dict[str, Any]:
        """The ``risk_control.json`` content (format 1: λ̂ under ``lambda_``, the settings under ``calibration``),
        with the digest of that content under ``digest`` (:func:`hf_safe_exit.digest.with_digest`)."""
        from .. import __version__

        if self.config is not None and isinstance(self.config.measure, ConfidenceMeasure):
            raise ValueError(f"a calibration with the custom measure {self.config.measure_name!r} cannot be written: "
                             "a file names its measure, and only the built-in ones can be rebuilt from a name. Keep "
                             "the fitted object in memory, or calibrate a built-in measure.")
        if self.is_bild:
            settings = {"strategy": "bild", "policy": dict(self.bild)}
        else:  # a fit on raw losses may not know its configuration yet (measure None: refused when decoding)
            settings = self.config.to_dict() if self.config is not None else {**EarlyExitConfig().to_dict(),
                                                                              "measure": None}
        return with_digest({"format_version": FORMAT_VERSION, "hf_safe_exit_version": __version__,
                            "params": {**self.request, "task": self.task}, "lambda_": self.threshold,
                            "calibration": {**settings, "model_fingerprint": self.model_fingerprint,
                                            **self._provenance_extras, "task": self.task, **self.generation_settings},
                            "certificate": self.certificate.to_dict()})

    @classmethod
    def from_dict(cls, data, path=None) -> "Calibration":
        """The calibration a ``risk_control.json`` (``data``, read from ``path``) describes, after checking it.

        Raises :class:`~hf_safe_exit.errors.CorruptFileError` for an incomplete or malformed file, or one edited after
        it was written (its digest), and :class:`~hf_safe_exit.errors.InconsistentCalibrationError` for one that
        contradicts itself, naming ``path`` (which the calibration keeps as ``source``, for later refusals to name).
        """
        certificate = check_calibration_dict(data, path)  # every field, the request and the settings included
        params, cal = data["params"], data["calibration"]
        request = {k: params[k] for k in REQUEST_KEYS if k in params}
        config = None if cal.get("strategy") == "bild" or cal.get("measure") is None else \
            EarlyExitConfig.from_dict(cal, strict=False)
        return cls(threshold=float(data["lambda_"]), certificate=certificate, request=request, config=config,
                   bild=dict(cal["policy"]) if cal.get("strategy") == "bild" else None,
                   model_fingerprint=cal.get("model_fingerprint"), dtype=cal.get("dtype"),
                   meta_head_fingerprint=cal.get("meta_head_fingerprint"), task=cal.get("task"),
                   lengths={k: v for k in _LENGTHS if (v := _length(cal, certificate, k)) is not None},
                   source=None if path is None else os.fspath(path))

    def save_pretrained(self, save_directory) -> str:
        """Write ``save_directory/risk_control.json``; returns its path. What is written passes the checks of reading
        it (:func:`~hf_safe_exit.risk.integrity.check_calibration_dict`): one that would not raises before writing."""
        path = os.path.join(os.fspath(save_directory), RISK_CONTROL_FILENAME)
        data = self.to_dict()
        try:  # a file we write is one we can read back
            check_calibration_dict(json.loads(json.dumps(data)), path)
        except CalibrationFileError as err:
            raise ValueError(f"This calibration cannot be written: reading it back would be refused ({err})") from None
        os.makedirs(save_directory, exist_ok=True)
        with atomic_write(path, encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, ensure_ascii=False)
        return path

    @classmethod
    def from_pretrained(cls, path_or_repo_id, task: str | None = None, *, revision: str | None = None,
                        subfolder: str | None = None) -> "Calibration":
        """Load a calibration: a directory holding ``risk_control.json`` (or the file itself), a model folder (its
        ``calibration/<task>/risk_control.json``; ``task`` defaults to the model's primary task), else a Hub repo at
        ``revision`` (default: its default branch): its root or ``subfolder``'s ``risk_control.json`` when ``task``
        is None and there is one, else its ``calibration/<task>/`` as in a model folder. Where the loss table is
        stored beside the file (for ``method="pareto"``, the configuration table), refitting it must give the file's
        certificate (:class:`~hf_safe_exit.errors.InconsistentCalibrationError` otherwise). A Hub that cannot be asked raises
        :class:`~hf_safe_exit.errors.HubFileError`; nothing there, :class:`MissingCalibrationError`."""
        path = os.fspath(path_or_repo_id)
        if os.path.isdir(path):
            path = os.path.join(path, RISK_CONTROL_FILENAME)
            if task is not None or not os.path.isfile(path):
                return cls._from_stored(find_stored(os.fspath(path_or_repo_id), task))
            beside, configurations = (os.path.join(os.path.dirname(path), name)
                                      for name in (CALIBRATION_FILENAME, CONFIGURATIONS_FILENAME))
        elif os.path.isfile(path):
            beside, configurations = (os.path.join(os.path.dirname(path), name)
                                      for name in (CALIBRATION_FILENAME, CONFIGURATIONS_FILENAME))
        elif os.path.isabs(path) or path.startswith(".") or path.count("/") > 1 or os.sep != "/" and os.sep in path:
            raise MissingCalibrationError.about(path, "no such file or folder (and not a Hub repo id)",
                                                f"Pass the folder you gave save_pretrained() (holding "
                                                f"{RISK_CONTROL_FILENAME}), a model folder, or a Hub repo id")
        else:  # a Hub repo id
            from ..hub_files import hub_file

            prefix = f"{subfolder.strip('/')}/" if subfolder else ""
            found = None if task is not None else hub_file(path, prefix + RISK_CONTROL_FILENAME, revision=revision)
            if found is None:
                return cls._from_stored(find_stored(path, task, revision=revision))
            path, beside, configurations = found, *(hub_file(path_or_repo_id, prefix + name, revision=revision)
                                                    for name in (CALIBRATION_FILENAME, CONFIGURATIONS_FILENAME))
        table = LossTable.load(beside) if beside is not None and os.path.isfile(beside) else None
        stacked = ConfigurationTable.load(configurations) if configurations is not None and \
            os.path.isfile(configurations) else None
        return cls.from_dict(read_calibration_json(path, table, beside if table is not None else None,
                                                   configurations=stacked), path)

    @classmethod
    def _from_stored(cls, stored) -> "Calibration":
        if stored.controlled_json is None:
            raise MissingCalibrationError(
                f"No {RISK_CONTROL_FILENAME} beside {stored.table_path} for task {stored.task!r} (only the loss table): fit "
                "one with RiskControlled(eps, ...).fit_table(LossTable.load(...)).")
        return cls.from_dict(stored.controlled_json, stored.controlled_path)


def _length(calibration: dict, certificate: RiskCertificate, key: str):
    """A length from the file's ``calibration`` section, else from its certificate (files of either age)."""
    value = calibration.get(key)
    return value if value is not None else getattr(certificate, key)
