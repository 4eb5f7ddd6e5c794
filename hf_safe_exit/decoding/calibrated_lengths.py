"""Decode as the calibration did: its output and input lengths, applied to a ``generate`` call.

A risk-controlled λ̂ is guaranteed for outputs made the way its losses were: at most
``max_new_tokens`` new tokens, from inputs truncated to ``max_input_length`` tokens (both recorded in
the certificate, :class:`~hf_safe_exit.risk.RiskCertificate`). Without a length of its own, HF's
``generate`` would stop at its default ``max_length`` (20) instead. So, when the policy carries a
certificate with these lengths:

* a call that sets no length (no ``max_new_tokens``/``max_length``, neither as keywords nor on the
  call's ``generation_config``) decodes ``max_new_tokens`` new tokens, the calibration's;
* a call, or the model's ``generation_config``, that sets another length keeps the call's (or the
  calibration's, over the model's stored default), with a warning naming both values;
* an input longer than ``max_input_length`` (padding excluded) is decoded as given, with a warning:
  the tokenizer call, not ``generate``, truncates; truncate with ``truncation=True,
  max_length=<max_input_length>``.

Each warning is shown once per process for each (setting, calibrated value, other value): a loop over a
data set is not flooded. :func:`clear_warned` forgets which were shown (tests; a notebook that wants them again).
"""

from __future__ import annotations

import warnings

__all__ = ["apply_calibrated_lengths", "clear_warned"]

_WARNED: set[tuple] = set()


def clear_warned() -> None:
    """Forget the warnings shown so far: the next call that departs from a calibration warns again."""
    _WARNED.clear()


def _warn_once(key: tuple, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=4)


def _new_tokens(max_new_tokens, max_length, prompt_length: int):
    """The number of new tokens a length setting allows (``max_new_tokens`` wins over ``max_length``, as in HF)."""
    if max_new_tokens is not None:
        return int(max_new_tokens), f"max_new_tokens={max_new_tokens}"
    if max_length is not None:
        return int(max_length) - prompt_length, f"max_length={max_length} ({int(max_length) - prompt_length} new tokens)"
    return None, None


def _longest_input(inputs, kwargs) -> int | None:
    ids = inputs if inputs is not None else kwargs.get("input_ids")
    if ids is None or not hasattr(ids, "shape") or len(ids.shape) != 2:
        return None  # inputs_embeds or another modality: no token count to compare
    mask = kwargs.get("attention_mask")
    if mask is not None and tuple(mask.shape) == tuple(ids.shape):
        return int(mask.sum(-1).max())
    return int(ids.shape[1])


def apply_calibrated_lengths(model, certificate, inputs, kwargs: dict) -> None:
    """Apply ``certificate``'s ``max_new_tokens`` to ``kwargs`` (a ``generate`` call's keywords) and warn, in place.

    Guarantees: a call that sets no length gets ``max_new_tokens`` = the calibration's; a call that sets another
    length keeps it and warns with both values; a model whose ``generation_config`` stores another length is
    overridden by the calibration, with a warning; an input longer than the calibration's ``max_input_length``
    warns. Does nothing for a certificate without lengths (or no certificate).
    """
    calibrated = getattr(certificate, "max_new_tokens", None)
    truncation = getattr(certificate, "max_input_length", None)
    if calibrated is not None:
        decoder_ids = kwargs.get("decoder_input_ids")
        prompt = int(decoder_ids.shape[-1]) if hasattr(decoder_ids, "shape") else 1
        asked, said = _new_tokens(kwargs.get("max_new_tokens"), kwargs.get("max_length"), prompt)
        where = "this call"
        if asked is None and kwargs.get("generation_config") is not None:
            config = kwargs["generation_config"]
            asked, said = _new_tokens(config.max_new_tokens, config.max_length, prompt)
            where = "this call's generation_config"
        if asked is None:
            stored = getattr(model, "generation_config", None)
            stored_new, stored_said = _new_tokens(getattr(stored, "max_new_tokens", None),
                                                  getattr(stored, "max_length", None), prompt)
            if stored_new is not None and stored_new != calibrated:
                _warn_once(("model", stored_said, calibrated),
                           f"model.generation_config sets {stored_said}, but the risk-controlled policy was calibrated "
                           f"with max_new_tokens={calibrated}: decoding with the calibration's {calibrated}, for which "
                           f"the guarantee holds. Pass max_new_tokens={stored_new} in the call to decode with the "
                           f"model's stored length anyway ({'longer' if stored_new > calibrated else 'shorter'} "
                           "outputs than calibrated: the guarantee does not cover them).")
            kwargs["max_new_tokens"] = calibrated
        elif asked != calibrated:
            _warn_once(("call", said, calibrated),
                       f"{where} sets {said}, but the risk-controlled policy was calibrated with max_new_tokens="
                       f"{calibrated}: the guarantee holds for outputs made like the calibration's. Drop the length "
                       f"(the calibration's {calibrated} is then used) or recalibrate with --max-new-tokens {asked}.")
    if truncation is not None:
        longest = _longest_input(inputs, kwargs)
        if longest is not None and longest > truncation:
            _warn_once(("input", truncation),
                       f"an input of {longest} tokens is longer than the calibration's max_input_length={truncation}: "
                       "the guarantee holds for inputs truncated like the calibration's. Tokenize with "
                       f"truncation=True, max_length={truncation} (this warning is shown once per process).")
