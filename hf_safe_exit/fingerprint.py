"""A short, stable identifier of a model's weights, used to tie a calibration to the model it was made for.

Computed once per model and weights: :func:`model_fingerprint` keeps the result per model object (weakly) with a
key of every parameter's storage, shape, dtype, device and version counter (``Tensor._version``, which every
in-place change bumps: ``load_state_dict``, an optimizer step, ``p.mul_(...)``; ``p.data = ...`` changes the
storage), so a later call on unchanged weights costs one pass over the parameter list instead of a copy of a
sample of every tensor to the host, and any change of the weights recomputes it. Writes through ``param.data``
escape the key: ``param.data.copy_(...)`` (a tensor with a version counter of its own, autograd's documented escape
hatch), and ``param.data = t`` when ``t`` reuses the old storage's address; call :func:`clear_fingerprint_cache`
after such a write. Tensors made under ``torch.inference_mode`` have no version counter: they are never cached.
"""

from __future__ import annotations

import hashlib
import json
import weakref

import torch

__all__ = ["model_fingerprint", "clear_fingerprint_cache"]

_SAMPLES_PER_TENSOR = 1024
_ADD_ON_PREFIXES = ("meta_head.",)
_CONFIG_KEYS = ("model_type", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                "vocab_size", "feed_forward_proj", "tie_word_embeddings", "relative_attention_num_buckets")
_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def clear_fingerprint_cache() -> None:
    """Forget every cached fingerprint (they are recomputed on the next call)."""
    _CACHE.clear()


def _config_items(model) -> dict:
    config = getattr(model, "config", None)
    return {} if config is None else {k: getattr(config, k, None) for k in _CONFIG_KEYS}


def _weights(model):
    """``(name, parameter)`` of the backbone: shared parameters once, an attached meta head left out."""
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        # An attached meta-classifier head is an add-on, not the backbone the losses were collected with.
        if id(param) in seen or name.startswith(_ADD_ON_PREFIXES):
            continue
        seen.add(id(param))
        yield name, param


def _state_key(model) -> tuple:
    """Changes whenever a weight or the architecture config could have changed (see the module docstring)."""
    params = tuple((name, p.data_ptr(), p._version, tuple(p.shape), p.dtype, p.device) for name, p in _weights(model))
    return json.dumps(_config_items(model), sort_keys=True, default=str), params


@torch.no_grad()
def _compute(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    if getattr(model, "config", None) is not None:
        digest.update(json.dumps(_config_items(model), sort_keys=True).encode())
    for name, param in _weights(model):
        flat = param.detach().reshape(-1)
        stride = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::stride][:_SAMPLES_PER_TENSOR].to(device="cpu", dtype=torch.bfloat16).view(torch.int16)
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of the architecture config and a strided sample of every weight.

    Values are hashed after rounding to bfloat16, so the same checkpoint loaded in
    float32 or bfloat16 gets the same fingerprint, while fine-tuning, another
    checkpoint or another architecture gets a different one. An attached ``meta_head`` is
    ignored (it is an add-on read by the meta measure, not part of the backbone). Calibrations and
    stored loss tables carry it; loading one onto another model raises.

    Cached per model object until its weights change (module docstring).
    """
    try:
        key = _state_key(model)
        hit = _CACHE.get(model)
    except (RuntimeError, TypeError):  # inference-mode tensors (no version counter), or no weak reference: no cache
        return _compute(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    fingerprint = _compute(model)
    _CACHE[model] = (key, fingerprint)
    return fingerprint
