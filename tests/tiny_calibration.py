"""A tiny random T5 and a word-level tokenizer built offline: for smoke tests of the pipeline, not for results.

Nothing is downloaded: the tokenizer is a ``tokenizers`` WordLevel model over the words of
the texts you give, wrapped in ``PreTrainedTokenizerFast``; the model is a randomly
initialised ``T5ForConditionalGeneration`` (``initializer_factor=4`` so that its greedy
outputs vary instead of repeating one token).
"""

from __future__ import annotations

import os
import re
from typing import Iterable

__all__ = ["build_word_tokenizer", "build_tiny_t5", "save_tiny_t5", "tiny_cnndm"]

_SPECIALS = ["<pad>", "</s>", "<unk>"]


def build_word_tokenizer(texts: Iterable[str], max_vocab: int = 500):
    """A lowercase word-level tokenizer (pad 0, eos 1, unk 2) over the most frequent words of ``texts``."""
    from collections import Counter

    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    counts = Counter(w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower()))
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][: max_vocab - len(_SPECIALS)]
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + words)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)


def build_tiny_t5(vocab_size: int, seed: int = 0, num_layers: int = 2, num_decoder_layers: int = 3, d_model: int = 16):
    """A randomly initialised tiny ``T5ForConditionalGeneration`` (float32, eval mode)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=32, num_layers=num_layers,
                      num_decoder_layers=num_decoder_layers, num_heads=2, relative_attention_num_buckets=8,
                      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                      initializer_factor=4.0, feed_forward_proj="relu", tie_word_embeddings=True)
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config).eval()


def tiny_cnndm(n_rows: int, data, **model_kwargs):
    """``(task, rows, tokenizer, model)``: the CNN/DM task, the first ``n_rows`` rows of its pool split in ``data``, a
    word tokenizer over their prompts and highlights, and a tiny random T5 for it (:func:`build_tiny_t5`)."""
    from hf_safe_exit.tasks import get_task, load_split

    task = get_task("cnndm")
    rows = load_split(task, "pool", path=data).select(range(n_rows))
    tokenizer = build_word_tokenizer([task.prompt(r) + " " + r["highlights"] for r in rows])
    return task, rows, tokenizer, build_tiny_t5(len(tokenizer), **model_kwargs)


def save_tiny_t5(directory: str | os.PathLike, texts: Iterable[str], seed: int = 0, **model_kwargs) -> str:
    """Build a word tokenizer over ``texts`` and a tiny random T5 for it, save both to ``directory``."""
    tokenizer = build_word_tokenizer(texts)
    model = build_tiny_t5(len(tokenizer), seed=seed, **model_kwargs)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return os.fspath(directory)
