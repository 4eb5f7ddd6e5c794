"""The cells of one batch at several thresholds of one configuration, decoded together: :class:`ThresholdGrid`.

:func:`~hf_safe_exit.calibration.collect` decodes every batch of examples at every λ of its grid (a *cell* is one
batch at one λ). One ``generate`` call per cell runs the encoder and computes the cross-attention keys/values once
per λ, and pays every decoding step's overhead once per λ. A :class:`ThresholdGrid` decodes the missing cells of a
batch together (issue 28, "make it affordable"):

* the encoder runs once per batch, and so do the cross-attention keys/values;
* the thresholds decode as the rows of ONE batch (B examples × K thresholds, example-major: row ``i·K + j`` is
  example ``i`` at the ``j``-th threshold; the encoder output and the cross-attention keys/values repeated with
  ``repeat_interleave``), with per-row thresholds
  (:class:`~hf_safe_exit.decoding.row_thresholds.RowThresholds`). λ = 1 is one of these rows: the early-exit loop
  with a threshold that never triggers, i.e. the full model up to float rounding, not HF's own loop.

**Outputs.** Each cell's output is the rows of its λ, cut to the steps they ran (as a batch decoded alone stops
when its last row finishes). Every row's tokens, exit layers and costs are what one ``generate`` call per cell gives
**up to float rounding**: a row's arithmetic depends on the other rows only through the size of the products it
shares, so the tokens and exits are the same except at float near-ties; the λ = 1 rows are HF's own greedy tokens
except at float near-ties (``tests/test_grid_collect.py`` checks both row by row).

**Times.** The grid has two measured times, the encoder's and the decode's (``parts``). A cell's ``seconds`` are
their sum apportioned in proportion to the tokens its rows generated: every token of the grid is charged the grid's
mean time per token. That is not a time measured per λ, and it claims no speed-up: read from these times, the
speed-up per generated token over λ = 1 (``evaluate``, the card) is about 1× at every λ (exactly, within one batch),
whatever early exit saves. A share by decoder blocks run would claim a speed-up that is not there: on the default
model, one thread, the per-step overhead dominates, and such a share gave λ = 0 3.2× where one call per λ measures
1.17× (``benchmarks/collect_speed.py``). Time the thresholds with ``collect(..., batch_thresholds=False)`` (each
cell its own measured call) or the speed benchmarks.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # torch is loaded when a grid decodes, not when collect's module is imported
    import torch

__all__ = ["BATCHED_TIMING", "ThresholdGrid", "check_batch_thresholds"]

#: the run config's and the table's ``"timing"`` when collect decodes the cells of a batch together
BATCHED_TIMING = "batched thresholds: cell seconds apportioned (hf_safe_exit.calibration.grid)"


def check_batch_thresholds(batch_thresholds, can_batch: bool) -> bool:
    """collect's ``batch_thresholds`` (True, False or None: whether the strategy ``can_batch``), checked."""
    if batch_thresholds is None:
        return can_batch
    if not isinstance(batch_thresholds, bool):
        raise TypeError(f"batch_thresholds={batch_thresholds!r} must be True, False or None (the default).")
    if batch_thresholds and not can_batch:
        raise ValueError("batch_thresholds=True needs the early-exit strategy (config=...): a policy_factory's "
                         "policies are decoded one threshold at a time; drop batch_thresholds.")
    return batch_thresholds


def _sync(device: "torch.device") -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ThresholdGrid:
    """The cells of one tokenized batch ``encoded`` at the thresholds ``lambdas`` (``{λ index: λ}``) of ``config``.

    Nothing is decoded until the first :meth:`output`, which decodes every cell of the grid; :meth:`output` and
    :meth:`seconds` then give each cell's output and apportioned time (see the module's doc).
    """

    def __init__(self, encoded: Mapping[str, torch.Tensor], config, lambdas: Mapping[int, float],
                 max_new_tokens: int):
        if not lambdas:
            raise ValueError("a ThresholdGrid needs at least one threshold: give the λ of the cells to decode.")
        self.encoded, self.config, self.max_new_tokens = encoded, config, int(max_new_tokens)
        self.lambdas = {int(k): float(lam) for k, lam in lambdas.items()}
        self.outputs: dict[int, Any] | None = None
        self.times: dict[int, float] = {}
        self.parts: dict[str, float] = {}  # the measured seconds: "encoder", "decode"

    def output(self, model, policy):
        """The output of the cell whose threshold is ``policy`` (an ``EarlyExit`` at one of the grid's λ, with its
        configuration); the first call decodes the whole grid."""
        matches = [k for k, lam in self.lambdas.items() if lam == float(policy.threshold)]
        if not matches or policy.config != self.config:
            raise ValueError(f"{policy!r} is not a cell of this grid (thresholds {sorted(self.lambdas.values())}, "
                             f"config {self.config!r}): decode it with its own generate call.")
        if self.outputs is None:
            self._decode(model)
        return self.outputs[matches[0]]

    def seconds(self, k: int) -> float:
        """The apportioned seconds of the cell at λ index ``k`` (after :meth:`output`)."""
        if self.outputs is None:
            raise RuntimeError("the grid is not decoded yet: call output() first.")
        return self.times[k]

    def _decode(self, model) -> None:
        import torch

        ids, mask = self.encoded["input_ids"], self.encoded["attention_mask"]
        device = ids.device
        with torch.inference_mode():
            _sync(device)
            start = time.perf_counter()
            hidden = model.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state
            _sync(device)
            middle = time.perf_counter()
            outputs = self._decode_rows(model, hidden, list(self.lambdas))
            _sync(device)
        self.parts = {"encoder": middle - start, "decode": time.perf_counter() - middle}
        self.outputs, self.times = outputs, self._apportion(outputs)

    def _decode_rows(self, model, hidden: torch.Tensor, cells: list[int]) -> dict[int, Any]:
        """The cells ``cells`` as the rows of one batch, example-major; each cell's output cut from it."""
        from transformers.modeling_outputs import BaseModelOutput

        from ..compat import cache_kwargs
        from ..decoding.early_exit_loop import new_decoder_cache
        from ..decoding.generate import generate
        from ..decoding.row_thresholds import RowThresholds
        from ..decoding.step_decoder import cross_attention_kv

        count = len(cells)
        thresholds = [self.lambdas[k] for _ in range(hidden.shape[0]) for k in cells]

        def repeat(t: torch.Tensor) -> torch.Tensor:
            return t.repeat_interleave(count, dim=0)

        # the cross-attention K/V of the B examples, computed once, each repeated for its K rows
        cache = new_decoder_cache(model)
        for layer, block in enumerate(model.decoder.block):
            keys, values = cross_attention_kv(block, hidden, model.config.d_kv)
            cache.cross_attention_cache.update(repeat(keys), repeat(values), layer)
            cache.is_updated[layer] = True
        out = generate(model, input_ids=repeat(self.encoded["input_ids"]),
                       attention_mask=repeat(self.encoded["attention_mask"]),
                       encoder_outputs=BaseModelOutput(last_hidden_state=repeat(hidden)),
                       early_exit=RowThresholds(thresholds, self.config), **cache_kwargs(cache),
                       max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1, return_dict_in_generate=True)
        return {k: _rows_of(out, slice(j, None, count)) for j, k in enumerate(cells)}

    def _apportion(self, outputs: dict) -> dict[int, float]:
        """Each cell's seconds: the grid's measured time in proportion to the tokens its rows generated."""
        seconds = self.parts["encoder"] + self.parts["decode"]
        tokens = {k: int((out.exit_layers > 0).sum()) for k, out in outputs.items()}
        total = sum(tokens.values())
        return {k: seconds * (tokens[k] / total if total > 0 else 1.0 / len(tokens)) for k in outputs}


def _rows_of(out, rows: slice):
    """The output of the batch rows ``rows`` alone: sequences and early-exit fields cut to the steps they ran
    (their longest row's tokens; a batch decoded alone stops there)."""
    from ..decoding.early_exit_loop import EarlyExitGenerateOutput, exit_fields

    exit_layers = out.exit_layers[rows]
    steps = int((exit_layers > 0).sum(dim=1).max())
    prompt = out.sequences.shape[1] - out.exit_layers.shape[1]
    return EarlyExitGenerateOutput(sequences=out.sequences[rows, :prompt + steps],
                                   **exit_fields(exit_layers[:, :steps], out.confidences[rows, :steps],
                                                 out.num_decoder_layers))
