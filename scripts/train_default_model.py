#!/usr/bin/env python
"""Train hf_safe_exit's small default T5 from scratch, offline, reproducibly.

The recipe is train_default_model in scripts/default_model_recipe/recipe.py (stages, data and splits in its docstring);
every option below is a field of its RecipeConfig. It writes the package's hf_safe_exit/default_model/ (weights,
config, tokenizer, meta head, model card, held-out ids). To start from a pretrained T5 instead, see
examples/finetune_calm.py.

The shipped model (CPU, 2 threads; three training runs, each continues the previous one; then the first four
decoder layers of the third are kept as they are, since its layers 5-6 did not improve on its exit 4 held out):

    ARCH="--vocab-size 8000 --d-model 128 --d-kv 32 --num-heads 4 --d-ff 512 --enc-layers 6 --dec-layers 6
          --max-source-length 160 --max-target-length 48 --qa-target-length 16 --batch-size 16 --summ-prob 0.4"
    python scripts/train_default_model.py --threads 2 --max-minutes 50 --pretrain-fraction 0.5 $ARCH \
        --work-dir runs/v5 --out runs/v5/package     # (the shipped v5 reused, with --resume, the
                                                     #  8k tokenizer an earlier run of this script trained)
    python scripts/train_default_model.py --threads 2 --max-minutes 38 --lr 3e-3 --warmup-steps 50 $ARCH \
        --dropout 0.1 --finetune-self-supervised 0.6 --summ-prob 0.3 \
        --init-from runs/v5/ckpt_finetune --work-dir runs/v6 --out runs/v6/package
                                                     # (v6 predates calm_loss reading every exit out
                                                     #  through the decoder dropout: only the last was)
    python scripts/train_default_model.py --threads 2 --max-minutes 78 --lr 3e-3 --warmup-steps 50 $ARCH \
        --dropout 0.1 --finetune-self-supervised 0.6 --summ-prob 0.3 --eval-cnndm 200 --eval-squad 600 \
        --init-from runs/v6/ckpt_finetune --work-dir runs/v7 --out runs/v7/package
    python scripts/train_default_model.py --threads 2 $ARCH --eval-cnndm 200 --eval-squad 1200 \
        --init-from runs/v7/ckpt_finetune --keep-decoder-layers 4 --max-finetune-steps 0 \
        --eval-exclude runs/v7/package/heldout_eval_ids.json --work-dir runs/v8cut   # writes hf_safe_exit/default_model
                                                     # (evaluated on pool rows disjoint from the 200/600 that v7's
                                                     #  per-exit scores, which chose the depth, were measured on)
    # Not shipped: the same cut model trained on for 68 min (--max-minutes 68 --lr 3e-3 --warmup-steps 50
    # --dropout 0.1 --finetune-self-supervised 0.6 --summ-prob 0.3) scored higher on the selection rows (ROUGE-L
    # 9.51 vs 8.32, F1 1.76 vs 1.29) but its ROUGE-L dipped at exit 3 (-0.09); the rule written down before either
    # was evaluated took the candidate whose ROUGE-L and F1 both rose there.

    python scripts/train_default_model.py --card-only                  # re-render its README.md
    python scripts/train_default_model.py --tiny --max-minutes 3 --out /tmp/tiny_model   # smoke test
    python scripts/train_default_model.py --device cuda --d-model 384 --dec-layers 8 ...  # larger, on a GPU
"""

from __future__ import annotations

import argparse
import os
import sys

from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the recipe lives next to this script
from default_model_recipe.card import rewrite_card  # noqa: E402
from default_model_recipe.loop import log  # noqa: E402
from default_model_recipe.recipe import RecipeConfig, train_default_model  # noqa: E402


def main(argv=None):
    parser = HfArgumentParser(RecipeConfig, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--card-only", "--card_only", action="store_true",
                        help="only rewrite README.md in --out from its training_results.json (no training, no "
                             "evaluation); the guarantee sections the card has are kept")
    try:
        config, rest = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # RecipeConfig's validation: one line naming the value and the fix
        parser.error(str(err))
    if rest.card_only:
        return log(f"rewrote {rewrite_card(config.out)}")
    try:
        return train_default_model(config)
    except (FileNotFoundError, ValueError) as err:  # missing data, an --init-from that is not a checkpoint
        sys.exit(f"train_default_model.py: error: {err}")


if __name__ == "__main__":
    main()
