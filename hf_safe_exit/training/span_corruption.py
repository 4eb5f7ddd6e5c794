"""T5 span corruption (Raffel et al. 2020, Sec. 3.1.4) for self-supervised pretraining.

Given a token sequence, ~``noise_density`` of the tokens are replaced by spans of
mean length ``mean_noise_span_length``; each dropped span becomes one sentinel in
the input, and the target lists the sentinels each followed by the tokens it
replaced. This mirrors ``random_spans_noise_mask`` of the T5 codebase.

:func:`text_infill` is BART's text infilling (Lewis et al. 2020, Sec. 2.2) on the same masks:
each span becomes one mask token and the target is the whole original sequence. Most target
tokens are copies of input tokens, which teaches a from-scratch model to copy from its input
(attend to the right source position) in far fewer steps than span corruption alone.
"""

from __future__ import annotations

import random
from typing import Sequence

__all__ = ["random_spans_noise_mask", "span_corrupt", "text_infill"]


def _random_segmentation(num_items: int, num_segments: int, rng: random.Random) -> list[int]:
    """Split ``num_items`` into ``num_segments`` positive lengths uniformly at random."""
    if num_segments == 1:
        return [num_items]
    cuts = sorted(rng.sample(range(1, num_items), num_segments - 1))
    bounds = [0] + cuts + [num_items]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def random_spans_noise_mask(length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                            rng: random.Random | None = None) -> list[bool]:
    """A boolean mask of ``length`` with ~``noise_density`` noise in alternating non-noise/noise spans."""
    rng = rng or random.Random()
    if length < 2:
        return [False] * length
    num_noise = int(round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    num_spans = min(num_spans, num_noise, length - num_noise)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    keep_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    mask: list[bool] = []
    for k, nz in zip(keep_lengths, noise_lengths):  # starts with non-noise, as in T5
        mask.extend([False] * k)
        mask.extend([True] * nz)
    return mask


def span_corrupt(token_ids: Sequence[int], sentinel_ids: Sequence[int], *, eos_id: int = 1,
                 noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                 rng: random.Random | None = None) -> tuple[list[int], list[int]]:
    """Return ``(input_ids, target_ids)`` for one sequence (both end with ``eos_id``).

    ``sentinel_ids[k]`` is the id of ``<extra_id_k>`` (use ``tokenizer.convert_tokens_to_ids``).
    ``token_ids`` should not contain the EOS token.
    """
    mask = random_spans_noise_mask(len(token_ids), noise_density, mean_noise_span_length, rng)
    inputs: list[int] = []
    targets: list[int] = []
    k = -1
    prev = False
    for tok, m in zip(token_ids, mask):
        if m:
            if not prev:
                k += 1
                if k >= len(sentinel_ids):
                    raise ValueError("more noise spans than sentinels; shorten the sequence")
                inputs.append(sentinel_ids[k])
                targets.append(sentinel_ids[k])
            targets.append(tok)
        else:
            inputs.append(tok)
        prev = m
    if k + 1 < len(sentinel_ids):
        targets.append(sentinel_ids[k + 1])  # closing sentinel, as in T5
    inputs.append(eos_id)
    targets.append(eos_id)
    return inputs, targets


def text_infill(token_ids: Sequence[int], mask_id: int, *, eos_id: int = 1, noise_density: float = 0.3,
                mean_noise_span_length: float = 3.0, rng: random.Random | None = None) -> tuple[list[int], list[int]]:
    """BART text infilling: ``(input with each noise span replaced by one mask_id, token_ids)``, both + EOS.

    BART draws span lengths from Poisson(3) and masks 30% of the tokens; the spans here come from
    :func:`random_spans_noise_mask` (same density and mean length, non-empty spans).
    """
    mask = random_spans_noise_mask(len(token_ids), noise_density, mean_noise_span_length, rng)
    inputs: list[int] = []
    prev = False
    for tok, m in zip(token_ids, mask):
        if not m:
            inputs.append(tok)
        elif not prev:
            inputs.append(mask_id)
        prev = m
    return inputs + [eos_id], list(token_ids) + [eos_id]
