"""The plain training loop of the from-scratch recipe (:mod:`.recipe`): batches, schedule,
CALM's loss, checkpoints.

A pretrained T5 is better fine-tuned with :class:`~hf_safe_exit.training.CALMSeq2SeqTrainer`
(:mod:`hf_safe_exit.training.finetune`); this loop exists for the staged, time-budgeted training of a model from
scratch on a CPU, where each stage runs for a share of a wall-clock budget rather than a number of steps.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from hf_safe_exit.training.calm_loss import calm_loss

__all__ = ["log", "LinearWarmupCosine", "save_tokenizer", "pad_batch", "encode_pairs", "save_checkpoint",
           "train_loop"]


def log(message: str) -> None:
    """Print ``message`` with the time of day (the recipes' progress lines)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


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
    """``tok.save_pretrained(directory)`` without the truncation settings of its last call in the config."""
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
    """(source, target) texts -> (source ids, target ids), each truncated to its length."""
    src = tok([s for s, _ in pairs], max_length=max_src, truncation=True)["input_ids"]
    tgt = tok([t for _, t in pairs], max_length=max_tgt, truncation=True)["input_ids"]
    return list(zip(src, tgt))


def save_checkpoint(model, tok, path: Path, state: dict):
    """Write model, tokenizer and ``train_state.json`` to ``path`` atomically (a sibling ``.tmp`` renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    save_tokenizer(tok, tmp)
    (tmp / "train_state.json").write_text(json.dumps(state, indent=2))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def train_loop(name, model, tok, make_batch: Callable[[], dict], *, steps_max, seconds, config, device, ckpt: Path,
               history: list, extra_state: dict):
    """Train ``model`` on ``make_batch()`` batches with CALM's loss until ``steps_max`` steps or ``seconds`` pass.

    ``config`` supplies ``optimizer``, ``lr``, ``warmup_steps``, ``weighting`` and ``checkpoint_minutes``. Progress
    goes to ``history`` every 20 steps; ``ckpt`` is written every ``checkpoint_minutes`` and at the end (with
    ``finished: true``). Returns ``(steps, seconds)``; the model is left in eval mode.
    """
    if getattr(config, "optimizer", "adamw") == "adafactor":
        from transformers.optimization import Adafactor

        opt = Adafactor(model.parameters(), lr=config.lr, scale_parameter=True, relative_step=False,
                        warmup_init=False)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = LinearWarmupCosine(opt, config.lr, config.warmup_steps, seconds)
    model.train()
    t0 = last_ck = time.time()
    step = 0
    run = None
    while step < steps_max and time.time() - t0 < seconds:
        batch = {k: v.to(device) for k, v in make_batch().items()}
        lr = sched.step(step)
        out = calm_loss(model, batch, weighting=config.weighting)
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
        if time.time() - last_ck > config.checkpoint_minutes * 60:
            save_checkpoint(model, tok, ckpt, {**extra_state, "stage": name, "step": step,
                                                "elapsed_s": time.time() - t0})
            last_ck = time.time()
    model.eval()
    save_checkpoint(model, tok, ckpt, {**extra_state, "stage": name, "step": step, "elapsed_s": time.time() - t0,
                                       "finished": True})
    return step, time.time() - t0
