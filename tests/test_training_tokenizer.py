"""The T5-compatible tokenizer trained offline with the `tokenizers` library."""

import pytest
from transformers import AutoTokenizer

from hf_safe_exit.training.tokenizer import train_t5_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Officials said on Tuesday that the new bridge would open in 2025, costing $3.5 million.",
    "Question answering systems read a context paragraph and extract a short answer span.",
    "Early exit lets a decoder stop at an intermediate layer when it is already confident.",
    "Summaries of news articles are written by journalists as a few highlight sentences.",
    "In 1066, William of Normandy crossed the Channel; the battle of Hastings followed.",
] * 30


@pytest.fixture(scope="module")
def tok():
    return train_t5_tokenizer(CORPUS, vocab_size=400)


def test_special_ids_match_t5(tok):
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.unk_token_id == 2
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    V = len(tok)
    # as in T5's vocabularies: <extra_id_0> is the last id, <extra_id_99> the 100th from the top
    assert tok.convert_tokens_to_ids("<extra_id_0>") == V - 1
    assert tok.convert_tokens_to_ids("<extra_id_99>") == V - 100
    ids = tok.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])
    assert ids == list(range(V - 1, V - 101, -1))


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "Officials said the bridge would cost $3.5 million in 2025.",
    "summarize: William crossed the Channel; Hastings followed.",
    "question: who crossed? context: William of Normandy crossed the Channel.",
])
def test_round_trip(tok, text):
    enc = tok(text).input_ids
    assert enc[-1] == tok.eos_token_id and enc.count(tok.eos_token_id) == 1
    assert tok.decode(enc, skip_special_tokens=True) == text


def test_unseen_ascii_is_covered_and_unseen_unicode_is_unk(tok):
    text = "A ~tilde^ {brace} | pipe?"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    assert tok.unk_token_id in tok("\u4e2d").input_ids  # a CJK character never seen in training


def test_sentinels_are_single_tokens_in_text(tok):
    enc = tok("The quick <extra_id_0> fox <extra_id_1> dog.").input_ids
    assert tok.convert_tokens_to_ids("<extra_id_0>") in enc and tok.convert_tokens_to_ids("<extra_id_1>") in enc
    assert "<extra_id_0>" in tok.decode(enc)


def test_save_and_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "Early exit lets a decoder stop at an intermediate layer."
    assert again(text).input_ids == tok(text).input_ids
    assert len(again) == len(tok)
    assert again.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1
