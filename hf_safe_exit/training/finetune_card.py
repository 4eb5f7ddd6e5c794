"""The model card of a CALM fine-tune (:func:`hf_safe_exit.training.finetune.finetune_calm`).

What was trained, on which rows, with which settings, then the guarantee section that
:func:`hf_safe_exit.cards.write_guarantee_card` writes: what the shipped λ̂ does on its calibration rows (from
the loss table), and the split procedure's test risk, mean exit layer and speed-up per generated token over
repeated random calibration/test splits of those same rows (not a held-out test). The rows are named in the
words of :mod:`hf_safe_exit.cards.vocabulary`, which holds the project's split facts.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["render_finetune_card", "write_finetune_card"]


def _hub_id(model: str) -> str | None:
    """``model`` when it names a Hub repo (``owner/name``) rather than a local folder; the card's ``base_model``."""
    parts = model.split("/")
    return model if len(parts) == 2 and all(parts) and not os.path.exists(model) else None


def render_finetune_card(results: dict) -> str:
    """The card's text before its guarantee section: YAML metadata, what was trained and how to reproduce it.

    ``results`` is the dict :func:`~hf_safe_exit.training.finetune.finetune_calm` writes to ``finetune_results.json``.
    """
    from huggingface_hub import ModelCardData

    from ..cards.vocabulary import rows_description, task_info
    from ..tasks import get_task
    from .calm_loss import layer_weights

    cfg, train, meta, cal = results["config"], results["training"], results["meta_head"], results["calibration"]
    task = get_task(cfg["task"])
    base = _hub_id(cfg["model"])
    data = ModelCardData(library_name="transformers", language="en", tags=["t5", "early-exit", "calm"],
                         datasets=[task.hub_id], base_model=base, model_name=Path(cfg["output"]).name)
    dataset, pool_rows = task_info(task.name).display_name, rows_description(task.name, {"split": "pool"})
    train_rows = rows_description(task.name, {"split": "train"})
    weights = ", ".join(f"{w:.3f}" for w in layer_weights(results["num_decoder_layers"], cfg["weighting"]).tolist())
    precision = "bf16 mixed precision" if cfg["bf16"] else "fp16 mixed precision" if cfg["fp16"] else "float32"
    return f"""---
{data.to_yaml()}
---

# {data.model_name}

`{cfg['model']}` fine-tuned for **{task.name}** with CALM's per-layer loss (Schuster et al. 2022), so that
every decoder layer can be read out through the shared head, and calibrated for token-level early exit with a
risk guarantee (the `hf_safe_exit` library). It is an ordinary `T5ForConditionalGeneration`; loaded with
`trust_remote_code=True`, its `generate` also takes `early_exit=RiskControlled(eps=...)` (see *Use it* below).

## Training
- Data: {dataset}, {train_rows}; inputs as `hf_safe_exit.tasks.get_task({task.name!r}).prompt` makes them, \
sources truncated to {cfg['max_input_length'] or task.max_input_length} tokens, targets to \
{cfg['max_new_tokens'] or task.max_new_tokens}.
- Loss: the weighted cross-entropy of every decoder layer's read-out, weights {cfg['weighting']} ({weights}).
- {train['steps']} steps of `CALMSeq2SeqTrainer` (AdamW, lr {cfg['learning_rate']:g}, {cfg['warmup_steps']} \
warm-up steps, linear decay), batch {cfg['batch_size']} × {cfg['gradient_accumulation_steps']} accumulation, \
{precision}, on {train['device'].upper()} in {train['seconds'] / 60:.1f} min; mean weighted training loss \
{train['train_loss']:.4f}.
- Meta-classifier head (`meta_head.safetensors`, for `measure="meta"`): backbone frozen, decoder states of \
{meta['n_examples']} (position, layer) pairs of train examples, label "the layer's top token equals the last \
layer's" (positive rate {meta['positive_rate']:.3f}), class-balanced cross-entropy; training balanced accuracy \
{meta['train_balanced_accuracy']:.3f}.
- Calibration: {cal['n']} examples of {dataset}, {pool_rows} (never trained on), decoded at every \
threshold with the `{cal['measure']}` confidence measure; their ids are in \
`calibration/{task.name}/early_exit_calibration.npz`. The card's split numbers below are repeated random \
calibration/test splits of these same {cal['n']} rows (`--eval-repeats`), not rows set aside for testing.

Reproduce: `{results['command']}`.
"""


def write_finetune_card(out, results: dict, controlled, evaluation: dict, *, plots: bool = True) -> Path:
    """Write ``out/README.md``: :func:`render_finetune_card`, then the guarantee section of ``controlled`` with the
    split procedure of ``evaluation`` (repeated random calibration/test splits of the calibration rows) and its
    plots, copied into ``out/hf_safe_exit_plots/<task>/``. The calibration rows are named from the loss table
    stored in ``out/calibration/<task>/`` (its ``split``), in the cards' vocabulary."""
    from huggingface_hub import ModelCard

    from ..cards import write_guarantee_card

    out = Path(out)
    ModelCard(render_finetune_card(results)).save(out / "README.md")
    with tempfile.TemporaryDirectory(prefix="hf_safe_exit_plots_") as scratch:
        figures = []
        if plots:
            from ..plotting import plot_evaluation

            figures = plot_evaluation(evaluation, scratch)
        return write_guarantee_card(out, controlled, test_results=evaluation, plots=figures, hardware="auto",
                                    save_calibration=False)
