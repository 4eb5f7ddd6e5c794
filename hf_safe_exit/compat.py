"""Compatibility with the range of transformers releases hf_safe_exit supports.

Why this module exists: transformers 5.24 renamed the KV-cache argument ``past_key_values`` to
``cache`` (in ``generate``, in ``prepare_inputs_for_generation``, in every T5/MT5 forward and in the
``ModelOutput`` field). The old name still works there through ``@deprecate_kwarg``, but it prints a
``FutureWarning`` attributed to *our* call site, and the T5 forwards drop it in 5.40. Older 5.x
releases (down to our floor) only know ``past_key_values``. So hf_safe_exit must pick the name per
installed release, and reading a model output's cache must not go through the deprecated alias.

The decision is made by inspecting signatures, not by comparing version numbers: a forward that
names ``cache`` takes ``cache``. This follows the library wherever the rename lands (a backport, a
model renamed later than another) and needs no table of versions. Only a function that takes the
cache through ``**kwargs`` (``generate``) is decided by GenerationMixin's
``prepare_inputs_for_generation``, the method through which ``generate`` hands the cache to the
forward; the version comparison is the last resort if that stops naming either.

Nothing here imports transformers at module import time (``import hf_safe_exit`` stays light).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

__all__ = ["CACHE_NAMES", "RENAMED_IN", "cache_field", "cache_kwarg", "cache_kwargs", "find_cache"]

#: The names a KV cache goes by, newest first.
CACHE_NAMES = ("cache", "past_key_values")
#: The transformers release that renamed ``past_key_values`` to ``cache`` (used only as a fallback).
RENAMED_IN = "5.24.0"


@functools.lru_cache(maxsize=None)
def _named_in(fn: Callable) -> str | None:
    """The cache parameter that ``fn``'s signature names (``inspect.signature`` follows ``__wrapped__``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in CACHE_NAMES if name in params), None)


@functools.lru_cache(maxsize=None)
def _generate_cache_kwarg() -> str:
    from transformers.generation.utils import GenerationMixin

    name = _named_in(GenerationMixin.prepare_inputs_for_generation)
    if name is not None:
        return name
    import transformers
    from packaging.version import Version

    return "cache" if Version(transformers.__version__) >= Version(RENAMED_IN) else "past_key_values"


def _function_of(fn_or_model: Any) -> Callable:
    if inspect.isroutine(fn_or_model) or isinstance(fn_or_model, functools.partial):
        return getattr(fn_or_model, "__func__", fn_or_model)  # unbind: don't keep models alive in the lru_cache
    cls = fn_or_model if isinstance(fn_or_model, type) else type(fn_or_model)
    forward = getattr(cls, "forward", None)
    if forward is None:
        raise TypeError(f"cache_kwarg expects a model (with forward) or a function, got {type(fn_or_model).__name__}.")
    return forward


def cache_kwarg(fn_or_model: Any = None) -> str:
    """``"cache"`` or ``"past_key_values"``: the keyword that takes a KV cache without a deprecation warning.

    ``fn_or_model``: a model instance or class (its ``forward`` is inspected), a function or bound
    method, or ``None`` for ``generate`` (and for the ``model_kwargs`` that ``generate`` hands to a
    ``custom_generate`` callable). A function that takes the cache only through ``**kwargs``, such as
    ``generate``, gets generate's name.
    """
    if fn_or_model is None:
        return _generate_cache_kwarg()
    return _named_in(_function_of(fn_or_model)) or _generate_cache_kwarg()


def cache_kwargs(cache: Any, fn_or_model: Any = None) -> dict[str, Any]:
    """``{cache_kwarg(fn_or_model): cache}``, to splat into a call: ``model(..., **cache_kwargs(c, model))``."""
    return {cache_kwarg(fn_or_model): cache}


def cache_field(output_cls: type) -> str:
    """The name of the cache field of a ``ModelOutput`` dataclass (``cache`` on 5.24+), for building one.

    ``EarlyExitGenerateOutput(**{cache_field(EarlyExitGenerateOutput): cache}, ...)``: the old keyword still
    works on 5.24 but logs a deprecation warning.
    """
    names = {f.name for f in dataclasses.fields(output_cls)}
    name = next((n for n in CACHE_NAMES if n in names), None)
    if name is None:
        raise TypeError(f"{output_cls.__name__} has no cache field ({' or '.join(CACHE_NAMES)}).")
    return name


def find_cache(container: Any, default: Any = None) -> Any:
    """The KV cache in a model output, a ``generate`` output or a kwargs dict, under whichever name it has.

    Reads a ``ModelOutput``'s own field (``cache`` on 5.24+, ``past_key_values`` before), never the
    deprecated alias, which logs a deprecation warning on 5.24+.
    """
    if dataclasses.is_dataclass(container) and not isinstance(container, type):
        names = {f.name for f in dataclasses.fields(container)}
        for name in CACHE_NAMES:
            if name in names:
                value = getattr(container, name)
                return default if value is None else value
        return default
    for name in CACHE_NAMES:
        value = dict.get(container, name) if isinstance(container, dict) else container.get(name)
        if value is not None:
            return value
    return default
