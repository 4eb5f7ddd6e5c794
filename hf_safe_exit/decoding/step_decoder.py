"""One decoding step of a T5 decoder with per-row early exit (CALM state propagation): :class:`StepDecoder`.

The step's algorithm is described in :mod:`hf_safe_exit.decoding.early_exit_loop`, which drives it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers.cache_utils import EncoderDecoderCache
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.t5.modeling_t5 import eager_attention_forward

from ..compat import cache_kwargs
from ..confidence import LayerView
from .deferred_kv import DeferredFills
from .head_projection import project
from .kv_buffer import PreallocatedLayer, project_kv, split_heads
from .poe import PoEConfig, PoEState
from .readout import decoder_output_scale
from .row_plan import DecidingRows, RowPlan
from .step_exits import StepExits, can_exit, thresholds_of

__all__ = ["StepDecoder", "cross_attention_kv"]


def _clamp_fp16(hidden: torch.Tensor) -> torch.Tensor:
    # Same overflow guard as T5Block applies in float16.
    if hidden.dtype == torch.float16:
        limit = torch.where(torch.isinf(hidden).any(), torch.finfo(hidden.dtype).max - 1000,
                            torch.finfo(hidden.dtype).max)
        hidden = torch.clamp(hidden, min=-limit, max=limit)
    return hidden


def cross_attention_kv(block, encoder_hidden: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-attention keys and values ``(batch, heads, source, d_kv)`` of decoder ``block`` over
    ``encoder_hidden``: what HF's T5 block caches at the first decoding step."""
    return project_kv(block.layer[1].EncDecAttention, encoder_hidden, head_dim)


class _PoERead(NamedTuple):
    """The deciding rows' read-out at one layer with PoE on: final-normed states, their logits, PoE log-probs."""

    normed: torch.Tensor
    logits: torch.Tensor
    logp: torch.Tensor

    def prediction(self, poe: PoEConfig) -> torch.Tensor:
        """What an exit at this layer reads out: the PoE's log-probabilities (``poe.prediction``) or the logits."""
        return self.logp if poe.prediction else self.logits


class StepDecoder:
    """Runs the decoder blocks of one T5 model for one new token, with per-row exits."""

    def __init__(self, model, cache: EncoderDecoderCache, encoder_hidden: torch.Tensor,
                 encoder_mask: torch.Tensor | None, *, defer_fills: bool = True):
        self.model = model
        self.decoder = model.decoder
        self.blocks = list(model.decoder.block)
        self.num_layers = len(self.blocks)
        self.cache = cache
        self.encoder_hidden = encoder_hidden
        self.encoder_mask = encoder_mask
        config = model.decoder.config
        self.attention = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)
        self.head_dim = config.d_kv
        probe = encoder_hidden[:, :1]
        # The same extended cross-attention mask T5Stack builds (None when nothing is padded).
        self.cross_mask = create_bidirectional_mask(
            config=config, inputs_embeds=probe, attention_mask=encoder_mask, encoder_hidden_states=encoder_hidden
        )
        self.cross_bias = torch.zeros(
            (1, config.num_heads, 1, encoder_hidden.shape[1]), device=encoder_hidden.device, dtype=encoder_hidden.dtype
        )
        self.scale = decoder_output_scale(model.config)
        # HF processes logits in float32; keep float64 when the model runs in float64 (exactness checks).
        self.logits_dtype = torch.promote_types(encoder_hidden.dtype, torch.float32)
        self.batch = encoder_hidden.shape[0]
        # skipped layers' K/V filled when read, in one product per layer (deferred_kv); needs the in-place buffers
        layers = cache.self_attention_cache.layers
        deferrable = len(layers) == self.num_layers and all(isinstance(layer, PreallocatedLayer) for layer in layers)
        self.fills = DeferredFills(self.blocks, layers, self.batch, self.head_dim) if defer_fills and deferrable \
            else None
        # skip_kv's template per layer: the shape and dtype of a pending slot (an expanded view, no memory)
        self._no_kv: dict[int, torch.Tensor] = {}

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            normed = normed * self.scale
        return project(self.model.lm_head, normed)

    def _cross_kv(self, layer: int):
        """The cross-attention K/V of ``layer`` for the whole batch (computed once, then cached)."""
        cross = self.cache.cross_attention_cache
        if not self.cache.is_updated.get(layer, False):
            k, v = cross_attention_kv(self.blocks[layer], self.encoder_hidden, self.head_dim)
            cross.update(k, v, layer)
            self.cache.is_updated[layer] = True
        return cross.layers[layer].keys, cross.layers[layer].values

    def _attend(self, module, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor | None, bias: torch.Tensor, plan: "RowPlan | None") -> torch.Tensor:
        """Attention of the deciding rows' ``query`` ``(n, heads, 1, d_kv)`` over the batch's cached ``keys`` /
        ``values``; returns ``(n, 1, heads * d_kv)``.

        ``plan`` None: every row decides, one call over the whole batch. Otherwise the call runs per
        :class:`RowPlan` segment on *views* ``keys[lo:hi]`` of the cache (slices of the batch dimension, no
        copy); a segment that also covers rows not deciding gets a zero query there and those outputs are
        dropped. Every (row, head) is an independent attention, so a row's result does not depend on which
        other rows share the call.
        """
        if plan is None:
            attn, _ = self.attention(module, query, keys, values, mask, dropout=0.0, scaling=module.scaling,
                                     position_bias=bias)
            return attn.reshape(query.shape[0], 1, -1)
        outs = []
        for lo, hi, start, stop, keep in plan.segments:
            q = query[start:stop]
            if keep is not None:  # the segment spans rows that are not deciding: pad their queries with zeros
                padded = query.new_zeros((hi - lo, *query.shape[1:]))
                padded[keep] = q
                q = padded
            seg_mask = None if mask is None else mask[lo:hi]
            attn, _ = self.attention(module, q, keys[lo:hi], values[lo:hi], seg_mask, dropout=0.0,
                                     scaling=module.scaling, position_bias=bias)
            outs.append(attn if keep is None else attn[keep])
        attn = outs[0] if len(outs) == 1 else torch.cat(outs)
        return attn.reshape(query.shape[0], 1, -1)

    def position_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """This step's self-attention position bias, computed once (as block 0 would) and shared by every block."""
        past = self.cache.self_attention_cache.get_seq_length(0)
        bias = self.blocks[0].layer[0].SelfAttention.compute_bias(1, past + 1, device=self.cross_bias.device,
                                                                  past_seen_tokens=past)
        return bias.to(dtype)

    def fill_kv(self, idx: int, x: torch.Tensor, rows: DecidingRows | None = None):
        """Append block ``idx``'s self-attention K/V of this position for every row of the batch (``x``
        ``(batch, 1, d)``; for rows that already exited this is CALM's state propagation), before ``rows`` (None: the
        whole batch) run the block; returns (their pre-attention normed states, keys, values of the whole batch).

        With deferred fills, the positions pending at ``idx`` (no row ran it there: :class:`DeferredFills`) are
        computed in the same product and written first."""
        layer = self.blocks[idx].layer[0]
        att = layer.SelfAttention
        cache_layer = self.cache.self_attention_cache.layers[idx]
        taken = None if self.fills is None else self.fills.take(idx, cache_layer.get_seq_length())
        if taken is None:
            normed = layer.layer_norm(x)
            keys, values = cache_layer.update(*project_kv(att, normed, self.head_dim))
        else:  # in the wider dtype of the two (a half-precision T5 may carry float32 states): no state is rounded
            start, past = taken
            dtype = torch.promote_types(past.dtype, x.dtype)
            normed = layer.layer_norm(torch.cat([past.to(dtype), x.to(dtype)], dim=1))
            k, v = project_kv(att, normed, self.head_dim)
            m = past.shape[1]
            cache_layer.write_range(start, k[:, :, :m], v[:, :, :m])
            keys, values = cache_layer.update(k[:, :, m:], v[:, :, m:])
            normed = normed[:, m:]
        return (normed[rows.rows] if rows is not None and rows.rows is not None else normed), keys, values

    def skip_kv(self, idx: int, x: torch.Tensor) -> None:
        """Block ``idx`` runs for no row at this position: eager, fill every row's K/V (state propagation);
        deferred, append a slot pending for every row."""
        if self.fills is None:
            self.fill_kv(idx, x)
            return
        if idx not in self._no_kv:  # made once per layer, in the dtype a fill appends (under autocast not the weight's)
            att = self.blocks[idx].layer[0].SelfAttention
            dtype = torch.nn.functional.linear(x[:0, 0].to(att.k.weight.dtype), att.k.weight).dtype
            self._no_kv[idx] = x.new_empty((1, att.n_heads, 1, self.head_dim), dtype=dtype).expand(self.batch, -1, -1,
                                                                                                  -1)
        cache_layer = self.cache.self_attention_cache.layers[idx]
        self.fills.mark_pending(idx, cache_layer.get_seq_length())
        cache_layer.append_pending(self._no_kv[idx])

    def finish_step(self, position: int, x: torch.Tensor) -> None:
        """After the step that decoded ``position``: with deferred fills, keep every row's final state ``x`` (the
        states a pending K/V of this position is computed from)."""
        if self.fills is not None:
            self.fills.keep(position, x)

    def complete_cache(self) -> None:
        """Fill every pending K/V (before the cache is handed back): the cache then holds what eager fills give."""
        if self.fills is not None:
            self.fills.fill_all(self.cache.self_attention_cache.get_seq_length(0))

    def run_block(self, idx: int, h: torch.Tensor, normed: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  position_bias: torch.Tensor, plans: "tuple[RowPlan, RowPlan] | None") -> torch.Tensor:
        """The rest of block ``idx`` after :meth:`fill_kv`, for the rows whose states are ``h`` (``normed`` their
        pre-attention layer norm): the whole batch when ``plans`` is None, else the rows the plans describe."""
        block = self.blocks[idx]
        self_attn_layer, cross_layer, ff_layer = block.layer[0], block.layer[1], block.layer[-1]
        self_plan, cross_plan = (None, None) if plans is None else plans
        att = self_attn_layer.SelfAttention
        query = split_heads(att.q(normed), self.head_dim)
        attn = self._attend(att, query, keys, values, None, position_bias, self_plan)
        h = _clamp_fp16(h + self_attn_layer.dropout(att.o(attn)))
        # Cross-attention over the cached encoder K/V.
        ckeys, cvalues = self._cross_kv(idx)
        catt = cross_layer.EncDecAttention
        query = split_heads(catt.q(cross_layer.layer_norm(h)), self.head_dim)
        attn = self._attend(catt, query, ckeys, cvalues, self.cross_mask, self.cross_bias, cross_plan)
        h = _clamp_fp16(h + cross_layer.dropout(catt.o(attn)))
        return _clamp_fp16(ff_layer(h))

    def confidence(self, measure, *, layer: int, step: int, rows: torch.Tensor, hidden: torch.Tensor,
                   prev_hidden: torch.Tensor, normed: torch.Tensor, cached: dict, batch: int) -> torch.Tensor:
        """``measure``'s float32 confidence for ``rows`` after ``layer``; the intermediate logits it may ask for are
        projected from ``normed`` once and kept in ``cached["logits"]`` (which the caller may have filled)."""

        def logits_fn():
            if "logits" not in cached:
                cached["logits"] = self.logits(normed)
            return cached["logits"]

        view = LayerView(layer=layer, step=step, rows=rows, hidden=hidden, prev_hidden=prev_hidden, normed=normed,
                         logits_fn=logits_fn, batch_size=batch)
        return measure(view).float()

    def prefill(self, tokens: torch.Tensor) -> None:
        """Put the decoder prompt ``tokens`` ``(batch, p)`` into the cache through HF's full decoder forward.

        Afterwards every layer's self-attention cache holds ``p`` positions computed exactly as
        ``model.decoder`` computes them (all layers, no exits), and the cross-attention K/V of every layer
        are cached with ``is_updated`` set, which :meth:`_cross_kv` then reuses. :meth:`step` reads the
        cache length for its relative-position offset, so the next token is decoded at position ``p``.
        """
        if tokens.shape[1] == 0:
            return
        if self.cache.get_seq_length() != 0:
            raise RuntimeError("prefill needs an empty cache")
        self.decoder(input_ids=tokens, encoder_hidden_states=self.encoder_hidden,
                     encoder_attention_mask=self.encoder_mask, use_cache=True,
                     **cache_kwargs(self.cache, self.decoder))
        lengths = {self.cache.self_attention_cache.get_seq_length(i) for i in range(self.num_layers)}
        if lengths != {tokens.shape[1]} or not all(self.cache.is_updated.get(i, False)
                                                   for i in range(self.num_layers)):
            raise RuntimeError(f"decoder prefill left the cache inconsistent (self-attention lengths {lengths})")

    def step(self, tokens: torch.Tensor, *, step: int, threshold: float | torch.Tensor, measure, min_exit_layer: int,
             done: torch.Tensor | None, poe: PoEConfig | None = None, exit_layers: frozenset[int] | None = None):
        """Decode one token for every row.

        Args:
            tokens: ``(batch, 1)`` the previous tokens.
            threshold: λ_t for this step (>= 1 never exits early): a float, or a float32 tensor ``(batch,)`` of one
                λ_t per row (several thresholds decoded as rows of one batch; see ``RowThresholds``).
            exit_layers: the only layers where the confidence is checked (None: every layer >= min_exit_layer).
            done: ``(batch,)`` bool, rows whose sequence already finished (None: none has): they run no block and
                report exit layer 0 (their output is padding; their cache entries only keep shapes aligned).
            poe: Product-of-Experts anytime predictions (:mod:`hf_safe_exit.decoding.poe`), or None. When set
                (and the step may exit early, or ``poe.final_layer == "poe"``), the logits of every layer are
                read out for the deciding rows and folded into the running product; an exiting row gets the
                PoE log-probabilities of its exit layer as its logits (``poe.prediction``) and the softmax
                measure sees them (``poe.confidence``). With ``poe=None`` nothing here changes.

        Returns:
            logits ``(batch, vocab)`` (float32, or float64 for a float64 model) of each row's exit layer,
            exit layers ``(batch,)`` long, confidences ``(batch,)`` float32 (NaN where none was computed).
        """
        batch, device = tokens.shape[0], tokens.device
        x = self.decoder.dropout(self.decoder.embed_tokens(tokens))  # (b, 1, d): every row's state
        position = self.cache.self_attention_cache.get_seq_length(0)
        position_bias = self.position_bias(x.dtype)
        deciding = DecidingRows(done, batch, device)
        exits = StepExits(batch, self.logits_dtype, device)
        may_exit = can_exit(threshold)
        poe_last = poe is not None and poe.prediction and poe.final_layer == "poe"
        poe_state = None
        if poe is not None and (may_exit or poe_last):
            poe_state = PoEState(poe, self.num_layers, batch, self.logits_dtype, device)
        for idx in range(self.num_layers):
            layer = idx + 1
            if deciding.none_left:
                self.skip_kv(idx, x)  # every row exited: the remaining layers' K/V (state propagation)
                continue
            normed, keys, values = self.fill_kv(idx, x, deciding)
            h, prev, x = self._run_deciding(idx, x, normed, keys, values, position_bias, deciding)
            poe_read = None
            if poe_state is not None and (layer < self.num_layers or poe_last):
                poe_read = self._poe_readout(poe_state, layer, deciding.rows, h)
            if layer == self.num_layers:
                exiting = conf = normed = None  # every deciding row exits
                known = None if poe_read is None else poe_read.prediction(poe)
            elif may_exit and layer >= min_exit_layer and (exit_layers is None or layer in exit_layers):
                conf, normed, known = self._check(measure, layer, step, h, prev, deciding, poe, poe_read, batch)
                exiting = conf > thresholds_of(threshold, deciding.rows)
                if not bool(exiting.any()):
                    continue
            else:
                continue
            self._record_exits(exits, layer, h, deciding, exiting, conf, normed, known)
            if exiting is not None:
                deciding.drop(exiting)
        self.finish_step(position, x)
        return exits.read_out(self.logits, self.model.config.vocab_size), exits.exit_layer, exits.confidence

    def _run_deciding(self, idx: int, x: torch.Tensor, normed: torch.Tensor, keys: torch.Tensor,
                      values: torch.Tensor, position_bias: torch.Tensor, deciding: DecidingRows):
        """Block ``idx`` (after :meth:`fill_kv`, whose ``normed`` states of the deciding rows it takes) for the
        deciding rows of the batch's states ``x``: returns their new states, their states before the block, and
        ``x`` with theirs replaced."""
        rows = deciding.rows
        if rows is None:
            h = self.run_block(idx, x, normed, keys, values, position_bias, None)
            return h, x, h
        # Only the deciding rows' states are gathered (b x d_model); the caches are never copied: attention runs on
        # batch slices of them (see _attend / RowPlan).
        prev = x[rows]
        plans = deciding.plans or deciding.plan(keys, self._cross_kv(idx)[0])
        h = self.run_block(idx, prev, normed, keys, values, position_bias, plans)
        # a half-precision T5 loaded by from_pretrained keeps `wo` in float32 (_keep_in_fp32_modules), so a block
        # can return float32 states for float16 ones; the whole batch then moves to that dtype, as in HF's stack
        return h, prev, x.to(h.dtype).index_copy(0, rows, h)

    def _poe_readout(self, poe_state: PoEState, layer: int, rows: torch.Tensor | None, h: torch.Tensor) -> _PoERead:
        """The deciding rows' read-out after ``layer``, folded into the running product."""
        normed = self.decoder.final_layer_norm(h[:, 0])
        logits = self.logits(normed)
        return _PoERead(normed, logits, poe_state.update(layer, rows, logits))

    def _check(self, measure, layer: int, step: int, h: torch.Tensor, prev: torch.Tensor, deciding: DecidingRows,
               poe: PoEConfig | None, poe_read: _PoERead | None, batch: int):
        """The deciding rows' confidence after ``layer`` (a checked layer), with their final-normed states and the
        logits an exit there reads out when they are already computed (else None)."""
        cached: dict[str, torch.Tensor] = {}
        if poe_read is not None:
            normed = poe_read.normed
            cached["logits"] = poe_read.logp if poe.confidence else poe_read.logits.to(self.logits_dtype)
        else:
            normed = self.decoder.final_layer_norm(h[:, 0])
        conf = self.confidence(measure, layer=layer, step=step, rows=deciding.ids(), hidden=h[:, 0],
                               prev_hidden=prev[:, 0], normed=normed, cached=cached, batch=batch)
        return conf, normed, cached.get("logits") if poe_read is None else poe_read.prediction(poe)

    def _record_exits(self, exits: StepExits, layer: int, h: torch.Tensor, deciding: DecidingRows,
                      exiting: torch.Tensor | None, conf: torch.Tensor | None, normed: torch.Tensor | None,
                      known: torch.Tensor | None) -> None:
        """Record the exit at ``layer`` of the deciding rows ``exiting`` selects (None: all of them), with their
        logits when ``known``, else their final-normed states for the read-out after the last block."""
        # positions (within the deciding rows) of the exiting ones, found once for every read below
        exit_pos = None if exiting is None else exiting.nonzero().squeeze(1)

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if exit_pos is None else t.index_select(0, exit_pos)

        exit_rows = pick(deciding.ids())
        if known is not None:
            exits.set_logits(exit_rows, pick(known))
        else:
            in_order = deciding.rows is None and exiting is None  # the whole batch, in batch order
            exits.defer(None if in_order else exit_rows,
                        self.decoder.final_layer_norm(h[:, 0]) if normed is None else pick(normed))
        exits.set_layer(exit_rows, layer, None if conf is None else pick(conf))
