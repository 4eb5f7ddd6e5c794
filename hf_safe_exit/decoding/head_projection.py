"""The LM head's projection of a few decoder states, in vocabulary chunks where that is bit-identical and faster.

Why: on a CPU, MKL multiplies a (rows, d_model) block by the (vocab, d_model) head with a small-M kernel that
streams the whole head once per 3 rows, so 4-15 rows cost 2-5 passes over the head (flan-t5-base shape, one thread:
10 ms for 1-3 rows, 21 ms for 4-6, 31 ms for 7-9, 42 ms for 10-12, and 22 ms again for 16, where MKL switches to its
packed kernel). Projecting the vocabulary in chunks of ~512 KiB of head weight keeps each chunk in L2 for all rows:
8 rows take 17.3 ms instead of 31.3 (t5-small shape 13.1 vs 23.7, flan-t5-large shape 20.9 vs 35.8: the
``projection`` / ``projection_hf`` floor parts of ``benchmarks/results/speed_shapes_*.json``). Every logit is still
the dot product of one state with one head row, but which kernel computes it, and so its summation order, is the
BLAS library's choice; so the chunked projection is only used after a probe returned exactly ``F.linear(x, weight)``
for the same shapes, strides, alignments of ``x`` and of the weight, thread count and float32 matmul precision (the
answer is kept per such key). Anything else (GPU, half precision, a head with hooks, a compiled head, a subclass of
the layer or of its weight, a bias, autograd) calls ``head(x)`` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["project"]

# MKL's small-M regime on CPU (below 4 rows one pass serves 3 rows; from 16 rows the packed kernel is as fast).
_CHUNKED_ROWS = range(4, 16)
_CHUNK_BYTES = 512 * 1024
# (rows, vocab, d_model, strides, alignments, threads, precision, chunk) -> chunks equal F.linear bit for bit.
_IDENTICAL: dict[tuple, bool] = {}


def _chunk_size(weight: torch.Tensor) -> int:
    per_row = weight.shape[1] * weight.element_size()
    return max(64, _CHUNK_BYTES // per_row // 64 * 64)


def _chunked(x: torch.Tensor, weight: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([F.linear(x, weight[i:i + chunk]) for i in range(0, weight.shape[0], chunk)], dim=-1)


def _plain_linear(head: nn.Module) -> bool:
    # Only an nn.Linear whose call is exactly F.linear(x, weight): no subclass (LoRA, quantised layers), no
    # replaced forward (accelerate's offload hooks set module.forward), no compiled call (Module.compile), no
    # hooks, no bias, and a plain weight tensor (torchao-style tensor subclasses keep the Linear's type).
    return (type(head) is nn.Linear and head.bias is None and "forward" not in head.__dict__
            and getattr(head, "_compiled_call_impl", None) is None
            and type(head.weight) in (nn.Parameter, torch.Tensor)
            and not head._forward_hooks and not head._forward_pre_hooks
            and not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks)


def _probe_identical(rows: int, weight: torch.Tensor, chunk: int, offset: int) -> bool:
    """Whether the chunks give exactly ``F.linear`` for a random ``(rows, d)`` input that starts ``offset`` bytes
    past a 64-byte boundary, like the real input (BLAS kernels may treat unaligned heads differently)."""
    generator = torch.Generator().manual_seed(rows)
    d, size = weight.shape[1], weight.element_size()
    buffer = torch.randn(rows * d + 64, generator=generator, dtype=weight.dtype)
    start = ((offset - buffer.data_ptr()) % 64) // size
    probe = buffer[start:start + rows * d].view(rows, d)
    return torch.equal(_chunked(probe, weight, chunk), F.linear(probe, weight))


def _matmul_precision() -> tuple:
    mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
    return torch.get_float32_matmul_precision(), getattr(mkldnn, "fp32_precision", None)


def project(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``head(x)`` for decoder states ``x`` ``(..., d_model)``, bit for bit.

    Computed in vocabulary chunks when ``head`` is a plain bias-free ``nn.Linear`` on the CPU in float32, ``x`` has
    4-15 rows, no gradient is recorded, and a probe with the same key (shapes, strides, alignments, threads, matmul
    precision) showed the chunks give exactly ``F.linear(x, weight)``, which is ``head(x)`` for such a layer (see
    the module docstring for why and what it saves); otherwise ``head(x)``. The first call per key pays the probe
    (about two projections).
    """
    weight = getattr(head, "weight", None)
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if (rows not in _CHUNKED_ROWS or weight is None or weight.device.type != "cpu" or weight.dtype != torch.float32
            or type(x) is not torch.Tensor or x.dtype != torch.float32 or x.device != weight.device
            or not x.is_contiguous()
            or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)) or not _plain_linear(head)):
        return head(x)
    chunk = _chunk_size(weight)
    offset = x.data_ptr() % 64
    key = (rows, *weight.shape, weight.stride(), offset, weight.data_ptr() % 64, torch.get_num_threads(),
           _matmul_precision(), chunk)
    identical = _IDENTICAL.get(key)
    if identical is None:
        identical = _IDENTICAL[key] = _probe_identical(rows, weight, chunk, offset)
    return _chunked(x, weight, chunk) if identical else head(x)
