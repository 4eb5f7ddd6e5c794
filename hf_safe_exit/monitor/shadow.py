"""The shadow decode of a :class:`~hf_safe_exit.monitor.RiskMonitor`: the sampled rows of a call, again, by the full
model, without disturbing what the call returns or the caller's random stream.

* :func:`batch_size` and :func:`select_rows` read and slice a ``generate`` call's batch (``inputs``, ``input_ids``,
  ``attention_mask``, ``decoder_input_ids``, any tensor keyword whose first dimension is the batch, and the tensors
  of a precomputed ``encoder_outputs``);
* :func:`shadow_inputs` builds the shadow decode's batch: the sampled rows alone, a row-indexed
  ``prefix_allowed_tokens_fn`` told each row's index in the caller's batch; or, when the call brings its own
  ``logits_processor`` / ``stopping_criteria`` (which may index rows of the caller's batch), the whole batch;
* :func:`shadow_kwargs` drops what belongs to the caller's decode alone (its ``streamer``, which must not show the
  shadow's tokens, and its cache) and asks for the sequences only;
* :func:`check_greedy` refuses a sampling call (``do_sample=True``): the calibration measured greedy outputs, and a
  shadow decode that samples draws an independent sample, whose loss against the caller's is not the deployed risk;
* :func:`isolated_rng` runs the shadow decode on a fork of torch's random state, so that whatever a caller's own
  logits processor draws, the caller's later draws are those it would make without a monitor.
"""

from __future__ import annotations

import contextlib
import numbers

import torch

from ..compat import CACHE_NAMES

__all__ = ["batch_size", "select_rows", "shadow_inputs", "shadow_kwargs", "isolated_rng", "sequences_of", "texts_of",
           "check_one_output_per_input", "check_greedy", "ShadowDecodeWarning"]

# the caller's decode only: its streamer would print the shadow's tokens; its cache is filled by its own decode
_CALLER_ONLY = ("streamer", *CACHE_NAMES)
_OUTPUT_FLAGS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")
# the caller's own objects that may index rows of its batch (HF passes them the whole batch's ids)
_ROW_INDEXED = ("logits_processor", "stopping_criteria")


class ShadowDecodeWarning(UserWarning):
    """A call's shadow decode (or the scoring of its texts) raised: the caller's output is returned, the call's sampled
    rows are not monitored (nothing fed, not counted as sampled), and the message names the error."""


def batch_size(inputs, kwargs: dict) -> int:
    """The number of rows of a ``generate`` call (from ``inputs``, ``input_ids`` or ``inputs_embeds``)."""
    for given in (inputs, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(given, torch.Tensor) and given.dim() >= 1:
            return int(given.shape[0])
    raise ValueError("RiskMonitor needs the batch of the call: pass input_ids (or inputs_embeds) as a tensor.")


def check_one_output_per_input(kwargs: dict) -> None:
    """Refuse ``num_return_sequences`` > 1: the monitor pairs each input's output with the full model's."""
    config = kwargs.get("generation_config")
    asked = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", None))
    if asked is not None and (isinstance(asked, bool) or not isinstance(asked, numbers.Integral) or asked != 1):
        raise ValueError(f"num_return_sequences={asked!r} with a RiskMonitor: the monitor compares one output per "
                         "input with the full model's. Decode with num_return_sequences=1.")


def check_greedy(model, kwargs: dict) -> None:
    """Refuse ``do_sample=True``: from the call's keywords, else its ``generation_config``, else the model's (HF's
    order). The calibration's losses compare greedy outputs; a sampling call's shadow decode would compare two
    independent samples, near-certain false alarms that say nothing about the deployed risk."""
    do_sample = kwargs.get("do_sample")
    for config in (kwargs.get("generation_config"), getattr(model, "generation_config", None)):
        if do_sample is None and config is not None:
            do_sample = getattr(config, "do_sample", None)
    if do_sample:
        raise ValueError("do_sample=True with a RiskMonitor: its calibration measured greedy decoding, and a sampled "
                         "output compared with an independent sample of the full model is no draw of the deployed "
                         "risk (false alarms). Monitor greedy traffic (do_sample=False), or decode sampled calls with "
                         "the policy directly (early_exit=monitor.policy), unmonitored.")


def _rows_of(value, rows: torch.Tensor, batch: int):
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
        return value.index_select(0, rows.to(value.device))
    return value


def select_rows(inputs, kwargs: dict, rows, batch: int) -> tuple:
    """``(inputs, kwargs)`` restricted to ``rows`` (0-based row indices of a batch of ``batch`` rows)."""
    index = torch.as_tensor(rows, dtype=torch.long)
    out = {}
    for key, value in kwargs.items():
        if key == "encoder_outputs" and isinstance(value, dict):  # a ModelOutput: slice each of its tensors
            value = type(value)(**{k: _rows_of(v, index, batch) for k, v in value.items()})
        out[key] = _rows_of(value, index, batch)
    return _rows_of(inputs, index, batch), out


def shadow_inputs(inputs, kwargs: dict, rows, batch: int) -> tuple:
    """``(inputs, kwargs, take)`` for the shadow decode of ``rows``: its outputs' rows ``take`` are the full model's
    outputs of ``rows``, in order.

    The sampled rows alone, as a sub-batch, with a ``prefix_allowed_tokens_fn`` (HF calls it with the row's index in
    the batch decoded) called with each row's index in the caller's batch. A call with its own ``logits_processor``
    or ``stopping_criteria`` decodes the whole batch: such an object may hold per-row state sized to the caller's
    batch (a bias per row, a criterion per row), which no wrapper can renumber; the price is a full-batch decode."""
    if any(kwargs.get(name) for name in _ROW_INDEXED):
        return inputs, dict(kwargs), [int(r) for r in rows]
    sub_inputs, sub_kwargs = select_rows(inputs, kwargs, rows, batch)
    allowed = sub_kwargs.get("prefix_allowed_tokens_fn")
    if allowed is not None:
        original = [int(r) for r in rows]
        sub_kwargs["prefix_allowed_tokens_fn"] = lambda batch_id, ids: allowed(original[batch_id], ids)
    return sub_inputs, sub_kwargs, list(range(len(rows)))


def shadow_kwargs(kwargs: dict) -> dict:
    """The call's keywords for the shadow decode: the same settings, without the caller's streamer and cache, and
    returning the sequences only."""
    out = {k: v for k, v in kwargs.items() if k not in _CALLER_ONLY and k not in _OUTPUT_FLAGS}
    out["return_dict_in_generate"] = False
    return out


@contextlib.contextmanager
def isolated_rng(model):
    """Run the block on a fork of torch's random state (CPU, and the model's CUDA device): what it draws is not
    drawn from the caller's stream."""
    device = getattr(model, "device", torch.device("cpu"))
    devices = [device] if getattr(device, "type", "cpu") == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def sequences_of(output) -> torch.Tensor:
    """The token ids of a ``generate`` output (a tensor, or an output object with ``sequences``)."""
    return output if isinstance(output, torch.Tensor) else output.sequences


def texts_of(tokenizer, sequences: torch.Tensor) -> list[str]:
    """Each row of ``sequences`` as text, special tokens (padding, end of sequence) left out."""
    return [str(t) for t in tokenizer.batch_decode(sequences, skip_special_tokens=True)]
