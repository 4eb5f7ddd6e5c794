"""What a calibration belongs to: the provenance a loss table records and every use of it with a model checks.

A loss table or calibration records what its losses depend on (:func:`record_provenance`): the fingerprint of
the backbone (:func:`hf_safe_exit.model_fingerprint`: every weight, in its dtype), the dtype of the weights, and,
when the measure reads one, the fingerprint of the meta-classifier head. BiLD's small model is recorded in its
policy settings. Used with a model, each must be that model's: another one is refused
(:class:`~hf_safe_exit.errors.ModelMismatchError`, saying when a cast is the difference), and so is none at all
(:class:`~hf_safe_exit.errors.MissingFingerprintError`), since then nothing shows that the guarantee belongs to
the model, unless the user vouches for it (``allow_missing_fingerprint=True``, CLI ``--allow-missing-fingerprint``).
"""

from __future__ import annotations

import re

from ..errors import MissingFingerprintError, ModelMismatchError

__all__ = ["NO_FINGERPRINT_FIX", "PROVENANCE_KEYS", "check_fingerprint", "check_model_matches", "check_provenance",
           "is_dtype_name", "is_fingerprint", "meta_head_read", "record_provenance"]

PROVENANCE_KEYS = ("model_fingerprint", "dtype", "meta_head_fingerprint")
# what hf_safe_exit.model_fingerprint / meta_head_fingerprint give is 16 of these; hand-made tables may hold fewer
_FINGERPRINT = re.compile(r"[0-9a-f]{1,64}")


def is_fingerprint(value) -> bool:
    """Whether ``value`` can be a recorded fingerprint: lowercase hex digits (16 from
    :func:`~hf_safe_exit.model_fingerprint` and :func:`~hf_safe_exit.meta_head_fingerprint`)."""
    return isinstance(value, str) and _FINGERPRINT.fullmatch(value) is not None


def is_dtype_name(value) -> bool:
    """Whether ``value`` is what :func:`~hf_safe_exit.fingerprint.weights_dtype` records: a floating-point torch
    dtype's name (``"float32"``, ``"bfloat16"``, ...) or ``"mixed"``."""
    if value == "mixed":
        return True
    import torch

    dtype = getattr(torch, value, None) if isinstance(value, str) and value.isidentifier() else None
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point and str(dtype) == f"torch.{value}"

NO_FINGERPRINT_FIX = (
    "Use a loss table from `hf-safe-exit collect` (it records the model), add "
    "metadata={'model_fingerprint': hf_safe_exit.model_fingerprint(model)} to a table you build, or, if you are "
    "sure these losses were collected on this model, opt out with RiskControlled(..., allow_missing_fingerprint=True) "
    "(CLI: --allow-missing-fingerprint)")


NO_HEAD_FINGERPRINT_FIX = (
    "Use a loss table from `hf-safe-exit collect` (it records the head the meta measure read), add "
    "metadata={'meta_head_fingerprint': hf_safe_exit.meta_head_fingerprint(head)} to a table you build, or, if you are "
    "sure these losses were collected with this head, opt out with RiskControlled(..., allow_missing_fingerprint=True) "
    "(CLI: --allow-missing-fingerprint)")


def check_fingerprint(recorded: str | None, actual: str, allow_missing: bool, what: str, *, role: str = "model",
                      missing_fix: str = NO_FINGERPRINT_FIX, other_fix: str = "Recalibrate on this model",
                      key: str = "model_fingerprint", path=None, actual_source=None) -> None:
    """Return only if ``recorded`` (what the calibration ``what`` records) is ``actual`` (the ``role``'s fingerprint).

    ``recorded`` None: :class:`MissingFingerprintError` unless ``allow_missing``. Another fingerprint:
    :class:`ModelMismatchError`, always. The messages name both fingerprints and end with the fix; ``path``, the file
    ``what`` was read from, leads the message (``'<path>': ...``), and ``actual_source``, the file the ``role`` was read
    from (a meta head's), follows its fingerprint.
    """
    read = f", read from '{actual_source}'" if actual_source else ""
    if recorded is None:
        if not allow_missing:
            raise _refusal(MissingFingerprintError, path, f"{what} does not record which {role} it was calibrated for "
                           f"(no {key}), so nothing shows that its guarantee holds for this {role} (fingerprint "
                           f"{actual}{read})", missing_fix)
    elif recorded != actual:
        raise _refusal(ModelMismatchError, path, f"{what} was calibrated for another {role} (fingerprint {recorded}, "
                       f"this {role} is {actual}{read}): its guarantee does not transfer", other_fix)


def _refusal(cls, path, problem: str, fix: str):
    """``cls`` with ``problem`` and ``fix``, naming ``path`` first when there is one (then ``problem`` goes on
    in lower case: ``'<path>': the calibration was ...``)."""
    if path is None:
        return cls(f"{problem}. {fix.rstrip('.')}.")
    return cls.about(path, problem[:1].lower() + problem[1:], fix)


def meta_head_read(config, model):
    """The meta-classifier head that decoding ``model`` with the early-exit ``config`` reads, or None.

    A ``MetaConfidence`` given with its head reads that head; the measure ``"meta"`` reads the model's
    (:func:`~hf_safe_exit.confidence.find_meta_head`: attached, or saved with the model); other measures none.
    ``config`` must be resolved (no ``"auto"``)."""
    if config is None or config.measure_name != "meta":
        return None
    head = getattr(config.measure, "head", None)
    if head is not None:
        return head
    from ..confidence import find_meta_head

    return find_meta_head(model)


def record_provenance(model, config=None) -> dict:
    """What losses collected on ``model`` with the (resolved) early-exit ``config`` depend on, as table metadata:
    ``model_fingerprint``, ``dtype`` (of the weights) and, when the measure reads a meta head, ``meta_head_fingerprint``."""
    from ..fingerprint import meta_head_fingerprint, model_fingerprint, weights_dtype

    about = {"model_fingerprint": model_fingerprint(model), "dtype": weights_dtype(model)}
    head = meta_head_read(config, model)
    if head is not None:
        about["meta_head_fingerprint"] = meta_head_fingerprint(head)
    return about


def check_provenance(recorded: dict, model, config, *, allow_missing: bool, what: str, fingerprint: str | None = None,
                     missing_fix: str = NO_FINGERPRINT_FIX, other_fix: str = "Recalibrate on this model",
                     path=None) -> None:
    """Return only if what ``recorded`` (a table's metadata, a calibration's settings) says its losses depend on is
    ``model``'s with ``config``: the backbone's fingerprint (``fingerprint``: ``model``'s, when the caller has it),
    and the meta head's when ``config`` reads one (:func:`meta_head_read`). See :func:`check_fingerprint`; ``path``:
    the file ``recorded`` was read from, named by a refusal, as is the meta head's file when it was read from one."""
    from ..fingerprint import meta_head_fingerprint, model_fingerprint, weights_dtype

    actual = fingerprint if fingerprint is not None else model_fingerprint(model)
    stored = recorded.get("model_fingerprint")
    if stored is not None and stored != actual and recorded.get("dtype") not in (None, weights_dtype(model)):
        other_fix = (f"Its losses were collected with {recorded['dtype']} weights and this model's are "
                     f"{weights_dtype(model)}: a calibration holds only for the dtype it was collected in (float16 "
                     f"and bfloat16 copies alike need their own). Load the model in {recorded['dtype']}, or "
                     f"recalibrate in {weights_dtype(model)} (`hf-safe-exit collect --dtype ...`)")
    check_fingerprint(stored, actual, allow_missing, what, missing_fix=missing_fix, other_fix=other_fix, path=path)
    head = meta_head_read(config, model)
    if head is not None:
        check_fingerprint(recorded.get("meta_head_fingerprint"), meta_head_fingerprint(head), allow_missing, what,
                          path=path, actual_source=getattr(head, "source", None),
                          role="meta head", key="meta_head_fingerprint", missing_fix=NO_HEAD_FINGERPRINT_FIX,
                          other_fix="Use the meta head it was calibrated with (meta_head.safetensors saved with the "
                          "model), or recalibrate with this one")


def check_model_matches(table_or_metadata, model, *, allow_missing: bool = False, path=None) -> None:
    """Raise unless the table was collected on ``model`` (its provenance, see :mod:`hf_safe_exit.risk.provenance`).

    Another model's fingerprint (or meta head): :class:`ModelMismatchError`. None recorded:
    :class:`MissingFingerprintError`, unless ``allow_missing`` (the user vouches for the table). ``path``: the file
    the table was read from, which the refusal names.
    """
    from ..config import EarlyExitConfig

    meta = getattr(table_or_metadata, "metadata", table_or_metadata)
    # only the measure matters here (a custom measure's name cannot be rebuilt): does it read the meta head?
    config = EarlyExitConfig(measure="meta") if meta.get("strategy") != "bild" and meta.get("measure") == "meta" \
        else None
    check_provenance(meta, model, config, allow_missing=allow_missing, what="The results file", path=path,
                     missing_fix="Recollect it with `hf-safe-exit collect` on this model, or, if you know it was "
                     "collected on it, pass --allow-missing-fingerprint (allow_missing=True)",
                     other_fix="Run `hf-safe-exit collect` on this model, or pass the model it was collected on")
