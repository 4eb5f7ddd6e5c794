"""Train a T5-compatible SentencePiece-style (Unigram + Metaspace) tokenizer offline.

The layout matches T5's: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, then the
learned pieces, then 100 sentinels at the top of the vocabulary with
``<extra_id_0>`` as the *last* id (``vocab_size - 1``) and ``<extra_id_99>`` as
``vocab_size - 100``, exactly as in the released T5 vocabularies.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

__all__ = ["SPECIAL_TOKENS", "sentinel_tokens", "train_t5_tokenizer"]

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]


def sentinel_tokens(n: int = 100) -> list[str]:
    return [f"<extra_id_{i}>" for i in range(n)]


def _batched(texts: Iterable[str], size: int = 256) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def train_t5_tokenizer(texts: Iterable[str], vocab_size: int = 8000, *, extra_ids: int = 100,
                       max_piece_length: int = 16):
    """Train a Unigram tokenizer on ``texts`` and wrap it as a ``T5TokenizerFast``.

    ``vocab_size`` is the total size including the 3 special tokens and the
    ``extra_ids`` sentinels. Printable ASCII is always in the vocabulary; other
    characters not seen in ``texts`` map to ``<unk>``. Returns a ``transformers.T5TokenizerFast`` (in
    transformers 5 an alias of the tokenizers-backed ``T5Tokenizer``); save it
    with ``save_pretrained(dir)``.
    """
    from transformers import T5TokenizerFast

    if vocab_size <= len(SPECIAL_TOKENS) + extra_ids + 10:
        raise ValueError(f"vocab_size={vocab_size} too small for {extra_ids} sentinels")
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - extra_ids,
        special_tokens=SPECIAL_TOKENS,
        unk_token="<unk>",
        max_piece_length=max_piece_length,
        shrinking_factor=0.75,
        n_sub_iterations=2,
        # every printable ASCII character is a piece, so plain English text never maps to <unk>
        initial_alphabet=[chr(c) for c in range(33, 127)],
    )
    tok.train_from_iterator(_batched(texts), trainer=trainer)
    learned = tok.get_vocab_size()
    # sentinels at the top, <extra_id_0> last, as in T5's vocabularies
    sentinels = list(reversed(sentinel_tokens(extra_ids)))
    tok.add_special_tokens(sentinels)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    assert tok.token_to_id("<pad>") == 0 and tok.token_to_id("</s>") == 1 and tok.token_to_id("<unk>") == 2
    assert tok.token_to_id("<extra_id_0>") == learned + extra_ids - 1
    fast = T5TokenizerFast(tokenizer_object=tok, extra_ids=0, additional_special_tokens=sentinel_tokens(extra_ids),
                           eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    return fast
