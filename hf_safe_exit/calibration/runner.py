"""The calibration runner: decode every example at every threshold λ of a grid and record the losses.

For a model, a :class:`~hf_safe_exit.tasks.Task`, a λ grid, a confidence measure and n
examples, :func:`collect` decodes each example with ``EarlyExit(threshold=λ, ...)`` for every
λ (greedy, batched) and writes a :class:`~hf_safe_exit.risk.loss_table.LossTable`:

* ``losses["performance_gap"]``, ``["performance_gap_bounded"]`` -- ℓ(ŷ_λ, y) − ℓ(ŷ_1, y) and its
  positive part, from the task loss ℓ = 1 − score (``extras["task_loss"]``);
* ``losses["consistency"]`` -- ℓ(ŷ_λ, ŷ_1): the task loss of the output against the full
  model's (λ = 1) output as the reference;
* ``extras["mean_exit_layer"]``, ``extras["layer_fraction"]``, ``extras["num_tokens"]`` (K, n) -- per
  example: mean 1-based exit layer over its generated tokens, executed decoder layers /
  (decoder layers × tokens), number of generated tokens;
* ``extras["wall_time"]`` (K,) -- seconds spent decoding all examples at each λ (summed over
  processes). With ``batch_thresholds=False`` each λ's are measured in the same run, so
  ``wall_time[λ=1] / wall_time[λ]`` is the speed-up over the full model; batched (the default) they are the
  batches' times apportioned by tokens, which shows no speed-up (see below); ``extras["example_time"]`` (K, n) --
  each cell's time split evenly over its examples;
* ``metadata`` -- ``model_fingerprint``, ``task``, ``lambdas``, ``measure``, ``schedule``,
  ``min_exit_layer``, ``num_decoder_layers``, ``max_new_tokens``, ``max_input_length``,
  ``batch_size``, ``example_ids``, ``versions``, plus what the caller adds.

Rows are in the order of ``lambdas`` as given (the default grid is ascending).

**Other strategies.** ``policy_factory=`` (λ → an ``early_exit=`` object) calibrates another
threshold through the same loop, e.g. BiLD's rollback threshold (λ = exp(−α_RB), λ = 1 ↔ the
large model's greedy output except at float ties) with :func:`hf_safe_exit.decoding.bild.bild_policy_factory`. The losses are
the same; the per-example cost extras are then ``large_calls_per_token`` and ``num_tokens``, and
the metadata has ``strategy``, ``policy`` (the λ = 1 policy's settings, incl. the small model's
fingerprint) and ``rollbacks`` instead of the early-exit settings. See
:mod:`hf_safe_exit.calibration.strategies`.

**Batches and processes.** Examples are cut into fixed batches of ``batch_size`` in the order
given; a *cell* is one (λ, batch). Under ``accelerate`` (``accelerate launch -m hf_safe_exit
collect ...``) batch ``b`` goes to process ``b mod world_size`` and the main process gathers
all cells (``gather_object``) and writes the one result file. Each process decodes its batches
one after the other, each batch at every λ in turn, so that the wall times of all thresholds
are measured under the same conditions. Because every batch is the same
whatever the number of processes, one process and several give the same losses.

**Resumable.** Every finished cell is appended to a JSON-lines file in the state directory
(default: ``<output>.partial/``, one file per process). A rerun with the same settings reads
all of them and only decodes the missing cells, so an interrupted run continues where it
stopped and yields the same result file; pass ``fresh=True`` / ``--fresh`` to discard it. A run
killed while writing leaves a torn last line, which the next run drops before appending. Once the
result file is written, the default state directory is removed (see :mod:`hf_safe_exit.calibration.state`). Settings that change the results (model
fingerprint, task, grid, measure, schedule, batch size, lengths, examples) are checked
against the state's ``config.json``; a mismatch raises :class:`StateMismatchError`. Each cell is
written with its content digest and read back only when it is unchanged and a cell of this run (its λ, its
batch's ids, its costs in range); else a ``CorruptFileError`` names the cells file and line.

**Thresholds batched.** By default (``batch_thresholds=True``) the missing cells of a batch are decoded together
(:mod:`~hf_safe_exit.calibration.grid`: the encoder once, the thresholds as rows of one batch): every cell holds what
one ``generate`` call per cell gives up to float rounding (λ = 1: HF's tokens except at near-ties, not its bits),
and is written, resumed and checked one by one; its ``seconds`` are apportioned, as the run config and the table's
``"timing"`` say. ``batch_thresholds=False`` (BiLD and ``policy_factory=`` always) decodes one cell per call
(λ = 1 HF's own loop, bit for bit) and measures each cell's time.

**Deterministic.** Greedy decoding; losses are computed from the decoded text after all
cells are in. Only the wall times vary from run to run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..digest import with_digest
from ..errors import ModelMismatchError, RunInProgressError, StateMismatchError
from ..lazy import require
from ..risk.provenance import check_model_matches, record_provenance
from .grid import BATCHED_TIMING, ThresholdGrid, check_batch_thresholds
from .lock import acquire_lock, release_lock
from .state import CELL_KEYS, open_state
from .strategies import default_lambdas

if TYPE_CHECKING:
    from ..risk.loss_table import LossTable

__all__ = ["BATCHED_TIMING", "collect", "decode_cell", "default_lambdas", "StateMismatchError", "ModelMismatchError",
           "check_model_matches"]


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    return {"hf_safe_exit": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _as_rows(examples) -> list[Mapping[str, Any]]:
    if hasattr(examples, "to_list"):  # datasets.Dataset
        return examples.to_list()
    return list(examples)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]




def _sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Plan:
    """What one collect run decodes: the strategy, the grid, the batches, the run config, the cells left to do."""

    task: Any
    strategy: Any
    lam: np.ndarray
    ids: list
    prompts: list
    references: list
    batches: list[list[int]]
    config: dict
    max_new_tokens: int
    max_input_length: int
    order: list[int]
    depth: int | None = None  # the decoder's layers: the range of a cell's exit layers
    batched: bool = False  # the cells of a batch decoded together (ThresholdGrid)
    state_path: Path | None = None
    state_is_default: bool = False
    done: dict = field(default_factory=dict)
    mine: list = field(default_factory=list)


def collect(
    model,
    tokenizer,
    task,
    examples: Iterable[Mapping[str, Any]],
    *,
    config=None,
    lambdas: Sequence[float] | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    max_input_length: int | None = None,
    output: str | os.PathLike | None = None,
    state_dir: str | os.PathLike | None = None,
    fresh: bool = False,
    progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
    policy_factory: Callable[[float], Any] | None = None,
    policy_description: Mapping[str, Any] | None = None,
    batch_thresholds: bool | None = None,
):
    """Decode ``examples`` at every λ of ``lambdas`` and return (and, with ``output``, save) a ``LossTable``.

    Args:
        model: a T5-family model (``hf_safe_exit.enable`` is applied if needed); put it on the
            device first (under ``accelerate`` the CLI uses ``PartialState().device``).
        tokenizer: its tokenizer.
        task: a :class:`~hf_safe_exit.tasks.Task` or its name (``"cnndm"``, ``"squad"``).
        examples: rows of the task's dataset (a ``datasets.Dataset`` or a list of dicts).
        config: the :class:`~hf_safe_exit.EarlyExitConfig` to calibrate (default ``EarlyExitConfig()``); its
            ``"auto"`` measure is resolved against ``model`` here, and the table records the resolved configuration.
        lambdas: the threshold grid; must contain 1.0. Default :func:`default_lambdas`
            (for BiLD: :func:`~hf_safe_exit.calibration.strategies.default_bild_lambdas`).
        batch_size: examples per ``generate`` call.
        max_new_tokens / max_input_length: default to the task's.
        output: where to write the result file (``.npz``); ``None`` keeps it in memory only.
        state_dir: where finished cells are kept for resuming; default ``<output>.partial``, removed once the
            result file is written (a ``state_dir`` you pass is kept; no resuming when both are ``None``).
        fresh: discard an existing state directory first.
        progress: show a tqdm bar (main process only).
        metadata: extra JSON-able entries for the table's metadata.
        policy_factory: ``λ -> early_exit=`` object, to calibrate another decoding strategy's
            threshold through the same runner, e.g. BiLD's rollback threshold with
            ``bild_policy_factory(small_model, fallback=...)`` (λ = exp(−α_RB); see
            :mod:`hf_safe_exit.calibration.strategies`); ``config`` must then be ``None``. λ = 1 must give the
            reference output (BiLD: rollback 0, the large model's tokens except at float ties).
        policy_description: JSON-able settings of the factory's policies, stored in the run
            config (resume check) and the metadata (``"policy"``); default
            ``policy_factory(1.0).describe()``.
        batch_thresholds: decode the missing cells of each batch together (the encoder once per batch, the
            thresholds as rows of one batch; outputs equal up to float rounding) and apportion their time; ``False``:
            one ``generate`` call per cell, each cell's time measured. ``None`` (default): ``True`` for the
            early-exit strategy, ``False`` with ``policy_factory``, which cannot batch.

    Returns:
        the ``LossTable`` on the main process; ``None`` on the other processes.
    """
    from ..decoding.enable import enable  # decoding loads transformers: only when a collection runs

    state = require("accelerate", "collect").PartialState()
    plan = _plan(model, tokenizer, task, examples, config, lambdas, batch_size, max_new_tokens, max_input_length,
                 policy_factory, policy_description, batch_thresholds)
    model = enable(model)
    model.eval()
    lock = _open_state(plan, output, state_dir, fresh, state)
    try:
        cells = _run(plan, model, tokenizer, state, progress)
        if cells is None:  # not the main process
            return None
        table = _assemble(plan, cells, model, metadata)
        if output is not None:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            table.save(output)
            if plan.state_is_default and plan.state_path.is_dir():
                shutil.rmtree(plan.state_path)  # the result file holds everything now; the state was for resuming
        return table
    finally:
        if lock is not None:
            release_lock(lock)


def _plan(model, tokenizer, task, examples, config, lambdas, batch_size, max_new_tokens, max_input_length,
          policy_factory, policy_description, batch_thresholds) -> _Plan:
    """Validate the request and lay out the run: strategy, grid, batches, and the config that identifies it."""
    from ..config import EarlyExitConfig
    from ..tasks import get_task
    from .strategies import EarlyExitStrategy, FactoryStrategy, default_bild_lambdas

    task = get_task(task)
    rows = _as_rows(examples)
    if not rows:
        raise ValueError("collect needs at least one example: check the data split and --n.")
    if policy_factory is None:
        config = EarlyExitConfig() if config is None else config
        if not isinstance(config, EarlyExitConfig):
            raise TypeError(f"config must be an hf_safe_exit.EarlyExitConfig, got {type(config).__name__}.")
        # "auto" is resolved here, so that the table records the measure the losses were computed with
        strategy = EarlyExitStrategy(config.resolve(model))
    elif config is not None:
        raise ValueError("config= is the early-exit configuration: drop it when policy_factory= is given.")
    else:
        strategy = FactoryStrategy(policy_factory, policy_description)
    lam = _grid(lambdas, default_bild_lambdas() if strategy.name == "bild" else default_lambdas())
    batched = check_batch_thresholds(batch_thresholds, strategy.name == "early_exit")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
    max_new_tokens = int(max_new_tokens or task.max_new_tokens)
    max_input_length = int(max_input_length or task.max_input_length)
    strategy.check(model, tokenizer)  # validate the policy settings once, before any decoding
    ids = [task.example_id(r) for r in rows]
    prompts = [task.prompt(r) for r in rows]
    n = len(rows)
    batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    run_config = {
        **record_provenance(model, getattr(strategy, "early_exit_config", None)), "task": task.name,
        "lambdas": [float(x) for x in lam],
        **strategy.config, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
        "max_input_length": max_input_length, "examples": _digest({"ids": ids, "prompts": prompts}),
        # cells' seconds apportioned, not measured per λ: a resumed run must not mix the two kinds
        **({"timing": BATCHED_TIMING} if batched else {}),
    }
    # Batch by batch, each at every λ in turn (λ = 1 first): slow drifts of the machine's speed then
    # affect all thresholds alike, which keeps the wall-time ratios (speed-ups) fair.
    order = [int(np.flatnonzero(lam == 1.0)[0])] + [k for k in range(lam.size) if lam[k] != 1.0]
    depth = getattr(model.config, "num_decoder_layers", None)
    return _Plan(task, strategy, lam, ids, prompts, [task.reference(r) for r in rows], batches, run_config,
                 max_new_tokens, max_input_length, order, depth=int(depth) if depth else None, batched=batched)



def _grid(lambdas, default) -> np.ndarray:
    lam = default if lambdas is None else np.asarray(lambdas, dtype=np.float64)
    if lam.ndim != 1 or lam.size == 0 or not np.all((lam >= 0) & (lam <= 1)):
        raise ValueError(f"lambdas must be thresholds in [0, 1], got {lambdas!r}.")
    if np.unique(lam).size != lam.size:
        raise ValueError("lambdas contains duplicates: give each threshold once.")
    if not np.any(lam == 1.0):
        raise ValueError("the grid must contain λ = 1 (the full model: the reference of the performance gap and the "
                         "consistency loss): add 1.0 to lambdas.")
    return lam


def _open_state(plan: _Plan, output, state_dir, fresh: bool, state) -> Path | None:
    """Take the state folder (the main process: its lock, one writer), read the cells an earlier run finished
    (resuming) and list the cells of this process. Returns the lock to release (None: no folder, or not main)."""
    plan.state_is_default = state_dir is None and output is not None
    if plan.state_is_default:
        state_dir = Path(output).with_name(Path(output).name + ".partial")
    plan.state_path = Path(state_dir) if state_dir is not None else None
    lock = None
    if plan.state_path is not None:
        lock = _take(plan.state_path, state)
        try:
            batch_ids = [[plan.ids[j] for j in batch] for batch in plan.batches]  # what each cell read must hold
            plan.done = open_state(plan.state_path, plan.config, state, fresh, batch_ids=batch_ids, depth=plan.depth)
        except BaseException:
            if lock is not None:
                release_lock(lock)
            raise
    plan.mine = [(k, b) for b in range(len(plan.batches)) if b % state.num_processes == state.process_index
                 for k in plan.order]
    return lock


def _take(state_path: Path, state) -> Path | None:
    """The main process takes the state folder's lock; its refusal reaches every process (none waits at a barrier)."""
    error, lock = None, None
    if state.is_main_process:
        try:
            lock = acquire_lock(state_path)
        except RunInProgressError as err:
            error = str(err)
    if state.num_processes > 1:
        error = require("accelerate.utils", "collect").broadcast_object_list([error])[0]
    if error is not None:
        raise RunInProgressError(error)
    return lock


def decode_cell(model, encoded, policy, max_new_tokens: int):
    """One cell: the batch ``encoded`` decoded greedily at one threshold's ``policy``. ``encoded`` is the tokenized
    batch, or a :class:`~hf_safe_exit.calibration.grid.ThresholdGrid` of it, which decodes all its cells at the
    first one and then hands each out."""
    import torch

    from ..decoding.early_exit_loop import no_cache_returned

    if isinstance(encoded, ThresholdGrid):
        return encoded.output(model, policy)
    with torch.inference_mode():  # the cell's time is decoding's: no cache is handed back, none completed
        return model.generate(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                              early_exit=policy, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              return_dict_in_generate=True, **no_cache_returned(policy))


def _run(plan: _Plan, model, tokenizer, state, progress: bool) -> dict | None:
    """Decode this process's missing cells (appending each to the state), then gather every process's cells.

    Returns all cells keyed by (λ index, batch) on the main process, ``None`` on the others."""
    gather_object = require("accelerate.utils", "collect").gather_object
    tqdm = require("tqdm.auto", "collect").tqdm

    todo = [cell for cell in plan.mine if cell not in plan.done]
    cells_file = None
    if plan.state_path is not None:
        cells_file = plan.state_path / f"cells-{state.process_index:03d}-of-{state.num_processes:03d}.jsonl"
    device = next(model.parameters()).device
    encoded: dict[int, Any] = {}

    def tokenize(b: int, rows: slice = slice(None)):
        return tokenizer([plan.prompts[j] for j in plan.batches[b][rows]], return_tensors="pt", padding=True,
                         truncation=True, max_length=plan.max_input_length).to(device)

    def encode(b: int):  # tokenized once per batch, outside the timed region
        if b not in encoded:
            encoded.clear()  # cells come batch by batch: keep only the current batch
            encoded[b] = _grid_of(plan, tokenize(b), todo, b) if plan.batched else tokenize(b)
        return encoded[b]

    def policy(k: int):
        return plan.strategy.policy(float(plan.lam[k]))

    if todo:  # warm-up, not timed: the first call pays one-time costs (batched: the first example's grid)
        k, b = todo[0]
        warm = _grid_of(plan, tokenize(b, slice(0, 1)), todo, b) if plan.batched else encode(b)
        decode_cell(model, warm, policy(k), plan.max_new_tokens)
    # one step of the bar is a cell: one batch decoded at one threshold λ
    bar = tqdm(total=len(plan.mine), initial=len(plan.mine) - len(todo), unit="batch×λ",
               desc=f"collect {plan.task.name} ({len(plan.batches)} batches of ≤{plan.config['batch_size']} × "
                    f"{plan.lam.size} thresholds)", disable=not (progress and state.is_main_process), dynamic_ncols=True)
    try:
        for k, b in todo:
            enc = encode(b)
            _sync(device)
            start = time.perf_counter()
            out = decode_cell(model, enc, policy(k), plan.max_new_tokens)
            _sync(device)
            seconds = enc.seconds(k) if plan.batched else time.perf_counter() - start
            texts = [t.strip() for t in tokenizer.batch_decode(out.sequences, skip_special_tokens=True)]
            cell = {"k": k, "lambda": float(plan.lam[k]), "batch": b, "ids": [plan.ids[j] for j in plan.batches[b]],
                    "predictions": texts, **plan.strategy.costs(out), "seconds": seconds}
            plan.done[(k, b)] = cell
            if cells_file is not None:
                with open(cells_file, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(with_digest(cell)) + "\n")  # read back only if it is still this
            bar.update(1)
    finally:
        bar.close()
    mine = [plan.done[cell] for cell in plan.mine]
    gathered = gather_object(mine) if state.num_processes > 1 else mine
    if not state.is_main_process:
        return None
    cells = {}
    for cell in gathered:
        cells.setdefault((int(cell["k"]), int(cell["batch"])), cell)
    missing = [(k, b) for k in range(plan.lam.size) for b in range(len(plan.batches)) if (k, b) not in cells]
    if missing:
        raise RuntimeError(f"{len(missing)} (λ, batch) cells are missing after gathering: rerun to resume.")
    return cells


def _grid_of(plan: _Plan, encoded, todo: list, b: int) -> ThresholdGrid:
    """The grid of batch ``b``'s cells left to do."""
    lambdas = {k: float(plan.lam[k]) for k, batch in todo if batch == b}
    return ThresholdGrid(encoded, plan.strategy.early_exit_config, lambdas, plan.max_new_tokens)


def _assemble(plan: _Plan, cells: dict, model, metadata) -> LossTable:
    """The loss table of the gathered cells: task losses scored from the decoded text, costs, times, metadata."""
    from ..risk.loss_table import LossTable

    K, n = plan.lam.size, len(plan.ids)
    predictions = [[""] * n for _ in range(K)]
    # per-example costs: every cell key that is not bookkeeping (early exit: mean_exit_layer, layer_fraction,
    # num_tokens; BiLD: large_calls_per_token, num_tokens); int64 when all values are ints
    cost_names = [key for key in next(iter(cells.values())) if key not in CELL_KEYS]
    costs = {name: np.zeros((K, n), dtype=np.int64 if all(isinstance(v, int) for c in cells.values() for v in c[name])
                            else np.float64) for name in cost_names}
    example_time, wall_time = np.zeros((K, n)), np.zeros(K)
    for (k, b), cell in cells.items():
        batch = plan.batches[b]
        if cell["ids"] != [plan.ids[j] for j in batch]:
            raise StateMismatchError(f"cell (λ={plan.lam[k]}, batch {b}) holds other examples: rerun with --fresh.")
        for pos, j in enumerate(batch):
            predictions[k][j] = cell["predictions"][pos]
            for name, values in costs.items():
                values[k, j] = cell[name][pos]
            example_time[k, j] = cell["seconds"] / len(batch)
        wall_time[k] += cell["seconds"]
    task, full = plan.task, plan.order[0]
    scored: dict[tuple, float] = {}  # many thresholds give an example the same text: score it once

    def score(kind: str, j: int, text: str) -> float:
        if (kind, j, text) not in scored:
            scored[(kind, j, text)] = task.loss(text, plan.references[j]) if kind == "task" else \
                task.consistency_loss(text, predictions[full][j])
        return scored[(kind, j, text)]

    task_losses = np.array([[score("task", j, predictions[k][j]) for j in range(n)] for k in range(K)])
    consistency = np.array([[score("consistency", j, predictions[k][j]) for j in range(n)] for k in range(K)])
    meta = {key: value for key, value in plan.config.items() if key != "examples"}
    meta.update({"num_decoder_layers": int(model.config.num_decoder_layers), "example_ids": plan.ids, "n": n,
                 "versions": _versions(),
                 "device": next(model.parameters()).device.type, "task_loss": f"1 - {type(task).__name__}.score",
                 "lambda_order": "as given"})
    meta.update(plan.strategy.metadata(plan.lam))
    meta.update(dict(metadata or {}))
    return LossTable.from_task_losses(plan.lam, task_losses, consistency_losses=consistency,
                                      task_loss_bounds=task.loss_bounds,
                                      extras={**costs, "example_time": example_time, "wall_time": wall_time},
                                      metadata=meta)
