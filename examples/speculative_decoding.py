"""Big-little speculative decoding (BiLD) with two T5 checkpoints that share a tokenizer.

    python examples/speculative_decoding.py --large path/to/flan-t5-large --small path/to/flan-t5-small \
        [--task cnndm --data ../shared/data --n 4] [--fallback 0.6] [--rollback 3]
    python examples/speculative_decoding.py --demo      # offline, tiny random models, no tokenizer

The small model drafts tokens while its confidence stays >= ``--fallback``. The large model
checks each draft in one pass and rolls back at the first token whose cross-entropy under the
large model exceeds ``--rollback`` (nats). ``--rollback 0`` reproduces the large model's greedy
output token for token. The rollback threshold maps to λ = exp(-rollback) in [0, 1]; λ = 1 is
the large model. ``BiLD.from_lambda(small, lam)`` gives the policy for a calibrated λ, the same
way ``RiskControlled`` picks an early-exit threshold.

The script decodes the inputs with the large model alone and with BiLD, and prints the outputs,
how many tokens agree, the BiLD statistics (drafted / accepted / rolled back, model calls) and
the time per generated token.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import T5Config, T5ForConditionalGeneration

import hf_safe_exit
from hf_safe_exit.compat import cache_kwargs
from hf_safe_exit.decoding import new_decoder_cache
from hf_safe_exit.decoding.bild import BiLD, rollback_to_lambda


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--large", help="local directory of the large model (weights + tokenizer)")
    p.add_argument("--small", help="local directory of the small model (same tokenizer)")
    p.add_argument("--demo", action="store_true", help="tiny random models instead of checkpoints")
    p.add_argument("--task", default=None, help="cnndm or squad: take prompts from the task's pool")
    p.add_argument("--data", default=None, help="local data (e.g. ../shared/data); default: the Hub")
    p.add_argument("--n", type=int, default=4, help="number of prompts")
    p.add_argument("--fallback", type=float, default=0.6)
    p.add_argument("--rollback", type=float, default=3.0)
    p.add_argument("--max-draft-len", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each, interleaved (median)")
    args = p.parse_args(argv)
    if not args.demo and not (args.large and args.small):
        p.error("give --large and --small, or --demo")
    return args


def demo_models():
    """A random T5 and a 1-decoder-layer copy of it: offline stand-ins for a real pair."""
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=200, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=4, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=2.0)
    large = T5ForConditionalGeneration(cfg).eval()
    small_cfg = copy.deepcopy(cfg)
    small_cfg.num_decoder_layers = 1
    small = T5ForConditionalGeneration(small_cfg).eval()
    small.load_state_dict(large.state_dict(), strict=False)
    return large, small


def main(argv=None):
    args = parse_args(argv)
    tokenizer = None
    if args.demo:
        large, small = demo_models()
        gen = torch.Generator().manual_seed(1)
        batch = {"input_ids": torch.randint(2, 200, (args.n, 12), generator=gen)}
    else:
        from transformers import AutoTokenizer

        large = T5ForConditionalGeneration.from_pretrained(args.large).eval()
        small = T5ForConditionalGeneration.from_pretrained(args.small).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.large)
        if args.task:
            from hf_safe_exit.tasks import get_task, load_split

            task = get_task(args.task)
            rows = load_split(task, "pool", path=args.data).select(range(args.n))
            prompts = [task.prompt(row) for row in rows]
        else:
            prompts = ["translate English to German: The house is wonderful.",
                       "summarize: The city council met on Tuesday and approved the new budget after a long debate "
                       "about road repairs, school funding and the cost of the new library."][: args.n]
        batch = dict(tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=512))
    small.to(large.device)
    batch = {k: v.to(large.device) for k, v in batch.items()}

    # generate(early_exit=BiLD(...)) needs hf_safe_exit.enable; BiLD(...).decode(large, **batch) works without it.
    model = hf_safe_exit.enable(large)
    bild = BiLD(small, fallback=args.fallback, rollback=args.rollback, max_draft_len=args.max_draft_len)
    print(f"{bild}  (λ = exp(-rollback) = {rollback_to_lambda(args.rollback):.4f})")

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    with torch.inference_mode():
        # the large model alone (HF generate); transformers 5.x sizes the default decoder cache by the
        # encoder depth, so hand it one sized by the decoder
        def run_full():
            return model.generate(**batch, max_new_tokens=args.max_new_tokens,
                                  **cache_kwargs(new_decoder_cache(large)))

        def run_bild():
            return model.generate(**batch, max_new_tokens=args.max_new_tokens, early_exit=bild,
                                  return_dict_in_generate=True)

        full, out = run_full(), run_bild()  # warm-up (first-call allocations), untimed
        # interleaved repeats, so that drifts in machine load hit both alike; medians
        times = [(timed(run_full), timed(run_bild)) for _ in range(args.repeats)]
        t_full, t_bild = (statistics.median(t) for t in zip(*times))
        # rollback 0 is the large model, token for token
        exact = BiLD(small, fallback=args.fallback, rollback=0.0).decode(large, **batch,
                                                                         max_new_tokens=args.max_new_tokens)

    def text(seqs):
        if tokenizer is None:
            return [" ".join(map(str, s.tolist())) for s in seqs]
        return tokenizer.batch_decode(seqs, skip_special_tokens=True)

    for i, (a, b) in enumerate(zip(text(full), text(out.sequences))):
        print(f"[{i}] large: {a}\n    BiLD : {b}")
    n = min(full.shape[1], out.sequences.shape[1])
    agree = (full[:, :n] == out.sequences[:, :n]).float().mean().item()
    s = out.stats
    print(f"token agreement with the large model: {agree:.3f}; rollback 0 identical: "
          f"{exact.shape == full.shape and torch.equal(exact, full)}")
    print(f"drafted {s.num_drafted}, accepted {s.num_accepted}, rolled back {s.num_rolled_back} "
          f"({s.num_rollbacks} rollbacks, {s.num_fallbacks} fallbacks); large-model tokens {s.num_large_tokens} "
          f"of {s.num_new_tokens}")
    # outputs of different lengths are compared per generated token (padding after EOS not counted)
    pad = large.config.pad_token_id
    n_full, n_bild = int((full[:, 1:] != pad).sum()), int((out.sequences[:, 1:] != pad).sum())
    print(f"decoder calls: large {s.large_model_calls}, small {s.small_model_calls}; time per generated token: "
          f"large alone {1000 * t_full / n_full:.1f} ms ({n_full} tokens), BiLD {1000 * t_bild / n_bild:.1f} ms "
          f"({n_bild} tokens) -> speed-up {(t_full / n_full) / (t_bild / n_bild):.2f}x (medians of {args.repeats} "
          "interleaved runs)")


if __name__ == "__main__":
    main()
