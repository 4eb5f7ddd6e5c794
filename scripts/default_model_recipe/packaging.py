"""The last stages of the from-scratch recipe (:mod:`.recipe`): meta head, held-out evaluation
of every exit layer, and the package folder with its card.

The evaluation draws only pool rows (CNN/DM rows 500-899, SQuAD articles 36-47), less the rows of ``eval_exclude``
(those an earlier model was looked at on to choose this one); the package lists the rows it used in
``heldout_eval_ids.json`` and writes ``training_results.json``, from which ``--card-only`` re-renders the card.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from hf_safe_exit.training.data import qa_example, summarization_example
from hf_safe_exit.training.evaluation import (evaluate_qa, evaluate_summarization, lead3, rouge_l,
                                              teacher_forced_layer_scores, truncated_decoder_model)
from hf_safe_exit.training.meta_classifier import train_meta_classifier

from .card import write_card
from .loop import encode_pairs, log, pad_batch, save_tokenizer

__all__ = ["earlier_evaluation", "evaluate_and_package"]


def earlier_evaluation(earlier: dict) -> dict | None:
    """The per-exit evaluation the earlier run wrote into its package (its ``--out``), if that is still there."""
    path = Path((earlier.get("args") or {}).get("out") or "/nonexistent") / "training_results.json"
    if not path.is_file():
        return None
    ev = json.loads(path.read_text())["eval"]
    return {k: ev[k] for k in ("cnndm_n", "squad_n", "per_exit_layer")}


def _meta_head(model, tok, cfg, cnn_train, sq_train):
    """The meta-classifier, trained on teacher-forced decoder states of train rows only."""
    rng = random.Random(cfg.seed + 3)
    meta_src = [summarization_example(r) for r in rng.sample(cnn_train, min(cfg.meta_examples, len(cnn_train)))]
    meta_qa = [qa_example(q) for q in rng.sample(sq_train, cfg.meta_examples)]
    mp = encode_pairs(tok, meta_src, cfg.max_source_length, cfg.max_target_length) + \
        encode_pairs(tok, meta_qa, cfg.max_source_length, cfg.qa_target_length)
    t = time.time()
    head, stats = train_meta_classifier(model, [pad_batch(mp[i:i + 16]) for i in range(0, len(mp), 16)], epochs=10,
                                        return_stats=True, seed=cfg.seed)
    log(f"meta head: {stats['n_examples']} examples, positive rate {stats['positive_rate']:.3f}, "
        f"balanced acc {stats['train_balanced_accuracy']:.3f} ({time.time() - t:.0f}s)")
    return head, stats


def _evaluate(model, tok, cfg, ev_cnn, ev_sq):
    """Every static exit layer on the held-out rows: generated ROUGE-L / F1 / EM and teacher-forced accuracy."""
    per_layer, preds = [], {}
    tf = {name: teacher_forced_layer_scores(model, tok, examples, max_source_length=cfg.max_source_length,
                                            max_target_length=length)
          for name, examples, length in (("cnndm", [summarization_example(r) for r in ev_cnn], cfg.max_target_length),
                                         ("squad", [qa_example(q) for q in ev_sq], cfg.qa_target_length))}
    for i in range(1, len(model.decoder.block) + 1):
        m = truncated_decoder_model(model, i)
        s = evaluate_summarization(m, tok, ev_cnn, max_source_length=cfg.max_source_length,
                                   max_new_tokens=cfg.max_target_length)
        q = evaluate_qa(m, tok, ev_sq, max_source_length=cfg.max_source_length, max_new_tokens=cfg.qa_target_length)
        per_layer.append({"exit_layer": i, "rougeL": s["rougeL"], "rougeL_se": s["rougeL_se"], "squad_f1": q["f1"],
                          "squad_f1_se": q["f1_se"], "squad_em": q["em"],
                          "cnndm_token_accuracy": tf["cnndm"]["token_accuracy"][i - 1],
                          "cnndm_cross_entropy": tf["cnndm"]["cross_entropy"][i - 1],
                          "squad_token_accuracy": tf["squad"]["token_accuracy"][i - 1],
                          "squad_cross_entropy": tf["squad"]["cross_entropy"][i - 1]})
        preds[i] = {"cnndm": s["predictions"], "squad": q["predictions"]}
        log(f"exit layer {i}: ROUGE-L {s['rougeL']:.2f}  SQuAD F1 {q['f1']:.2f} EM {q['em']:.2f}  teacher-forced "
            f"token accuracy CNN/DM {tf['cnndm']['token_accuracy'][i - 1]:.2f} "
            f"SQuAD {tf['squad']['token_accuracy'][i - 1]:.2f}")
    return per_layer, preds, {name: scores["n_tokens"] for name, scores in tf.items()}


def evaluate_and_package(model, tok, cfg, summary: dict, work: Path, *, cnn_train, cnn_pool, sq_train,
                         sq_pool) -> Path:
    """Meta head, held-out evaluation and the package folder ``cfg.out`` (its files replaced); returns its path."""
    n_params = sum(p.numel() for p in model.parameters())
    e = summary.get("earlier_run") or {}
    if e.get("kept_decoder_layers") and not e.get("eval_before_cut"):  # a summary of an older version of the recipe
        e["eval_before_cut"] = earlier_evaluation(e)
    head, meta_stats = _meta_head(model, tok, cfg, cnn_train, sq_train)

    rng = random.Random(cfg.seed + 4)
    selection = None
    if cfg.eval_exclude:
        # rows at which an earlier model was looked at to choose this one: evaluating on them would be optimistic
        selection = json.loads(Path(cfg.eval_exclude).read_text())
        chosen_cnn, chosen_sq = set(selection["cnndm_ids"]), set(selection["squad_ids"])
        cnn_pool = [r for r in cnn_pool if r["id"] not in chosen_cnn]
        sq_pool = [q for q in sq_pool if q["id"] not in chosen_sq]
        log(f"evaluation rows disjoint from {cfg.eval_exclude}: {len(cnn_pool)} CNN/DM rows and "
            f"{len(sq_pool)} SQuAD questions left in the pool")
    ev_cnn = sorted(rng.sample(cnn_pool, min(cfg.eval_cnndm, len(cnn_pool))), key=lambda r: r["row"])
    ev_sq = rng.sample(sq_pool, min(cfg.eval_squad, len(sq_pool)))
    t = time.time()
    lead = 100 * sum(rouge_l(lead3(r["article"]), summarization_example(r)[1]) for r in ev_cnn) / len(ev_cnn)
    per_layer, preds, tf_tokens = _evaluate(model, tok, cfg, ev_cnn, ev_sq)
    eval_s = time.time() - t
    log(f"lead-3 ROUGE-L {lead:.2f}; evaluation took {eval_s:.0f}s")
    (work / "eval_predictions.json").write_text(json.dumps(
        {"cnndm_ids": [r["id"] for r in ev_cnn], "squad_ids": [q["id"] for q in ev_sq], "predictions": preds},
        indent=1))

    out = Path(cfg.out)
    if out.exists():
        for f in out.iterdir():
            if f.is_file() and f.name != "__init__.py":
                f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    save_dtype = torch.float32 if n_params * 4 <= 20e6 else torch.float16  # stay within the 25 MB package budget
    model.to(save_dtype).save_pretrained(out)
    model.to(torch.float32)
    save_tokenizer(tok, out)
    head.cpu().save_pretrained(out)
    results = {
        "params": n_params, "train_wall_minutes": summary.get("train_wall_minutes"),
        "pretrain": summary.get("pretrain"), "finetune": summary.get("finetune"),
        "earlier_run": summary.get("earlier_run"), "meta_head": dict(meta_stats),
        "eval": {"cnndm_n": len(ev_cnn), "squad_n": len(ev_sq), "lead3_rougeL": lead, "per_exit_layer": per_layer,
                 "teacher_forced_tokens": tf_tokens, "full_model": per_layer[-1], "seconds": eval_s},
        "save_dtype": str(save_dtype).replace("torch.", ""), "vocab_size": len(tok),
        "device": cfg.device, "threads": cfg.threads, "seed": cfg.seed,
    }
    heldout = {"description": "held-out examples used for the numbers in README.md; all drawn from the pool "
                              "(CNN/DM rows 500-899, SQuAD articles 36-47); never trained on",
               "cnndm_rows": [r["row"] for r in ev_cnn], "cnndm_ids": [r["id"] for r in ev_cnn],
               "squad_ids": [q["id"] for q in ev_sq],
               "training_data": {"cnndm_rows": "0-499", "squad_articles": "0-35",
                                 "pretraining": "train CNN/DM articles, train SQuAD contexts, extra_text (Lee corpus, "
                                                "shortened enwiki dump)"},
               "eval_seed": cfg.seed + 4}
    if selection is not None:
        heldout["disjoint_from"] = "selection_eval_ids.json"
        results["eval"]["selection_rows"] = {"cnndm": len(selection["cnndm_ids"]),
                                             "squad": len(selection["squad_ids"])}
        (out / "selection_eval_ids.json").write_text(json.dumps({
            "description": "pool rows on which an earlier model's per-exit scores were looked at to choose this "
                           "model (its decoder depth); this model's card numbers and its calibration use none of them",
            "cnndm_ids": selection["cnndm_ids"], "squad_ids": selection["squad_ids"]}, indent=1))
    (out / "heldout_eval_ids.json").write_text(json.dumps(heldout, indent=1))
    last = len(per_layer)
    examples = {"CNN/DM": [(summarization_example(r)[0], preds[last]["cnndm"][k]) for k, r in enumerate(ev_cnn[:3])],
                "SQuAD": [(qa_example(q)[0], preds[last]["squad"][k]) for k, q in enumerate(ev_sq[:3])]}
    args = cfg.stored_args()
    (out / "training_results.json").write_text(json.dumps({**results, "examples": examples, "args": args}, indent=2))
    write_card(out, args, results, examples)
    log(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6:.1f} MB)")
    return out
