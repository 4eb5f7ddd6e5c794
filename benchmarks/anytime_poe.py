"""Product-of-Experts anytime exits on the shipped default model: conditional monotonicity and efficiency at fixed ε.

Two measurements per task (held-out pool examples only: CNN/DM pool rows 500–899, SQuAD pool
articles 36–47, from ``../shared/data``):

1. **Conditional monotonicity** (Jazbec et al. 2023, Sec. 3), teacher-forced: the full model's
   greedy output ŷ is fed back to the decoder, and at every position t the probability that
   layer l assigns to the *final* token ŷ_t (the full model's choice) is read out for l = 1..L
   with three read-outs: ``softmax`` (each layer's own softmax, what plain early exit uses),
   ``poe`` (the PoE over layers 1..l for l < L and the model's own softmax at L: what
   ``EarlyExit(anytime="poe")`` decodes with, the default ``final_layer="model"``) and ``poe_all``
   (the PoE at every layer incl. L, the paper's form, ``final_layer="poe"``). Reported: how often
   that probability drops from one layer to the next (per transition, and per token: any drop),
   with tolerances 0 and 0.01; the paper's per-token statistic, the share of tokens with
   max_{i<j} (p_i − p_j) > τ for τ ∈ {0.01, 0.05, 0.1, 0.2, 0.5}; and per layer the mean
   probability of ŷ_t and how often the layer's argmax is ŷ_t.

2. **Efficiency at a fixed ε after calibration**: each example is decoded greedily at every λ of a
   grid with plain early exit (softmax-margin confidence) and with PoE (the softmax margin of the
   PoE distribution as the confidence, the PoE as the prediction). Risk = the task-loss gap against
   the plain full model (λ = 1; identical for both, checked). The per-λ losses, mean exit layers and
   wall times go into a :class:`~hf_safe_exit.LossTable` per variant and
   :func:`~hf_safe_exit.calibration.evaluate.evaluate_table` draws repeated random
   calibration/test splits: λ̂ on the calibration half for each ε, test risk, mean exit layer and
   speed-up on the test half. PoE margins are orders of magnitude smaller than softmax margins
   (ReLU'd logits are not exponentiated and the i/L weights temper early layers), so each variant
   gets its own λ grid: quantiles of its confidences (layers 1..L−1, teacher-forced) on *other* pool
   examples than the ones decoded, plus 0 and 1.

    python benchmarks/anytime_poe.py                       # default model, writes benchmarks/results/anytime_poe.json
    python benchmarks/anytime_poe.py --tiny --n-squad 16 --n-cnndm 4 --output /tmp/poe_smoke.json   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import hf_safe_exit
from hf_safe_exit import EarlyExit, LossTable, model_fingerprint
from hf_safe_exit.calibration.evaluate import evaluate_table
from hf_safe_exit.compat import cache_kwargs
from hf_safe_exit.decoding import new_decoder_cache
from hf_safe_exit.decoding.poe import PoEConfig, poe_log_probs
from hf_safe_exit.decoding.readout import intermediate_logits
from hf_safe_exit.tasks import get_task, load_split, shared_data_dir

GRID_QUANTILES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)
TAUS = (0.01, 0.05, 0.1, 0.2, 0.5)
RESULTS = Path(__file__).resolve().parent / "results" / "anytime_poe.json"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_model(args):
    if args.tiny:
        from transformers import AutoTokenizer, T5ForConditionalGeneration

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny model is a test fixture
        from tiny_calibration import save_tiny_t5

        d = Path(args.tiny_dir)
        if not (d / "config.json").is_file():
            texts = [r["article"] for r in load_split(get_task("cnndm"), "train", path=args.data_dir)]
            save_tiny_t5(d, texts[:200], seed=0, num_decoder_layers=4, d_model=32)
        tok = AutoTokenizer.from_pretrained(d)
        return hf_safe_exit.enable(T5ForConditionalGeneration.from_pretrained(d).eval()), tok, f"tiny random ({d})"
    if args.model:
        from transformers import AutoTokenizer, T5ForConditionalGeneration

        tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        model = T5ForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32, local_files_only=True)
        return hf_safe_exit.enable(model.eval()), tok, os.fspath(args.model)
    from hf_safe_exit.models import default_model_path, load_default_model

    model, tok = load_default_model()
    return hf_safe_exit.enable(model), tok, f"default model ({default_model_path()})"


def examples(task, n: int, seed: int, data_dir):
    pool = load_split(task, "pool", path=data_dir)
    idx = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [pool[int(i)] for i in idx]


def encode(tok, task, rows):
    return tok([task.prompt(r) for r in rows], return_tensors="pt", padding=True, truncation=True,
               max_length=task.max_input_length)


# ----------------------------------------------------------------------------------------------------------------
# 1. conditional monotonicity, teacher-forced on the full model's output
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def final_token_probs(model, enc, sequences, eos_id: int):
    """``{read-out: (L, tokens)}`` probability of the full model's token at each layer, plus per-layer argmax hits."""
    dec_in, target = sequences[:, :-1], sequences[:, 1:]
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], decoder_input_ids=dec_in,
                output_hidden_states=True, use_cache=False)
    hs = out.decoder_hidden_states  # embeddings, layers 1..L (the last one already final-layer-normed)
    L = len(hs) - 1
    logits = torch.stack([intermediate_logits(model, hs[l]) for l in range(1, L)] + [out.logits]).double()
    # real target tokens: up to and including the first EOS
    is_eos = (target == eos_id).long()
    valid = (torch.cumsum(is_eos, dim=1) - is_eos) == 0
    logp_soft = torch.log_softmax(logits, dim=-1)
    logp_poe = poe_log_probs(logits)
    idx = target[None, :, :, None].expand(L, -1, -1, 1)
    gather = lambda lp: lp.gather(-1, idx).squeeze(-1).exp()[:, valid]  # noqa: E731
    p_soft, p_poe_all = gather(logp_soft), gather(logp_poe)
    p_poe = torch.cat([p_poe_all[:-1], p_soft[-1:]])
    hits_soft = (logits.argmax(-1) == target[None])[:, valid]
    hits_poe_all = (logp_poe.argmax(-1) == target[None])[:, valid]
    hits_poe = torch.cat([hits_poe_all[:-1], hits_soft[-1:]])
    return ({"softmax": p_soft, "poe": p_poe, "poe_all": p_poe_all},
            {"softmax": hits_soft, "poe": hits_poe, "poe_all": hits_poe_all})


@torch.no_grad()
def confidence_grids(model, tok, task, rows, batch_size: int, max_new: int) -> dict:
    """Per read-out λ grid: quantiles of the softmax margins at layers 1..L−1 on ``rows`` (teacher-forced), 0 and 1."""
    from hf_safe_exit.confidence import softmax_margin

    margins = {"softmax": [], "poe": []}
    for i in range(0, len(rows), batch_size):
        enc = encode(tok, task, rows[i: i + batch_size])
        seqs = type(model).generate(model, **enc, max_new_tokens=max_new, do_sample=False, num_beams=1,
                                    **cache_kwargs(new_decoder_cache(model)))
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], decoder_input_ids=seqs[:, :-1],
                    output_hidden_states=True, use_cache=False)
        hs = out.decoder_hidden_states
        logits = torch.stack([intermediate_logits(model, hs[l]) for l in range(1, len(hs) - 1)]).double()
        target = seqs[:, 1:]
        is_eos = (target == tok.eos_token_id).long()
        valid = (torch.cumsum(is_eos, dim=1) - is_eos) == 0
        margins["softmax"].append(softmax_margin(logits)[:, valid].flatten().numpy())
        margins["poe"].append(softmax_margin(poe_log_probs(logits))[:, valid].flatten().numpy())
    grids = {}
    for k, v in margins.items():
        q = np.quantile(np.concatenate(v), GRID_QUANTILES)
        grid = np.unique(np.concatenate([[0.0, 1.0], np.round(q, 8)]))
        grids[k] = [float(x) for x in grid]
    return grids


def monotonicity_stats(p: np.ndarray, hits: np.ndarray) -> dict:
    """``p``: (L, tokens) probability of the final token per layer."""
    diffs = p[1:] - p[:-1]
    out = {"tokens": int(p.shape[1])}
    for tol in (0.0, 0.01):
        drops = diffs < -tol
        key = "0" if tol == 0 else f"{tol:g}"
        out[f"transition_drop_rate_tol{key}"] = float(drops.mean())
        out[f"token_any_drop_rate_tol{key}"] = float(drops.any(axis=0).mean())
    # the paper's statistic: max over i < j of p_i − p_j (the largest later decrease)
    running_max = np.maximum.accumulate(p, axis=0)
    worst = (running_max[:-1] - p[1:]).max(axis=0)
    out["token_max_decrease_rate"] = {f"{t:g}": float((worst > t).mean()) for t in TAUS}
    out["mean_prob_final_token_per_layer"] = [float(x) for x in p.mean(axis=1)]
    out["argmax_is_final_token_per_layer"] = [float(x) for x in hits.mean(axis=1)]
    return out


# ----------------------------------------------------------------------------------------------------------------
# 2. decode at every λ, with and without PoE
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def decode_grid(model, tok, task, rows, variant: str, grid, batch_size: int, max_new_tokens: int):
    anytime = PoEConfig() if variant == "poe" else None
    K, n = len(grid), len(rows)
    texts = [[None] * n for _ in range(K)]
    exit_layer = np.zeros((K, n))
    fraction = np.zeros((K, n))
    ntok = np.zeros((K, n))
    wall = np.zeros(K)
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    encs = [encode(tok, task, [rows[i] for i in b]) for b in batches]
    for b, enc in zip(batches, encs):  # every batch at every λ in turn: wall times share conditions
        for k, lam in enumerate(grid):
            policy = EarlyExit(threshold=float(lam), anytime=anytime)
            start = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 early_exit=policy, return_dict_in_generate=True)
            wall[k] += time.perf_counter() - start
            decoded = tok.batch_decode(out.sequences, skip_special_tokens=True)
            for j, i in enumerate(b):
                texts[k][i] = decoded[j]
            exit_layer[k, b] = out.mean_exit_layer.numpy()
            fraction[k, b] = out.layer_fraction.numpy()
            ntok[k, b] = (out.exit_layers > 0).sum(1).numpy()
    return texts, exit_layer, fraction, ntok, wall


def run_task(model, tok, task_name: str, n: int, args) -> dict:
    task = get_task(task_name)  # a fresh instance: the override below stays in this run
    if args.max_input_length:
        task.max_input_length = args.max_input_length  # the length the model was trained with
    all_rows = examples(task, n + args.n_grid, args.seed, args.data_dir)
    rows, grid_rows = all_rows[:n], all_rows[n:]
    max_new = min(args.max_new_tokens or task.max_new_tokens, task.max_new_tokens)
    log(f"{task_name}: {n} pool examples (+{len(grid_rows)} others for the λ grids), max_new_tokens {max_new}")
    grids = confidence_grids(model, tok, task, grid_rows, args.batch_size, max_new)
    log(f"{task_name}: grids " + json.dumps({k: [round(x, 6) for x in v] for k, v in grids.items()}))
    refs = [task.reference(r) for r in rows]
    result = {"n": n, "max_new_tokens": max_new, "example_ids": [task.example_id(r) for r in rows],
              "grid_example_ids": [task.example_id(r) for r in grid_rows], "grids": grids}

    tables, decoded = {}, {}
    for variant in ("softmax", "poe"):
        grid = grids[variant]
        t0 = time.perf_counter()
        texts, layers, frac, ntok, wall = decode_grid(model, tok, task, rows, variant, grid, args.batch_size, max_new)
        log(f"{task_name}/{variant}: {len(grid)} thresholds decoded in {time.perf_counter() - t0:.0f}s; "
            f"mean exit layer per λ {np.round(layers.mean(1), 2).tolist()}")
        decoded[variant] = texts[grid.index(1.0)]
        task_loss = np.array([[task.loss(texts[k][i], refs[i]) for i in range(n)] for k in range(len(grid))])
        tables[variant] = (grid, task_loss, layers, frac, ntok, wall)
    # λ = 1 is the plain full model for both (PoE's default final_layer="model"): same texts
    result["full_outputs_identical"] = decoded["softmax"] == decoded["poe"]
    grid, task_loss, *_ = tables["softmax"]
    full_loss = task_loss[grid.index(1.0)]
    result["full_model_task_score"] = float(1 - full_loss.mean())

    result["efficiency"] = {}
    for variant, (grid, task_loss, layers, frac, ntok, wall) in tables.items():
        gap = np.clip(task_loss - full_loss[None], -1, 1)
        table = LossTable(np.array(grid), {"performance_gap": gap},
                          extras={"task_loss": task_loss, "mean_exit_layer": layers, "layer_fraction": frac,
                                  "num_tokens": ntok, "wall_time": wall},
                          metadata={"task": task_name, "measure": "softmax", "anytime": variant,
                                    "model_fingerprint": model_fingerprint(model),
                                    "num_decoder_layers": model.config.num_decoder_layers})
        if args.save_tables:
            table.metadata.update({"split": "pool", "schedule": "constant", "min_exit_layer": 1,
                                   "max_new_tokens": max_new, "example_ids": result["example_ids"]})
            saved = Path(args.save_tables) / task_name / f"{variant}.npz"
            saved.parent.mkdir(parents=True, exist_ok=True)
            table.save(saved)
            log(f"wrote {saved}")
        ev = evaluate_table(table, eps=args.eps, methods=("crc", "ucb"), delta=0.1, n_cal=n // 2,
                            repeats=args.repeats, seed=args.seed)
        ev["grid"] = {"lambdas": grid, "mean_gap": gap.mean(1).tolist(), "mean_exit_layer": layers.mean(1).tolist(),
                      "wall_time": wall.tolist(), "task_score": (1 - task_loss.mean(1)).tolist()}
        result["efficiency"][variant] = ev

    # conditional monotonicity on the full model's outputs (teacher-forced)
    full_seqs = []
    probs = {k: [] for k in ("softmax", "poe", "poe_all")}
    hits = {k: [] for k in probs}
    for i in range(0, n, args.batch_size):
        chunk = rows[i: i + args.batch_size]
        enc = encode(tok, task, chunk)
        seqs = type(model).generate(model, **enc, max_new_tokens=max_new, do_sample=False, num_beams=1,
                                    **cache_kwargs(new_decoder_cache(model)))  # decoder-sized cache (depths differ)
        full_seqs += tok.batch_decode(seqs, skip_special_tokens=True)
        p, h = final_token_probs(model, enc, seqs, tok.eos_token_id)
        for k in probs:
            probs[k].append(p[k].numpy())
            hits[k].append(h[k].numpy())
    result["hf_generate_matches_full"] = full_seqs == decoded["softmax"]
    result["monotonicity"] = {k: monotonicity_stats(np.concatenate(probs[k], 1), np.concatenate(hits[k], 1))
                              for k in probs}
    return result


def summary(results: dict, eps_focus: float) -> dict:
    out = {}
    for task, r in results.items():
        s = {"transition_drop_rate": {k: v["transition_drop_rate_tol0"] for k, v in r["monotonicity"].items()},
             "token_max_decrease_gt_0.1": {k: v["token_max_decrease_rate"]["0.1"] for k, v in r["monotonicity"].items()}}
        for variant, ev in r["efficiency"].items():
            for row in ev["results"]:
                if abs(row["eps"] - eps_focus) < 1e-12:
                    s[f"{variant}_{row['method']}_eps{eps_focus:g}"] = {
                        k: row[k] for k in ("test_risk_mean", "violation_rate", "lambda_hat_mean", "mean_exit_layer",
                                            "layer_fraction", "speedup", "no_exit_rate")}
        out[task] = s
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a T5 checkpoint directory (default: the shipped default model)")
    p.add_argument("--tiny", action="store_true", help="smoke test on a tiny random model (numbers mean nothing)")
    p.add_argument("--tiny-dir", default="/tmp/hf_safe_exit_tiny_poe")
    p.add_argument("--data-dir", default=None, help="default: ../shared/data")
    p.add_argument("--tasks", default="squad,cnndm")
    p.add_argument("--n-squad", type=int, default=200)
    p.add_argument("--n-cnndm", type=int, default=60)
    p.add_argument("--n-grid", type=int, default=32, help="other pool examples whose confidences set the λ grids")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap on the task's max_new_tokens (default: the task's)")
    p.add_argument("--max-input-length", type=int, default=None,
                   help="truncate inputs (default: the task's); use the length the model was trained with")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eps", default="0.05,0.1,0.2")
    p.add_argument("--eps-focus", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--save-tables", default=None, help="also write each variant's LossTable to DIR/<task>/<variant>.npz")
    p.add_argument("--output", default=None, help=f"JSON output (default: {RESULTS}; the tiny smoke test needs one)")
    args = p.parse_args(argv)
    args.eps = [float(e) for e in args.eps.split(",")]
    args.data_dir = args.data_dir or shared_data_dir()
    if args.data_dir is None:
        sys.exit("no ../shared/data folder: this benchmark needs the project's offline pool data.")
    if args.tiny and args.output is None:
        sys.exit("--tiny writes meaningless numbers: pass --output explicitly (not the results file).")
    if args.threads:
        torch.set_num_threads(args.threads)
    output = Path(args.output) if args.output else RESULTS
    model, tok, label = load_model(args)
    log(f"model: {label}; decoder layers {model.config.num_decoder_layers}; threads {torch.get_num_threads()}")
    start = time.perf_counter()
    results = {}
    for task in args.tasks.split(","):
        n = args.n_squad if task == "squad" else args.n_cnndm
        results[task] = run_task(model, tok, task, n, args)
        write(output, model, label, args, results, start)  # after every task: a partial run keeps what it has
    return write(output, model, label, args, results, start, final=True)


def write(output, model, label, args, results, start, final=False) -> dict:
    import transformers

    from hf_safe_exit.cards import describe_hardware

    doc = {
        "what": "PoE anytime exits vs plain early exit: conditional monotonicity (teacher-forced on the full model's "
                "greedy output) and efficiency at fixed ε after calibration (repeated random calibration/test splits "
                "of held-out pool examples); see benchmarks/anytime_poe.py",
        "model": label, "model_fingerprint": model_fingerprint(model),
        "num_decoder_layers": model.config.num_decoder_layers,
        "poe": PoEConfig().to_dict(), "grid_quantiles": list(GRID_QUANTILES), "n_grid": args.n_grid, "eps": args.eps, "eps_focus": args.eps_focus,
        "repeats": args.repeats, "seed": args.seed, "batch_size": args.batch_size,
        "max_input_length": args.max_input_length or "the task's",
        "hardware": describe_hardware(), "platform": platform.platform(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "hf_safe_exit": hf_safe_exit.__version__},
        "seconds": round(time.perf_counter() - start, 1),
        "summary": summary(results, args.eps_focus),
        "tasks": results,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(doc, indent=1))
    log(f"wrote {output} ({', '.join(results)})")
    if final:
        print(json.dumps(doc["summary"], indent=1))
    return doc


if __name__ == "__main__":
    main()
