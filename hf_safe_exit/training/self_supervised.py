"""Task-shaped self-supervised examples built from unlabelled text (no summaries, no answers).

A from-scratch model has only 500 labelled CNN/DM rows and ~8k SQuAD questions. Two
self-supervised objectives teach, on all the pretraining text, the two skills those tasks
rest on, in the tasks' own input format:

- **lead sentences** (lead-bias pretraining, Zhu et al. 2021, "Leveraging Lead Bias for
  Zero-shot Abstractive News Summarization", SIGIR): ``"summarize: " + document`` ->
  its first sentence(s). News puts the gist first, so this is a pseudo-summary.
- **cloze questions** (span-selection pretraining, Glass et al. 2020, "Span Selection
  Pre-training for Question Answering", ACL): one sentence of the passage with a span
  replaced by a wh-word becomes the question, the passage the context, the span the
  answer: ``"question: ... context: ..."`` -> span.

Both only copy text that is in the input, the skill extractive QA and lead-style
summaries need, and one that early layers can learn to do confidently.
"""

from __future__ import annotations

import random
import re

__all__ = ["split_sentences", "lead_sentences_example", "cloze_question_example"]

_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])")
_CANDIDATE_SPAN = re.compile(r"\b(?:[A-Z][\w'\-]*(?:\s+(?:of\s+|the\s+)?[A-Z][\w'\-]*){0,3}|\d[\d,.]*(?:\s+[a-z]+)?)")


def split_sentences(text: str) -> list[str]:
    """Split running text into sentences at ``.``/``!``/``?`` followed by a capital or digit."""
    return [s.strip() for s in _SENT_END.split(text.strip()) if s.strip()]


def lead_sentences_example(text: str, max_words: int = 40) -> tuple[str, str] | None:
    """``("summarize: " + text, leading sentences of ``text`` up to ``max_words`` words)``.

    At least one whole sentence is used; ``None`` if ``text`` has fewer than three sentences
    (then the "summary" would be most of the document).
    """
    sents = split_sentences(text)
    if len(sents) < 3:
        return None
    lead, n = [], 0
    for s in sents[:-1]:
        w = len(s.split())
        if lead and n + w > max_words:
            break
        lead.append(s)
        n += w
    return "summarize: " + text, " ".join(lead)


def _wh_word(span: str) -> str:
    return "how many" if span[0].isdigit() else "what"


def cloze_question_example(text: str, rng: random.Random, max_answer_words: int = 5) -> tuple[str, str] | None:
    """``("question: {sentence with a span replaced by a wh-word} context: {text}", span)``.

    The span is a capitalised phrase or a number (the kinds of answers SQuAD has) of at most
    ``max_answer_words`` words, not at the start of its sentence. ``None`` if there is none.
    """
    sents = [s for s in split_sentences(text) if 6 <= len(s.split()) <= 60]
    rng.shuffle(sents)
    for sent in sents:
        spans = [m for m in _CANDIDATE_SPAN.finditer(sent)
                 if m.start() > 0 and len(m.group().split()) <= max_answer_words]
        if not spans:
            continue
        m = rng.choice(spans)
        question = (sent[:m.start()] + _wh_word(m.group()) + sent[m.end():]).rstrip(" .!") + "?"
        return f"question: {question} context: {text}", m.group().rstrip(",.")
    return None
