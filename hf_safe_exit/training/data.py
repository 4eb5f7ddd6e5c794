"""The offline data of this project (``../shared/data``) with its FIXED splits, and task formatting.

Splits (never train on the pool):
- CNN/DailyMail validation rows 0-499: train; rows 500-899: calibration/test pool.
- SQuAD v1.1 dev articles 0-35 (file order): train; articles 36-47: pool.
- ``extra_text/`` and the train articles/contexts may be used for self-supervised pretraining.
"""

from __future__ import annotations

import bz2
import html
import csv
import json
import os
import re
from pathlib import Path

__all__ = ["default_data_dir", "load_cnndm", "load_squad", "pretraining_texts", "summarization_example",
           "qa_example", "CNNDM_TRAIN", "CNNDM_POOL", "SQUAD_TRAIN_ARTICLES", "SQUAD_POOL_ARTICLES"]

CNNDM_TRAIN = range(0, 500)
CNNDM_POOL = range(500, 900)
SQUAD_TRAIN_ARTICLES = range(0, 36)
SQUAD_POOL_ARTICLES = range(36, 48)


def default_data_dir() -> Path:
    env = os.environ.get("HF_SAFE_EXIT_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent.parent / "shared" / "data"
        if (cand / "cnn_dailymail").is_dir():
            return cand
    return Path("/work/shared/data")


def _split_rows(split: str, train, pool):
    if split == "train":
        return set(train)
    if split == "pool":
        return set(pool)
    raise ValueError("split must be 'train' or 'pool'")


def load_cnndm(split: str = "train", data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Rows of the CNN/DM file for ``split``: dicts with ``row``, ``id``, ``article``, ``highlights``."""
    path = Path(data_dir or default_data_dir()) / "cnn_dailymail" / "validation_first900.csv"
    rows = _split_rows(split, CNNDM_TRAIN, CNNDM_POOL)
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for i, r in enumerate(csv.DictReader(f)):
            if i in rows:
                out.append({"row": i, "id": r["id"], "article": r["article"], "highlights": r["highlights"]})
    return out


def load_squad(split: str = "train", data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Questions of SQuAD v1.1 dev for ``split``: dicts with ``id``, ``article``, ``question``, ``context``, ``answers``."""
    path = Path(data_dir or default_data_dir()) / "squad" / "dev-v1.1.json"
    arts = _split_rows(split, SQUAD_TRAIN_ARTICLES, SQUAD_POOL_ARTICLES)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)["data"]
    out = []
    for a_idx, art in enumerate(data):
        if a_idx not in arts:
            continue
        for para in art["paragraphs"]:
            for qa in para["qas"]:
                out.append({"id": qa["id"], "article": a_idx, "question": qa["question"], "context": para["context"],
                            "answers": [a["text"] for a in qa["answers"]]})
    return out


def _clean_wiki(text: str) -> str:
    text = html.unescape(text)
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    for _ in range(4):  # nested templates / tables
        text = re.sub(r"\{\{[^{}]*\}\}", " ", text)
        text = re.sub(r"\{\|[^{}]*?\|\}", " ", text, flags=re.S)
    for _ in range(3):  # [[File:...[[link]]...]] with nested links
        text = re.sub(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]", " ", text)
    text = re.sub(r"<ref[^>]*/>", " ", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", " ", text, flags=re.S)
    text = re.sub(r"<[^>]+>", " ", text)
    text = re.sub(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^[=*#:;|!{}].*$", " ", text, flags=re.M)
    paras = [p.strip() for p in re.split(r"\n\s*\n", text)]
    return "\n".join(p.replace("\n", " ") for p in paras if len(p) > 200)


def wiki_texts(data_dir=None) -> list[str]:
    d = Path(data_dir or default_data_dir()) / "extra_text"
    out = []
    for p in sorted(d.glob("enwiki-*.bz2")):
        xml = bz2.open(p, "rt", encoding="utf-8").read()
        for m in re.finditer(r"<text[^>]*>(.*?)</text>", xml, flags=re.S):
            body = m.group(1)
            if body.lstrip().upper().startswith("#REDIRECT"):
                continue
            for para in _clean_wiki(body).split("\n"):
                if len(para) > 200:
                    out.append(re.sub(r"\s+", " ", para).strip())
    return out


def pretraining_texts(data_dir=None) -> list[str]:
    """Unlabelled text allowed for self-supervised pretraining: train CNN/DM articles, train SQuAD
    contexts (unique), ``extra_text`` news and Wikipedia paragraphs. No summaries, answers or pool rows."""
    d = Path(data_dir or default_data_dir())
    texts = [r["article"] for r in load_cnndm("train", d)]
    seen = set()
    for q in load_squad("train", d):
        if q["context"] not in seen:
            seen.add(q["context"])
            texts.append(q["context"])
    for name in ("lee_background.cor", "lee.cor"):
        p = d / "extra_text" / name
        if p.is_file():
            texts.extend(line.strip() for line in open(p, encoding="utf-8", errors="replace") if line.strip())
    texts.extend(wiki_texts(d))
    return texts


def summarization_example(row: dict) -> tuple[str, str]:
    """``("summarize: " + article, highlights joined by spaces)``."""
    return "summarize: " + row["article"], " ".join(s.strip() for s in row["highlights"].split("\n") if s.strip())


def qa_example(q: dict) -> tuple[str, str]:
    """``("question: {q} context: {c}", first answer)``."""
    return f"question: {q['question']} context: {q['context']}", q["answers"][0]
