"""What a BiLD ``decode`` call reports: :class:`BiLDStats` counters and the :class:`BiLDOutput` of
``return_dict_in_generate=True``."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from transformers.utils import ModelOutput

__all__ = ["BiLDOutput", "BiLDStats"]


@dataclass
class BiLDStats:
    """Counters for one BiLD ``decode`` call (summed over the batch)."""

    num_drafted: int = 0          # tokens proposed by the small model
    num_accepted: int = 0         # drafted tokens kept in the output
    num_rolled_back: int = 0      # drafted tokens discarded by rollbacks
    num_rollbacks: int = 0        # rollback events
    num_fallbacks: int = 0        # drafts ended because the small model's confidence < fallback
    num_large_tokens: int = 0     # output tokens produced by the large model (replacements and fallbacks)
    num_new_tokens: int = 0       # generated tokens in the output, summed over rows (excluding padding)
    large_model_calls: int = 0    # large decoder forwards (one batched pass = one call)
    small_model_calls: int = 0    # small decoder forwards

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class BiLDOutput(ModelOutput):
    """What ``decode`` returns with ``return_dict_in_generate=True``.

    ``sequences`` plus the :class:`BiLDStats` counters summed over the batch (ints). It also has
    per-row LongTensors of shape ``(batch,)``: ``row_new_tokens`` (generated tokens, without
    padding), ``row_accepted``, ``row_rolled_back``, ``row_large_tokens``, and ``row_large_calls``
    / ``row_small_calls`` (batched decoder passes the row took part in until it finished).
    """

    sequences: torch.LongTensor | None = None
    num_drafted: int | None = None
    num_accepted: int | None = None
    num_rolled_back: int | None = None
    num_rollbacks: int | None = None
    num_fallbacks: int | None = None
    num_large_tokens: int | None = None
    num_new_tokens: int | None = None
    large_model_calls: int | None = None
    small_model_calls: int | None = None
    row_new_tokens: torch.LongTensor | None = None
    row_accepted: torch.LongTensor | None = None
    row_rolled_back: torch.LongTensor | None = None
    row_large_tokens: torch.LongTensor | None = None
    row_large_calls: torch.LongTensor | None = None
    row_small_calls: torch.LongTensor | None = None

    @property
    def stats(self) -> BiLDStats:
        return BiLDStats(**{f.name: getattr(self, f.name) for f in fields(BiLDStats)})

    @property
    def large_calls_per_token(self) -> torch.Tensor:
        """Per row: large-model passes that included the row / its generated tokens (1.0 = the large model alone)."""
        return self.row_large_calls.double() / self.row_new_tokens.clamp(min=1).double()
