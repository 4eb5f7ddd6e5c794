"""An early-exit policy kept on a ``GenerationConfig`` (``generation_config.early_exit``).

In memory the attribute may hold a policy object; on disk (``generation_config.json``) it holds a JSON
spec, ``{"type": "EarlyExit", "threshold": 0.9, "measure": "softmax", ...}`` or
``{"type": "RiskControlled", "eps": 0.05, "task": "cnndm", ...}``. An early-exit model's ``generate``
honours either (:func:`policy_from_config`); a model that was not switched on refuses it
(:mod:`hf_safe_exit.decoding.enable`), since HF's own ``generate`` would silently ignore it.

Only what can be rebuilt from the checkpoint is stored: an ``EarlyExit`` with a named measure, or a
``RiskControlled`` by its parameters (it refits from the calibration the model folder stores). A stored value that
is no such spec is refused with :class:`~hf_safe_exit.errors.InvalidStoredPolicyError`, whose one line names
``generation_config.json`` and how to fix it, never dropped.
"""

from __future__ import annotations

import os

from ..errors import InvalidStoredPolicyError, read_json_object

__all__ = ["POLICY_ATTRIBUTE", "InvalidStoredPolicyError", "policy_from_config", "policy_to_dict",
           "check_saved_generation_config"]

POLICY_ATTRIBUTE = "early_exit"
GENERATION_CONFIG_NAME = "generation_config.json"
_STORED_FIX = (f"Fix or remove \"early_exit\" in the model's {GENERATION_CONFIG_NAME}, or set "
               "model.generation_config.early_exit to hf_safe_exit.EarlyExit(...) or "
               "hf_safe_exit.RiskControlled(eps=...) (None: no stored policy)")


def _invalid_stored(spec, problem: str) -> InvalidStoredPolicyError:
    """The refusal of a stored policy spec: what is wrong, in one line naming generation_config.json, and the fix."""
    return InvalidStoredPolicyError(" ".join(f"generation_config.early_exit = {spec!r} (the early-exit policy stored "
                                             f"in {GENERATION_CONFIG_NAME}) {problem.rstrip('.')}. {_STORED_FIX}."
                                             .split()))


def policy_to_dict(policy) -> dict:
    """The JSON spec of ``policy`` for ``generation_config.json``; raises if it cannot be rebuilt from disk."""
    from ..policy import EarlyExit
    from ..risk import RiskControlled

    if policy is False:  # stored "off" switch
        return False
    if isinstance(policy, dict):
        policy_from_dict(policy)  # validate
        return dict(policy)
    if isinstance(policy, EarlyExit):
        _check_named(policy.config, "EarlyExit")
        return {"type": "EarlyExit", "threshold": policy.threshold, **policy.config.to_dict()}
    if isinstance(policy, RiskControlled):
        if policy.small_model is not None or policy.is_bild:
            raise InvalidStoredPolicyError("a BiLD calibration cannot be stored on generation_config: it needs the "
                                           "small model at run time; pass early_exit= in each call.")
        # a fitted request is stored with the configuration it was fitted for (refitted, it must find that one)
        config = policy.calibration.config if policy.is_fitted else policy.config
        if config is not None:
            _check_named(config, "RiskControlled")
        spec = {"type": "RiskControlled", **policy.controller().get_params(), "task": policy.task,
                "config": None if config is None else config.to_dict(),
                "allow_missing_fingerprint": policy.allow_missing_fingerprint}
        if policy.is_fitted and spec["task"] is None:  # refit on the task it was fitted for, never the primary one
            spec["task"] = policy.certificate.task
            if spec["task"] is None:
                raise InvalidStoredPolicyError(
                    "a RiskControlled fitted on losses without a task cannot be saved on generation_config: it would "
                    "be refitted on whatever the folder stores. Store its table with hf_safe_exit.risk."
                    "store_calibration(folder, table=..., task=...) and save RiskControlled(eps, task=...).")
        return spec
    raise InvalidStoredPolicyError(
        f"generation_config.early_exit holds a {type(policy).__name__}, which cannot be saved: store an "
        "hf_safe_exit.EarlyExit or an hf_safe_exit.RiskControlled, or pass early_exit= in each generate call.")


def _check_named(config, kind: str) -> None:
    from ..confidence import ConfidenceMeasure

    if isinstance(config.measure, ConfidenceMeasure):
        raise InvalidStoredPolicyError(f"generation_config.early_exit = {kind}(measure={config.measure!r}) cannot be "
                                       "saved: only a named measure can. Use measure='<name>'.")


def policy_from_dict(spec: dict):
    """The policy a stored spec describes (``EarlyExit`` or ``RiskControlled``), validated."""
    from ..config import EarlyExitConfig, config_fields
    from ..policy import EarlyExit
    from ..risk import RiskControlled

    kind = spec.get("type") if isinstance(spec, dict) else None
    try:
        if kind == "EarlyExit":
            settings = {k: v for k, v in spec.items() if k not in ("type", "threshold")}
            return EarlyExit(spec.get("threshold", 0.9), config=EarlyExitConfig.from_dict(settings))
        if kind == "RiskControlled":
            params = {k: v for k, v in spec.items() if k not in ("type", "config", *config_fields())}
            # specs written before the configuration object listed the settings flat, None meaning "the table's";
            # a partial list has no meaning now (a configuration is whole): it is refused rather than guessed
            flat = {k: spec[k] for k in config_fields() if spec.get(k) is not None}
            if flat:
                raise ValueError(f"it sets {sorted(flat)} outside \"config\" (written by an older hf_safe_exit): move "
                                 "the whole early-exit configuration into \"config\": {...}, or drop them to take the "
                                 "calibration's.")
            config = spec.get("config")
            return RiskControlled(**params, config=None if config is None else EarlyExitConfig.from_dict(config))
    except (TypeError, ValueError) as err:
        raise _invalid_stored(spec, f"is not a valid {kind}: {err}") from None
    raise _invalid_stored(spec, "names no policy type: it needs \"type\": one of ['EarlyExit', 'RiskControlled']")


def policy_from_config(generation_config):
    """The policy stored on ``generation_config`` (rebuilt from its JSON spec if need be), or None."""
    stored = getattr(generation_config, POLICY_ATTRIBUTE, None)
    if stored is None or stored is False:
        return stored
    if isinstance(stored, dict):
        return policy_from_dict(stored)
    from ..decoding.bild import BiLD
    from ..policy import EarlyExitPolicy
    from ..risk import RiskControlled

    if isinstance(stored, (EarlyExitPolicy, RiskControlled, BiLD)):
        return stored
    raise _invalid_stored(stored, "is not an early-exit policy or the spec of one (a JSON object with a \"type\")")


def check_saved_generation_config(model) -> None:
    """Raise when the ``generation_config.json`` saved with ``model`` (a local folder) was not loaded.

    transformers reads an unreadable ``generation_config.json`` (truncated, not JSON) as no file at all and builds
    the generation config from ``config.json`` (``_from_model_config``): a policy stored in it would be dropped
    without a word, and the model would decode in full. Such a file gets
    :class:`~hf_safe_exit.errors.InvalidStoredPolicyError` naming it; a readable one that holds a policy transformers
    did not load, too. Costs an attribute read unless the config came from ``config.json``.
    """
    config = getattr(model, "generation_config", None)
    folder = os.fspath(getattr(model, "name_or_path", "") or "")
    if not getattr(config, "_from_model_config", False) or not folder:
        return
    path = os.path.join(folder, GENERATION_CONFIG_NAME)
    if not os.path.isfile(path):
        return
    fix = ("Fix it or write it again (model.generation_config.save_pretrained(folder)); delete it to decode "
           "without a stored policy")
    data = read_json_object(path, what="a generation config (transformers ignored it and used default settings, "
                            "dropping any early-exit policy stored there)", fix=fix, cls=InvalidStoredPolicyError)
    if POLICY_ATTRIBUTE in data and data[POLICY_ATTRIBUTE] is not None:
        raise InvalidStoredPolicyError.about(path, "holds an early-exit policy that transformers did not load (the "
                                             "generation config in use was built from config.json)", fix)
