#!/usr/bin/env python
"""CALM-fine-tune a pretrained T5, calibrate its early exit on the task's pool, and write a folder to push.

With the Hub reachable (the data then comes from the Hub too):

    python examples/finetune_calm.py --model google/flan-t5-small --task cnndm --max-steps 2000 \\
        --n-calibration 200 --output flan-t5-small-calm-cnndm

Offline, from the shipped default model and the project's data (a smoke run: two steps, eight pool rows):

    python examples/finetune_calm.py --model hf_safe_exit/default_model --task cnndm --data ../shared/data \\
        --max-steps 2 --n-calibration 8 --max-new-tokens 32 --meta-examples 32 --output /tmp/calm-cnndm

The folder holds the weights, tokenizer, meta head, calibration/<task>/, custom_generate/ and README.md (the
guarantee, test risk and speed-up per generated token). Then, or after `hf upload <user>/<name> <folder>`:

    model = T5ForConditionalGeneration.from_pretrained(folder, trust_remote_code=True)
    model.generate(**inputs, early_exit=hf_safe_exit.RiskControlled(eps=0.05, delta=0.1, method="ucb"))

The recipe is hf_safe_exit.training.finetune.finetune_calm; every option below is a FinetuneConfig field.
"""

from __future__ import annotations

import argparse

from transformers import HfArgumentParser

from hf_safe_exit.training.finetune import FinetuneConfig, finetune_calm


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(FinetuneConfig, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    try:
        (config,) = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # FinetuneConfig's validation: one line naming the value and the fix
        parser.error(str(err))
    return finetune_calm(config)


if __name__ == "__main__":
    main()
