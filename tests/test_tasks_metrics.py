"""Task metrics against independent references: hand-computed ROUGE-L (LCS) and the official SQuAD v1.1 rules."""

import re

import pytest

from hf_safe_exit.tasks import CNNDailyMail, SQuAD, UnknownTaskError, get_task, normalize_answer, squad_exact_match, squad_f1


def lcs_length(a, b):
    """Textbook dynamic-programming LCS length, written independently of rouge_score."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, 1):
        for j, y in enumerate(b, 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x == y else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def lcs_f(pred_tokens, ref_tokens):
    lcs = lcs_length(pred_tokens, ref_tokens)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred_tokens), lcs / len(ref_tokens)
    return 2 * p * r / (p + r)


# (prediction, reference, value computed by hand)
HAND_PAIRS = [
    ("the cat sat on the mat", "the cat is on the mat", 5 / 6),                   # LCS "the cat on the mat"
    ("police killed the gunman", "the gunman was shot by police", 0.4),           # Lin (2004): LCS 2, P 1/2, R 1/3
    ("a b c d", "d c b a", 0.25),                                                 # LCS 1
    ("one two three", "one two three", 1.0),
    ("alpha beta", "gamma delta", 0.0),
]


@pytest.mark.parametrize("pred,ref,expected", HAND_PAIRS)
def test_rouge_l_matches_hand_values_and_independent_lcs(pred, ref, expected):
    task = CNNDailyMail()
    value = task.score(pred, ref)
    assert value == pytest.approx(expected, abs=1e-12)
    assert value == pytest.approx(lcs_f(pred.split(), ref.split()), abs=1e-12)
    assert task.loss(pred, ref) == pytest.approx(1 - expected, abs=1e-12)


def test_rouge_l_is_case_and_punctuation_insensitive_and_stems():
    task = CNNDailyMail()
    assert task.score("The CAT, sat!", "the cat sat") == 1.0
    # stemming on: running->run, dogs->dog, runs->run; LCS of [run, dog] and [the, dog, run] is 1 -> F = 0.4
    assert task.score("running dogs", "the dog runs") == pytest.approx(0.4)
    assert lcs_f(["running", "dogs"], ["the", "dog", "runs"]) == 0.0  # without stemming there is no overlap


def test_rouge_l_reference_is_newline_joined_highlights_scored_as_one_sequence():
    """rougeL (not rougeLsum): newlines are whitespace, the LCS runs over the whole reference."""
    task = CNNDailyMail()
    highlights = "six patients got kidneys\nthe chain started with one donor"
    pred = "one donor started a chain and six patients got kidneys"
    ref_tokens = re.sub(r"\s+", " ", highlights).split()
    expected = lcs_f(pred.split(), ref_tokens)
    assert task.score(pred, highlights) == pytest.approx(expected, abs=1e-12)
    # hand check: LCS = "six patients got kidneys" (4) -> P = 4/10, R = 4/10 -> F = 0.4
    assert expected == pytest.approx(0.4)
    assert task.reference({"highlights": highlights, "article": "x", "id": "0"}) == highlights


def test_cnndm_prompt_and_consistency_loss():
    task = get_task("cnndm")
    assert task.prompt({"article": "Some text.", "highlights": "", "id": "1"}) == "summarize: Some text."
    assert task.consistency_loss("the cat sat on the mat", "the cat sat on the mat") == 0.0
    assert task.consistency_loss("", "") == 0.0
    assert task.consistency_loss("the cat sat on the mat", "the cat is on the mat") == pytest.approx(1 / 6)
    assert task.consistency_loss("", "the cat") == 1.0
    assert task.loss_bounds == (0.0, 1.0)


# Official SQuAD v1.1 normalisation: lower, drop punctuation, drop a/an/the, collapse whitespace.
@pytest.mark.parametrize("raw,normalised", [
    ("The Denver Broncos", "denver broncos"),
    ("an apple a day", "apple day"),
    ("Another theory", "another theory"),          # articles only as whole words
    ("U.S. Army's", "us armys"),                   # punctuation removed, not replaced by spaces
    ("  Saint   Bernadette\tSoubirous \n", "saint bernadette soubirous"),
    ("(the) 1,000!", "1000"),
])
def test_squad_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_squad_f1_and_exact_match_by_hand():
    # articles and punctuation ignored -> exact match
    assert squad_exact_match("the Denver Broncos.", ["Denver Broncos"]) == 1.0
    assert squad_f1("the Denver Broncos.", ["Denver Broncos"]) == 1.0
    # partial overlap: pred {denver}, gold {denver, broncos}: P 1, R 1/2, F1 2/3
    assert squad_f1("Denver", ["Denver Broncos"]) == pytest.approx(2 / 3)
    assert squad_exact_match("Denver", ["Denver Broncos"]) == 0.0
    # repeated tokens are counted as a multiset: pred [a? no] "paris paris france" vs "paris": common 1, P 1/3, R 1
    assert squad_f1("Paris paris France", ["Paris"]) == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    # no overlap
    assert squad_f1("Santa Clara", ["Levi's Stadium"]) == 0.0
    # whitespace differences do not matter
    assert squad_exact_match("Levi's   Stadium", ["levis stadium"]) == 1.0


def test_squad_max_over_references():
    refs = ["Denver Broncos", "Broncos", "the Denver Broncos team"]
    # vs ref 1: 2/3; vs ref 2: 1.0 (exact); vs ref 3 ("denver broncos team"): P 1, R 1/3 -> 0.5
    assert squad_f1("Broncos", refs) == 1.0
    assert squad_exact_match("Broncos", refs) == 1.0
    # "Denver": 2/3, 0, 2*1*(1/3)/(4/3) = 0.5 -> max 2/3
    assert squad_f1("Denver", refs) == pytest.approx(2 / 3)


def test_squad_task_interface():
    task = SQuAD()
    example = {"id": "q1", "question": "Who won?", "context": "The Broncos won.",
               "answers": {"text": ["Broncos", "the Broncos"], "answer_start": [4, 0]}}
    assert task.prompt(example) == "question: Who won? context: The Broncos won."
    assert task.reference(example) == ["Broncos", "the Broncos"]
    assert task.loss("Denver Broncos", task.reference(example)) == pytest.approx(1 - 2 / 3)
    assert task.metrics("broncos!", task.reference(example)) == {"score": 1.0, "f1": 1.0, "exact_match": 1.0}
    assert task.consistency_loss("Denver", "Denver Broncos") == pytest.approx(1 / 3)
    assert task.consistency_loss("", "") == 0.0
    assert task.example_id(example) == "q1"
    with pytest.raises(ValueError, match="non-empty list of answer strings"):
        task.score("x", [])


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(UnknownTaskError, match=r"unknown task 'xsum': use one of \['cnndm', 'squad'\]"):
        get_task("xsum")
    assert get_task("SQuAD").name == "squad" and get_task(get_task("cnndm")).name == "cnndm"
