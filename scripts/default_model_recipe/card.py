"""The model card of the package's default model (:mod:`.recipe`): architecture, data, recipe,
per-exit-layer results and limitations, rendered from the run's ``training_results.json``.

:func:`rewrite_card` re-renders it (``scripts/train_default_model.py --card-only``) and keeps what
:func:`hf_safe_exit.cards.write_guarantee_card` added to the card since: the guarantee sections of the tasks
calibrated under ``calibration/<task>/``, their ``model-index`` results and their tags.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_safe_exit.training.calm_loss import layer_weights

__all__ = ["write_card", "rewrite_card"]


def render_card(args, results: dict, examples: dict | None = None):
    """The card (a :class:`huggingface_hub.ModelCard`) of a run: ``args`` are its settings (a dict, as
    ``training_results.json`` stores them, or a namespace), ``results`` its numbers, ``examples`` sample outputs."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    if isinstance(args, dict):
        args = argparse.Namespace(**args)
    ev = results["eval"]
    full = ev["full_model"]
    evals = [
        EvalResult(task_type="summarization", dataset_type="cnn_dailymail", dataset_name="CNN/DailyMail 3.0.0 "
                   f"validation rows 500-899 ({ev['cnndm_n']} held-out rows)", dataset_config="3.0.0",
                   dataset_split="validation", metric_type="rougeL", metric_name="ROUGE-L (per-example F, stemmed)",
                   metric_value=round(full["rougeL"], 2)),
        EvalResult(task_type="summarization", dataset_type="cnn_dailymail", dataset_name="CNN/DailyMail 3.0.0 "
                   f"validation rows 500-899 ({ev['cnndm_n']} held-out rows)", dataset_config="3.0.0",
                   dataset_split="validation", metric_type="rougeL", metric_name="Lead-3 baseline ROUGE-L",
                   metric_value=round(ev["lead3_rougeL"], 2)),
        EvalResult(task_type="question-answering", dataset_type="squad", dataset_name="SQuAD v1.1 dev articles "
                   f"36-47 ({ev['squad_n']} held-out questions)", dataset_split="validation", metric_type="f1",
                   metric_name="F1", metric_value=round(full["squad_f1"], 2)),
        EvalResult(task_type="question-answering", dataset_type="squad", dataset_name="SQuAD v1.1 dev articles "
                   f"36-47 ({ev['squad_n']} held-out questions)", dataset_split="validation", metric_type="exact_match",
                   metric_name="EM", metric_value=round(full["squad_em"], 2)),
    ]
    # no pipeline_tag: transformers 5 removed the text2text-generation pipeline, which the tag would promise
    data = ModelCardData(language="en", license="cc-by-sa-4.0", library_name="transformers",
                         tags=["t5", "early-exit", "calm", "hf_safe_exit"], model_name="hf_safe_exit default model",
                         eval_results=evals, datasets=["cnn_dailymail", "squad"])
    pre, ft = results.get("pretrain") or {}, results.get("finetune") or {}
    ssl_ft = getattr(args, "finetune_self_supervised", 0.0)
    finetune_text = f"fine-tuning {ft.get('steps', '?')} steps ({(ft.get('seconds') or 0) / 60:.1f} min)"
    mix_text = (f"{args.summ_prob:.0%} of the supervised batches; {ssl_ft:.0%} of all fine-tuning batches "
                f"self-supervised; dropout {args.dropout:g}")
    # a chain of runs, each continuing the previous one's checkpoint (--init-from): oldest first
    runs, e = [], results.get("earlier_run")
    while e:
        runs.insert(0, e)
        e = e.get("earlier_run")
    if runs:
        runs.append({"finetune": ft, "args": vars(args)})
        parts = []
        for k, r in enumerate(runs, 1):
            rft, ra = r.get("finetune") or {}, r.get("args") or {}
            if rft.get("steps") == 0:  # e.g. a cut model taken as it is (--max-finetune-steps 0)
                parts.append(f"run {k}: no training steps ({ra.get('dec_layers', '?')} decoder layers as they were)")
                continue
            restart = f", warm-up {ra.get('warmup_steps', '?')} steps: a warm restart" if k > 1 else ""
            parts.append(f"run {k}: {rft.get('steps', '?')} steps ({(rft.get('seconds') or 0) / 60:.1f} min, "
                         f"lr {ra.get('lr', '?')}{restart}, {ra.get('dec_layers', '?')} decoder layers)")
            if r.get("kept_decoder_layers"):  # the next run kept only the first layers of this one's decoder
                parts[-1] += (f", then cut to its first {r['kept_decoder_layers']} decoder layers (its exit "
                              f"{r['kept_decoder_layers']} as a model of its own)")
        finetune_text = (f"fine-tuning in {len(runs)} runs of the script, each continuing the previous run's "
                         f"fine-tuning checkpoint (`--init-from`): " + "; ".join(parts))

        def run_mix(r):
            ra = r.get("args") or {}
            if (r.get("finetune") or {}).get("steps") == 0:
                return "no training"
            text = (f"{ra.get('summ_prob', 0):.0%} of the supervised batches, "
                    f"{ra.get('finetune_self_supervised', 0):.0%} of all batches self-supervised, "
                    f"dropout {ra.get('dropout', 0):g}")
            if ra.get("dropout", 0) > 0 and not ra.get("exit_readout_dropout"):
                text += " (the read-out dropout then on the last exit only)"
            return text
        mix_text = "; ".join(f"run {k}: {run_mix(r)}" for k, r in enumerate(runs, 1))
    measures = {"rougeL": "ROUGE-L", "squad_f1": "F1", "cnndm_token_accuracy": "acc. CNN/DM",
                "squad_token_accuracy": "acc. SQuAD"}

    def steps_above(table, n):
        return "; ".join(f"{a['exit_layer']}→{b['exit_layer']}: " + ", ".join(
            f"{name} {b[k] - a[k]:+.2f}" for k, name in measures.items() if k in b)
            for a, b in zip(table[n - 1:], table[n:]))

    def steps_below(table, n):
        falls = [f"{name} {a['exit_layer']}→{b['exit_layer']} {b[k] - a[k]:+.2f}"
                 for a, b in zip(table[:n - 1], table[1:n]) for k, name in measures.items() if k in b and b[k] < a[k]]
        return "no measure fell from one exit to the next" if not falls else "it fell at " + ", ".join(falls)

    cut_text = ""
    for r, after in zip(runs, runs[1:]):  # a cut is recorded on the run that was cut; `after` continued it
        before = r.get("eval_before_cut")
        if r.get("kept_decoder_layers") and before:
            n = r["kept_decoder_layers"]
            cells = "; ".join(f"exit {x['exit_layer']}: {x['rougeL']:.2f} / {x['squad_f1']:.2f}"
                              + (f" / {x['cnndm_token_accuracy']:.2f} / {x['squad_token_accuracy']:.2f}"
                                 if "cnndm_token_accuracy" in x else "") for x in before["per_exit_layer"])
            trained_on = (after.get("finetune") or {}).get("steps")
            cut_text = (f"- Why {n} decoder layers: before the cut, the {r.get('decoder_layers')}-layer model "
                        f"scored, on {before['cnndm_n']} CNN/DM rows and {before['squad_n']} SQuAD questions of the "
                        f"pool (ROUGE-L / SQuAD F1 / next-token accuracy CNN/DM / SQuAD): {cells}. Above exit {n} the "
                        f"steps were {steps_above(before['per_exit_layer'], n)}; up to it, "
                        f"{steps_below(before['per_exit_layer'], n)}. So the model kept its first {n} layers"
                        + (f" and was trained on with the {n}-layer loss.\n" if trained_on else
                           f" and was not trained further: it is that model's exits 1–{n}, as they were.\n"))
    selection_text = ""
    if ev.get("selection_rows"):
        sel = ev["selection_rows"]
        selection_text = (f" They are disjoint from the {sel['cnndm']} CNN/DM rows and {sel['squad']} SQuAD questions"
                          " (`selection_eval_ids.json`) on which the earlier run's per-exit scores were looked at"
                          " to choose this model's decoder depth, and which its calibration leaves out as well.")
    pl = ev["per_exit_layer"]
    has_tf = all("cnndm_token_accuracy" in r for r in pl)  # results of older runs of this script lack them

    def cell(r, key):
        se = r.get(key + "_se")
        return f"{r[key]:.2f}" + (f" ± {se:.2f}" if se is not None else "")
    rows = "\n".join(
        f"| {r['exit_layer']} | {cell(r, 'rougeL')} | {cell(r, 'squad_f1')} | {r['squad_em']:.2f} |"
        + (f" {r['cnndm_token_accuracy']:.2f} | {r['squad_token_accuracy']:.2f} |" if has_tf else "")
        for r in pl)
    header = "| exit layer | ROUGE-L | SQuAD F1 | SQuAD EM |" + (
        " next-token acc. CNN/DM | next-token acc. SQuAD |" if has_tf else "")
    header += "\n|" + "---|" * (6 if has_tf else 4)

    def trend(key):
        vals = [r[key] for r in pl]
        if max(vals) - min(vals) < 0.5:
            return "flat (all exit layers score within 0.5 points of each other)"
        mono = all(a <= b + 1e-9 for a, b in zip(vals, vals[1:]))
        if mono and vals[-1] > vals[0]:
            return "rises monotonically with depth"
        dips = [f"layer {r['exit_layer']} {r[key] - p[key]:+.2f}" for p, r in zip(pl, pl[1:]) if r[key] < p[key]]
        return "does not rise monotonically with depth (" + ", ".join(dips) + ")"
    keys = {"rougeL": "ROUGE-L", "squad_f1": "SQuAD F1"}
    if has_tf:
        keys.update({"cnndm_token_accuracy": "CNN/DM next-token accuracy",
                     "squad_token_accuracy": "SQuAD next-token accuracy"})
    trends = {key: trend(key) for key in keys}
    trend_text = "; ".join(f"{name} {trends[key]}" for key, name in keys.items()) + "."
    rising = [name for key, name in keys.items() if trends[key] == "rises monotonically with depth"]
    unordered = [name for key, name in keys.items() if trends[key] != "rises monotonically with depth"]
    if not unordered:
        layer_text = "Its per-layer scores rise with depth, but the scores themselves are low."
    elif rising:
        layer_text = (f"Its exits' {', '.join(rising)} rise with depth; its {', '.join(unordered)} "
                      f"{'is' if len(unordered) == 1 else 'are'} too low and too noisy to order all of its layers "
                      "(see the table).")
    else:
        layer_text = ("Its per-layer task scores are too low and too noisy to order all of its layers (see the "
                      "table).")
    tf_note = ""
    if has_tf:
        tok_n = ev.get("teacher_forced_tokens", {})
        tf_note = (f"\nNext-token accuracy: each layer's read-out under teacher forcing on the reference targets "
                   f"of the same held-out examples ({tok_n.get('cnndm', '?')} / {tok_n.get('squad', '?')} target "
                   f"tokens), top-1, ×100: the accuracy of each exit, free of the error compounding of generated "
                   f"text. ± is one standard error over examples.\n")
    ex_lines = ""
    for kind, items in (examples or {}).items():
        for src, pred in items:
            ex_lines += f"- *{kind}* `{src[:90]}...` → `{pred[:160] or '(empty)'}`\n"
    w = layer_weights(args.dec_layers, args.weighting).tolist()
    mix = ", ".join(f"{k} {v:g}" for k, v in (
        (kv.split("=")[0], float(kv.split("=")[1])) for kv in getattr(args, "pretrain_mix", "span=1").split(",")))
    gap = ev["lead3_rougeL"] - full["rougeL"]
    versus_lead = (f"{gap:.1f} ROUGE-L points below lead-3" if gap > 0 else f"{-gap:.1f} ROUGE-L points above lead-3")
    text = f"""---
{data.to_yaml()}
---

# hf_safe_exit default model (a small T5 trained from scratch on CPU)

A **small** T5 ({results['params'] / 1e6:.1f} M parameters) that ships inside the `hf_safe_exit` package, so that the
early-exit demo, tests and benchmarks run offline on real text. It was trained from scratch on a 2-core CPU in
{results.get('train_wall_minutes') or 0:.0f} minutes, with no pretrained weights, and every decoder layer was trained to be
read out through the shared head (CALM's per-layer loss). It is a weak model: on held-out CNN/DM it is
{versus_lead}, and its SQuAD F1 is {full['squad_f1']:.1f}. Use it to see and measure early exit, not as a
summariser or QA system.

```python
import hf_safe_exit
model, tokenizer = hf_safe_exit.load_default_model()   # offline, float32, meta head attached
# or: T5ForConditionalGeneration.from_pretrained(path)   (weights are stored in {results['save_dtype']})
```

## Architecture
T5 (v1.0-style tied embeddings, `scale_decoder_outputs`, gated-GELU feed-forward): d_model {args.d_model},
d_ff {args.d_ff}, {args.num_heads} heads × d_kv {args.d_kv}, {args.enc_layers} encoder layers, {args.dec_layers} decoder layers,
vocabulary {results.get('vocab_size', args.vocab_size)} (Unigram tokenizer trained here with `tokenizers`; `<pad>`=0, `</s>`=1, `<unk>`=2,
100 sentinels `<extra_id_0..99>` at the top of the vocabulary as in T5). Weights stored in {results['save_dtype']}
(safetensors); the meta-classifier head (`meta_head.safetensors`, Linear(d_model, 2)) sits next to them.

## Data (offline copies; fixed project splits)
- Self-supervised pretraining text: CNN/DailyMail 3.0.0 validation rows 0–499 (articles only), SQuAD v1.1 dev
  articles 0–35 (contexts only), the Lee/Pincombe/Welsh news corpus and a shortened English Wikipedia dump.
  Four objectives, one per batch (shares {mix}): *infill*, BART's text infilling (Lewis et al. 2020: 30% of
  the tokens of a chunk of 8–{getattr(args, 'infill_length', 48)} tokens masked in spans of mean length 3, each span one mask
  token; target = the whole chunk), which teaches copying from the input fastest; *span*, T5 span corruption (15%
  noise, mean span 3); *lead sentences*
  (`summarize: <text>` → its first sentences, lead-bias pretraining, Zhu et al. 2021); *cloze questions*
  (`question: <a sentence of the text with a name or number replaced by what/how many> context: <text>` → that
  span, span-selection pretraining, Glass et al. 2020). None of them uses a summary or an answer.
- Fine-tuning (multitask): `summarize: <article>` → highlights (CNN/DM rows 0–499; {mix_text}),
  `question: <q> context: <c>` → first answer (SQuAD dev articles 0–35, 8,123 questions); the self-supervised
  batches (lead sentences / cloze questions) are there so that 500 CNN/DM rows are not simply memorised.
{cut_text}- Held out, never trained on: CNN/DM rows 500–899 and SQuAD articles 36–47 (the project's calibration/test pool).
  The rows used for the numbers below are listed in `heldout_eval_ids.json`.{selection_text}

## Recipe
`scripts/train_default_model.py` (seed {args.seed}). Loss: CALM's weighted per-layer cross-entropy through the shared
head, weights {args.weighting} ({', '.join(f'{x:.3f}' for x in w)}), in both stages; in training mode every exit is
read out through the decoder's dropout after the final norm, as HF's last layer is. {getattr(args, 'optimizer', 'adamw').replace('adafactor', 'Adafactor').replace('adamw', 'AdamW')} (lr {args.lr}, warm-up
{args.warmup_steps} steps, cosine to 10%), batch {args.batch_size}, sources truncated to {args.max_source_length} tokens,
summaries to {args.max_target_length}, answers to {args.qa_target_length}. Pretraining {pre.get('steps', '?')} steps
({(pre.get('seconds') or 0) / 60:.1f} min), {finetune_text};
total training wall time {results.get('train_wall_minutes') or 0:.1f} min on {args.device.upper()} with
{args.threads} threads (a shared 2-core machine). Meta-classifier: backbone frozen, teacher-forced decoder states of
{results['meta_head']['n_examples']} (position, layer) pairs from training examples, label = "layer's top token equals the
last layer's" (positive rate {results['meta_head']['positive_rate']:.3f}), class-balanced cross-entropy;
training balanced accuracy {results['meta_head']['train_balanced_accuracy']:.3f}.

## Results (held-out pool, greedy decoding)
ROUGE-L: `rouge_score` rougeL F-measure with stemming, averaged per example, ×100. SQuAD: official v1.1 F1/EM, ×100.

| system | CNN/DM ROUGE-L ({ev['cnndm_n']} rows) | SQuAD F1 ({ev['squad_n']} q.) | SQuAD EM |
|---|---|---|---|
| this model (all {args.dec_layers} decoder layers) | {full['rougeL']:.2f} | {full['squad_f1']:.2f} | {full['squad_em']:.2f} |
| lead-3 | {ev['lead3_rougeL']:.2f} | – | – |

### Score per exit layer (every token exits at layer i: decoder truncated to i blocks + shared read-out)

{header}
{rows}
{tf_note}
Per-layer quality (CALM's "marginal monotonicity"): {trend_text}

### Sample outputs of the full model (held-out, greedy)
{ex_lines}

## Limitations
Trained from scratch for {results.get('train_wall_minutes') or 0:.0f} minutes on a shared 2-core CPU, on ~9 k labelled
examples and ~1.4 M tokens of unlabelled text. It has only begun to use its input: its summaries are mostly
ungrammatical, repetitive fragments and its answers are rarely right (see the samples above); it is far from a
pretrained T5. {layer_text} Exit-layer scores come from small held-out subsets
({ev['cnndm_n']} / {ev['squad_n']}) and carry the sampling error shown as ± in the table. For a real model, run
`scripts/train_default_model.py --device cuda` with a larger budget, or fine-tune a pretrained T5 with
`hf_safe_exit.training.CALMSeq2SeqTrainer`. The size ({results['params'] / 1e6:.1f} M parameters) is at the low end of the
10–20 M first planned: on this CPU a larger model would have seen too few tokens in the time available.
"""
    return ModelCard(text)


def write_card(out, args, results: dict, examples: dict | None = None) -> Path:
    """Write ``out/README.md`` (:func:`render_card`); returns its path."""
    path = Path(out) / "README.md"
    render_card(args, results, examples).save(path)
    return path


def _keep_guarantees(card, old, model_dir: Path) -> None:
    """Carry the guarantee sections, results and tags that ``hf_safe_exit.cards`` wrote into ``old`` over to ``card``.

    The sections (from the first guarantee marker on) follow the re-rendered text as the card writer appends them;
    this library's ``model-index`` results (:data:`hf_safe_exit.cards.METRIC_TYPES`) follow the training results.
    """
    from hf_safe_exit.cards import METRIC_TYPES, SECTION_START, section_markers
    from hf_safe_exit.risk.store import stored_tasks

    starts = [old.text.find(marker) for marker in
              [SECTION_START] + [section_markers(task)[0] for task in stored_tasks(model_dir)]]
    starts = [i for i in starts if i >= 0]
    if not starts:
        return
    card.text = card.text.rstrip("\n") + "\n\n" + old.text[min(starts):]
    card.data.tags = list(card.data.tags or []) + [t for t in (old.data.tags or []) if t not in (card.data.tags or [])]
    card.data.eval_results = list(card.data.eval_results or []) + [
        r for r in (old.data.eval_results or []) if r.metric_type in METRIC_TYPES]


def rewrite_card(out) -> Path:
    """Re-render ``out/README.md`` from ``out/training_results.json`` (the settings and numbers of the run), keeping
    its guarantee sections (:func:`_keep_guarantees`); returns its path."""
    from huggingface_hub import ModelCard

    out = Path(out)
    stored = json.loads((out / "training_results.json").read_text())
    card = render_card(stored["args"], stored, stored.get("examples"))
    path = out / "README.md"
    if path.is_file():
        _keep_guarantees(card, ModelCard.load(path), out)
    card.save(path)
    return path

