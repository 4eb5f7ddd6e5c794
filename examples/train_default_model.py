#!/usr/bin/env python
"""Train hf_safe_exit's small default T5 from scratch, offline, reproducibly.

Stages: tokenizer -> self-supervised pretraining (BART text infilling, lead sentences, cloze
questions, T5 span corruption: hf_safe_exit.training) -> multitask CALM fine-tuning (CNN/DM
summarisation + SQuAD QA, plus a share of the self-supervised batches) -> meta-classifier -> evaluation on held-out pool
rows (full model and every static exit layer, lead-3 for comparison) -> writes the
package's ``hf_safe_exit/default_model/`` (fp16 safetensors, config, tokenizer, meta
head, model card, held-out ids).

Data and splits: ../shared/data (see hf_safe_exit.training.data). Training uses only
CNN/DM rows 0-499, SQuAD articles 0-35 and extra_text; evaluation draws from the pool
(CNN/DM rows 500-899, SQuAD articles 36-47).

The shipped model (CPU, 2 threads; three training runs, each continues the previous one; then the first four
decoder layers of the third are kept as they are, since its layers 5-6 did not improve on its exit 4 held out):

    ARCH="--vocab-size 8000 --d-model 128 --d-kv 32 --num-heads 4 --d-ff 512 --enc-layers 6 --dec-layers 6
          --max-source-length 160 --max-target-length 48 --qa-target-length 16 --batch-size 16 --summ-prob 0.4"
    python examples/train_default_model.py --threads 2 --max-minutes 50 --pretrain-fraction 0.5 $ARCH \
        --work-dir runs/v5 --out runs/v5/package     # (the shipped v5 reused, with --resume, the
                                                     #  8k tokenizer an earlier run of this script trained)
    python examples/train_default_model.py --threads 2 --max-minutes 38 --lr 3e-3 --warmup-steps 50 $ARCH \
        --dropout 0.1 --finetune-self-supervised 0.6 --summ-prob 0.3 \
        --init-from runs/v5/ckpt_finetune --work-dir runs/v6 --out runs/v6/package
                                                     # (v6 predates calm_loss reading every exit out
                                                     #  through the decoder dropout: only the last was)
    python examples/train_default_model.py --threads 2 --max-minutes 78 --lr 3e-3 --warmup-steps 50 $ARCH \
        --dropout 0.1 --finetune-self-supervised 0.6 --summ-prob 0.3 --eval-cnndm 200 --eval-squad 600 \
        --init-from runs/v6/ckpt_finetune --work-dir runs/v7 --out runs/v7/package
    python examples/train_default_model.py --threads 2 $ARCH --eval-cnndm 200 --eval-squad 1200 \
        --init-from runs/v7/ckpt_finetune --keep-decoder-layers 4 --max-finetune-steps 0 \
        --eval-exclude runs/v7/package/heldout_eval_ids.json --work-dir runs/v8cut   # writes hf_safe_exit/default_model
                                                     # (evaluated on pool rows disjoint from the 200/600 that v7's
                                                     #  per-exit scores, which chose the depth, were measured on)
    # Not shipped: the same cut model trained on for 68 min (--max-minutes 68 --lr 3e-3 --warmup-steps 50
    # --dropout 0.1 --finetune-self-supervised 0.6 --summ-prob 0.3) scored higher on the selection rows (ROUGE-L
    # 9.51 vs 8.32, F1 1.76 vs 1.29) but its ROUGE-L dipped at exit 3 (-0.09); the rule written down before either
    # was evaluated took the candidate whose ROUGE-L and F1 both rose there.

    python examples/train_default_model.py --card-only                  # re-render its README.md
    python examples/train_default_model.py --tiny --max-minutes 3 --out /tmp/tiny_model   # smoke test
    python examples/train_default_model.py --device cuda --d-model 384 --dec-layers 8 ...  # larger, on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from hf_safe_exit.training.calm_loss import calm_loss, layer_weights
from hf_safe_exit.training.data import (default_data_dir, load_cnndm, load_squad, pretraining_texts, qa_example,
                                        summarization_example)
from hf_safe_exit.training.evaluation import (evaluate_qa, evaluate_summarization, lead3, rouge_l,
                                              teacher_forced_layer_scores, truncated_decoder_model)
from hf_safe_exit.training.meta_classifier import train_meta_classifier
from hf_safe_exit.training.self_supervised import cloze_question_example, lead_sentences_example
from hf_safe_exit.training.span_corruption import span_corrupt, text_infill
from hf_safe_exit.training.surgery import keep_first_decoder_layers
from hf_safe_exit.training.tokenizer import train_t5_tokenizer

REPO = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "hf_safe_exit" / "default_model"), help="final model directory")
    p.add_argument("--work-dir", default="/work/runs/default_model", help="checkpoints, logs, predictions")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a loaded shared CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=75.0, help="wall-clock budget for pretraining + fine-tuning")
    p.add_argument("--pretrain-fraction", type=float, default=0.3, help="share of the budget for span corruption")
    p.add_argument("--max-pretrain-steps", type=int, default=100000)
    p.add_argument("--max-finetune-steps", type=int, default=100000)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--d-kv", type=int, default=64)
    p.add_argument("--enc-layers", type=int, default=4)
    p.add_argument("--dec-layers", type=int, default=6)
    p.add_argument("--dropout", type=float, default=0.0, help="0: a small model trained briefly underfits")
    p.add_argument("--max-source-length", type=int, default=256)
    p.add_argument("--max-target-length", type=int, default=64)
    p.add_argument("--qa-target-length", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--optimizer", default="adafactor", choices=["adafactor", "adamw"],
                   help="adafactor (T5's: updates scaled by each parameter's RMS, so the unit-scale embeddings "
                        "learn as fast as the projections) or adamw")
    p.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (T5 pretrains with Adafactor at 1e-2)")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--summ-prob", type=float, default=0.5, help="share of fine-tuning batches that are CNN/DM")
    p.add_argument("--pretrain-mix", default="infill=0.6,lead=0.25,cloze=0.15,span=0",
                   help="pretraining objectives and their batch shares: BART text infilling (short chunks), lead "
                        "sentences (lead-bias pretraining), cloze questions (span-selection pretraining), T5 span "
                        "corruption")
    p.add_argument("--infill-length", type=int, default=48, help="longest text-infilling chunk (8 tokens and up)")
    p.add_argument("--lead-source-length", type=int, default=96,
                   help="source tokens of the lead-sentence examples (the lead is at the start)")
    p.add_argument("--finetune-self-supervised", type=float, default=0.2,
                   help="share of fine-tuning batches that stay self-supervised (lead/cloze), so that 500 "
                        "CNN/DM rows are not memorised")
    p.add_argument("--weighting", default="linear", choices=["linear", "uniform", "geometric"])
    p.add_argument("--checkpoint-minutes", type=float, default=10.0)
    p.add_argument("--eval-cnndm", type=int, default=100)
    p.add_argument("--eval-squad", type=int, default=300)
    p.add_argument("--eval-exclude", default=None,
                   help="a heldout_eval_ids.json whose rows were used to choose this model (e.g. its depth): the "
                        "evaluation draws only pool rows disjoint from them, and the package lists them in "
                        "selection_eval_ids.json, which examples/calibrate_default_model.sh leaves out too")
    p.add_argument("--meta-examples", type=int, default=128, help="training examples per task for the meta head")
    p.add_argument("--tiny", action="store_true", help="a very small config for a smoke test")
    p.add_argument("--resume", action="store_true", help="reuse the tokenizer / pretraining checkpoint in --work-dir")
    p.add_argument("--init-from", default=None,
                   help="continue training: a finished fine-tuning checkpoint of an earlier run of this script "
                        "(its tokenizer and weights are reused, pretraining is skipped; the earlier run's "
                        "train_summary.json next to it is carried into the card)")
    p.add_argument("--keep-decoder-layers", type=int, default=None,
                   help="with --init-from: continue with only the first N decoder layers of the checkpoint (a "
                        "CALM-trained decoder's exit N is a model of its own; see hf_safe_exit.training.surgery)")
    p.add_argument("--skip-train", action="store_true", help="only evaluate + package the latest checkpoint")
    p.add_argument("--card-only", action="store_true",
                   help="only rewrite README.md in --out from its training_results.json (no training, no evaluation)")
    a = p.parse_args(argv)
    if a.tiny:
        a.vocab_size, a.d_model, a.d_ff, a.num_heads, a.d_kv = 1200, 64, 128, 2, 32
        a.enc_layers, a.dec_layers, a.batch_size = 2, 3, 8
        a.max_source_length, a.max_target_length = 128, 32
        a.eval_cnndm, a.eval_squad, a.meta_examples, a.warmup_steps = 8, 16, 16, 10
    # recorded with the run's arguments: from this version on every exit's read-out passes through the decoder
    # dropout during training (hf_safe_exit.training.calm_loss), not only the last one's
    a.exit_readout_dropout = True
    if a.keep_decoder_layers is not None and a.init_from is None:
        p.error("--keep-decoder-layers needs --init-from (the checkpoint whose first decoder layers are kept)")
    return a


class LinearWarmupCosine:
    """lr(t) = peak * min(1, t/warmup) * cosine decay to 10% over an estimated horizon (time-based)."""

    def __init__(self, opt, peak, warmup, horizon_s):
        self.opt, self.peak, self.warmup, self.horizon = opt, peak, warmup, horizon_s
        self.t0 = time.time()

    def step(self, step):
        frac = min((time.time() - self.t0) / max(self.horizon, 1e-6), 1.0)
        lr = self.peak * min(1.0, (step + 1) / self.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in self.opt.param_groups:
            g["lr"] = lr
        return lr


# the truncation arguments of the tokenizer's last call, which save_pretrained would write into
# tokenizer_config.json as if they were its settings (a run continued with --init-from inherits them)
_CALL_STATE_KEYS = ("max_length", "stride", "truncation_side", "truncation_strategy")


def save_tokenizer(tok, directory) -> None:
    tok.save_pretrained(directory)
    cfg_path = Path(directory) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in _CALL_STATE_KEYS:
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def pad_batch(pairs, pad_id=0):
    """pairs: list of (input_ids, target_ids) lists -> tensors; labels padded with -100."""
    S = max(len(s) for s, _ in pairs)
    T = max(len(t) for _, t in pairs)
    ids = torch.full((len(pairs), S), pad_id, dtype=torch.long)
    att = torch.zeros((len(pairs), S), dtype=torch.long)
    lab = torch.full((len(pairs), T), -100, dtype=torch.long)
    for k, (s, t) in enumerate(pairs):
        ids[k, :len(s)] = torch.tensor(s)
        att[k, :len(s)] = 1
        lab[k, :len(t)] = torch.tensor(t)
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


def encode_pairs(tok, pairs, max_src, max_tgt):
    src = tok([s for s, _ in pairs], max_length=max_src, truncation=True)["input_ids"]
    tgt = tok([t for _, t in pairs], max_length=max_tgt, truncation=True)["input_ids"]
    return list(zip(src, tgt))


def save_checkpoint(model, tok, path: Path, state: dict):
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    save_tokenizer(tok, tmp)
    (tmp / "train_state.json").write_text(json.dumps(state, indent=2))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def train_loop(name, model, tok, make_batch, *, steps_max, seconds, args, device, ckpt: Path, history: list,
               extra_state: dict):
    if getattr(args, "optimizer", "adamw") == "adafactor":
        from transformers.optimization import Adafactor

        opt = Adafactor(model.parameters(), lr=args.lr, scale_parameter=True, relative_step=False, warmup_init=False)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = LinearWarmupCosine(opt, args.lr, args.warmup_steps, seconds)
    model.train()
    t0 = last_ck = time.time()
    step = 0
    run = None
    while step < steps_max and time.time() - t0 < seconds:
        batch = {k: v.to(device) for k, v in make_batch().items()}
        lr = sched.step(step)
        out = calm_loss(model, batch, weighting=args.weighting)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ll = out.layer_losses.cpu().tolist()
        run = ll if run is None else [0.95 * r + 0.05 * x for r, x in zip(run, ll)]
        if step % 20 == 0 or step == 1:
            history.append({"stage": name, "step": step, "elapsed_s": round(time.time() - t0, 1), "lr": lr,
                            "loss": out.loss.item(), "layer_losses_ema": [round(x, 4) for x in run]})
            log(f"{name} step {step} loss {out.loss.item():.3f} layer-CE(ema) "
                + " ".join(f"{x:.2f}" for x in run) + f" lr {lr:.2e} {time.time() - t0:.0f}s")
        if time.time() - last_ck > args.checkpoint_minutes * 60:
            save_checkpoint(model, tok, ckpt, {**extra_state, "stage": name, "step": step,
                                                "elapsed_s": time.time() - t0})
            last_ck = time.time()
    model.eval()
    save_checkpoint(model, tok, ckpt, {**extra_state, "stage": name, "step": step, "elapsed_s": time.time() - t0,
                                       "finished": True})
    return step, time.time() - t0


def rewrite_card(out: Path) -> None:
    """Re-render ``out/README.md`` from ``out/training_results.json`` (the settings and numbers of the run)."""
    stored = json.loads((out / "training_results.json").read_text())
    args = argparse.Namespace(**stored["args"])
    write_card(out, args, stored, stored.get("examples"))
    log(f"rewrote {out / 'README.md'}")


def main(argv=None):
    args = parse_args(argv)
    if args.card_only:
        return rewrite_card(Path(args.out))
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    if not (data_dir / "cnn_dailymail").is_dir():
        sys.exit(f"offline data not found at {data_dir}; set --data-dir or HF_SAFE_EXIT_DATA")
    t_start = time.time()
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    # ---------------- data
    cnn_train, cnn_pool = load_cnndm("train", data_dir), load_cnndm("pool", data_dir)
    sq_train, sq_pool = load_squad("train", data_dir), load_squad("pool", data_dir)
    pre_texts = pretraining_texts(data_dir)
    log(f"data: cnndm train {len(cnn_train)} pool {len(cnn_pool)}; squad train {len(sq_train)} pool {len(sq_pool)}; "
        f"pretraining paragraphs {len(pre_texts)} ({sum(map(len, pre_texts)) / 1e6:.1f}M chars)")

    # ---------------- tokenizer (training text only: pretraining text + train targets/questions)
    tok_dir = work / "tokenizer"
    init = Path(args.init_from) if args.init_from else None
    if init is not None:
        state_file = init / "train_state.json"
        init_state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        if not (init / "model.safetensors").is_file() or not init_state.get("finished"):
            sys.exit(f"--init-from {init}: expected a finished checkpoint of this script (model.safetensors and "
                     f"train_state.json with finished=true, e.g. <work-dir>/ckpt_finetune)")
        tok = AutoTokenizer.from_pretrained(init)
        save_tokenizer(tok, tok_dir)
    elif args.resume and (tok_dir / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(tok_dir)
    else:
        tok_text = pre_texts + [summarization_example(r)[1] for r in cnn_train] + \
            [q["question"] + " " + q["answers"][0] for q in sq_train] + ["summarize: question: context:"] * 50
        t = time.time()
        tok = train_t5_tokenizer(tok_text, vocab_size=args.vocab_size)
        save_tokenizer(tok, tok_dir)
        log(f"tokenizer: {len(tok)} tokens in {time.time() - t:.0f}s")
    sentinels = tok.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])

    # ---------------- model
    config = T5Config(vocab_size=len(tok), d_model=args.d_model, d_kv=args.d_kv, d_ff=args.d_ff,
                      num_layers=args.enc_layers, num_decoder_layers=args.dec_layers, num_heads=args.num_heads,
                      feed_forward_proj="gated-gelu", dropout_rate=args.dropout, tie_word_embeddings=True,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, relative_attention_num_buckets=32,
                      relative_attention_max_distance=128)
    pre_ckpt, ft_ckpt = work / "ckpt_pretrain", work / "ckpt_finetune"
    history: list = []
    state_path = work / "train_summary.json"
    summary = json.loads(state_path.read_text()) if (args.resume or args.skip_train) and state_path.exists() else {}
    budget = args.max_minutes * 60

    def parse_mix(spec: str) -> dict[str, float]:
        mix = {k.strip(): float(v) for k, v in (item.split("=") for item in spec.split(",") if item.strip())}
        unknown = set(mix) - {"span", "lead", "cloze", "infill"}
        if unknown or not mix or min(mix.values()) < 0 or sum(mix.values()) <= 0:
            sys.exit(f"--pretrain-mix: expected weights for infill/span/lead/cloze, got {spec!r}")
        return mix

    def self_supervised_sources():
        """Per-objective batch makers over the pretraining text (one objective per batch: less padding)."""
        rng = random.Random(args.seed + 1)
        ids = tok(pre_texts, add_special_tokens=False)["input_ids"]
        chunk = int(args.max_source_length * 0.85) - 2
        chunks = [x[i:i + chunk] for x in ids for i in range(0, len(x), chunk) if len(x[i:i + chunk]) >= 16]
        # infilling chunks of 8..infill_length tokens: on short inputs even uniform cross-attention carries a
        # strong signal of which tokens to copy, which gets a from-scratch model off the unigram plateau
        short = []
        for x in ids:
            i = 0
            while len(x) - i >= 8:
                n = rng.randint(8, args.infill_length)
                short.append(x[i:i + n])
                i += n
        lead = encode_pairs(tok, [ex for ex in map(lead_sentences_example, pre_texts) if ex is not None],
                            args.lead_source_length, args.max_target_length)
        # the cloze sentence must lie inside the truncated context: keep the first words only
        words_fit = int(args.max_source_length * 0.55)
        cloze_texts = [" ".join(t.split()[:words_fit]) for t in pre_texts]
        log(f"self-supervised: {len(chunks)} span-corruption chunks of <= {chunk} tokens "
            f"({sum(map(len, chunks)) / 1e6:.2f}M tokens), {len(lead)} lead-sentence pairs, "
            f"{len(cloze_texts)} passages for cloze questions")

        def make_cloze():
            pairs = []
            while len(pairs) < args.batch_size:
                ex = cloze_question_example(rng.choice(cloze_texts), rng)
                if ex is not None:
                    pairs.append(ex)
            return pad_batch(encode_pairs(tok, pairs, args.max_source_length, args.qa_target_length))

        return {"span": lambda: pad_batch([span_corrupt(c, sentinels, rng=rng)
                                           for c in rng.sample(chunks, args.batch_size)]),
                "infill": lambda: pad_batch([text_infill(c, sentinels[0], rng=rng)
                                             for c in rng.sample(short, 2 * args.batch_size)]),
                "lead": lambda: pad_batch(rng.sample(lead, args.batch_size)),
                "cloze": make_cloze}

    def mixture(makers: dict, weights: dict[str, float], seed: int):
        rng = random.Random(seed)
        names = [k for k in weights if weights[k] > 0]
        if not names:
            sys.exit("a batch mixture needs at least one positive share")
        w = [weights[k] for k in names]
        return lambda: makers[rng.choices(names, w)[0]]()

    if args.skip_train:
        model = T5ForConditionalGeneration.from_pretrained(ft_ckpt, dtype=torch.float32).to(device)
    else:
        if init is not None:
            # --dropout applies to the continued run too (500 CNN/DM rows are memorised fast without it)
            model = T5ForConditionalGeneration.from_pretrained(init, dtype=torch.float32,
                                                               dropout_rate=args.dropout).to(device)
            earlier = init.parent / "train_summary.json"
            earlier = json.loads(earlier.read_text()) if earlier.is_file() else {}
            summary["earlier_run"] = {"checkpoint": str(init), "pretrain": earlier.get("pretrain"),
                                      "finetune": earlier.get("finetune"),
                                      "train_wall_minutes": earlier.get("train_wall_minutes"),
                                      "args": earlier.get("args"),
                                      # a chain of continuations: the earlier run's own earlier run, and so on
                                      "earlier_run": earlier.get("earlier_run")}
            summary["pretrain"] = earlier.get("pretrain")
            if args.keep_decoder_layers is not None:
                summary["earlier_run"]["decoder_layers"] = model.config.num_decoder_layers
                summary["earlier_run"]["eval_before_cut"] = earlier_evaluation(summary["earlier_run"])
                keep_first_decoder_layers(model, args.keep_decoder_layers)
                summary["earlier_run"]["kept_decoder_layers"] = args.keep_decoder_layers
                log(f"kept the first {args.keep_decoder_layers} of the checkpoint's "
                    f"{summary['earlier_run']['decoder_layers']} decoder layers")
            c = model.config  # the card describes the architecture from args: take it from the checkpoint
            args.d_model, args.d_ff, args.num_heads, args.d_kv = c.d_model, c.d_ff, c.num_heads, c.d_kv
            args.enc_layers, args.dec_layers, args.vocab_size = c.num_layers, c.num_decoder_layers, c.vocab_size
            log(f"continuing from {init} ({init_state['step']} fine-tuning steps)")
        elif args.resume and (pre_ckpt / "train_state.json").is_file() and \
                json.loads((pre_ckpt / "train_state.json").read_text()).get("finished"):
            model = T5ForConditionalGeneration.from_pretrained(pre_ckpt, dtype=torch.float32).to(device)
            log("resumed pretraining checkpoint")
        else:
            torch.manual_seed(args.seed)
            model = T5ForConditionalGeneration(config).to(device)
            n_params = sum(p.numel() for p in model.parameters())
            log(f"model: {n_params / 1e6:.2f}M parameters")
            ssl = self_supervised_sources()
            make = mixture(ssl, parse_mix(args.pretrain_mix), args.seed + 5)
            steps, secs = train_loop("pretrain", model, tok, make, steps_max=args.max_pretrain_steps,
                                     seconds=budget * args.pretrain_fraction, args=args, device=device,
                                     ckpt=pre_ckpt, history=history, extra_state={})
            summary["pretrain"] = {"steps": steps, "seconds": secs, "batch_size": args.batch_size}
        # ---------------- multitask CALM fine-tuning
        summ_pairs = encode_pairs(tok, [summarization_example(r) for r in cnn_train], args.max_source_length,
                                  args.max_target_length)
        qa_pairs = encode_pairs(tok, [qa_example(q) for q in sq_train], args.max_source_length, args.qa_target_length)
        rng = random.Random(args.seed + 2)
        ssl = self_supervised_sources() if args.finetune_self_supervised > 0 else {}
        keep_ssl = mixture(ssl, {"lead": 0.5, "cloze": 0.5}, args.seed + 6) if ssl else None

        def make_ft():
            if keep_ssl is not None and rng.random() < args.finetune_self_supervised:
                return keep_ssl()
            pool = summ_pairs if rng.random() < args.summ_prob else qa_pairs
            return pad_batch(rng.sample(pool, args.batch_size))
        remaining = budget - (time.time() - t_start)
        steps, secs = train_loop("finetune", model, tok, make_ft, steps_max=args.max_finetune_steps,
                                 seconds=max(remaining, 60), args=args, device=device, ckpt=ft_ckpt,
                                 history=history, extra_state={})
        summary["finetune"] = {"steps": steps, "seconds": secs, "batch_size": args.batch_size,
                               "summ_prob": args.summ_prob}
        summary["train_wall_minutes"] = (time.time() - t_start) / 60
        if "earlier_run" in summary:  # the card reports the whole training, both runs
            summary["train_wall_minutes"] += summary["earlier_run"].get("train_wall_minutes") or 0
        summary["history"] = summary.get("history", []) + history
        summary["args"] = vars(args)
        state_path.write_text(json.dumps(summary, indent=2))
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    e = summary.get("earlier_run") or {}
    if e.get("kept_decoder_layers") and not e.get("eval_before_cut"):  # a summary of an older version of this script
        e["eval_before_cut"] = earlier_evaluation(e)

    # ---------------- meta-classifier (train split only, teacher forcing)
    rng = random.Random(args.seed + 3)
    meta_src = [summarization_example(r) for r in rng.sample(cnn_train, min(args.meta_examples, len(cnn_train)))]
    meta_qa = [qa_example(q) for q in rng.sample(sq_train, args.meta_examples)]
    mp = encode_pairs(tok, meta_src, args.max_source_length, args.max_target_length) + \
        encode_pairs(tok, meta_qa, args.max_source_length, args.qa_target_length)
    meta_batches = [pad_batch(mp[i:i + 16]) for i in range(0, len(mp), 16)]
    t = time.time()
    head, meta_stats = train_meta_classifier(model, meta_batches, epochs=10, return_stats=True, seed=args.seed)
    log(f"meta head: {meta_stats['n_examples']} examples, positive rate {meta_stats['positive_rate']:.3f}, "
        f"balanced acc {meta_stats['train_balanced_accuracy']:.3f} ({time.time() - t:.0f}s)")

    # ---------------- evaluation on held-out pool rows
    rng = random.Random(args.seed + 4)
    selection = None
    if args.eval_exclude:
        # rows at which an earlier model was looked at to choose this one: evaluating on them would be optimistic
        selection = json.loads(Path(args.eval_exclude).read_text())
        chosen_cnn, chosen_sq = set(selection["cnndm_ids"]), set(selection["squad_ids"])
        cnn_pool = [r for r in cnn_pool if r["id"] not in chosen_cnn]
        sq_pool = [q for q in sq_pool if q["id"] not in chosen_sq]
        log(f"evaluation rows disjoint from {args.eval_exclude}: {len(cnn_pool)} CNN/DM rows and "
            f"{len(sq_pool)} SQuAD questions left in the pool")
    ev_cnn = sorted(rng.sample(cnn_pool, min(args.eval_cnndm, len(cnn_pool))), key=lambda r: r["row"])
    ev_sq = rng.sample(sq_pool, min(args.eval_squad, len(sq_pool)))
    t = time.time()
    lead = 100 * sum(rouge_l(lead3(r["article"]), summarization_example(r)[1]) for r in ev_cnn) / len(ev_cnn)
    per_layer = []
    preds = {}
    L = len(model.decoder.block)
    # read-out accuracy of every layer on the same held-out rows, teacher-forced (one forward pass each)
    tf_cnn = teacher_forced_layer_scores(model, tok, [summarization_example(r) for r in ev_cnn],
                                         max_source_length=args.max_source_length,
                                         max_target_length=args.max_target_length)
    tf_sq = teacher_forced_layer_scores(model, tok, [qa_example(q) for q in ev_sq],
                                        max_source_length=args.max_source_length,
                                        max_target_length=args.qa_target_length)
    for i in range(1, L + 1):
        m = truncated_decoder_model(model, i)
        s = evaluate_summarization(m, tok, ev_cnn, max_source_length=args.max_source_length,
                                   max_new_tokens=args.max_target_length)
        q = evaluate_qa(m, tok, ev_sq, max_source_length=args.max_source_length, max_new_tokens=args.qa_target_length)
        per_layer.append({"exit_layer": i, "rougeL": s["rougeL"], "rougeL_se": s["rougeL_se"], "squad_f1": q["f1"],
                          "squad_f1_se": q["f1_se"], "squad_em": q["em"],
                          "cnndm_token_accuracy": tf_cnn["token_accuracy"][i - 1],
                          "cnndm_cross_entropy": tf_cnn["cross_entropy"][i - 1],
                          "squad_token_accuracy": tf_sq["token_accuracy"][i - 1],
                          "squad_cross_entropy": tf_sq["cross_entropy"][i - 1]})
        preds[i] = {"cnndm": s["predictions"], "squad": q["predictions"]}
        log(f"exit layer {i}: ROUGE-L {s['rougeL']:.2f}  SQuAD F1 {q['f1']:.2f} EM {q['em']:.2f}  teacher-forced "
            f"token accuracy CNN/DM {tf_cnn['token_accuracy'][i - 1]:.2f} SQuAD {tf_sq['token_accuracy'][i - 1]:.2f}")
    eval_s = time.time() - t
    log(f"lead-3 ROUGE-L {lead:.2f}; evaluation took {eval_s:.0f}s")
    (work / "eval_predictions.json").write_text(json.dumps(
        {"cnndm_ids": [r["id"] for r in ev_cnn], "squad_ids": [q["id"] for q in ev_sq], "predictions": preds},
        indent=1))

    # ---------------- package
    out = Path(args.out)
    if out.exists():
        for f in out.iterdir():
            if f.is_file() and f.name != "__init__.py":
                f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    save_dtype = torch.float32 if n_params * 4 <= 20e6 else torch.float16  # stay within the 25 MB package budget
    model.to(save_dtype).save_pretrained(out)
    model.to(torch.float32)
    save_tokenizer(tok, out)
    head.cpu().save_pretrained(out)
    results = {
        "params": n_params,
        "train_wall_minutes": summary.get("train_wall_minutes"),
        "pretrain": summary.get("pretrain"), "finetune": summary.get("finetune"),
        "earlier_run": summary.get("earlier_run"),
        "meta_head": {k: v for k, v in meta_stats.items()},
        "eval": {"cnndm_n": len(ev_cnn), "squad_n": len(ev_sq), "lead3_rougeL": lead, "per_exit_layer": per_layer,
                 "teacher_forced_tokens": {"cnndm": tf_cnn["n_tokens"], "squad": tf_sq["n_tokens"]},
                 "full_model": per_layer[-1], "seconds": eval_s},
        "save_dtype": str(save_dtype).replace("torch.", ""), "vocab_size": len(tok),
        "device": args.device, "threads": args.threads, "seed": args.seed,
    }
    heldout = {"description": "held-out examples used for the numbers in README.md; all drawn from the pool "
                              "(CNN/DM rows 500-899, SQuAD articles 36-47); never trained on",
               "cnndm_rows": [r["row"] for r in ev_cnn], "cnndm_ids": [r["id"] for r in ev_cnn],
               "squad_ids": [q["id"] for q in ev_sq],
               "training_data": {"cnndm_rows": "0-499", "squad_articles": "0-35",
                                 "pretraining": "train CNN/DM articles, train SQuAD contexts, extra_text (Lee corpus, "
                                                "shortened enwiki dump)"},
               "eval_seed": args.seed + 4}
    if selection is not None:
        heldout["disjoint_from"] = "selection_eval_ids.json"
        results["eval"]["selection_rows"] = {"cnndm": len(selection["cnndm_ids"]),
                                             "squad": len(selection["squad_ids"])}
        (out / "selection_eval_ids.json").write_text(json.dumps({
            "description": "pool rows on which an earlier model's per-exit scores were looked at to choose this "
                           "model (its decoder depth); this model's card numbers and its calibration use none of them",
            "cnndm_ids": selection["cnndm_ids"], "squad_ids": selection["squad_ids"]}, indent=1))
    (out / "heldout_eval_ids.json").write_text(json.dumps(heldout, indent=1))
    (out / "training_results.json").write_text(json.dumps(results, indent=2))
    examples = {"CNN/DM": [(summarization_example(r)[0], preds[L]["cnndm"][k]) for k, r in enumerate(ev_cnn[:3])],
                "SQuAD": [(qa_example(q)[0], preds[L]["squad"][k]) for k, q in enumerate(ev_sq[:3])]}
    (out / "training_results.json").write_text(json.dumps({**results, "examples": examples, "args": vars(args)},
                                                          indent=2))
    write_card(out, args, results, examples)
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log(f"wrote {out} ({total / 1e6:.1f} MB)")


def earlier_evaluation(earlier: dict) -> dict | None:
    """The per-exit evaluation the earlier run wrote into its package (its ``--out``), if that is still there."""
    path = Path((earlier.get("args") or {}).get("out") or "/nonexistent") / "training_results.json"
    if not path.is_file():
        return None
    ev = json.loads(path.read_text())["eval"]
    return {k: ev[k] for k in ("cnndm_n", "squad_n", "per_exit_layer")}


def write_card(out: Path, args, results: dict, examples: dict | None = None) -> None:
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

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
    data = ModelCardData(language="en", license="cc-by-sa-4.0", library_name="transformers",
                         tags=["t5", "early-exit", "calm", "hf_safe_exit"], model_name="hf_safe_exit default model",
                         eval_results=evals, datasets=["cnn_dailymail", "squad"], pipeline_tag="text2text-generation")
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
`examples/train_default_model.py` (seed {args.seed}). Loss: CALM's weighted per-layer cross-entropy through the shared
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
`examples/train_default_model.py --device cuda` with a larger budget, or fine-tune a pretrained T5 with
`hf_safe_exit.training.CALMSeq2SeqTrainer`. The size ({results['params'] / 1e6:.1f} M parameters) is at the low end of the
10–20 M first planned: on this CPU a larger model would have seen too few tokens in the time available.
"""
    card = ModelCard(text)
    card.save(out / "README.md")


if __name__ == "__main__":
    main()
