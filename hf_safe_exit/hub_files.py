"""Files of a model's Hub repo, fetched on demand: where a model loaded by Hub id (``from_pretrained("user/repo")``)
keeps its calibration (:mod:`hf_safe_exit.risk.store`) and its meta head (:mod:`hf_safe_exit.confidence.meta`).

Each (repo, file) is looked up once per process (``generate`` binds its policy at every call, and a lookup is a
network round trip); :func:`clear_hub_cache` forgets them. A lookup has three outcomes: a local path (downloaded,
or from HF's cache), "the repo has no such file" (the Hub said so, or HF's cache recorded that it did), or "could
not ask" (offline with nothing cached, no access, no such repo). Callers choose what the last one means: the
calibration lookups treat it as "not there" (and then say no calibration was found, with the fix); the meta head
lookup raises it, because "no head" would let ``measure="auto"`` fall back silently to another measure.
"""

from __future__ import annotations

from .errors import HubFileError

__all__ = ["hub_file", "clear_hub_cache"]

_FILES: dict[tuple[str, str], str | None | HubFileError] = {}


def clear_hub_cache() -> None:
    """Forget every lookup (tests; after a repo changed)."""
    _FILES.clear()


def _absent_in_cache(repo_id: str, filename: str) -> bool:
    """Whether HF's cache recorded, on an earlier online lookup, that the repo has no such file."""
    try:
        from huggingface_hub import _CACHED_NO_EXIST, try_to_load_from_cache

        return try_to_load_from_cache(repo_id, filename) is _CACHED_NO_EXIST
    except Exception:  # noqa: BLE001 - an unusable cache knows nothing
        return False


def _lookup(repo_id: str, filename: str) -> str | None | HubFileError:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    try:
        return hf_hub_download(repo_id=repo_id, filename=filename)
    except HFValidationError:  # not a repo id (e.g. the path of a folder that was moved): no Hub repo, no file
        return None
    except EntryNotFoundError as err:
        if not isinstance(err, LocalEntryNotFoundError):  # the Hub answered: the repo has no such file
            return None
        cause: Exception = err  # offline and not in the cache: unknown
    except Exception as err:  # noqa: BLE001 - network, access, missing repo or revision: the file's fate is unknown
        cause = err
    if _absent_in_cache(repo_id, filename):
        return None
    detail = " ".join(str(cause).split())[:300]
    return HubFileError.about(f"hub:{repo_id}/{filename}", f"could not be looked up ({type(cause).__name__}: {detail})",
                              "Connect to the Hub (or log in for a private repo) and retry, or download the repo with "
                              "`hf download` and load the model from that folder")


def hub_file(repo_id: str, filename: str, *, strict: bool = False) -> str | None:
    """A local path to ``filename`` of the Hub repo ``repo_id``, or None when the repo has no such file.

    ``strict=False``: a repo that could not be asked also gives None. ``strict=True``: it raises
    :class:`~hf_safe_exit.errors.HubFileError` naming the repo, the file and the cause.
    """
    key = (repo_id, filename)
    if key not in _FILES:
        _FILES[key] = _lookup(repo_id, filename)
    found = _FILES[key]
    if isinstance(found, HubFileError):
        if strict:
            raise found
        return None
    return found
