"""Task metrics and per-exit-layer evaluation used for the default model's card.

- ROUGE-L: ``rouge_score`` ``rougeL`` F-measure with the Porter stemmer, averaged
  per example (the CALM paper's per-example line), ×100.
- SQuAD: the official v1.1 normalisation, F1 and EM maxed over the gold answers, ×100.
- Lead-3: the first three sentences of the article.
- Static exit at layer i: the decoder truncated to its first i blocks followed by
  the shared read-out (``final_layer_norm`` -> scale -> ``lm_head``), which is
  exactly "every token exits at layer i".
- Read-out accuracy per layer (teacher forcing): the next-token top-1 accuracy and
  cross-entropy of every layer's read-out on the reference targets, the per-exit
  accuracy of the anytime-prediction literature (Jazbec et al. 2023, Fig. 1) for a
  sequence model. Less noisy than generated-text scores, which compound errors.
"""

from __future__ import annotations

import copy
import re
import string
from collections import Counter

import torch

from ..lazy import require
from .surgery import keep_first_decoder_layers

__all__ = ["rouge_l", "squad_f1", "squad_em", "lead3", "truncated_decoder_model", "greedy_generate",
           "evaluate_summarization", "evaluate_qa", "teacher_forced_layer_scores", "standard_error"]

_SCORER = None


def _scorer():
    global _SCORER
    if _SCORER is None:
        rouge_scorer = require("rouge_score.rouge_scorer", "ROUGE-L evaluation")
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


def rouge_l(prediction: str, reference: str) -> float:
    """Per-example ROUGE-L F-measure in [0, 1] (stemmed)."""
    return _scorer().score(reference, prediction)["rougeL"].fmeasure


def _normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(pred: str, gold: str) -> float:
    p, g = _normalize_answer(pred).split(), _normalize_answer(gold).split()
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    prec, rec = same / len(p), same / len(g)
    return 2 * prec * rec / (prec + rec)


def squad_f1(prediction: str, answers: list[str]) -> float:
    return max(_f1(prediction, a) for a in answers)


def squad_em(prediction: str, answers: list[str]) -> float:
    return max(float(_normalize_answer(prediction) == _normalize_answer(a)) for a in answers)


def lead3(article: str) -> str:
    """The first three sentences of ``article`` (simple punctuation-based splitter)."""
    text = re.sub(r"\s+", " ", article).strip()
    text = re.sub(r"^.*?\(CNN\)\s*--\s*", "", text[:400]) + text[400:] if "(CNN)" in text[:400] else text
    sents = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", text)
    return " ".join(sents[:3])


def truncated_decoder_model(model, num_layers: int):
    """A copy of ``model`` whose decoder keeps only its first ``num_layers`` blocks (static exit)."""
    L = len(model.decoder.block)
    if not 1 <= num_layers <= L:
        raise ValueError(f"num_layers must be in 1..{L}")
    if num_layers == L:
        return model
    # shallow copies that share every parameter; the module dicts and configs are copied so that
    # keep_first_decoder_layers cuts the copy and leaves the original untouched
    dec = copy.copy(model.decoder)
    dec._modules = dict(model.decoder._modules)
    dec.config = copy.deepcopy(model.decoder.config)
    m = copy.copy(model)
    m._modules = dict(model._modules)
    m.decoder = dec
    m.config = copy.deepcopy(model.config)
    return keep_first_decoder_layers(m, num_layers)


@torch.no_grad()
def greedy_generate(model, tokenizer, sources: list[str], *, max_source_length: int, max_new_tokens: int,
                    batch_size: int = 16) -> list[str]:
    """Greedy decoding (with a decoder-sized cache, so truncated decoders work with stock ``generate``)."""
    from ..compat import cache_kwargs
    from ..decoding.early_exit_loop import new_decoder_cache

    model.eval()
    device = next(model.parameters()).device
    outs: list[str] = []
    order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
    res: dict[int, str] = {}
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        enc = tokenizer([sources[i] for i in idx], max_length=max_source_length, truncation=True,
                        padding=True, return_tensors="pt").to(device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             **cache_kwargs(new_decoder_cache(model)))
        for i, text in zip(idx, tokenizer.batch_decode(gen, skip_special_tokens=True)):
            res[i] = text.strip()
    outs = [res[i] for i in range(len(sources))]
    return outs


def evaluate_summarization(model, tokenizer, rows: list[dict], *, max_source_length: int = 256,
                           max_new_tokens: int = 64, batch_size: int = 16) -> dict:
    from .data import summarization_example

    src, ref = zip(*(summarization_example(r) for r in rows))
    preds = greedy_generate(model, tokenizer, list(src), max_source_length=max_source_length,
                            max_new_tokens=max_new_tokens, batch_size=batch_size)
    scores = [rouge_l(p, r) for p, r in zip(preds, ref)]
    return {"rougeL": 100 * sum(scores) / len(scores), "rougeL_se": 100 * standard_error(scores), "n": len(scores),
            "predictions": preds}


def evaluate_qa(model, tokenizer, questions: list[dict], *, max_source_length: int = 256,
                max_new_tokens: int = 16, batch_size: int = 32) -> dict:
    from .data import qa_example

    src = [qa_example(q)[0] for q in questions]
    preds = greedy_generate(model, tokenizer, src, max_source_length=max_source_length,
                            max_new_tokens=max_new_tokens, batch_size=batch_size)
    f1 = [squad_f1(p, q["answers"]) for p, q in zip(preds, questions)]
    em = [squad_em(p, q["answers"]) for p, q in zip(preds, questions)]
    return {"f1": 100 * sum(f1) / len(f1), "f1_se": 100 * standard_error(f1), "em": 100 * sum(em) / len(em),
            "n": len(f1), "predictions": preds}


def standard_error(values: list[float]) -> float:
    """Standard error of the mean, sample standard deviation (n - 1) over sqrt(n); 0 for n < 2."""
    from scipy import stats

    return float(stats.sem(values)) if len(values) >= 2 else 0.0


@torch.no_grad()
def teacher_forced_layer_scores(model, tokenizer, pairs: list[tuple[str, str]], *, max_source_length: int,
                                max_target_length: int, batch_size: int = 16) -> dict:
    """Next-token accuracy and cross-entropy of every decoder layer's read-out under teacher forcing.

    For each (source, target) pair the decoder is fed the reference target; layer i's prediction at each
    position is the shared read-out of block i's output. Returns per-layer lists (layer 1 first), pooled over
    all target tokens (``</s>`` included, padding excluded): ``token_accuracy`` (top-1, ×100) and
    ``cross_entropy`` (nats per token), with ``n_tokens``.
    """
    from ..decoding.readout import exit_logits

    model.eval()
    device = next(model.parameters()).device
    L = len(model.decoder.block)
    correct = torch.zeros(L, dtype=torch.float64)
    nll = torch.zeros(L, dtype=torch.float64)
    n_tokens = 0
    for s in range(0, len(pairs), batch_size):
        src, tgt = zip(*pairs[s:s + batch_size])
        enc = tokenizer(list(src), max_length=max_source_length, truncation=True, padding=True,
                        return_tensors="pt").to(device)
        labels = tokenizer(list(tgt), max_length=max_target_length, truncation=True, padding=True,
                           return_tensors="pt").input_ids.to(device)
        mask = labels != tokenizer.pad_token_id
        out = model(**enc, decoder_input_ids=model._shift_right(labels), output_hidden_states=True,
                    return_dict=True, use_cache=False)
        for i, logits in enumerate(exit_logits(model, out)):
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            nll[i] += -logp[mask].double().sum().cpu()
            correct[i] += (logits.argmax(-1) == labels)[mask].sum().cpu()
        n_tokens += int(mask.sum())
    if n_tokens == 0:
        raise ValueError("no target tokens to score")
    return {"token_accuracy": (100 * correct / n_tokens).tolist(), "cross_entropy": (nll / n_tokens).tolist(),
            "n_tokens": n_tokens}
