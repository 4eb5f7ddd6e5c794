"""The from-scratch recipe of the package's default model: tokenizer, staged training, meta head, evaluation, package.

Stages: a T5 tokenizer trained on the training text -> self-supervised pretraining (BART text infilling, lead
sentences, cloze questions, T5 span corruption: :mod:`.objectives`) -> multitask CALM
fine-tuning (CNN/DM summarisation + SQuAD QA, plus a share of the self-supervised batches) -> meta-classifier ->
evaluation on held-out pool rows (full model and every static exit layer, lead-3 for comparison) -> a package
folder (:mod:`.packaging`: weights, tokenizer, meta head, card, held-out ids).

Data and splits: ``../shared/data`` (:mod:`hf_safe_exit.training.data`). Training uses only CNN/DM rows 0-499,
SQuAD articles 0-35 and ``extra_text``; evaluation draws from the pool (CNN/DM rows 500-899, SQuAD articles
36-47). ``scripts/train_default_model.py`` is the command line over :func:`train_default_model` (and lists the
commands that trained the shipped model); every :class:`RecipeConfig` field is one of its options.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from hf_safe_exit.training.data import (default_data_dir, load_cnndm, load_squad, pretraining_texts,
                                        summarization_example)

from .loop import log, save_tokenizer, train_loop
from .objectives import finetune_batches, mixture, parse_mix, self_supervised_sources

__all__ = ["RecipeConfig", "train_default_model"]


def _opt(default, text: str):
    return field(default=default, metadata={"help": text})


def _default_out() -> str:
    from hf_safe_exit.models import default_model_path

    return str(default_model_path())


@dataclass
class RecipeConfig:
    """Settings of :func:`train_default_model`; ``scripts/train_default_model.py`` has one option per field."""

    out: str = field(default_factory=_default_out, metadata={"help": "final model directory"})
    work_dir: str = _opt("/work/runs/default_model", "checkpoints, logs, predictions")
    data_dir: Optional[str] = _opt(None, "the offline data (default: ../shared/data or $HF_SAFE_EXIT_DATA)")
    device: Literal["cpu", "cuda"] = _opt("cpu", "where to train")
    threads: int = _opt(1, "1 is fastest on a loaded shared CPU")
    seed: int = _opt(0, "seed of everything random")
    max_minutes: float = _opt(75.0, "wall-clock budget for pretraining + fine-tuning")
    pretrain_fraction: float = _opt(0.3, "share of the budget for pretraining")
    max_pretrain_steps: int = _opt(100000, "at most this many pretraining steps")
    max_finetune_steps: int = _opt(100000, "at most this many fine-tuning steps")
    vocab_size: int = _opt(8000, "tokenizer vocabulary")
    d_model: int = _opt(256, "T5 d_model")
    d_ff: int = _opt(512, "T5 d_ff")
    num_heads: int = _opt(4, "attention heads")
    d_kv: int = _opt(64, "T5 d_kv")
    enc_layers: int = _opt(4, "encoder layers")
    dec_layers: int = _opt(6, "decoder layers")
    dropout: float = _opt(0.0, "0: a small model trained briefly underfits")
    max_source_length: int = _opt(256, "source tokens")
    max_target_length: int = _opt(64, "summary tokens")
    qa_target_length: int = _opt(16, "answer tokens")
    batch_size: int = _opt(16, "examples per step")
    optimizer: Literal["adafactor", "adamw"] = _opt(
        "adafactor", "adafactor (T5's: updates scaled by each parameter's RMS, so the unit-scale embeddings learn as "
                     "fast as the projections) or adamw")
    lr: float = _opt(1e-2, "peak learning rate (T5 pretrains with Adafactor at 1e-2)")
    warmup_steps: int = _opt(100, "linear warm-up steps")
    summ_prob: float = _opt(0.5, "share of fine-tuning batches that are CNN/DM")
    pretrain_mix: str = _opt("infill=0.6,lead=0.25,cloze=0.15,span=0",
                             "pretraining objectives and their batch shares: BART text infilling (short chunks), lead "
                             "sentences (lead-bias pretraining), cloze questions (span-selection pretraining), T5 span "
                             "corruption")
    infill_length: int = _opt(48, "longest text-infilling chunk (8 tokens and up)")
    lead_source_length: int = _opt(96, "source tokens of the lead-sentence examples (the lead is at the start)")
    finetune_self_supervised: float = _opt(0.2, "share of fine-tuning batches that stay self-supervised (lead/cloze), "
                                                "so that 500 CNN/DM rows are not memorised")
    weighting: Literal["linear", "uniform", "geometric"] = _opt("linear", "CALM's per-layer loss weights")
    checkpoint_minutes: float = _opt(10.0, "minutes between checkpoints")
    eval_cnndm: int = _opt(100, "held-out CNN/DM rows evaluated")
    eval_squad: int = _opt(300, "held-out SQuAD questions evaluated")
    eval_exclude: Optional[str] = _opt(
        None, "a heldout_eval_ids.json whose rows were used to choose this model (e.g. its depth): the evaluation "
              "draws only pool rows disjoint from them, and the package lists them in selection_eval_ids.json, which "
              "examples/calibrate_default_model.sh leaves out too")
    meta_examples: int = _opt(128, "training examples per task for the meta head")
    tiny: bool = _opt(False, "a very small config for a smoke test")
    resume: bool = _opt(False, "reuse the tokenizer / pretraining checkpoint in --work-dir")
    init_from: Optional[str] = _opt(
        None, "continue training: a finished fine-tuning checkpoint of an earlier run of this recipe (its tokenizer "
              "and weights are reused, pretraining is skipped; the earlier run's train_summary.json next to it is "
              "carried into the card)")
    keep_decoder_layers: Optional[int] = _opt(
        None, "with --init-from: continue with only the first N decoder layers of the checkpoint (a CALM-trained "
              "decoder's exit N is a model of its own; see hf_safe_exit.training.surgery)")
    skip_train: bool = _opt(False, "only evaluate + package the latest checkpoint")

    def __post_init__(self):
        if self.tiny:
            self.vocab_size, self.d_model, self.d_ff, self.num_heads, self.d_kv = 1200, 64, 128, 2, 32
            self.enc_layers, self.dec_layers, self.batch_size = 2, 3, 8
            self.max_source_length, self.max_target_length = 128, 32
            self.eval_cnndm, self.eval_squad, self.meta_examples, self.warmup_steps = 8, 16, 16, 10
        if self.keep_decoder_layers is not None and self.init_from is None:
            raise ValueError("keep_decoder_layers needs init_from (--init-from: the checkpoint whose first decoder "
                             "layers are kept)")
        parse_mix(self.pretrain_mix)  # raises naming the expected form
        for name in ("threads", "vocab_size", "d_model", "d_ff", "num_heads", "d_kv", "enc_layers", "dec_layers",
                     "max_source_length", "max_target_length", "qa_target_length", "batch_size", "warmup_steps",
                     "eval_cnndm", "eval_squad", "meta_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be at least 1.")
        for name in ("pretrain_fraction", "summ_prob", "finetune_self_supervised", "dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must lie in [0, 1].")

    def stored_args(self) -> dict:
        """The settings as the card and ``training_results.json`` record them."""
        # from this version on every exit's read-out passes through the decoder dropout during training
        # (hf_safe_exit.training.calm_loss), not only the last one's: the card says which runs had it
        return {**asdict(self), "exit_readout_dropout": True}


def _new_config(cfg: RecipeConfig, vocab: int):
    from transformers import T5Config

    return T5Config(vocab_size=vocab, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_layers=cfg.enc_layers,
                    num_decoder_layers=cfg.dec_layers, num_heads=cfg.num_heads, feed_forward_proj="gated-gelu",
                    dropout_rate=cfg.dropout, tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0,
                    eos_token_id=1, relative_attention_num_buckets=32, relative_attention_max_distance=128)


def _tokenizer(cfg: RecipeConfig, work: Path, init: Path | None, pre_texts, cnn_train, sq_train):
    """The tokenizer: the continued checkpoint's, the work dir's (resume), or one trained on the training text."""
    from transformers import AutoTokenizer

    from hf_safe_exit.training.tokenizer import train_t5_tokenizer

    tok_dir = work / "tokenizer"
    if init is not None:
        tok = AutoTokenizer.from_pretrained(init)
        save_tokenizer(tok, tok_dir)
    elif cfg.resume and (tok_dir / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(tok_dir)
    else:  # training text only: pretraining text + train targets/questions
        tok_text = pre_texts + [summarization_example(r)[1] for r in cnn_train] + \
            [q["question"] + " " + q["answers"][0] for q in sq_train] + ["summarize: question: context:"] * 50
        t = time.time()
        tok = train_t5_tokenizer(tok_text, vocab_size=cfg.vocab_size)
        save_tokenizer(tok, tok_dir)
        log(f"tokenizer: {len(tok)} tokens in {time.time() - t:.0f}s")
    return tok


def _continue_from(cfg: RecipeConfig, init: Path, summary: dict, device):
    """The checkpoint of an earlier run (cut to its first decoder layers if asked), its history in ``summary``."""
    from transformers import T5ForConditionalGeneration

    from hf_safe_exit.training.surgery import keep_first_decoder_layers

    from .packaging import earlier_evaluation

    # --dropout applies to the continued run too (500 CNN/DM rows are memorised fast without it)
    model = T5ForConditionalGeneration.from_pretrained(init, dtype=torch.float32, dropout_rate=cfg.dropout).to(device)
    earlier = init.parent / "train_summary.json"
    earlier = json.loads(earlier.read_text()) if earlier.is_file() else {}
    summary["earlier_run"] = {"checkpoint": str(init), "pretrain": earlier.get("pretrain"),
                              "finetune": earlier.get("finetune"),
                              "train_wall_minutes": earlier.get("train_wall_minutes"), "args": earlier.get("args"),
                              # a chain of continuations: the earlier run's own earlier run, and so on
                              "earlier_run": earlier.get("earlier_run")}
    summary["pretrain"] = earlier.get("pretrain")
    if cfg.keep_decoder_layers is not None:
        summary["earlier_run"]["decoder_layers"] = model.config.num_decoder_layers
        summary["earlier_run"]["eval_before_cut"] = earlier_evaluation(summary["earlier_run"])
        keep_first_decoder_layers(model, cfg.keep_decoder_layers)
        summary["earlier_run"]["kept_decoder_layers"] = cfg.keep_decoder_layers
        log(f"kept the first {cfg.keep_decoder_layers} of the checkpoint's "
            f"{summary['earlier_run']['decoder_layers']} decoder layers")
    c = model.config  # the card describes the architecture from the settings: take it from the checkpoint
    cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.d_kv = c.d_model, c.d_ff, c.num_heads, c.d_kv
    cfg.enc_layers, cfg.dec_layers, cfg.vocab_size = c.num_layers, c.num_decoder_layers, c.vocab_size
    return model


def train_default_model(cfg: RecipeConfig) -> Path:
    """Run the recipe (see the module docstring); returns ``cfg.out``, the package folder it wrote.

    Raises ``FileNotFoundError`` when the offline data is missing and ``ValueError`` when ``init_from`` is not a
    finished fine-tuning checkpoint of this recipe, both before any training.
    """
    from transformers import T5ForConditionalGeneration

    from .packaging import evaluate_and_package

    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    if not (data_dir / "cnn_dailymail").is_dir():
        raise FileNotFoundError(f"offline data not found at {data_dir}: set data_dir (--data-dir) or HF_SAFE_EXIT_DATA")
    init = Path(cfg.init_from) if cfg.init_from else None
    init_state = {}
    if init is not None:
        state_file = init / "train_state.json"
        init_state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        if not (init / "model.safetensors").is_file() or not init_state.get("finished"):
            raise ValueError(f"init_from={str(init)!r}: expected a finished checkpoint of this recipe (model.safetensors "
                             "and train_state.json with finished=true, e.g. <work-dir>/ckpt_finetune)")
    t_start = time.time()

    cnn_train, cnn_pool = load_cnndm("train", data_dir), load_cnndm("pool", data_dir)
    sq_train, sq_pool = load_squad("train", data_dir), load_squad("pool", data_dir)
    pre_texts = pretraining_texts(data_dir)
    log(f"data: cnndm train {len(cnn_train)} pool {len(cnn_pool)}; squad train {len(sq_train)} pool {len(sq_pool)}; "
        f"pretraining paragraphs {len(pre_texts)} ({sum(map(len, pre_texts)) / 1e6:.1f}M chars)")
    tok = _tokenizer(cfg, work, init, pre_texts, cnn_train, sq_train)
    sentinels = tok.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])

    pre_ckpt, ft_ckpt = work / "ckpt_pretrain", work / "ckpt_finetune"
    history: list = []
    state_path = work / "train_summary.json"
    summary = json.loads(state_path.read_text()) if (cfg.resume or cfg.skip_train) and state_path.exists() else {}
    budget = cfg.max_minutes * 60
    if cfg.skip_train:
        model = T5ForConditionalGeneration.from_pretrained(ft_ckpt, dtype=torch.float32).to(device)
    else:
        if init is not None:
            model = _continue_from(cfg, init, summary, device)
            log(f"continuing from {init} ({init_state['step']} fine-tuning steps)")
        elif cfg.resume and (pre_ckpt / "train_state.json").is_file() and \
                json.loads((pre_ckpt / "train_state.json").read_text()).get("finished"):
            model = T5ForConditionalGeneration.from_pretrained(pre_ckpt, dtype=torch.float32).to(device)
            log("resumed pretraining checkpoint")
        else:
            torch.manual_seed(cfg.seed)
            model = T5ForConditionalGeneration(_new_config(cfg, len(tok))).to(device)
            log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
            make = mixture(self_supervised_sources(tok, pre_texts, cfg, sentinels), parse_mix(cfg.pretrain_mix),
                           cfg.seed + 5)
            steps, secs = train_loop("pretrain", model, tok, make, steps_max=cfg.max_pretrain_steps,
                                     seconds=budget * cfg.pretrain_fraction, config=cfg, device=device,
                                     ckpt=pre_ckpt, history=history, extra_state={})
            summary["pretrain"] = {"steps": steps, "seconds": secs, "batch_size": cfg.batch_size}
        make_ft = finetune_batches(tok, cnn_train, sq_train, pre_texts, cfg, sentinels)
        remaining = budget - (time.time() - t_start)
        steps, secs = train_loop("finetune", model, tok, make_ft, steps_max=cfg.max_finetune_steps,
                                 seconds=max(remaining, 60), config=cfg, device=device, ckpt=ft_ckpt,
                                 history=history, extra_state={})
        summary["finetune"] = {"steps": steps, "seconds": secs, "batch_size": cfg.batch_size,
                               "summ_prob": cfg.summ_prob}
        summary["train_wall_minutes"] = (time.time() - t_start) / 60
        if "earlier_run" in summary:  # the card reports the whole training, both runs
            summary["train_wall_minutes"] += summary["earlier_run"].get("train_wall_minutes") or 0
        summary["history"] = summary.get("history", []) + history
        summary["args"] = cfg.stored_args()
        state_path.write_text(json.dumps(summary, indent=2))
    model.eval()
    return evaluate_and_package(model, tok, cfg, summary, work, cnn_train=cnn_train, cnn_pool=cnn_pool,
                                sq_train=sq_train, sq_pool=sq_pool)
