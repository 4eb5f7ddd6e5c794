"""Token-level early-exit decoding for T5 with CALM state propagation.

One new token per step, one decoder block at a time, over HF's
``EncoderDecoderCache``:

* every row of the batch keeps a *state* ``x``: while the row is still deciding,
  ``x`` is the output of the last block it ran; once it exited after layer i,
  ``x`` stays the exit hidden state h_i;
* a row that exited after layer i gets, at every skipped layer j > i, the self-attention
  K/V of its exit state through layer j's own pre-attention layer norm and k/v projections:
  CALM's state propagation (Schuster et al. 2022, Sec. 4.2). Where some row of the batch runs
  layer j, every row's K/V there come from that layer's one product; where no row runs it, they
  are pending and computed the next time a token runs layer j, in one product with that
  token's own (:mod:`.deferred_kv`); K/V no token reads are never computed, and the cache
  handed back is completed first. ``DEFER_FILLS = False`` computes them at once, every layer;
* only the rows still deciding run the rest of the block (query, attention,
  cross-attention, feed-forward) — the batch never waits for its slowest row. Their
  attention reads the self- and cross-attention caches through slices of the batch
  dimension (:class:`RowPlan`), never through copies of the deciding rows, so a mixed
  batch costs no O(length) copy per layer. That is the CPU's step, where a row costs
  arithmetic; on other devices (a GPU, where it costs launches and host round trips) the
  block runs on the whole batch instead (:mod:`.dense_rows`), same results;
* after block i >= ``min_exit_layer`` (and only at the policy's ``exit_layers`` when it names them) a
  confidence c_i is computed for the rows still deciding and a row exits when ``c_i > λ_t`` (strict:
  λ = 1 never exits).
  Exiting rows whose logits the measure did not compute are read out together after
  the last block: one projection onto the vocabulary per step, whatever the number of
  distinct exit layers (the rows' logits equal the per-layer read-out up to rounding).

With ``EarlyExit(anytime="poe")`` (:mod:`hf_safe_exit.decoding.poe`, Jazbec et al. 2023) every
layer's logits are also read out for the deciding rows and folded into a running
Product-of-Experts; an exiting row predicts with (and the softmax measure looks at) the
normalised product of the ReLU'd logits of layers 1..i instead of layer i's own softmax.
Without it the loop is unchanged.

Block 0 owns T5's relative position bias; it is computed once per step (as block 0
would) and handed to every block, as ``T5Stack`` does. A policy that can never exit (λ = 1) does not come
here: ``generate`` runs HF's own loop for it (:mod:`.full_model`), so λ = 1 is HF's output bit for bit. This loop
with a threshold that never triggers computes the same tokens up to rounding: finished rows are left out of the
products and a decoder prompt is prefilled in two forwards, not one.

A decoder prompt (``decoder_input_ids`` longer than the start token) is *prefilled*: every
prompt token but the last goes once through HF's own full decoder forward, which fills the
self-attention cache of every layer and the cross-attention cache; the loop then starts from
the last prompt token. Prompt tokens are never early-exited and are not counted as generated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.generation.utils import GenerateEncoderDecoderOutput

from ..compat import cache_field, find_cache
from .dense_rows import DENSE_ROWS, dense_step
from .kv_buffer import install_kv_buffers
from .poe import PoEConfig
from .step_decoder import StepDecoder
from .step_exits import step_threshold

__all__ = ["EarlyExitGenerateOutput", "UnsupportedDecoderPromptError", "early_exit_decode", "exit_fields",
           "new_decoder_cache"]

class UnsupportedDecoderPromptError(ValueError):
    """Raised for decoder prompts early-exit decoding cannot continue exactly (rows of different lengths)."""


@dataclass
class EarlyExitGenerateOutput(GenerateEncoderDecoderOutput):
    """HF's ``GenerateEncoderDecoderOutput`` plus what early exit did for every generated token.

    Attributes:
        exit_layers: ``(batch, new_tokens)`` LongTensor, 1-based decoder layer each token exited at
            (``num_decoder_layers`` = full model); 0 for tokens after its sequence finished (padding, or with
            no EOS criterion the tokens HF goes on generating).
        confidences: ``(batch, new_tokens)`` float, the confidence that triggered the exit; NaN where
            the token reached the last layer without a confidence being computed, and at padding.
        mean_exit_layer: ``(batch,)`` mean exit layer over each sequence's real (non-padding) tokens.
        layer_fraction: ``(batch,)`` decoder blocks run in full / (num_decoder_layers × real tokens).
        num_decoder_layers: depth of the decoder.
        early_exit: the bound policy that decoded (``early_exit.threshold`` is the λ that ran).
        certificate: that threshold's :class:`~hf_safe_exit.risk.RiskCertificate` when ``RiskControlled`` chose
            it (ε, δ, method, n, λ̂, the bound at λ̂, the model fingerprint and task); ``None`` for a hand-set λ.
    """

    exit_layers: torch.LongTensor | None = None
    confidences: torch.FloatTensor | None = None
    mean_exit_layer: torch.FloatTensor | None = None
    layer_fraction: torch.FloatTensor | None = None
    num_decoder_layers: int | None = None
    # set by hf_safe_exit.generate: the bound policy that ran (its threshold is λ̂) and, for a
    # RiskControlled, the certificate of that threshold
    early_exit: object | None = None
    certificate: object | None = None


def new_decoder_cache(model) -> EncoderDecoderCache:
    """An empty cache sized by the *decoder* depth (stock ``generate`` sizes it by the encoder's)."""
    return EncoderDecoderCache(DynamicCache(config=model.decoder.config), DynamicCache(config=model.decoder.config))


def _check_decoder_prompt(model_kwargs: dict) -> None:
    # The loop keeps one cache length and one relative-position offset for the whole batch, so a padded
    # decoder prompt (rows of different lengths) would attend to / count its padding: refuse it.
    mask = model_kwargs.get("decoder_attention_mask")
    if mask is not None and bool((mask == 0).any()):
        raise UnsupportedDecoderPromptError(
            "early_exit supports decoder prompts (decoder_input_ids) of equal length without padding, but "
            "decoder_attention_mask has zeros: decode such rows in separate calls, grouped by prompt length."
        )


_KV_BUFFER_NEW_TOKENS = 512  # positions preallocated past the prompt (a long max_new_tokens grows on demand)
# Skipped layers' K/V filled when a later token reads them, in one product per layer (deferred_kv). False: at once,
# per token (the path before it), kept for side-by-side measurements (benchmarks/speed_shapes.py) and tests.
DEFER_FILLS = True


def early_exit_decode(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    early_exit_policy=None,
    early_exit_streamer=None,
    early_exit_complete_cache: bool = False,
    **model_kwargs,
):
    """HF ``custom_generate`` callable: greedy or sampled decoding with per-token early exit.

    HF's ``generate`` has already run the encoder, built the decoder start ids,
    the logits processors and stopping criteria. This loop mirrors
    ``GenerationMixin._sample`` (logits processors on float32 logits, argmax or
    multinomial, EOS → pad for finished rows, stopping criteria), with the model
    forward replaced by :class:`StepDecoder`. Rows that have finished run no block: their
    ``scores``/``logits`` entries are zeros (HF's are the logits of a token it replaces by padding).

    Decoder prompts: ``input_ids`` is the decoder prompt HF prepared (start token first). All its
    tokens but the last are prefilled through the full decoder (:meth:`StepDecoder.prefill`), and the last one
    is fed as the first step (HF runs the whole prompt in one forward: the same values up to rounding). As in HF,
    ``max_new_tokens`` counts tokens after the prompt; ``exit_layers`` / ``confidences`` have one
    column per new token. Prompts must have equal lengths: a ``decoder_attention_mask`` with zeros
    raises :class:`UnsupportedDecoderPromptError`. The cache is taken from ``model_kwargs["cache"]``
    (transformers >= 5.24) or ``model_kwargs["past_key_values"]`` (older). ``early_exit_complete_cache``: the cache
    is the caller's (complete it even when only the sequences are returned; see :mod:`.deferred_kv`). With
    ``use_cache=False`` the loop still decodes with its cache (early exit needs one; the outputs equal the no-cache
    computation), but, as HF's, the output holds none, and the K/V no token read are never filled.
    """
    if early_exit_policy is None:
        raise ValueError("early_exit_decode needs early_exit_policy (a bound EarlyExit policy).")
    if synced_gpus:
        raise NotImplementedError("early exit does not support synced_gpus (DeepSpeed ZeRO-3 / FSDP) generation yet.")
    _check_decoder_prompt(model_kwargs)
    # HF's generate puts the prompt into the streamers it knows before decoding; it never saw ours.
    put_prompt = early_exit_streamer is not None
    streamer = early_exit_streamer if early_exit_streamer is not None else streamer
    policy = early_exit_policy
    measure = policy.measure
    poe = getattr(policy, "anytime", None)
    if poe is not None and not isinstance(poe, PoEConfig):
        raise TypeError(f"the bound policy's anytime must be a PoEConfig or None, got {type(poe).__name__}.")
    checked = getattr(policy, "exit_layers", None)  # policies without the attribute check every layer
    checked = None if checked is None else frozenset(checked)
    pad_token_id = generation_config._pad_token_tensor
    return_dict = generation_config.return_dict_in_generate
    output_scores = return_dict and generation_config.output_scores
    output_logits = return_dict and generation_config.output_logits
    has_eos_stopping_criteria = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    do_sample = generation_config.do_sample
    max_new_tokens = max(int(generation_config.max_length) - input_ids.shape[1], 1)

    encoder_outputs = model_kwargs["encoder_outputs"]
    cache = find_cache(model_kwargs)  # `cache` from transformers 5.24 on, `past_key_values` before
    if not isinstance(cache, EncoderDecoderCache) or cache.get_seq_length() != 0 or (
        len(cache.self_attention_cache.layers) not in (0, model.config.num_decoder_layers)
    ):
        cache = new_decoder_cache(model)
    # append K/V in place rather than re-concatenating the whole cache every step (see kv_buffer); sized for the
    # whole generation up to a cap, beyond which it grows by doubling
    install_kv_buffers(cache, model.config.num_decoder_layers,
                       capacity=min(int(generation_config.max_length), input_ids.shape[1] + _KV_BUFFER_NEW_TOKENS))
    decoder = StepDecoder(model, cache, encoder_outputs.last_hidden_state, model_kwargs.get("attention_mask"),
                          defer_fills=DEFER_FILLS)
    decoder.prefill(input_ids[:, :-1])  # the step loop below feeds the last prompt token
    if pad_token_id is not None:
        pad_token_id = pad_token_id.to(input_ids.device)
    if streamer is not None and put_prompt:
        streamer.put(input_ids.cpu())

    batch = input_ids.shape[0]
    # on a GPU every block runs on the whole batch (see dense_rows); PoE anytime predictions need the row-wise step
    dense = poe is None and DENSE_ROWS.get(input_ids.device.type, True)
    unfinished = torch.ones(batch, dtype=torch.long, device=input_ids.device)
    remaining = batch  # rows not finished, known on the host: the step needs no check of its own while all decide
    scores, raw_logits = (), ()
    exit_layers, confidences = [], []
    step = 0
    while True:
        threshold = step_threshold(policy.threshold_at(step, max_new_tokens), batch)  # one λ_t, or one per row
        # a finished row stops decoding only when HF pads it (an EOS criterion): without one, HF goes on generating
        # its tokens, so the row keeps deciding (its exit layers still read 0 past its end, as at λ = 1)
        done = None if remaining == batch or not has_eos_stopping_criteria else unfinished == 0
        if dense:
            logits, layers, conf = dense_step(decoder, input_ids[:, -1:], step=step, threshold=threshold,
                                              measure=measure, min_exit_layer=policy.min_exit_layer, done=done,
                                              exit_layers=checked)
        else:
            logits, layers, conf = decoder.step(input_ids[:, -1:], step=step, threshold=threshold, measure=measure,
                                                min_exit_layer=policy.min_exit_layer, done=done, poe=poe,
                                                exit_layers=checked)
        next_scores = logits_processor(input_ids, logits)
        if output_scores:
            scores += (next_scores,)
        if output_logits:
            raw_logits += (logits,)
        if do_sample:
            next_tokens = torch.multinomial(torch.softmax(next_scores, dim=-1), num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(next_scores, dim=-1)
        if has_eos_stopping_criteria:
            next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
        exit_layers.append(layers * unfinished)
        confidences.append(torch.where(unfinished.bool(), conf, torch.full_like(conf, float("nan"))))
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        unfinished = unfinished & ~stopping_criteria(input_ids, scores)
        step += 1
        remaining = int(unfinished.sum())  # one host synchronisation per step, as HF's `unfinished.max() == 0`
        if remaining == 0:
            break
    if streamer is not None:
        streamer.end()

    # The cache leaves the loop in the output (unless use_cache=False: then, as HF, none is returned) or as the
    # caller's own object: no K/V may be pending in it. A cache nobody takes costs no fill.
    hand_back = early_exit_complete_cache or (return_dict and generation_config.use_cache is not False)
    if hand_back:
        decoder.complete_cache()
    if not return_dict:
        return input_ids
    encoder_hidden_states = encoder_outputs.get("hidden_states") if generation_config.output_hidden_states else None
    return EarlyExitGenerateOutput(
        sequences=input_ids,
        scores=scores if output_scores else None,
        logits=raw_logits if output_logits else None,
        encoder_hidden_states=encoder_hidden_states,
        **{cache_field(EarlyExitGenerateOutput): cache if hand_back else None},
        **exit_fields(torch.stack(exit_layers, dim=1), torch.stack(confidences, dim=1), decoder.num_layers),
    )


def no_cache_returned(policy) -> dict:
    """The ``generate`` keywords for a caller that reads no cache from the output (a timed or scoring call):
    ``{"use_cache": False}`` when ``policy`` decodes in this loop, which then returns no cache and never fills the
    K/V no token read (:mod:`.deferred_kv`); ``{}`` for a full-model policy (λ >= 1: HF's own loop, which without a
    cache would decode another way) and for any policy that does not say (``is_full_model``)."""
    return {} if getattr(policy, "is_full_model", True) else {"use_cache": False}


def exit_fields(exit_layers: torch.Tensor, confidences: torch.Tensor, num_layers: int) -> dict:
    """The early-exit fields of :class:`EarlyExitGenerateOutput` from the ``(batch, new_tokens)`` exit layers (0
    for tokens after a row finished) and confidences: the per-row means over real tokens, and the fraction."""
    real = (exit_layers > 0).sum(dim=1).clamp(min=1)
    mean_exit = exit_layers.sum(dim=1).float() / real
    return {"exit_layers": exit_layers, "confidences": confidences, "mean_exit_layer": mean_exit,
            "layer_fraction": mean_exit / num_layers, "num_decoder_layers": num_layers}
