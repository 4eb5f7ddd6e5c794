"""Which model a calibration belongs to: the fingerprint check every use of a calibration with a model makes.

A loss table or calibration records the fingerprint (:func:`hf_safe_exit.model_fingerprint`) of the model its
losses were collected on. Used with a model, it must be that model's: another model's is refused
(:class:`~hf_safe_exit.errors.ModelMismatchError`), and so is none at all
(:class:`~hf_safe_exit.errors.MissingFingerprintError`), since then nothing shows that the guarantee belongs to
the model, unless the user vouches for it (``allow_missing_fingerprint=True``, CLI ``--allow-missing-fingerprint``).
"""

from __future__ import annotations

from ..errors import MissingFingerprintError, ModelMismatchError

__all__ = ["NO_FINGERPRINT_FIX", "check_fingerprint", "check_model_matches"]

NO_FINGERPRINT_FIX = (
    "Use a loss table from `hf-safe-exit collect` (it records the model), add "
    "metadata={'model_fingerprint': hf_safe_exit.model_fingerprint(model)} to a table you build, or, if you are "
    "sure these losses were collected on this model, opt out with RiskControlled(..., allow_missing_fingerprint=True) "
    "(CLI: --allow-missing-fingerprint)")


def check_fingerprint(recorded: str | None, actual: str, allow_missing: bool, what: str, *, role: str = "model",
                      missing_fix: str = NO_FINGERPRINT_FIX, other_fix: str = "Recalibrate on this model") -> None:
    """Return only if ``recorded`` (what the calibration ``what`` records) is ``actual`` (the ``role``'s fingerprint).

    ``recorded`` None: :class:`MissingFingerprintError` unless ``allow_missing``. Another fingerprint:
    :class:`ModelMismatchError`, always. The messages name both fingerprints and end with the fix.
    """
    if recorded is None:
        if not allow_missing:
            raise MissingFingerprintError(
                f"{what} does not record which {role} it was calibrated for (no model_fingerprint), so nothing shows "
                f"that its guarantee holds for this {role} (fingerprint {actual}). {missing_fix.rstrip('.')}.")
    elif recorded != actual:
        raise ModelMismatchError(f"{what} was calibrated for another {role} (fingerprint {recorded}, this {role} is "
                                 f"{actual}): its guarantee does not transfer. {other_fix.rstrip('.')}.")


def check_model_matches(table_or_metadata, model, *, allow_missing: bool = False) -> None:
    """Raise unless the table was collected on ``model`` (same fingerprint; see :mod:`hf_safe_exit.risk.provenance`).

    Another model's fingerprint: :class:`ModelMismatchError`. None recorded: :class:`MissingFingerprintError`,
    unless ``allow_missing`` (the user vouches for the table).
    """
    from ..fingerprint import model_fingerprint

    meta = getattr(table_or_metadata, "metadata", table_or_metadata)
    check_fingerprint(meta.get("model_fingerprint"), model_fingerprint(model), allow_missing, "The results file",
                      missing_fix="Recollect it with `hf-safe-exit collect` on this model, or, if you know it was "
                      "collected on it, pass --allow-missing-fingerprint (allow_missing=True)",
                      other_fix="Run `hf-safe-exit collect` on this model, or pass the model it was collected on")
