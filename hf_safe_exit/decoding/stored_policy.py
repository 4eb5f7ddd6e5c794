"""An early-exit policy kept on a ``GenerationConfig`` (``generation_config.early_exit``).

In memory the attribute may hold a policy object; on disk (``generation_config.json``) it holds a JSON
spec, ``{"type": "EarlyExit", "threshold": 0.9, "measure": "softmax", ...}`` or
``{"type": "RiskControlled", "eps": 0.05, "task": "cnndm", ...}``. An early-exit model's ``generate``
honours either (:func:`policy_from_config`); a model that was not switched on refuses it
(:mod:`hf_safe_exit.decoding.enable`), since HF's own ``generate`` would silently ignore it.

Only what can be rebuilt from the checkpoint is stored: an ``EarlyExit`` with a named measure, or a
``RiskControlled`` by its parameters (it refits from the calibration the model folder stores).
"""

from __future__ import annotations

from dataclasses import fields

from ..errors import InvalidStoredPolicyError

__all__ = ["POLICY_ATTRIBUTE", "InvalidStoredPolicyError", "policy_from_config", "policy_to_dict"]

POLICY_ATTRIBUTE = "early_exit"


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
        if not isinstance(policy.measure, str):
            raise InvalidStoredPolicyError(f"generation_config.early_exit = EarlyExit(measure={policy.measure!r}) "
                                           "cannot be saved: only a named measure can. Use measure='<name>'.")
        spec = {f.name: getattr(policy, f.name) for f in fields(policy) if f.name != "certificate"}
        spec["anytime"] = None if policy.anytime is None else policy.anytime.to_dict()
        spec["exit_layers"] = None if policy.exit_layers is None else list(policy.exit_layers)
        return {"type": "EarlyExit", **spec}
    if isinstance(policy, RiskControlled):
        if policy.small_model is not None or policy.is_bild:
            raise InvalidStoredPolicyError("a BiLD calibration cannot be stored on generation_config: it needs the "
                                           "small model at run time; pass early_exit= in each call.")
        params = policy.get_params()
        if not all(v is None or isinstance(v, (str, int, float)) for k, v in params.items()
                   if k not in ("anytime", "exit_layers")):
            raise InvalidStoredPolicyError("a RiskControlled with a measure instance cannot be saved on "
                                           "generation_config: use measure='<name>'.")
        params["anytime"] = None if policy.anytime is None else policy.anytime.to_dict()
        params["exit_layers"] = None if policy.exit_layers is None else list(policy.exit_layers)
        if policy.is_fitted and params["task"] is None:  # refit on the task it was fitted for, never the primary one
            params["task"] = policy.certificate.task
            if params["task"] is None:
                raise InvalidStoredPolicyError(
                    "a RiskControlled fitted on losses without a task cannot be saved on generation_config: it would "
                    "be refitted on whatever the folder stores. Store its table with hf_safe_exit.risk."
                    "store_calibration(folder, table=..., task=...) and save RiskControlled(eps, task=...).")
        return {"type": "RiskControlled", **params}
    raise InvalidStoredPolicyError(
        f"generation_config.early_exit holds a {type(policy).__name__}, which cannot be saved: store an "
        "hf_safe_exit.EarlyExit or an hf_safe_exit.RiskControlled, or pass early_exit= in each generate call.")


def policy_from_dict(spec: dict):
    from ..policy import EarlyExit
    from ..risk import RiskControlled

    kinds = {"EarlyExit": EarlyExit, "RiskControlled": RiskControlled}
    kind = spec.get("type")
    if kind not in kinds:
        raise InvalidStoredPolicyError(f"generation_config.early_exit = {spec!r} names no policy type: it needs "
                                       f"\"type\": one of {sorted(kinds)}.")
    try:
        return kinds[kind](**{k: v for k, v in spec.items() if k != "type"})
    except TypeError as err:
        raise InvalidStoredPolicyError(f"generation_config.early_exit = {spec!r} is not a valid {kind}: {err}. "
                                       "Fix or remove it in generation_config.json.") from None


def policy_from_config(generation_config):
    """The policy stored on ``generation_config`` (rebuilt from its JSON spec if need be), or None."""
    stored = getattr(generation_config, POLICY_ATTRIBUTE, None)
    if stored is None or stored is False:
        return stored
    if isinstance(stored, dict):
        return policy_from_dict(stored)
    if callable(getattr(stored, "bind", None)) or callable(getattr(stored, "decode", None)):
        return stored
    raise InvalidStoredPolicyError(f"generation_config.early_exit = {stored!r} is not an early-exit policy: set it "
                                   "to hf_safe_exit.EarlyExit(...) or hf_safe_exit.RiskControlled(eps=...), or None.")
