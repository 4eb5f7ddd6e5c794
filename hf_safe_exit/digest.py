"""The content digest every file hf_safe_exit writes carries, so that an edit made after writing is refused.

A loss table, a ``risk_control.json``, an ``evaluation.json`` and each cell of a collect state record, under
``"digest"``, the SHA-256 of their content in a canonical form (:func:`content_digest`: JSON with sorted keys and
no whitespace, arrays by dtype, shape and bytes), computed when written. On reading, a file that has one must match
it (:func:`check_digest`); a file without one (written before digests, or built by hand) is read as before, and
its content checks are all that stand between it and use.

What this guards against: a hand edit, a script that rewrites one field, a copy torn or merged with another file,
bit rot. What it cannot: someone who edits the content *and* recomputes the digest with this function; the content
checks (λ̂ re-derived from its own statistics, the fingerprints, ranges) still apply to such a file, but a forger who
keeps every number consistent is beyond any check of a file alone.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from .errors import CorruptFileError

__all__ = ["DIGEST_KEY", "content_digest", "with_digest", "without_digest", "digest_matches", "check_digest"]

DIGEST_KEY = "digest"


def _feed(digest, value) -> None:
    if isinstance(value, np.ndarray):
        digest.update(f"ndarray|{value.dtype.str}|{value.shape}|".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        digest.update(b"{")
        for key in sorted(value):
            digest.update(json.dumps(str(key)).encode() + b":")
            _feed(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)) and any(isinstance(v, (np.ndarray, dict, list, tuple)) for v in value):
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    else:
        digest.update(json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True).encode())


def content_digest(content) -> str:
    """SHA-256 (hex) of ``content``: JSON-able values and numpy arrays, nested in dicts and lists; dict key order and
    JSON formatting do not matter, every value and array byte does. The key :data:`DIGEST_KEY` at the top level is
    left out (a file's digest does not cover itself)."""
    if isinstance(content, dict):
        content = without_digest(content)
    digest = hashlib.sha256()
    _feed(digest, content)
    return digest.hexdigest()


def with_digest(data: dict) -> dict:
    """``data`` with its :func:`content_digest` under :data:`DIGEST_KEY` (a new dict)."""
    return {**without_digest(data), DIGEST_KEY: content_digest(data)}


def without_digest(data: dict) -> dict:
    """``data`` less its :data:`DIGEST_KEY` (a new dict): the content the digest covers."""
    return {k: v for k, v in data.items() if k != DIGEST_KEY}


def digest_matches(data: dict) -> bool:
    """Whether ``data`` records no digest, or the one its content gives."""
    recorded = data.get(DIGEST_KEY)
    return recorded is None or (isinstance(recorded, str) and recorded == content_digest(data))


def check_digest(data: dict, path, what: str, fix: str) -> None:
    """Return if ``data`` records no digest or the one its content gives; else raise
    :class:`~hf_safe_exit.errors.CorruptFileError` naming ``path`` (``what``: the kind of file)."""
    if isinstance(data, dict) and not digest_matches(data):
        raise CorruptFileError.about(path, f"its content does not match the digest it was written with: {what} was "
                                     "edited (or damaged) after it was written", fix)
