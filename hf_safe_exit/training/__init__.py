"""Training for early exit: CALM's per-layer loss, the meta-classifier head, a T5 tokenizer, span corruption,
lead-sentence and cloze-question examples, and the offline data.

Two recipes: :func:`finetune_calm` (:mod:`.finetune`: CALM-fine-tune a pretrained T5, calibrate it and write a
folder to push; ``examples/finetune_calm.py``) and :func:`train_default_model` (:mod:`.recipe`: the package's
default model from scratch; ``examples/train_default_model.py``).
"""

from .calm_loss import CALMLossOutput, CALMSeq2SeqTrainer, calm_loss, layer_weights, per_layer_losses
from .finetune import FinetuneConfig, finetune_calm
from .meta_classifier import balanced_class_weights, collect_meta_examples, meta_labels, train_meta_classifier
from .recipe import RecipeConfig, train_default_model
from .self_supervised import cloze_question_example, lead_sentences_example, split_sentences
from .span_corruption import random_spans_noise_mask, span_corrupt
from .surgery import keep_first_decoder_layers
from .tokenizer import sentinel_tokens, train_t5_tokenizer

__all__ = [
    "CALMLossOutput", "CALMSeq2SeqTrainer", "calm_loss", "layer_weights", "per_layer_losses",
    "balanced_class_weights", "collect_meta_examples", "meta_labels", "train_meta_classifier",
    "random_spans_noise_mask", "span_corrupt", "keep_first_decoder_layers",
    "cloze_question_example", "lead_sentences_example", "split_sentences", "sentinel_tokens", "train_t5_tokenizer",
    "FinetuneConfig", "finetune_calm", "RecipeConfig", "train_default_model",
]
