"""BiLD: big-little speculative decoding for two HF T5-family models.

Big Little Decoder (Kim et al., NeurIPS 2023) pairs a small and a large seq2seq model
that share a vocabulary:

* **Draft.** The small model decodes autoregressively. Before it commits a token it looks at
  its confidence, the maximum probability after the logits processors. If that is below the
  **fallback** threshold α_FB the token is left to the large model (a *fallback*). Drafting also
  stops after ``max_draft_len`` tokens, or when a stopping criterion (EOS, ``max_length``) fires.
* **Verify.** The large model scores every drafted token in one non-autoregressive pass. It
  **rolls back** at the first drafted token ``y`` whose cross-entropy under the large model,
  ``-log p_L(y)``, exceeds the **rollback** threshold α_RB (strictly). It keeps the tokens before
  ``y`` and puts its own token in place of ``y``. If nothing is rolled back and the draft ended in
  a fallback, the large model's token for the next position is appended, because the same pass
  already computed it. If the draft ended at ``max_draft_len`` or at a stopping criterion, nothing
  is appended and the small model drafts the next token. So α_FB = 0 with α_RB = ∞ gives exactly
  the small model's output.
* Both models' caches are cropped to the kept prefix, per sequence.

α_RB = 0 gives the large model's greedy tokens except at float ties: every drafted token with
``p_L(y) < 1`` is rolled back, and a token with ``p_L(y) == 1`` is the large model's argmax anyway, but the
verify pass scores several tokens over a left-padded cache in one product, which rounds differently from HF's
one token at a time (float32: logits equal to ~1e-6 relative, so two logits closer than that may swap; float64:
the same tokens; both tested in ``tests/test_exactness.py``). Unlike the
reference implementation, a threshold of 0 here means 0, not "use the default".

Greedy and sampling
    The logits processors come from the large model's merged ``GenerationConfig`` (temperature,
    top-k, top-p, repetition penalty, min length, ...). They apply to both models' scores, per row
    and per position, with that position's own prefix. Greedy decoding takes the argmax. Sampling
    draws from the processed distribution with ``torch.multinomial``, so a fixed ``torch.manual_seed``
    gives the same output. With sampling the rollback test uses the sampled draft token. BiLD is
    not a distribution-preserving speculative sampler: with α_RB > 0 the output distribution
    differs from the large model's.

Batches and per-sequence rollback
    Rows accept different numbers of drafted tokens, so their lengths differ after a rollback: each model's
    cache is kept right-aligned with left padding and cropped per row (:mod:`hf_safe_exit.decoding.bild_cache`).
    The draft / verify / commit rounds run in :mod:`hf_safe_exit.decoding.bild_loop`.

Statistics per call (``return_dict_in_generate=True`` → :class:`BiLDOutput`): tokens drafted,
accepted, rolled back; rollback and fallback events; tokens produced by the large model; large- and
small-model decoder calls (one batched forward counts as one call; the encoders run once each and
are not counted).

Risk control of the rollback threshold
    Rollback thresholds map to λ ∈ [0, 1] by ``λ = exp(-α_RB)``, so ``α_RB = -log λ``. λ = 1 is
    α_RB = 0, i.e. the large model's output; λ = 0 is α_RB = ∞, where every draft is accepted.
    λ has a plain meaning: a drafted token is kept iff ``p_L(y) >= λ``, the smallest probability
    the large model must give it. A smaller λ is more permissive. A calibration runner takes
    ``lambda lam: BiLD.from_lambda(small_model, lam, fallback=...)`` (or
    :func:`bild_policy_factory`) as its policy factory, exactly as for the early-exit threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers.cache_utils import EncoderDecoderCache
from transformers.generation.utils import GenerationMixin

from ..compat import cache_kwargs, find_cache
from .bild_cache import BiLDDecoder
from .bild_loop import BiLDRun
from .bild_output import BiLDOutput, BiLDStats
from .early_exit_loop import new_decoder_cache
from .readout import check_supported_model

__all__ = [
    "BiLD",
    "BiLDOutput",
    "BiLDStats",
    "DEFAULT_FALLBACK",
    "DEFAULT_ROLLBACK",
    "DEFAULT_MAX_DRAFT_LEN",
    "bild_policy_factory",
    "check_compatible_pair",
    "lambda_to_rollback",
    "rollback_to_lambda",
]

DEFAULT_FALLBACK = 0.6
# A few nats, the range used for α_RB in the BiLD paper's experiments. A drafted token is kept while
# the large model gives it probability >= exp(-3) ≈ 0.05.
DEFAULT_ROLLBACK = 3.0
DEFAULT_MAX_DRAFT_LEN = 10

# generate() arguments BiLD cannot honour; the message says what to do instead.
_REJECTED_KWARGS = {
    "assistant_model": "BiLD already is a speculative decoder: pass the small model as BiLD(small_model=...)",
    "streamer": "streaming is not supported by BiLD decoding; decode without a streamer",
    "custom_generate": "BiLD supplies its own decoding loop; drop custom_generate",
    "past_key_values": "BiLD builds its own caches for both models; drop past_key_values",
    "cache": "BiLD builds its own caches for both models; drop cache",
    "inputs_embeds": "BiLD runs the small model's encoder on token ids; pass input_ids instead of inputs_embeds",
    "decoder_input_ids": "BiLD starts from the decoder start token; decoder prompts are not supported",
}
_UNSUPPORTED_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


# ----------------------------------------------------------------------------------------------
# thresholds and λ


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        raise ValueError(f"{name}={value!r} must be a real number.")
    return float(value)


def rollback_to_lambda(rollback: float) -> float:
    """λ = exp(-α_RB): 1 for rollback 0 (the large model's output), 0 for rollback ∞."""
    rollback = _check_real("rollback", rollback)
    if rollback < 0:
        raise ValueError(f"rollback={rollback!r} is negative: use a cross-entropy threshold >= 0 "
                         "(0 = the large model).")
    return math.exp(-rollback)


def lambda_to_rollback(lam: float) -> float:
    """α_RB = -log λ for λ in [0, 1]: λ = 1 → 0 (the large model), λ = 0 → ∞ (accept every draft)."""
    lam = _check_real("lam", lam)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam={lam!r} is outside [0, 1]: 1 is the large model's output, smaller is more permissive.")
    if lam == 0.0:
        return math.inf
    return 0.0 if lam == 1.0 else -math.log(lam)  # not max(-log λ, 0): that gives -0.0 at λ = 1


# ----------------------------------------------------------------------------------------------
# compatibility


def _special_ids(model) -> dict[str, Any]:
    gc, cfg = model.generation_config, model.config

    def pick(name):
        value = getattr(gc, name, None)
        return getattr(cfg, name, None) if value is None else value

    return {name: pick(name) for name in ("decoder_start_token_id", "pad_token_id", "eos_token_id")}


def check_compatible_pair(large_model, small_model, large_tokenizer=None, small_tokenizer=None) -> None:
    """Raise unless ``small_model`` can draft for ``large_model``.

    Both must be supported T5-family models (``TypeError`` otherwise), on the same device, with the
    same vocabulary size, output head size, and decoder-start, pad and EOS ids (``ValueError``).
    If both tokenizers are given, their vocabularies must be identical too.
    """
    check_supported_model(large_model)
    check_supported_model(small_model)
    fix = ("BiLD needs two checkpoints of one model family that share a tokenizer (e.g. t5-small with t5-large, "
           "or flan-t5-small with flan-t5-xl); load a small model trained with the large model's tokenizer.")
    v_large = large_model.get_output_embeddings().weight.shape[0]
    v_small = small_model.get_output_embeddings().weight.shape[0]
    if large_model.config.vocab_size != small_model.config.vocab_size or v_large != v_small:
        raise ValueError(
            f"mismatched vocabularies: the large model has vocab_size={large_model.config.vocab_size} "
            f"(LM head {v_large}) but the small model has vocab_size={small_model.config.vocab_size} "
            f"(LM head {v_small}). {fix}"
        )
    ids_large, ids_small = _special_ids(large_model), _special_ids(small_model)
    for name in ids_large:
        a, b = ids_large[name], ids_small[name]
        if a is not None and b is not None and a != b:
            raise ValueError(f"mismatched special tokens: {name} is {a!r} for the large model but {b!r} for the "
                             f"small model. {fix}")
    if large_tokenizer is not None and small_tokenizer is not None:
        if large_tokenizer.get_vocab() != small_tokenizer.get_vocab():
            raise ValueError("mismatched tokenizers: the large and small tokenizers map tokens to different ids. "
                             f"{fix}")
    if large_model.device != small_model.device:
        raise ValueError(f"the large model is on {large_model.device} but the small model is on {small_model.device}; "
                         "move both to the same device (model.to(device)).")


# ----------------------------------------------------------------------------------------------
# the policy object


@dataclass(frozen=True)
class BiLD:
    """Big-little speculative decoding; pass as ``model.generate(..., early_exit=BiLD(small_model))``.

    Args:
        small_model: a T5-family model sharing the large model's vocabulary (the drafter).
        fallback: α_FB in [0, 1]. The small model hands a token to the large model when its
            confidence (max processed probability) is < α_FB. 0 never falls back.
        rollback: α_RB >= 0 (``math.inf`` allowed). A drafted token ``y`` is rolled back when
            ``-log p_L(y) > α_RB``. 0 reproduces the large model; ∞ accepts every draft.
        max_draft_len: the most tokens the small model drafts before the large model verifies.
        small_tokenizer: optional. If given, and ``generate`` gets ``tokenizer=``, the two
            vocabularies are compared.

    ``decode(large_model, **generate_kwargs)`` runs the decoding. With ``enable(model)`` it is
    called for you by ``model.generate(..., early_exit=BiLD(...))``.
    """

    small_model: Any = field(repr=False)
    fallback: float = DEFAULT_FALLBACK
    rollback: float = DEFAULT_ROLLBACK
    max_draft_len: int = DEFAULT_MAX_DRAFT_LEN
    small_tokenizer: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_supported_model(self.small_model)
        fallback = _check_real("fallback", self.fallback)
        if not 0.0 <= fallback <= 1.0:
            raise ValueError(f"fallback={self.fallback!r} is outside [0, 1]: it is a probability threshold on the "
                             "small model's confidence (0 = never fall back to the large model).")
        rollback = _check_real("rollback", self.rollback)
        if rollback < 0:
            raise ValueError(f"rollback={self.rollback!r} is negative: it is a cross-entropy threshold in nats, "
                             ">= 0 (0 = the large model's output, math.inf = accept every draft).")
        if isinstance(self.max_draft_len, bool) or not isinstance(self.max_draft_len, int) or self.max_draft_len < 1:
            raise ValueError(f"max_draft_len={self.max_draft_len!r} must be an integer >= 1.")

    # -- λ ----------------------------------------------------------------------------------
    @property
    def lam(self) -> float:
        """λ = exp(-rollback) in [0, 1] (1 = the large model's output)."""
        return rollback_to_lambda(self.rollback)

    @classmethod
    def from_lambda(cls, small_model, lam: float, *, fallback: float = DEFAULT_FALLBACK,
                    max_draft_len: int = DEFAULT_MAX_DRAFT_LEN, small_tokenizer=None) -> "BiLD":
        """The BiLD policy with rollback = -log λ (λ = 1: the large model's output; 0: accept all drafts)."""
        return cls(small_model, fallback=fallback, rollback=lambda_to_rollback(lam), max_draft_len=max_draft_len,
                   small_tokenizer=small_tokenizer)

    def describe(self) -> dict[str, Any]:
        """JSON-able settings that determine the output (for result metadata and resume checks)."""
        from ..fingerprint import model_fingerprint

        rollback = float(self.rollback) if math.isfinite(self.rollback) else "inf"  # strict JSON has no Infinity
        return {"strategy": "bild", "fallback": float(self.fallback), "rollback": rollback, "lambda": self.lam,
                "max_draft_len": int(self.max_draft_len), "small_model": model_fingerprint(self.small_model)}

    # -- decoding -----------------------------------------------------------------------------
    def check_pair(self, large_model, large_tokenizer=None) -> None:
        """Raise ``TypeError``/``ValueError`` unless this policy's small model can draft for ``large_model``."""
        check_compatible_pair(large_model, self.small_model, large_tokenizer, self.small_tokenizer)

    def decode(self, large_model, inputs: torch.Tensor | None = None, **generate_kwargs):
        """Generate with BiLD. Takes the arguments of ``generate`` and returns what it returns.

        Returns a ``LongTensor`` of sequences (decoder start token first, finished rows padded
        with ``pad_token_id``, as HF does). With ``return_dict_in_generate=True`` it returns a
        :class:`BiLDOutput` with the statistics. ``bild_step_callback=fn`` (optional) is called
        after every verification step with a dict: ``large``/``small`` (internal decoders),
        ``rows`` (original batch indices of the active rows), ``sequences`` (their committed
        tokens), ``rolled_back`` (per row, whether this step rolled back) and ``rolled_back_tokens``
        (per row, how many drafted tokens this step discarded).
        """
        self.check_pair(large_model, generate_kwargs.get("tokenizer"))
        for name, why in _REJECTED_KWARGS.items():
            if generate_kwargs.get(name) is not None:
                raise ValueError(f"{name} is not supported with BiLD: {why}.")
        if generate_kwargs.get("synced_gpus"):
            raise ValueError("synced_gpus is not supported with BiLD: run on a single device.")
        step_callback: Callable | None = generate_kwargs.pop("bild_step_callback", None)
        for name in ("use_cache", "past_key_values", "cache", "custom_generate", "assistant_model", "streamer"):
            generate_kwargs.pop(name, None)

        stats = BiLDStats()

        def loop(model, input_ids, logits_processor, stopping_criteria, generation_config, inputs_tensor=None,
                 **model_kwargs):
            return self._loop(model, input_ids, logits_processor, stopping_criteria, generation_config,
                              inputs_tensor, model_kwargs, stats, step_callback)

        # Call the unpatched HF generate: it merges the GenerationConfig, runs the large encoder and
        # builds logits processors and stopping criteria, then hands over to ``loop``.
        return GenerationMixin.generate(large_model, inputs, custom_generate=loop,
                                        **cache_kwargs(new_decoder_cache(large_model)),
                                        **generate_kwargs)

    def _loop(self, large, input_ids, logits_processor, stopping_criteria, gen_cfg, inputs_tensor, model_kwargs,
              stats: BiLDStats, step_callback):
        _check_generation(gen_cfg, inputs_tensor)
        pad_id = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else 0
        large_dec, small_dec = self._decoders(large, input_ids, inputs_tensor, model_kwargs, pad_id)
        run = BiLDRun(large_dec, small_dec, input_ids, logits_processor, stopping_criteria, gen_cfg,
                      fallback=float(self.fallback), rollback=float(self.rollback), max_draft_len=self.max_draft_len,
                      stats=stats)
        while run.active:
            run.round(step_callback)
        return run.output(pad_id, gen_cfg.return_dict_in_generate)

    def _decoders(self, large, input_ids, inputs_tensor, model_kwargs, pad_id: int) -> tuple[BiLDDecoder, BiLDDecoder]:
        """Both models' decoder sides, each over its own encoder's states; the large one takes over ``generate``'s
        cache when that is an empty encoder-decoder cache."""
        small = self.small_model
        enc_mask = model_kwargs.get("attention_mask")
        repeat = input_ids.shape[0] // inputs_tensor.shape[0]
        small_inputs = inputs_tensor.repeat_interleave(repeat, dim=0) if repeat > 1 else inputs_tensor
        small_inputs = small_inputs.to(small.device)
        small_hidden = small.get_encoder()(input_ids=small_inputs, attention_mask=enc_mask, return_dict=True)
        large_dec = BiLDDecoder(large, model_kwargs["encoder_outputs"].last_hidden_state, enc_mask, pad_id)
        cache = find_cache(model_kwargs)
        if isinstance(cache, EncoderDecoderCache) and cache.get_seq_length() == 0:
            large_dec.cache = cache
        return large_dec, BiLDDecoder(small, small_hidden.last_hidden_state, enc_mask, pad_id)


def _check_generation(gen_cfg, inputs_tensor) -> None:
    """Raise ``ValueError`` for what BiLD cannot decode: beam search, per-step outputs, no encoder token ids."""
    if gen_cfg.num_beams is not None and gen_cfg.num_beams > 1:
        raise ValueError(f"num_beams={gen_cfg.num_beams} is not supported with BiLD: use greedy (num_beams=1) or "
                         "sampling (do_sample=True).")
    for name in _UNSUPPORTED_OUTPUTS:
        if getattr(gen_cfg, name, False):
            raise ValueError(f"{name}=True is not supported with BiLD; request only return_dict_in_generate.")
    if inputs_tensor is None or inputs_tensor.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
        raise ValueError("BiLD needs encoder input_ids (token ids) to run the small model's encoder.")


def bild_policy_factory(small_model, *, fallback: float = DEFAULT_FALLBACK, max_draft_len: int = DEFAULT_MAX_DRAFT_LEN,
                        small_tokenizer=None) -> Callable[[float], BiLD]:
    """``lam -> BiLD.from_lambda(small_model, lam, ...)``: the policy factory a calibration runner takes."""
    check_supported_model(small_model)

    def factory(lam: float) -> BiLD:
        return BiLD.from_lambda(small_model, lam, fallback=fallback, max_draft_len=max_draft_len,
                                small_tokenizer=small_tokenizer)

    return factory
