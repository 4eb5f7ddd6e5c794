"""Training for early exit: CALM's per-layer loss, the meta-classifier head, a T5 tokenizer, span corruption,
lead-sentence and cloze-question examples, and the offline data.

The recipe: :func:`finetune_calm` (:mod:`.finetune`: CALM-fine-tune a pretrained T5, calibrate it and write a
folder to push; ``examples/finetune_calm.py``). The package's default model was trained from scratch by
``scripts/train_default_model.py``, which is not part of the library.
"""

from ..lazy import lazy_exports

# imported on first use: calm_loss subclasses transformers' Seq2SeqTrainer, which loads accelerate and datasets
__getattr__, __dir__ = lazy_exports(globals(), {
    ".calm_loss": ("CALMLossOutput", "CALMSeq2SeqTrainer", "calm_loss", "layer_weights", "per_layer_losses"),
    ".finetune": ("FinetuneConfig", "finetune_calm"),
    ".meta_classifier": ("balanced_class_weights", "collect_meta_examples", "meta_labels", "train_meta_classifier"),
    ".self_supervised": ("cloze_question_example", "lead_sentences_example", "split_sentences"),
    ".span_corruption": ("random_spans_noise_mask", "span_corrupt"),
    ".surgery": ("keep_first_decoder_layers",),
    ".tokenizer": ("sentinel_tokens", "train_t5_tokenizer"),
})
del lazy_exports

__all__ = [
    "CALMLossOutput", "CALMSeq2SeqTrainer", "calm_loss", "layer_weights", "per_layer_losses",
    "balanced_class_weights", "collect_meta_examples", "meta_labels", "train_meta_classifier",
    "random_spans_noise_mask", "span_corrupt", "keep_first_decoder_layers",
    "cloze_question_example", "lead_sentences_example", "split_sentences", "sentinel_tokens", "train_t5_tokenizer",
    "FinetuneConfig", "finetune_calm",
]
