"""A short, stable identifier of a model's weights, used to tie a calibration to the model it was made for."""

from __future__ import annotations

import hashlib
import json

import torch

__all__ = ["model_fingerprint"]

_SAMPLES_PER_TENSOR = 1024
_ADD_ON_PREFIXES = ("meta_head.",)


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of the architecture config and a strided sample of every weight.

    Values are hashed after rounding to bfloat16, so the same checkpoint loaded in
    float32 or bfloat16 gets the same fingerprint, while fine-tuning, another
    checkpoint or another architecture gets a different one. An attached ``meta_head`` is
    ignored (it is an add-on read by the meta measure, not part of the backbone). Calibrations and
    stored loss tables carry it; loading one onto another model raises.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        keys = ("model_type", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                "vocab_size", "feed_forward_proj", "tie_word_embeddings", "relative_attention_num_buckets")
        digest.update(json.dumps({k: getattr(config, k, None) for k in keys}, sort_keys=True).encode())
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        # An attached meta-classifier head is an add-on, not the backbone the losses were collected with.
        if id(param) in seen or name.startswith(_ADD_ON_PREFIXES):
            continue
        seen.add(id(param))
        flat = param.detach().reshape(-1)
        stride = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::stride][:_SAMPLES_PER_TENSOR].to(device="cpu", dtype=torch.bfloat16).view(torch.int16)
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
