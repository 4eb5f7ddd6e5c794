"""The batch makers of the from-scratch recipe's stages (:mod:`.recipe`).

Pretraining draws each batch from one self-supervised objective (less padding than mixing them in a batch):
BART text infilling, T5 span corruption, lead sentences and cloze questions, in the shares of
``pretrain_mix``. Fine-tuning draws CNN/DM or SQuAD batches (``summ_prob``), and keeps a share
(``finetune_self_supervised``) of lead/cloze batches so that 500 CNN/DM rows are not simply memorised.
"""

from __future__ import annotations

import random
from typing import Callable

from hf_safe_exit.training.data import qa_example, summarization_example
from hf_safe_exit.training.self_supervised import cloze_question_example, lead_sentences_example
from hf_safe_exit.training.span_corruption import span_corrupt, text_infill

from .loop import encode_pairs, log, pad_batch

__all__ = ["OBJECTIVES", "parse_mix", "self_supervised_sources", "mixture", "finetune_batches"]

OBJECTIVES = ("infill", "span", "lead", "cloze")


def parse_mix(spec: str) -> dict[str, float]:
    """``"infill=0.6,lead=0.25,..."`` -> ``{"infill": 0.6, "lead": 0.25, ...}``; raises ``ValueError`` naming the fix."""
    try:
        mix = {k.strip(): float(v) for k, v in (item.split("=") for item in spec.split(",") if item.strip())}
    except ValueError:
        mix = {}
    unknown = set(mix) - set(OBJECTIVES)
    if unknown or not mix or min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise ValueError(f"pretrain_mix={spec!r}: expected non-negative weights for {'/'.join(OBJECTIVES)} with a "
                         "positive sum, e.g. 'infill=0.6,lead=0.25,cloze=0.15,span=0'.")
    return mix


def self_supervised_sources(tok, texts: list[str], config, sentinels: list[int]) -> dict[str, Callable[[], dict]]:
    """Per-objective batch makers over the pretraining ``texts`` (one objective per batch: less padding).

    ``config`` supplies ``seed``, ``batch_size``, ``max_source_length``, ``max_target_length``,
    ``qa_target_length``, ``infill_length`` and ``lead_source_length``.
    """
    rng = random.Random(config.seed + 1)
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    chunk = int(config.max_source_length * 0.85) - 2
    chunks = [x[i:i + chunk] for x in ids for i in range(0, len(x), chunk) if len(x[i:i + chunk]) >= 16]
    # infilling chunks of 8..infill_length tokens: on short inputs even uniform cross-attention carries a
    # strong signal of which tokens to copy, which gets a from-scratch model off the unigram plateau
    short = []
    for x in ids:
        i = 0
        while len(x) - i >= 8:
            n = rng.randint(8, config.infill_length)
            short.append(x[i:i + n])
            i += n
    lead = encode_pairs(tok, [ex for ex in map(lead_sentences_example, texts) if ex is not None],
                        config.lead_source_length, config.max_target_length)
    # the cloze sentence must lie inside the truncated context: keep the first words only
    words_fit = int(config.max_source_length * 0.55)
    cloze_texts = [" ".join(t.split()[:words_fit]) for t in texts]
    log(f"self-supervised: {len(chunks)} span-corruption chunks of <= {chunk} tokens "
        f"({sum(map(len, chunks)) / 1e6:.2f}M tokens), {len(lead)} lead-sentence pairs, "
        f"{len(cloze_texts)} passages for cloze questions")

    def make_cloze():
        pairs = []
        while len(pairs) < config.batch_size:
            ex = cloze_question_example(rng.choice(cloze_texts), rng)
            if ex is not None:
                pairs.append(ex)
        return pad_batch(encode_pairs(tok, pairs, config.max_source_length, config.qa_target_length))

    return {"span": lambda: pad_batch([span_corrupt(c, sentinels, rng=rng)
                                       for c in rng.sample(chunks, config.batch_size)]),
            "infill": lambda: pad_batch([text_infill(c, sentinels[0], rng=rng)
                                         for c in rng.sample(short, 2 * config.batch_size)]),
            "lead": lambda: pad_batch(rng.sample(lead, config.batch_size)),
            "cloze": make_cloze}


def mixture(makers: dict, weights: dict[str, float], seed: int) -> Callable[[], dict]:
    """A batch maker that calls one of ``makers`` per batch, chosen with probabilities ∝ ``weights``."""
    rng = random.Random(seed)
    names = [k for k in weights if weights[k] > 0]
    if not names:
        raise ValueError(f"a batch mixture needs at least one positive share, got {weights!r}.")
    w = [weights[k] for k in names]
    return lambda: makers[rng.choices(names, w)[0]]()


def finetune_batches(tok, cnn_train: list[dict], sq_train: list[dict], texts: list[str], config,
                     sentinels: list[int]) -> Callable[[], dict]:
    """The multitask fine-tuning batch maker: CNN/DM (share ``summ_prob`` of the supervised batches) or SQuAD,
    and a share ``finetune_self_supervised`` of all batches from lead sentences / cloze questions."""
    summ_pairs = encode_pairs(tok, [summarization_example(r) for r in cnn_train], config.max_source_length,
                              config.max_target_length)
    qa_pairs = encode_pairs(tok, [qa_example(q) for q in sq_train], config.max_source_length, config.qa_target_length)
    rng = random.Random(config.seed + 2)
    ssl = self_supervised_sources(tok, texts, config, sentinels) if config.finetune_self_supervised > 0 else {}
    keep_ssl = mixture(ssl, {"lead": 0.5, "cloze": 0.5}, config.seed + 6) if ssl else None

    def make():
        if keep_ssl is not None and rng.random() < config.finetune_self_supervised:
            return keep_ssl()
        pool = summ_pairs if rng.random() < config.summ_prob else qa_pairs
        return pad_batch(rng.sample(pool, config.batch_size))
    return make
