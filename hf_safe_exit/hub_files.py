"""Files of a model's Hub repo, fetched on demand: where a model loaded by Hub id (``from_pretrained("user/repo")``)
keeps its calibration (:mod:`hf_safe_exit.risk.store`) and its meta head (:mod:`hf_safe_exit.confidence.meta`).

A lookup has three outcomes:

* a local path (downloaded, or from HF's cache);
* None: the repo has no such file (the Hub said so, HF's cache recorded that it did, or the name is no repo id);
* :class:`~hf_safe_exit.errors.HubFileError`, raised: the Hub could not be asked (offline with nothing cached, no
  access, no such repo or revision), so whether the file exists is unknown. Every caller treats this as an error,
  never as "no such file": "no calibration" or "no meta head" would let the caller fall back silently.

Lookups are made at a ``revision`` (a branch, tag or commit; None: the repo's default branch), which is part of
what is looked up: the files of two revisions are never mixed up. :func:`loaded_revision` is the commit a loaded
model's weights came from, when transformers recorded it.

Answers (a path, or "no such file") are kept per (repo, revision, file) for the process (``generate`` binds its
policy at every call, and a lookup is a network round trip); :func:`clear_hub_cache` forgets them. A failed lookup
is never kept: the next call asks again, so a brief offline spell costs errors while it lasts, not a stale answer.
"""

from __future__ import annotations

import re

from .errors import HubFileError

__all__ = ["HUB_FIX", "hub_file", "hub_path", "loaded_revision", "clear_hub_cache"]

_FILES: dict[tuple[str, str | None, str], str | None] = {}
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
HUB_FIX = ("Connect to the Hub (or log in for a private repo, or check the repo id and revision) and retry, or "
           "download the repo with `hf download` and load the model from that folder")


def clear_hub_cache() -> None:
    """Forget every lookup (tests; after a repo changed)."""
    _FILES.clear()


def hub_path(repo_id: str, filename: str | None = None, revision: str | None = None) -> str:
    """How messages name a Hub repo (or a file of it): ``hub:user/repo[@revision][/file]``."""
    at = f"@{revision}" if revision is not None else ""
    return f"hub:{repo_id}{at}" + (f"/{filename}" if filename else "")


def loaded_revision(model) -> str | None:
    """The commit hash ``model``'s weights were loaded from, when transformers recorded it, else None.

    transformers 5.15 records it as ``model.config._commit_hash`` for a model loaded from the Hub; 5.25 records no
    revision on the model (it drops ``_commit_hash``), and None (the repo's default branch) is all that is known.
    """
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    return commit if isinstance(commit, str) and _COMMIT.match(commit) else None


def _absent_in_cache(repo_id: str, filename: str, revision: str | None) -> bool:
    """Whether HF's cache recorded, on an earlier online lookup, that the repo has no such file."""
    try:
        from huggingface_hub import _CACHED_NO_EXIST, try_to_load_from_cache

        return try_to_load_from_cache(repo_id, filename, revision=revision) is _CACHED_NO_EXIST
    except Exception:  # noqa: BLE001 - an unusable cache knows nothing
        return False


def _lookup(repo_id: str, filename: str, revision: str | None) -> str | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    try:
        return hf_hub_download(repo_id=repo_id, filename=filename, revision=revision)
    except HFValidationError:  # not a repo id (e.g. the path of a folder that was moved): no Hub repo, no file
        return None
    except EntryNotFoundError as err:
        if not isinstance(err, LocalEntryNotFoundError):  # the Hub answered: the repo has no such file
            return None
        cause: Exception = err  # offline and not in the cache: unknown
    except Exception as err:  # noqa: BLE001 - network, access, missing repo or revision: the file's fate is unknown
        cause = err
    if _absent_in_cache(repo_id, filename, revision):
        return None
    detail = " ".join(str(cause).split())[:300]
    raise HubFileError.about(hub_path(repo_id, filename, revision),
                             f"could not be looked up ({type(cause).__name__}: {detail})", HUB_FIX)


def hub_file(repo_id: str, filename: str, *, revision: str | None = None) -> str | None:
    """A local path to ``filename`` of the Hub repo ``repo_id`` at ``revision``, or None when it has no such file.

    Raises :class:`~hf_safe_exit.errors.HubFileError` naming the repo, revision, file, cause and fix when the Hub
    could not be asked; that outcome is not kept, so a later call asks again.
    """
    key = (repo_id, revision, filename)
    if key not in _FILES:
        _FILES[key] = _lookup(repo_id, filename, revision)  # raises, and keeps nothing, when the Hub was not asked
    return _FILES[key]
