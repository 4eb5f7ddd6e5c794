"""Quick start: early-exit decoding on the shipped default model, offline, on a CPU.

Summarises one article (a held-out CNN/DM pool row when ../shared/data is present, else a
short built-in text) with the full model and with early exit at a few thresholds, and
prints each output, its mean exit layer and its time per generated token relative to the full
model's, measured side by side (outputs of different lengths are compared per token). Then it
decodes under ``RiskControlled(eps=...)`` with the calibration the model ships for summarization
and prints the λ̂ and the guarantee it ran under.

    python examples/quickstart.py [--threshold 0.9 0.7 0.5] [--eps 0.05] [--text "..."]
"""

from __future__ import annotations

import argparse
import time

import torch

import hf_safe_exit
from hf_safe_exit import EarlyExit, RiskControlled
from hf_safe_exit.models import default_model_path, load_default_model

BUILTIN_ARTICLE = (
    "The city council voted on Tuesday to expand the bus network to the northern suburbs, adding four new "
    "routes and extending evening service until midnight. The plan, which will cost an estimated 12 million "
    "dollars over three years, was approved by seven votes to two. Supporters said the new routes would cut "
    "commuting times for thousands of residents who currently rely on cars. Opponents argued that the money "
    "should instead be spent on repairing existing roads. The first new routes are expected to begin "
    "operating in the spring."
)


def pool_article() -> str | None:
    """The first CNN/DM calibration/test-pool row (row 500), if the shared data is present."""
    from hf_safe_exit.tasks import load_split, shared_data_dir

    data = shared_data_dir()
    if data is None:  # a user's machine without the project's offline data: use the built-in text
        return None
    return load_split("cnndm", "pool", path=data)[0]["article"]


def new_tokens(out) -> int:
    return int((out.exit_layers[0] > 0).sum())


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=None, help="article to summarise (default: a held-out CNN/DM article)")
    parser.add_argument("--threshold", type=float, nargs="+", default=[0.9, 0.7, 0.5])
    parser.add_argument("--measure", default="auto",
                        choices=["auto", "softmax", "softmax_shortlist", "saturation", "meta"])
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)

    model, tokenizer = load_default_model()  # early exit is switched on
    article = args.text or pool_article() or BUILTIN_ARTICLE
    inputs = tokenizer(["summarize: " + article], return_tensors="pt", truncation=True, max_length=256)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False, return_dict_in_generate=True)
    layers = model.config.num_decoder_layers
    print(f"default model: {default_model_path()}  ({layers} decoder layers)\n")
    print("article:", article[:300].replace("\n", " "), "...\n")

    model.generate(**inputs, max_new_tokens=4)  # warm-up
    full, t_full = timed(lambda: model.generate(**inputs, early_exit=EarlyExit(threshold=1.0), **gen))
    per_token_full = t_full / new_tokens(full)
    print(f"[full model]  layers {layers:.2f}/{layers}  {new_tokens(full)} tokens, {per_token_full * 1e3:.1f} ms/token")
    print("  ", tokenizer.decode(full.sequences[0], skip_special_tokens=True))
    for threshold in args.threshold:
        out, t = timed(lambda: model.generate(**inputs, early_exit=EarlyExit(threshold=threshold,
                                                                              measure=args.measure), **gen))
        same = torch.equal(out.sequences, full.sequences)
        print(f"[λ = {threshold}]  layers {out.mean_exit_layer.item():.2f}/{layers}  {new_tokens(out)} tokens, "
              f"time per token {t / new_tokens(out) / per_token_full:.2f}x the full model's  "
              f"({'same tokens as the full model' if same else 'differs from the full model'})")
        print("  ", tokenizer.decode(out.sequences[0], skip_special_tokens=True))

    out, t = timed(lambda: model.generate(**inputs, early_exit=RiskControlled(eps=args.eps), **gen))
    print(f"\n[RiskControlled(eps={args.eps})]  λ̂ = {out.early_exit.threshold:g} from calibration/"
          f"{out.certificate.task}/  layers {out.mean_exit_layer.item():.2f}/{layers}  {new_tokens(out)} tokens, "
          f"time per token {t / new_tokens(out) / per_token_full:.2f}x the full model's")
    print("  guarantee:", out.certificate.guarantee)
    print("  ", tokenizer.decode(out.sequences[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
