"""Does token-level early exit beat HF ``generate`` in wall-clock time on real T5 shapes? (issue "Speed")

Randomly initialised models with the exact configurations of t5-small (v1.0: relu, tied read-out scaled by
d_model**-0.5), flan-t5-base and flan-t5-large (gated-gelu, own read-out matrix), float32, CPU, greedy, every
run emitting exactly ``--new-tokens`` tokens (``min_new_tokens = max_new_tokens = N``; counted and asserted).
Random weights: tokens exit where we *force* them to, so the numbers are about cost, not quality.

For each shape x batch size x input length (a "context"):

* ``lambda1``: ``EarlyExit(threshold=1.0)`` against HF: λ = 1 runs HF's own loop (decoding/full_model.py), so this
  row is HF against HF plus our dispatch;
* ``full_depth``: ``ForcedExit(L)``, every token through every layer of *our* loop: its cost at full depth;
* ``forced``: ``ForcedExit(k)``: every token exits at layer k, no confidence computed;
* one row per confidence measure and k: the real measure runs at every layer 1..k (its projection onto the
  vocabulary included when it uses one) and the token exits at k (:class:`AtLayer`): what exiting at k costs
  with that measure;
* RC-paper operating point (``--rc-shape``, default flan-t5-large, mean exit 6 of 24): k = 6 for every measure,
  and per-token exit layers drawn uniformly from 4..8 (mean exactly 6 on every row);
* mixed batch (``--mixed-shape``, t5-small, 256 input tokens, batch 8): at every step the 8 rows exit at
  spread-out layers (all of 1..6 present, mean exactly 3.5) for N in ``--mixed-lengths``.

Timing: HF (``type(model).generate``) and ours (``hf_safe_exit.generate``) run interleaved ``--repeats`` times
after a warm-up; medians. The encoder runs once per context and both get its output (``encoder_outputs=``): at
large shapes the encoder costs ~10x the decoding, and subtracting a separately timed encoder from a noisy total
would drown the decode time. So ms/token = decode time / N, which is (total - encoder) / N; ``--end-to-end``
times the literal ``generate(input_ids)`` and subtracts the encoder time instead.

Floor: the model's own submodules timed one by one (encoder; one decoder block for one token with a self-
attention cache of N/2 entries and cross-attention over the input; one skipped layer's K/V fill = layer norm +
k/v projections + cache append; one read-out = final_layer_norm + lm_head on (batch, 1, d), projected as our loop
projects it (decoding/head_projection.py: in vocabulary chunks on a CPU at 4-15 rows); one layer's cross-
attention K/V over the encoder output, paid once per sequence for each layer that ever runs in full):
floor(k) = encoder + k_max * cross_kv + N * (k * block + projection): what is read per token is k blocks and the
read-out; the skipped layers' K/V fills (kv_fill, still measured) are deferred until a later token reads them and
then computed in that token's own K/V product (issue 27; before it the floor had + (L - k) * kv_fill). The cross
K/V term is paid by both loops and dominates at 512 input tokens. Rows with per-token tables use
k = their mean exit layer (exact for batch 1; for mixed batches only an estimate).

    python benchmarks/speed_shapes.py --quick  # smoke run, ~30 s: results/speed_shapes_quick.{json,png}
    python benchmarks/speed_shapes.py          # full run on an idle machine: results/speed_shapes.{json,png}

The full default run (small, base, large; 4 measures; batch 1 and 8; 128 and 512 input tokens; N = 24;
3 repeats; 1 thread) takes roughly 15 hours on one idle core (extrapolated from the t5-small shape; about
20 min small, 2 h base, 12 h large); ``--stride 2`` halves the large sweep. Every row is written to ``--out``
as soon as it is measured, so a long run can be inspected; the plot is drawn at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import transformers
from transformers import T5Config, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.t5.modeling_t5 import eager_attention_forward

import hf_safe_exit
from hf_safe_exit import EarlyExit, ForcedExit, MetaClassifierHead, MetaHeadConfig
from hf_safe_exit.confidence import MEASURES, ConfidenceMeasure, get_measure
from hf_safe_exit.decoding.head_projection import project

HERE = os.path.dirname(os.path.abspath(__file__))
COMMON = dict(vocab_size=32128, d_kv=64, relative_attention_num_buckets=32, relative_attention_max_distance=128,
              layer_norm_epsilon=1e-6, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
SHAPES = {  # the published configs of google-t5/t5-small, google/flan-t5-base, google/flan-t5-large
    "small": dict(d_model=512, d_ff=2048, num_heads=8, num_layers=6, num_decoder_layers=6,
                  feed_forward_proj="relu", tie_word_embeddings=True),
    "base": dict(d_model=768, d_ff=2048, num_heads=12, num_layers=12, num_decoder_layers=12,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "large": dict(d_model=1024, d_ff=2816, num_heads=16, num_layers=24, num_decoder_layers=24,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


class AtLayer(ConfidenceMeasure):
    """Pays for the real measure ``inner`` at every layer it is asked about, but exits exactly at ``layers``.

    ``layers``: an int or a (batch, N) LongTensor of 1-based exit layers. Use with ``EarlyExit(threshold=0.5)``.
    """

    name = "at_layer"

    def __init__(self, inner: str, layers, bound: ConfidenceMeasure | None = None, exits=None):
        self.inner_name, self.layers, self.inner, self.exits = inner, layers, bound, exits

    def bind(self, model) -> "AtLayer":
        # a fresh bound inner measure per generate call, as EarlyExit.bind does (softmax_shortlist has state); the
        # exit decision is ForcedExit's own (answered on the rows' device)
        return AtLayer(self.inner_name, self.layers, get_measure(self.inner_name).bind(model),
                       ForcedExit(self.layers).bind(model).measure)

    def __call__(self, view) -> torch.Tensor:
        self.inner(view)  # computed for its cost only (eager CPU ops: the work is really done)
        return self.exits(view)


def build_model(spec: dict) -> T5ForConditionalGeneration:
    config = T5Config(**{**COMMON, **spec})
    # transformers 5 reads T5 v1.0's tied, rescaled read-out from scale_decoder_outputs (False iff tie=False)
    assert config.scale_decoder_outputs == (spec.get("tie_word_embeddings", True) is not False)
    model = T5ForConditionalGeneration(config)
    if not config.scale_decoder_outputs:
        # 5.24 ties lm_head to the embedding for every hand-built T5; flan-t5 has its own read-out matrix
        model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    model.meta_head = MetaClassifierHead(MetaHeadConfig(d_model=config.d_model)).eval()  # untrained: cost only
    return model.eval()


def bench(fn, samples: int, budget_s: float) -> float:
    """Median seconds per call of ``fn``; each sample loops enough calls to last ~budget_s (short ops)."""
    start = time.perf_counter()
    fn()  # warm-up, also sizes the loop
    iters = max(1, min(2000, int(budget_s / max(time.perf_counter() - start, 1e-7))))
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def floor_parts(model, ids, mask, new_tokens: int, samples: int, budget_s: float) -> dict:
    """Seconds of each part the early-exit loop cannot avoid, built from the model's own submodules."""
    dec, cfg = model.decoder, model.decoder.config
    batch, hd = ids.shape[0], cfg.d_kv
    enc = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    blk = dec.block[0]
    sa, ca, ff = blk.layer[0], blk.layer[1], blk.layer[-1]
    att, catt = sa.SelfAttention, ca.EncDecAttention
    attn_fn = ALL_ATTENTION_FUNCTIONS.get_interface(cfg._attn_implementation, eager_attention_forward)
    split = lambda t: t.view(batch, t.shape[1], -1, hd).transpose(1, 2)  # noqa: E731
    n = max(new_tokens // 2, 1)  # mean self-attention cache length over the N steps
    x = torch.randn(batch, 1, cfg.d_model)
    past_k, past_v = torch.randn(batch, cfg.num_heads, n, hd), torch.randn(batch, cfg.num_heads, n, hd)
    bias = att.compute_bias(1, n + 1, past_seen_tokens=n)
    ck, cv = split(catt.k(enc)), split(catt.v(enc))
    cbias = torch.zeros(1, cfg.num_heads, 1, enc.shape[1])
    scale = cfg.d_model ** -0.5 if model.config.scale_decoder_outputs else 1.0

    def kv_fill():  # what a skipped layer costs: its K/V for the new token, appended like DynamicCache does
        normed = sa.layer_norm(x)
        return normed, torch.cat([past_k, split(att.k(normed))], 2), torch.cat([past_v, split(att.v(normed))], 2)

    def block():
        normed, k, v = kv_fill()
        a, _ = attn_fn(att, split(att.q(normed)), k, v, None, dropout=0.0, scaling=att.scaling, position_bias=bias)
        h = x + att.o(a.reshape(batch, 1, -1))
        a, _ = attn_fn(catt, split(catt.q(ca.layer_norm(h))), ck, cv, None, dropout=0.0, scaling=catt.scaling,
                       position_bias=cbias)
        return ff(h + catt.o(a.reshape(batch, 1, -1)))

    parts = {
        "encoder": lambda: model.encoder(input_ids=ids, attention_mask=mask),
        "block": block, "kv_fill": kv_fill,
        # our read-out (chunked over the vocabulary where that is bit-identical and faster), and HF's own call
        "projection": lambda: project(model.lm_head, dec.final_layer_norm(x[:, 0]) * scale),
        "projection_hf": lambda: model.lm_head(dec.final_layer_norm(x[:, 0]) * scale),
        "cross_kv": lambda: (catt.k(enc), catt.v(enc)),
    }
    return {name: bench(fn, samples, budget_s) for name, fn in parts.items()}


def floor_ms(parts: dict, L: int, k: float, k_max: int, n: int) -> tuple[float, float]:
    """(decode floor ms per token, total floor ms incl. encoder) for exit layer k (or mean k).

    The skipped layers' K/V are not in it: they are filled only when a later token reads them, together with that
    token's own K/V in one product (hf_safe_exit/decoding/deferred_kv.py), which reads no weights beyond the
    block's own. Before that they cost (L - k) * kv_fill per token (benchmarks/deferred_fills.py compares both)."""
    decode = k_max * parts["cross_kv"] + n * (k * parts["block"] + parts["projection"])
    return 1000 * decode / n, 1000 * (parts["encoder"] + decode)


def exit_table(batch: int, n: int, centre: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, n) exit layers uniform on centre±width with each row's mean exactly ``centre``."""
    half = torch.randint(centre - width, centre + width + 1, (batch, n // 2), generator=gen)
    rows = torch.cat([half, 2 * centre - half, torch.full((batch, n % 2), centre)], dim=1)
    return torch.stack([r[torch.randperm(n, generator=gen)] for r in rows])


def mixed_table(batch: int, n: int, L: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, n): every step the rows take all layers 1..L (then pairs from both ends), shuffled across rows."""
    ends = [v for i in range(L // 2) for v in (i + 1, L - i)] + ([(L + 1) // 2] if L % 2 else [])
    values = torch.tensor((list(range(1, L + 1)) * (batch // L) + ends[: batch % L]))
    return torch.stack([values[torch.randperm(batch, generator=gen)] for _ in range(n)], dim=1)


def header(args, argv) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"benchmark": "speed_shapes", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([sys.executable, sys.argv[0] if argv is None else "speed_shapes.py",
                                 *(sys.argv[1:] if argv is None else argv)]),
            "git_commit": commit, "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
            "hf_safe_exit": hf_safe_exit.__version__, "python": platform.python_version(),
            "loadavg_before": os.getloadavg(), "loadavg_after": None, "args": vars(args)}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["small", "base", "large"])
    p.add_argument("--measures", nargs="+", default=list(MEASURES), choices=list(MEASURES))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--input-lengths", nargs="+", type=int, default=[128, 512])
    p.add_argument("--sweep-batch-sizes", nargs="+", type=int, default=None,
                   help="batch sizes that get the exit-layer sweep and the RC rows (default: all); the others get "
                   "λ = 1 only")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--exit-layers", nargs="+", default=["all"], help='"all" or 1-based layers (too deep: dropped)')
    p.add_argument("--stride", type=int, default=1, help="with --exit-layers all: 1, 1+s, ..., and L")
    p.add_argument("--rc-shape", default="large", help="RC operating point: shape (skipped if not in --shapes)")
    p.add_argument("--rc-exit", type=int, default=6)
    p.add_argument("--mixed-shape", default="small")
    p.add_argument("--mixed-batch", type=int, default=8)
    p.add_argument("--mixed-input-length", type=int, default=256)
    p.add_argument("--mixed-lengths", nargs="*", type=int, default=[32, 128, 256])
    p.add_argument("--end-to-end", action="store_true", help="time generate(input_ids), subtract the encoder")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: small only, batch 1, input 128, 4 tokens, softmax, layers 1 and L, 1 repeat")
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/speed_shapes[_quick].json)")
    p.add_argument("--plot", default=None, help="PNG (default next to --out); '' for none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--micro-seconds", type=float, default=0.05, help=argparse.SUPPRESS)  # per floor sample
    p.add_argument("--shape-override", default=None, help=argparse.SUPPRESS)  # JSON {name: T5Config kwargs}
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.batch_sizes, args.input_lengths, args.new_tokens = ["small"], [1], [128], 4
        args.measures, args.exit_layers, args.repeats, args.mixed_lengths, args.rc_shape = \
            args.measures[:1], ["1", "last"], 1, [], None
    # a smoke run never overwrites the real results
    name = "speed_shapes_quick.json" if args.quick else "speed_shapes.json"
    args.out = args.out or os.path.join(HERE, "results", name)
    args.plot = os.path.splitext(args.out)[0] + ".png" if args.plot is None else args.plot
    return args


@contextlib.contextmanager
def isolated(threads: int, seed: int):
    """``threads`` torch threads, a forked RNG seeded with ``seed``, inference mode; the caller's are restored."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(), torch.inference_mode():
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(old_threads)


def main(argv=None, shapes: dict | None = None) -> dict:
    args = parse_args(argv)
    shapes = {**SHAPES, **json.loads(args.shape_override or "{}"), **(shapes or {})}
    unknown = set(args.shapes) - set(shapes)
    if unknown:
        raise SystemExit(f"unknown shapes {sorted(unknown)}: use {sorted(shapes)}")
    doc = {**header(args, argv), "shapes": {s: {**COMMON, **shapes[s]} for s in args.shapes}, "floors": [], "rows": []}
    with isolated(args.threads, args.seed):
        for shape in args.shapes:
            run_shape(shape, shapes[shape], args, doc)
    doc["loadavg_after"] = os.getloadavg()
    write(doc, args.out)
    if args.plot:
        plot(doc["rows"], args.plot)
    return doc


def write(doc: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:  # atomic: a reader never sees half a file
        json.dump(doc, f, indent=1)
    os.replace(path + ".tmp", path)


def run_shape(shape: str, spec: dict, args, doc: dict) -> None:
    model = build_model(spec)
    L, vocab = model.config.num_decoder_layers, model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    if args.exit_layers == ["all"]:
        layers = sorted(set(range(1, L + 1, args.stride)) | {L})
    else:
        layers = sorted({L if v == "last" else int(v) for v in args.exit_layers} & set(range(1, L + 1)))
    contexts = [(b, n, args.new_tokens, False) for b in args.batch_sizes for n in args.input_lengths]
    if shape == args.mixed_shape:
        contexts += [(args.mixed_batch, args.mixed_input_length, m, True) for m in args.mixed_lengths]
    print(f"\n== {shape}: d_model {model.config.d_model}, {L} decoder layers, exit layers {layers}", flush=True)
    print(f"{'experiment':<13}{'b':>3}{'in':>5}{'N':>5} {'measure':<18}{'k':>6}{'HF ms/t':>9}{'ours ms/t':>10}"
          f"{'ours/HF':>8}{'floor':>8}{'/floor':>7}", flush=True)
    for batch, n_in, n_new, mixed in contexts:
        ids = torch.randint(2, vocab, (batch, n_in), generator=gen)
        mask = torch.ones_like(ids)
        parts = floor_parts(model, ids, mask, n_new, max(args.repeats, 3), args.micro_seconds)
        doc["floors"].append({"shape": shape, "batch": batch, "input_length": n_in, "new_tokens": n_new,
                              "seconds": parts})
        ctx = Context(model, shape, ids, mask, n_new, parts, args, doc)
        ctx.row("lambda1" if not mixed else "mixed", "lambda1", L, EarlyExit(threshold=1.0),
                torch.full((batch, n_new), L))
        ctx.row("full_depth", "forced", L, ForcedExit(L), torch.full((batch, n_new), L))
        if mixed:  # rows at different layers within every step
            table = mixed_table(batch, n_new, L, gen)
            ctx.row("mixed", "forced", table, ForcedExit(table), table)
            continue
        if args.sweep_batch_sizes is not None and batch not in args.sweep_batch_sizes:
            continue  # λ = 1 only at this batch size
        for k in layers:
            const = torch.full((batch, n_new), k)
            ctx.row("sweep", "forced", k, ForcedExit(k), const)
            for m in args.measures:
                ctx.row("sweep", m, k, EarlyExit(threshold=0.5, measure=AtLayer(m, k)), const)
        if shape == args.rc_shape and 1 <= args.rc_exit <= L:
            k = args.rc_exit
            const = torch.full((batch, n_new), k)
            if k not in layers:
                ctx.row("rc_point", "forced", k, ForcedExit(k), const)
                for m in args.measures:
                    ctx.row("rc_point", m, k, EarlyExit(threshold=0.5, measure=AtLayer(m, k)), const)
            table = exit_table(batch, n_new, k, min(2, k - 1, L - k), gen)
            ctx.row("rc_uniform", "forced", table, ForcedExit(table), table)
            for m in args.measures:
                ctx.row("rc_uniform", m, table, EarlyExit(threshold=0.5, measure=AtLayer(m, table)), table)
    del model


def paired_ratio(hf_s: list, ours_s: list, encoder_s: float = 0.0) -> float:
    """Median over the interleaved repeats of ours/HF within each pair: a load drift slower than one pair cancels
    in every ratio, which the ratio of the two medians (``ratio``) does not guarantee."""
    return statistics.median((o - encoder_s) / (h - encoder_s) for h, o in zip(hf_s, ours_s))


class Context:
    """One model + inputs: runs the HF reference once, then one row per policy against fresh HF timings."""

    def __init__(self, model, shape, ids, mask, n_new, parts, args, doc):
        self.model, self.shape, self.n_new, self.parts, self.args, self.doc = model, shape, n_new, parts, args, doc
        self.batch, self.n_in = ids.shape
        self.kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                           do_sample=False, num_beams=1)
        if not args.end_to_end:  # both loops decode from the same precomputed encoder output
            self.kwargs["encoder_outputs"] = BaseModelOutput(
                last_hidden_state=model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state)
        self.reference = self.hf()  # warm-up of HF, and the tokens λ = 1 must reproduce

    def hf(self):
        return type(self.model).generate(self.model, **self.kwargs)

    def ours(self, policy, **extra):
        return hf_safe_exit.generate(self.model, **self.kwargs, **extra, early_exit=policy)

    def row(self, experiment, measure, exit_layer, policy, expected: torch.Tensor) -> None:
        out = self.ours(policy, return_dict_in_generate=True)  # warm-up; check exits and token count
        generated = {"hf": self.reference.shape[1] - 1, "ours": out.sequences.shape[1] - 1}
        assert generated == {"hf": self.n_new, "ours": self.n_new}, generated
        assert torch.equal(out.exit_layers.cpu(), expected), "tokens did not exit where they were told to"
        hf_s, ours_s = [], []
        for _ in range(self.args.repeats):  # interleaved: load drifts hit both alike
            for fn, acc in ((self.hf, hf_s), (lambda: self.ours(policy), ours_s)):
                start = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - start)
        enc = self.parts["encoder"] if self.args.end_to_end else 0.0
        hf_ms, ours_ms = ((statistics.median(t) - enc) * 1000 / self.n_new for t in (hf_s, ours_s))
        L = self.model.config.num_decoder_layers
        k_mean = float(expected.float().mean())
        floor_tok, floor_total = floor_ms(self.parts, L, k_mean, int(expected.max()), self.n_new)
        r = {"experiment": experiment, "shape": self.shape, "batch": self.batch, "input_length": self.n_in,
             "new_tokens": self.n_new, "generated_tokens_hf": generated["hf"],
             "generated_tokens_ours": generated["ours"],
             "measure": measure, "exit_layer": exit_layer if isinstance(exit_layer, int) else "table",
             "mean_exit_layer": k_mean, "num_decoder_layers": L,
             "same_tokens_as_hf": bool(torch.equal(out.sequences, self.reference)),
             "ms_per_token_hf": hf_ms, "ms_per_token_ours": ours_ms,
             "ratio": ours_ms / hf_ms, "speedup": hf_ms / ours_ms,
             "ratio_paired": paired_ratio(hf_s, ours_s, enc),
             "floor_ms_per_token": floor_tok, "ratio_to_floor": ours_ms / floor_tok,
             "encoder_ms": 1000 * self.parts["encoder"], "floor_total_ms": floor_total,
             "ratio_total_to_floor": (1000 * self.parts["encoder"] + ours_ms * self.n_new) / floor_total,
             "floor_kind": "exact" if expected.min() == expected.max() or self.batch == 1 else "estimate_at_mean",
             "seconds_hf": hf_s, "seconds_ours": ours_s, "load1": os.getloadavg()[0],
             "exit_table": None if isinstance(exit_layer, int) else expected.tolist()}
        self.doc["rows"].append(r)
        write(self.doc, self.args.out)  # incrementally: a long run can be inspected while it goes
        k = str(exit_layer) if isinstance(exit_layer, int) else f"~{k_mean:.1f}"
        print(f"{experiment:<13}{self.batch:>3}{self.n_in:>5}{self.n_new:>5} {measure:<18}{k:>6}{hf_ms:>9.2f}"
              f"{ours_ms:>10.2f}{r['ratio']:>8.3f}{floor_tok:>8.2f}{r['ratio_to_floor']:>7.2f}", flush=True)


def plot(rows: list, path: str) -> None:
    """One panel per shape (batch 1, input 128 when run): HF ms/token ÷ ours against the exit layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    shapes = list(dict.fromkeys(r["shape"] for r in rows if r["experiment"] == "sweep"))
    fig, axes = plt.subplots(1, max(len(shapes), 1), figsize=(5 * max(len(shapes), 1), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sweep = [r for r in rows if r["experiment"] == "sweep" and r["shape"] == shape]
        batch = 1 if any(r["batch"] == 1 for r in sweep) else min(r["batch"] for r in sweep)
        n_in = 128 if any(r["input_length"] == 128 for r in sweep) else min(r["input_length"] for r in sweep)
        sweep = [r for r in sweep if r["batch"] == batch and r["input_length"] == n_in]
        for m in dict.fromkeys(r["measure"] for r in sweep):
            pts = sorted((r["exit_layer"], r["speedup"]) for r in sweep if r["measure"] == m)
            ax.plot(*zip(*pts), marker="o", label="ForcedExit" if m == "forced" else m,
                    **({"color": "black"} if m == "forced" else {}))
        floor = sorted({(r["exit_layer"], r["ms_per_token_hf"] / r["floor_ms_per_token"]) for r in sweep
                        if r["measure"] == "forced"})
        ax.plot(*zip(*floor), ls="--", color="grey", label="floor (HF / floor)")
        for r in rows:
            if (r["experiment"], r["shape"], r["batch"], r["input_length"]) == ("lambda1", shape, batch, n_in):
                ax.scatter([r["num_decoder_layers"]], [r["speedup"]], marker="x", color="red", label="λ = 1", zorder=3)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set(title=f"{shape}: batch {batch}, input {n_in}", xlabel="exit layer k",
               ylabel="speed-up (HF ms/token ÷ ours)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
