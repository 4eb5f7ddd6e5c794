"""Self-supervised task-shaped examples: lead sentences and cloze questions, checked by hand."""

import random

from hf_safe_exit.training.self_supervised import cloze_question_example, lead_sentences_example, split_sentences

TEXT = ("The council met on Tuesday in Northfield. It voted to restore the old depot. "
        "Work will cost 12 million dollars and take two years. Mayor Elena Ruiz welcomed the plan!")


def test_split_sentences_at_end_punctuation_before_a_capital_or_digit():
    assert split_sentences(TEXT) == ["The council met on Tuesday in Northfield.", "It voted to restore the old depot.",
                                     "Work will cost 12 million dollars and take two years.",
                                     "Mayor Elena Ruiz welcomed the plan!"]
    assert split_sentences("Mr. smith stayed. 3 men left.") == ["Mr. smith stayed.", "3 men left."]


def test_lead_sentences_are_the_first_whole_sentences_within_the_word_budget():
    src, tgt = lead_sentences_example(TEXT, max_words=14)
    assert src == "summarize: " + TEXT
    assert tgt == "The council met on Tuesday in Northfield. It voted to restore the old depot."  # 7 + 7 words
    assert lead_sentences_example(TEXT, max_words=3)[1] == "The council met on Tuesday in Northfield."  # ≥ 1 sentence
    assert lead_sentences_example("One sentence. Two sentences.") is None  # too short to have a "lead"


def test_cloze_question_removes_a_name_or_number_that_the_context_contains():
    seen = set()
    for seed in range(40):
        src, answer = cloze_question_example(TEXT, random.Random(seed))
        question, context = src.removeprefix("question: ").split(" context: ")
        assert context == TEXT and answer in TEXT and answer not in question
        wh = "how many" if answer[0].isdigit() else "what"
        restored = question.replace(wh, answer, 1).rstrip("?")
        assert any(restored == s.rstrip(".!") for s in split_sentences(TEXT)), (question, answer)
        seen.add(answer)
    # candidates: capitalised phrases and numbers not at a sentence start
    assert seen <= {"Tuesday", "Northfield", "12 million", "Elena Ruiz"} and len(seen) >= 3
    assert cloze_question_example("all lower case words and nothing else here at all.", random.Random(0)) is None


def test_text_infill_replaces_each_noise_span_by_one_mask_and_targets_the_whole_text():
    from hf_safe_exit.training.span_corruption import random_spans_noise_mask, text_infill

    ids = list(range(10, 50))
    for seed in range(5):
        src, tgt = text_infill(ids, 7, rng=random.Random(seed))
        mask = random_spans_noise_mask(len(ids), 0.3, 3.0, random.Random(seed))  # the same draw, by hand
        expected = [t for t, m in zip(ids, mask) if not m]
        assert tgt == ids + [1] and src[-1] == 1
        assert [t for t in src[:-1] if t != 7] == expected  # kept tokens, in order
        spans = sum(1 for m, prev in zip(mask, [False] + mask[:-1]) if m and not prev)
        assert src.count(7) == spans and sum(mask) == 12  # 30% of 40 tokens, one mask per span
