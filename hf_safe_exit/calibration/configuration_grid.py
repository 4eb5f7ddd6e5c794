"""Collect over a grid of early-exit configurations: one loss table per configuration, stacked into one
:class:`~hf_safe_exit.risk.ConfigurationTable` for Pareto Testing (Laufer-Goldshtein, Fisch, Barzilay, Jaakkola,
ICLR 2023; ``RiskControlled(eps, delta, method="pareto")``).

:class:`ConfigurationGrid` spans a product of settings (measure × schedule × τ × min_exit_layer × exit layers every
k-th layer) and lists its :class:`~hf_safe_exit.EarlyExitConfig` s for a decoder depth; :func:`collect_grid` runs
:func:`~hf_safe_exit.calibration.collect` once per configuration on the same examples, λ grid, batches and lengths,
and stacks the tables with :meth:`ConfigurationTable.from_tables <hf_safe_exit.risk.ConfigurationTable.from_tables>`
(which refuses tables whose λ = 1 rows, the full model whatever the configuration, differ).

**Resumable.** The state folder (default ``<output>.partial/``) holds ``grid.json`` (the configurations, in order) and
configuration ``i``'s finished table as ``<i>.npz``; an unfinished one is resumed by ``collect`` itself from
``<i>.npz.partial/``. A rerun with the same grid reads the finished tables (each checked: its configuration, λ grid,
examples, lengths, batch size and model) and collects the others; another grid raises
:class:`~hf_safe_exit.errors.StateMismatchError` (``fresh=True`` discards the folder). The default folder is removed
once ``output`` is written.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..config import EarlyExitConfig, InvalidConfigError
from ..errors import StateMismatchError

__all__ = ["ConfigurationGrid", "collect_grid", "GRID_STATE_FILENAME"]

GRID_STATE_FILENAME = "grid.json"
_FRESH = "rerun with --fresh (fresh=True) to discard them, or choose another --output"


def _values(name: str, given, check, example) -> tuple:
    values = [] if isinstance(given, (str, bytes, Mapping)) or not hasattr(given, "__iter__") else list(given)
    if not values:
        raise InvalidConfigError(f"ConfigurationGrid: {name}={given!r} must be a non-empty list, e.g. "
                                 f"{name}=[{example!r}].")
    for v in values:
        check(v)
    if len(set(values)) != len(values):
        raise InvalidConfigError(f"ConfigurationGrid: {name}={values!r} lists a value twice: give each once.")
    return tuple(values)


def _check_every(k) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidConfigError(f"ConfigurationGrid: exit_every={k!r} must be whole numbers >= 1 (1: check every "
                                 "layer; 2: every other layer, 2, 4, ...; 3: every third).")


@dataclass(frozen=True)
class ConfigurationGrid:
    """The product of early-exit settings to calibrate over (λ aside: every configuration is collected at every λ).

    Args:
        measures: confidence measures (``"auto"`` is resolved against the model by :func:`collect_grid`).
        schedules: ``"constant"`` and/or ``"decaying"`` (CALM Eq. 4).
        decay_taus: τ of the decaying schedule (the constant schedule ignores τ: it keeps ``base``'s).
        min_exit_layers: first 1-based layers a token may exit at.
        exit_every: ``1``: check every layer (``exit_layers=None``); ``k > 1``: only layers k, 2k, ... below the last
            (the last layer ends every token anyway), from ``min_exit_layer`` on.
        base: the settings no axis spans (e.g. ``anytime``); default ``EarlyExitConfig()``. An axis left ``None``
            takes ``base``'s one value (``exit_every``: 1); ``base.exit_layers`` must be ``None`` (``exit_every``
            sets them).
    """

    measures: Sequence | None = None
    schedules: Sequence[str] | None = None
    decay_taus: Sequence[float] | None = None
    min_exit_layers: Sequence[int] | None = None
    exit_every: Sequence[int] | None = None
    base: EarlyExitConfig | None = None

    def __post_init__(self) -> None:
        base = EarlyExitConfig() if self.base is None else self.base
        if not isinstance(base, EarlyExitConfig):
            raise TypeError(f"ConfigurationGrid: base must be an EarlyExitConfig, got {type(base).__name__}.")
        if base.exit_layers is not None:
            raise InvalidConfigError(f"ConfigurationGrid: base.exit_layers={base.exit_layers!r}: the grid sets the "
                                     "exit layers from exit_every (e.g. exit_every=[1, 2]); drop them from base.")
        object.__setattr__(self, "base", base)
        axes = (("measures", "measure"), ("schedules", "schedule"), ("decay_taus", "decay_tau"),
                ("min_exit_layers", "min_exit_layer"))
        for name, setting in axes:
            given = getattr(self, name)
            values = (getattr(base, setting),) if given is None else _values(
                name, given, lambda v, s=setting: replace(base, **{s: v}), getattr(base, setting))  # checked as settings
            object.__setattr__(self, name, values)
        every = (1,) if self.exit_every is None else _values("exit_every", self.exit_every, _check_every, 1)
        object.__setattr__(self, "exit_every", every)

    def configurations(self, num_decoder_layers: int) -> list[EarlyExitConfig]:
        """Every configuration of the product for a decoder of ``num_decoder_layers`` layers, in product order
        (measure slowest, exit_every fastest). A combination that decodes as an earlier one is listed once (the
        constant schedule at every τ; two exit-layer settings that check the same layers), and one that checks no
        layer below the last (e.g. every third layer from layer 3 of 3) is left out: it is the full model, which
        every configuration's λ = 1 row already holds. Raises ``InvalidConfigError`` when nothing is left."""
        if isinstance(num_decoder_layers, bool) or not isinstance(num_decoder_layers, int) or num_decoder_layers < 2:
            raise InvalidConfigError(f"num_decoder_layers={num_decoder_layers!r}: early exit needs a decoder of at "
                                     "least 2 layers.")
        out, seen = [], set()
        for measure in self.measures:
            for schedule in self.schedules:
                taus = self.decay_taus if schedule == "decaying" else (self.base.decay_tau,)
                for tau, first, every in ((t, m, k) for t in taus for m in self.min_exit_layers for k in self.exit_every):
                    # the multiples of k from min_exit_layer on, below the last layer (every layer when k = 1)
                    layers = tuple(range(-(-first // every) * every, num_decoder_layers, every))
                    if not layers:
                        continue
                    config = replace(self.base, measure=measure, schedule=schedule, decay_tau=tau, min_exit_layer=first,
                                     exit_layers=None if every == 1 else layers)
                    key = (config.measure_name, schedule, tau if schedule == "decaying" else None, layers,
                           json.dumps(config.to_dict()["anytime"], sort_keys=True))
                    if key not in seen:
                        seen.add(key)
                        out.append(config)
        if not out:
            raise InvalidConfigError(f"ConfigurationGrid: no configuration of {self} can exit before the last of "
                                     f"{num_decoder_layers} decoder layers: lower min_exit_layers or exit_every.")
        return out


def _configurations(grid, model) -> list[EarlyExitConfig]:
    """The grid's configurations with "auto" resolved against ``model`` (as collect records them), each once."""
    depth = int(model.config.num_decoder_layers)
    if isinstance(grid, ConfigurationGrid):
        configs = grid.configurations(depth)
    else:
        configs = None if isinstance(grid, (str, bytes, Mapping, EarlyExitConfig)) or not hasattr(grid, "__iter__") \
            else list(grid)
        if not configs or not all(isinstance(c, EarlyExitConfig) for c in configs):
            raise TypeError(f"grid must be a ConfigurationGrid or a non-empty list of EarlyExitConfig, got {grid!r}.")
    resolved = [c.resolve(model) for c in configs]
    for i, config in enumerate(resolved):
        config.check_model(model)
        if config in resolved[:i]:
            raise ValueError(f"grid: configurations {resolved.index(config)} and {i} are the same ({config.to_dict()}) "
                             "once 'auto' is resolved: give each configuration once.")
    return resolved


def collect_grid(model, tokenizer, task, examples: Iterable[Mapping[str, Any]], grid, *,
                 lambdas: Sequence[float] | None = None, output: str | os.PathLike | None = None,
                 state_dir: str | os.PathLike | None = None, fresh: bool = False, **collect_kwargs):
    """:func:`~hf_safe_exit.calibration.collect` at every configuration of ``grid``, stacked into one
    :class:`~hf_safe_exit.risk.ConfigurationTable` (returned; written to ``output`` if given).

    Args:
        grid: a :class:`ConfigurationGrid` or a list of :class:`~hf_safe_exit.EarlyExitConfig`.
        lambdas: the λ grid every configuration is collected at (must contain 1.0; default collect's).
        output: the ``.npz`` of the stacked table; ``None`` keeps it in memory (no resuming unless ``state_dir``).
        state_dir: where each configuration's table is kept (default ``<output>.partial/``, removed at the end; one
            you pass is kept).
        fresh: discard the state folder's content first.
        collect_kwargs: the rest of :func:`~hf_safe_exit.calibration.collect`'s keywords (``batch_size``,
            ``max_new_tokens``, ``max_input_length``, ``metadata``, ``progress``, ``batch_thresholds``), the same for
            every configuration; not ``config``, ``policy_factory`` or ``policy_description``.

    Every configuration decodes the same examples in the same batches at the same λ grid, so that the stacked rows
    are comparable; a Pareto fit on the table certifies one of its configurations (at one of its λ). Returns
    ``None`` on processes other than the main one under ``accelerate``.
    """
    from ..lazy import require
    from ..risk.configuration_table import ConfigurationTable
    from .lock import acquire_lock, release_lock
    from .runner import collect

    refused = sorted({"config", "policy_factory", "policy_description"} & set(collect_kwargs))
    if refused:
        raise ValueError(f"collect_grid: {refused} describe one configuration or another strategy; the grid gives "
                         "every configuration: drop them.")
    rows = examples.to_list() if hasattr(examples, "to_list") else list(examples)  # read once, decoded G times
    configs = _configurations(grid, model)
    state = require("accelerate", "collect").PartialState()
    folder = Path(state_dir) if state_dir is not None else \
        Path(output).with_name(Path(output).name + ".partial") if output is not None else None
    lock = acquire_lock(folder) if folder is not None and state.is_main_process else None
    try:
        done = {}
        if folder is not None:
            done = _open_grid_state(folder, configs, _run_identity(model, task, rows, lambdas, collect_kwargs), fresh,
                                    state, model)
        tables = [done[i] if i in done else
                  collect(model, tokenizer, task, rows, config=config, lambdas=lambdas,
                          output=None if folder is None else folder / f"{i}.npz", **collect_kwargs)
                  for i, config in enumerate(configs)]
        if not state.is_main_process:
            return None
        table = ConfigurationTable.from_tables(tables)
        if output is not None:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            table.save(output)
            if state_dir is None and folder.is_dir():
                shutil.rmtree(folder)  # the output holds every configuration now; the folder was for resuming
        return table
    finally:
        if lock is not None:
            release_lock(lock)


def _run_identity(model, task, rows: list, lambdas, collect_kwargs: dict) -> dict:
    """What every configuration's table of this run records alike (checked on the finished tables read back)."""
    import numpy as np

    from ..fingerprint import model_fingerprint
    from ..tasks import get_task
    from .grid import BATCHED_TIMING, check_batch_thresholds
    from .strategies import default_lambdas

    task = get_task(task)
    batched = check_batch_thresholds(collect_kwargs.get("batch_thresholds"), True)
    return {"model_fingerprint": model_fingerprint(model), "task": task.name,
            "lambdas": np.asarray(default_lambdas() if lambdas is None else lambdas, dtype=np.float64).tolist(),
            "example_ids": [task.example_id(r) for r in rows], "batch_size": collect_kwargs.get("batch_size", 8),
            "max_new_tokens": int(collect_kwargs.get("max_new_tokens") or task.max_new_tokens),
            "max_input_length": int(collect_kwargs.get("max_input_length") or task.max_input_length),
            "timing": BATCHED_TIMING if batched else None}


def _open_grid_state(folder: Path, configs: list, run: dict, fresh: bool, state, model) -> dict:
    """Prepare the state folder; return the finished tables it holds (checked), by configuration index."""
    from ..errors import read_json_object

    grid_file = folder / GRID_STATE_FILENAME
    mine = json.loads(json.dumps({"configurations": [c.to_dict() for c in configs], "run": run}))
    if state.is_main_process and fresh:
        for child in folder.iterdir():
            if child.name.endswith((".npz", ".npz.partial")) or child == grid_file:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    state.wait_for_everyone()
    if grid_file.exists():  # every process checks (and raises) alike
        stored = read_json_object(grid_file, what="the grid of a partial collect run", fix=_FRESH[0].upper() + _FRESH[1:])
        differ = ["configurations"] * (stored.get("configurations") != mine["configurations"]) + sorted(
            k for k in run if (stored.get("run") or {}).get(k) != mine["run"][k])
        if differ:
            raise StateMismatchError(f"the partial results in '{folder}' were collected with other settings "
                                     f"({', '.join(differ)}): {_FRESH}.")
    elif any(folder.glob("*.npz*")):
        raise StateMismatchError(f"the partial results in '{folder}' have no {GRID_STATE_FILENAME}, so nothing shows "
                                 f"which configuration each holds: {_FRESH}.")
    state.wait_for_everyone()
    if state.is_main_process and not grid_file.exists():
        grid_file.write_text(json.dumps(mine, indent=1), encoding="utf-8")
    return {i: _finished(folder / f"{i}.npz", config, run, model) for i, config in enumerate(configs)
            if (folder / f"{i}.npz").is_file()}


def _finished(path: Path, config: EarlyExitConfig, run: dict, model):
    """Configuration ``config``'s table from an earlier run, checked to be what this run would collect."""
    from ..risk.loss_table import LossTable
    from .runner import check_model_matches

    table = LossTable.load(path)  # checked whole, with its digest
    check_model_matches(table, model, path=path)  # the weights, and the meta head the meta measure reads
    expected = json.loads(json.dumps({**run, **config.to_dict()}))
    differ = [k for k, v in expected.items() if json.loads(json.dumps(table.metadata.get(k))) != v]
    if differ:
        raise StateMismatchError(f"'{path}' was collected with other settings ({', '.join(differ)}) than "
                                 f"configuration {config.to_dict()} of this run: {_FRESH}.")
    return table
