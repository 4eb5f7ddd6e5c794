"""Short, stable identifiers of a model's weights, used to tie a calibration to everything its losses depend on.

:func:`model_fingerprint` hashes the backbone: every byte of every weight, in the dtype it is held in (SHA-256),
with the architecture settings that change what the weights compute (``model_type``, sizes, activation,
``layer_norm_epsilon``, T5 v1.0's output scaling). An edit of one value changes it, and so does a cast: a
calibration holds for the weights *and the dtype* its losses were collected with (a float32 calibration for
float32 only; float16 and bfloat16 copies alike need their own, see ``hf-safe-exit collect --dtype``).
:func:`meta_head_fingerprint` does the same for a meta-classifier head, which the guarantee depends on whenever
the measure reads it. :func:`weights_dtype` names the dtype, so that a refusal can say a cast is the cause.

Computed once per model and weights: :func:`model_fingerprint` keeps the result per model object (weakly) with a
key of every parameter's storage, shape, dtype, device and version counter (``Tensor._version``, which every
in-place change bumps: ``load_state_dict``, an optimizer step, ``p.mul_(...)``; ``p.data = ...`` changes the
storage), so a later call on unchanged weights costs one pass over the parameter list instead of a copy of every
weight to the host, and any change of the weights recomputes it. Writes through ``param.data`` escape the key:
``param.data.copy_(...)`` (a tensor with a version counter of its own, autograd's documented escape hatch), and
``param.data = t`` when ``t`` reuses the old storage's address; call :func:`clear_fingerprint_cache` after such a
write. Tensors made under ``torch.inference_mode`` have no version counter: they are never cached.
"""

from __future__ import annotations

import hashlib
import json
import weakref

import torch

__all__ = ["model_fingerprint", "meta_head_fingerprint", "weights_dtype", "clear_fingerprint_cache"]

_ADD_ON_PREFIXES = ("meta_head.",)
_CONFIG_KEYS = ("model_type", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                "vocab_size", "feed_forward_proj", "tie_word_embeddings", "relative_attention_num_buckets",
                "relative_attention_max_distance", "layer_norm_epsilon", "scale_decoder_outputs")
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
        # An attached meta-classifier head is fingerprinted on its own (meta_head_fingerprint): the guarantee
        # depends on it only when the measure reads it.
        if id(param) in seen or name.startswith(_ADD_ON_PREFIXES):
            continue
        seen.add(id(param))
        yield name, param


def _state_key(model) -> tuple:
    """Changes whenever a weight or the architecture config could have changed (see the module docstring)."""
    params = tuple((name, p.data_ptr(), p._version, tuple(p.shape), p.dtype, p.device) for name, p in _weights(model))
    return json.dumps(_config_items(model), sort_keys=True, default=str), params


@torch.no_grad()
def _hash_tensors(digest, named) -> None:
    """Feed every byte of each tensor (with its name, shape and dtype) to ``digest``."""
    for name, tensor in named:
        if tensor.device.type == "meta":
            raise ValueError(f"{name} is on the meta device (offloaded or not loaded): its values cannot be "
                             "fingerprinted. Load the model with its weights in memory.")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tuple(tensor.shape)}|{data.dtype}".encode())
        digest.update(data.view(torch.uint8).numpy().data)


def _compute(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(_config_items(model), sort_keys=True, default=str).encode())
    _hash_tensors(digest, _weights(model))
    return digest.hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of the architecture config and every byte of every backbone weight.

    Another checkpoint, a fine-tuned copy, an edit of a single value, another architecture or another dtype
    (float32, bfloat16, float16: the bytes differ) gets another fingerprint. An attached ``meta_head`` is left
    out (see :func:`meta_head_fingerprint`). Calibrations and loss tables record it; using one with another
    model raises :class:`~hf_safe_exit.errors.ModelMismatchError`.

    Cached per model object until its weights change (module docstring): the full hash costs one pass over the
    weights (about a second per GB on a CPU core), once per loaded model.
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


def meta_head_fingerprint(head: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of a meta-classifier head's config and every byte of its weights.

    The meta measure's confidences, hence the losses and λ̂, are the head's: a calibration of that measure
    records this and is refused with another head. Small (a few MB at most), so it is not cached.
    """
    digest = hashlib.sha256()
    config = getattr(head, "config", None)
    digest.update(json.dumps(getattr(config, "__dict__", {}), sort_keys=True, default=str).encode())
    _hash_tensors(digest, sorted(head.state_dict().items()))
    return digest.hexdigest()[:16]


def weights_dtype(model: torch.nn.Module) -> str:
    """The dtype of the backbone's floating-point weights (``"float32"``, ``"bfloat16"``, ...); ``"mixed"`` if
    they differ. Recorded beside the fingerprint, so that a refusal can say when a cast is what differs."""
    dtypes = {str(p.dtype).removeprefix("torch.") for _, p in _weights(model) if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else "mixed"
