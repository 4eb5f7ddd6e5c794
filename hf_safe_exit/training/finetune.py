"""CALM-fine-tune a pretrained T5, calibrate its early exit and write a folder to push: the user's whole path.

>>> from hf_safe_exit.training.finetune import FinetuneConfig, finetune_calm
>>> finetune_calm(FinetuneConfig(model="google/flan-t5-small", task="cnndm", output="flan-t5-small-calm",
...                              max_steps=2000, n_calibration=200))

Stages (``examples/finetune_calm.py`` is the command line over this):

1. fine-tune with CALM's weighted per-layer loss (:class:`~hf_safe_exit.training.CALMSeq2SeqTrainer`, a
   ``Seq2SeqTrainer``: ``accelerate`` and bf16/fp16 as HF's Trainer does them) on the task's **train** split;
2. train the meta-classifier head (:func:`~hf_safe_exit.training.train_meta_classifier`) on train rows;
3. save the model (with ``custom_generate/``, :func:`hf_safe_exit.enable`), its tokenizer and the meta head;
4. decode ``n_calibration`` rows of the task's calibration/test **pool** at every threshold
   (:func:`hf_safe_exit.calibration.runner.collect`, with the library's default confidence measure), fit
   ``RiskControlled(eps, delta, method)`` (no δ for crc) and store both in ``calibration/<task>/``
   (:mod:`hf_safe_exit.risk.store`), with repeated random calibration/test splits of those rows
   (``evaluation.json``: the split procedure's test risk and speed-up per generated token, not a held-out test
   of the shipped λ̂);
5. write the model card: what was trained (:mod:`hf_safe_exit.training.finetune_card`), then the guarantee
   section (:func:`hf_safe_exit.cards.write_guarantee_card`) with its plots.

It runs as one process (on one device): the calibration and the files are written by that process. To
calibrate with several processes, run ``accelerate launch -m hf_safe_exit collect`` on the saved folder instead.

The folder then works with the one-liner: ``T5ForConditionalGeneration.from_pretrained(out,
trust_remote_code=True).generate(**inputs, early_exit=RiskControlled(eps=...))``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Literal, Optional

__all__ = ["FinetuneConfig", "finetune_calm", "fit_calibration", "command_line", "training_target", "RESULTS_FILENAME",
           "DEFAULT_DELTA"]

RESULTS_FILENAME = "finetune_results.json"  # the run's settings and numbers, next to the weights
DEFAULT_DELTA = 0.1  # the δ of a ucb/ltt run that names none: the library's usual 90% guarantee


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class FinetuneConfig:
    """Settings of :func:`finetune_calm`; every field is a command-line option of ``examples/finetune_calm.py``."""

    model: str = _help("the pretrained T5 to start from: a local folder or a Hub id (e.g. google/flan-t5-small)")
    task: Literal["cnndm", "squad"] = _help("the task to fine-tune and calibrate on")
    output: str = _help("the folder to write (weights, tokenizer, meta head, calibration, custom_generate/, card)")
    data: Optional[str] = _help("a local data folder (e.g. ../shared/data) or file; default: the Hub",
                                default=None)
    max_steps: int = _help("optimizer steps of CALM fine-tuning", default=1000)
    n_calibration: int = _help("pool examples decoded at every threshold to calibrate on (at least 2)", default=200)
    learning_rate: float = _help("peak learning rate (AdamW, linear decay)", default=3e-4)
    batch_size: int = _help("training examples per device and step", default=8)
    gradient_accumulation_steps: int = _help("batches per optimizer step", default=1)
    warmup_steps: int = _help("linear warm-up steps", default=0)
    weighting: Literal["linear", "uniform", "geometric"] = _help("CALM's per-layer loss weights", default="linear")
    bf16: bool = _help("bfloat16 mixed precision (weights stay float32)", default=False)
    fp16: bool = _help("float16 mixed precision (CUDA only)", default=False)
    device: Literal["auto", "cpu", "cuda"] = _help("auto: CUDA when available", default="auto")
    seed: int = _help("seed of training, the meta head's examples and the calibration subset", default=0)
    max_input_length: Optional[int] = _help("source tokens (training and calibration); default: the task's",
                                            default=None)
    max_new_tokens: Optional[int] = _help("target tokens in training, new tokens in calibration; default: the "
                                          "task's", default=None)
    meta_examples: int = _help("train examples whose decoder states train the meta head", default=256)
    eps: float = _help("target risk ε the stored calibration and the card state (any ε can be fitted later)",
                       default=0.05)
    method: Literal["crc", "ucb", "ltt"] = _help("risk-control method: ucb/ltt, a guarantee with probability 1 − δ; "
                                                 "crc, a guarantee in expectation (no δ)", default="ucb")
    delta: Optional[float] = _help(f"δ of the ucb/ltt guarantee (default {DEFAULT_DELTA} for them); crc has no δ: "
                                   "leave it unset", default=None)
    calibration_batch_size: int = _help("examples per generate call when collecting", default=8)
    time_each_threshold: bool = _help("collect each threshold in its own timed decode, so the card states the "
                                      "speed-up per generated token; off: the thresholds are decoded as one batch "
                                      "(3-4x faster to collect) and the card states no speed-up", default=True)
    eval_repeats: int = _help("random calibration/test splits of the calibration rows whose mean the card reports "
                              "(the split procedure, not a held-out test of the shipped λ̂)", default=100)
    plots: bool = _help("plots of risk, exit layer and speed-up against ε in the card", default=True)
    overwrite: bool = _help("write into an output folder that is not empty", default=False)

    def __post_init__(self):
        from ..risk.selection import check_method_and_delta
        from ..tasks import get_task

        get_task(self.task)  # raises UnknownTaskError naming the tasks
        for name in ("max_steps", "n_calibration", "batch_size", "gradient_accumulation_steps", "meta_examples",
                     "calibration_batch_size", "eval_repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if self.n_calibration < 2:
            raise ValueError(f"n_calibration={self.n_calibration} leaves no held-out example for the card's "
                             "evaluation: use at least 2 (hundreds for a useful guarantee).")
        for name in ("max_input_length", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer or None (the task's default).")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate!r} must be positive.")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps!r} must be 0 or more.")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps={self.eps!r} must lie in (0, 1).")
        if self.bf16 and self.fp16:
            raise ValueError("bf16=True and fp16=True: choose one mixed precision (bf16 on CPU and recent GPUs).")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is unknown: use 'auto', 'cpu' or 'cuda'.")
        if self.weighting not in ("linear", "uniform", "geometric"):
            raise ValueError(f"weighting={self.weighting!r} is unknown: use 'linear', 'uniform' or 'geometric'.")
        if self.method not in ("crc", "ucb", "ltt"):
            raise ValueError(f"method={self.method!r} is unknown: use 'crc', 'ucb' or 'ltt'.")
        if self.method in ("ucb", "ltt") and self.delta is None:
            self.delta = DEFAULT_DELTA  # recorded, so that the card's Reproduce command and results state it
        # the fit after training and collection refuses what RiskControlled refuses: check it before any training
        check_method_and_delta(self.method, self.delta)


def command_line(config: FinetuneConfig, output: str = "<folder>") -> str:
    """The ``examples/finetune_calm.py`` command that gives ``config``: the model, the task and every setting off
    its default (``--output`` is ``output``)."""
    options = []
    for f in fields(FinetuneConfig):
        value, flag = getattr(config, f.name), "--" + f.name.replace("_", "-")
        if f.name in ("output", "overwrite") or (f.default is not MISSING and value == f.default):
            continue
        if f.name == "delta" and value == DEFAULT_DELTA:  # what an unset --delta gives ucb/ltt
            continue
        if isinstance(value, bool):  # a flag: --bf16, or --no-plots for a default that is True
            options.append(flag if value else f"--no-{f.name.replace('_', '-')}")
        else:
            options.append(f"{flag} {value}")
    return " ".join(["python examples/finetune_calm.py", *options, f"--output {output}"])


def training_target(task, row) -> str:
    """The text the model learns to produce for ``row``: the reference summary with its sentences joined by
    spaces (CNN/DM highlights are newline-separated), or the first reference answer (SQuAD)."""
    reference = task.reference(row)
    if not isinstance(reference, str):
        reference = reference[0]
    return " ".join(reference.split())


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _check_output(config: FinetuneConfig) -> Path:
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output={config.output!r} is a file: pass a folder to write the model into.")
    if out.is_dir() and any(out.iterdir()) and not config.overwrite:
        raise FileExistsError(f"output={config.output!r} is not empty: choose a new folder, or pass overwrite=True "
                              "(--overwrite) to write into it.")
    return out


def _device(config: FinetuneConfig) -> str:
    import torch

    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device: use device='cpu' (or 'auto').")
    if config.fp16 and config.device == "cpu":
        raise ValueError("fp16=True needs a CUDA device: use bf16=True on the CPU.")
    return config.device


def _encode(task, tokenizer, rows, max_input: int, max_target: int) -> list[dict]:
    sources = tokenizer([task.prompt(r) for r in rows], max_length=max_input, truncation=True)["input_ids"]
    targets = tokenizer([training_target(task, r) for r in rows], max_length=max_target, truncation=True)["input_ids"]
    return [{"input_ids": s, "attention_mask": [1] * len(s), "labels": t} for s, t in zip(sources, targets)]


def _train(config: FinetuneConfig, model, tokenizer, train_set: list[dict], device: str, log) -> dict:
    """CALM fine-tuning with HF's Trainer; returns its summary (steps, loss, seconds)."""
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainingArguments

    from .calm_loss import CALMSeq2SeqTrainer

    with tempfile.TemporaryDirectory(prefix="hf_safe_exit_finetune_") as scratch:  # no checkpoints are kept
        args = Seq2SeqTrainingArguments(
            output_dir=scratch, max_steps=config.max_steps, per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps, learning_rate=config.learning_rate,
            warmup_steps=config.warmup_steps, bf16=config.bf16, fp16=config.fp16, use_cpu=device == "cpu",
            seed=config.seed, save_strategy="no", report_to="none", logging_steps=max(1, config.max_steps // 20),
            disable_tqdm=True, dataloader_pin_memory=device != "cpu")
        trainer = CALMSeq2SeqTrainer(
            model=model, args=args, train_dataset=train_set, calm_weighting=config.weighting,
            data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100))
        start = time.time()
        result = trainer.train()
    summary = {"steps": int(result.global_step), "train_loss": float(result.training_loss),
               "seconds": time.time() - start, "device": device,
               "log": [{k: v for k, v in entry.items() if k in ("step", "loss", "learning_rate")}
                       for entry in trainer.state.log_history if "loss" in entry]}
    log(f"CALM fine-tuning: {summary['steps']} steps, mean weighted loss {summary['train_loss']:.4f}, "
        f"{summary['seconds']:.0f}s on {device}")
    return summary


def _train_meta_head(config: FinetuneConfig, model, tokenizer, train_set: list[dict], log):
    import numpy as np
    from transformers import DataCollatorForSeq2Seq

    from .meta_classifier import train_meta_classifier

    rng = np.random.default_rng(config.seed)
    chosen = rng.choice(len(train_set), size=min(config.meta_examples, len(train_set)), replace=False)
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")
    rows = [train_set[i] for i in sorted(chosen)]
    batches = [collate(rows[i:i + config.batch_size]) for i in range(0, len(rows), config.batch_size)]
    head, stats = train_meta_classifier(model, batches, return_stats=True, seed=config.seed)
    log(f"meta head: {stats['n_examples']} (position, layer) examples, positive rate {stats['positive_rate']:.3f}, "
        f"balanced accuracy {stats['train_balanced_accuracy']:.3f}")
    return head, stats


def fit_calibration(config: FinetuneConfig, table):
    """The run's calibration of ``table``: ``RiskControlled(eps, delta, method)`` fitted on all its rows (δ only for
    ucb/ltt), and the repeated random calibration/test splits of those rows at a few ε (``evaluation.json``)."""
    from ..calibration.evaluate import evaluate_table
    from ..risk import RiskControlled

    rc = RiskControlled(config.eps, delta=config.delta, method=config.method).fit_table(table)
    eps_grid = sorted({0.02, 0.05, 0.1, 0.2, config.eps})
    evaluation = evaluate_table(table, eps=eps_grid, methods=(config.method,), delta=config.delta,
                                repeats=config.eval_repeats, seed=config.seed)
    return rc, evaluation


def finetune_calm(config: FinetuneConfig, *, log: Callable[[str], None] = _log) -> dict:
    """Run the whole recipe (see the module docstring) and return the run's summary (also in ``finetune_results.json``).

    Guarantees on return: ``config.output`` holds the fine-tuned weights (float32), the tokenizer, the meta head,
    ``custom_generate/``, ``calibration/<task>/{early_exit_calibration.npz, risk_control.json, evaluation.json}``
    with ``calibration/config.json`` naming the task primary, and ``README.md``; the calibration was collected
    on the model as saved (its fingerprint matches the saved weights) and only on pool rows of the task.
    Raises before any training when the output folder is not empty (without ``overwrite``) or the device is
    unavailable.
    """
    import numpy as np
    import torch
    from transformers import AutoTokenizer, T5ForConditionalGeneration, set_seed

    import hf_safe_exit

    from ..calibration.evaluate import write_evaluation
    from ..calibration.runner import collect
    from ..decoding.readout import check_supported_model
    from ..risk import store_calibration
    from ..risk.store import calibration_dir
    from ..tasks import get_task, load_split

    out, device = _check_output(config), _device(config)
    task = get_task(config.task)
    max_input = config.max_input_length or task.max_input_length
    max_new = config.max_new_tokens or task.max_new_tokens
    set_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    model = T5ForConditionalGeneration.from_pretrained(config.model, dtype=torch.float32)
    check_supported_model(model)
    train_rows, pool = load_split(task, "train", path=config.data), load_split(task, "pool", path=config.data)
    if config.n_calibration > len(pool):
        raise ValueError(f"n_calibration={config.n_calibration} exceeds the {len(pool)} examples of the {task.name} "
                         "pool: use fewer.")
    train_set = _encode(task, tokenizer, train_rows, max_input, max_new)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{config.model}: {n_params / 1e6:.1f}M parameters, "
        f"{model.config.num_decoder_layers} decoder layers; {task.name}: {len(train_set)} train rows, "
        f"{config.n_calibration} of {len(pool)} pool rows to calibrate on")

    training = _train(config, model, tokenizer, train_set, device, log)
    model = model.to(device=device, dtype=torch.float32).eval()
    head, meta_stats = _train_meta_head(config, model, tokenizer, train_set, log)

    out.mkdir(parents=True, exist_ok=True)
    hf_safe_exit.enable(model).save_pretrained(out)  # writes custom_generate/ too
    tokenizer.save_pretrained(out)
    head.cpu().save_pretrained(out)
    # a "meta" measure finds the head here in this process, and next to the weights after loading
    model.meta_head = head.to(next(model.parameters()).device)

    index = np.sort(np.random.default_rng(config.seed).choice(len(pool), size=config.n_calibration, replace=False))
    start = time.time()
    table = collect(model, tokenizer, task, pool.select(index.tolist()), batch_size=config.calibration_batch_size,
                    max_new_tokens=max_new, max_input_length=max_input, progress=False,
                    batch_thresholds=not config.time_each_threshold,
                    metadata={"split": "pool", "subset_seed": config.seed,
                              "data_source": os.fspath(config.data) if config.data else task.hub_id,
                              "model_path": os.fspath(out)})
    log(f"collected {table.n} pool examples × {table.lambdas.size} thresholds in {time.time() - start:.0f}s "
        f"(measure {table.metadata.get('measure')})")
    rc, evaluation = fit_calibration(config, table)
    store_calibration(out, table=table, controlled=rc, task=task.name, primary=True)
    cal_dir = calibration_dir(out, task.name)
    write_evaluation(evaluation, cal_dir / "evaluation.json")  # with its digest, as `hf-safe-exit evaluate` writes
    log(f"λ̂ = {rc.threshold:.4g} at ε = {config.eps:g} ({config.method}): {rc.certificate.guarantee}")

    results = {"config": asdict(config), "command": command_line(config), "training": training,
               "meta_head": meta_stats,
               "calibration": {"n": table.n, "threshold": rc.threshold, "measure": table.metadata.get("measure"),
                               "pool_ids": list(table.metadata["example_ids"])},
               "params": n_params, "num_decoder_layers": int(model.config.num_decoder_layers)}
    (out / RESULTS_FILENAME).write_text(json.dumps(results, indent=1, allow_nan=False), encoding="utf-8")
    from .finetune_card import write_finetune_card

    write_finetune_card(out, results, rc, evaluation, plots=config.plots)
    log(f"wrote {out}")
    return results
