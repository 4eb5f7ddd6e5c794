"""``hf-safe-exit`` (also ``python -m hf_safe_exit``): collect, calibrate, evaluate, plot, card, demo, monitor.

::

    hf-safe-exit collect   --model DIR --task cnndm --data ../shared/data --n 200 --output cnndm.npz
    hf-safe-exit collect   --strategy bild --model LARGE --small-model SMALL --task cnndm ... --output bild.npz
    hf-safe-exit calibrate --results cnndm.npz --eps 0.05 --method crc --model DIR        # -> DIR/risk_control.json
    hf-safe-exit collect   ... --measures meta,saturation --min-exit-layers 1,2 --output grid.npz  # a grid
    hf-safe-exit calibrate --results grid.npz --method pareto --eps 0.05 --delta 0.1 --model DIR  # its configuration
    hf-safe-exit evaluate  --results cnndm.npz --eps 0.02,0.05,0.1 --output eval.json     # + a table on stdout
    hf-safe-exit plot      --evaluation eval.json --output-dir figures/
    hf-safe-exit card      --model DIR --evaluation eval.json --plots figures/*.png --hardware auto  # README.md
    hf-safe-exit card      --model DIR --calibration DIR/calibration/squad ...   # + a section per task
    hf-safe-exit demo      [--text TEXT | --file FILE] [--question Q]    # the shipped default model, offline
    hf-safe-exit monitor   --model DIR --task cnndm --data ../shared/data --shift other-task --output log.json

Several processes / GPUs: ``accelerate launch -m hf_safe_exit collect ...`` (one result file).
Errors print one line to stderr and exit with status 2; set ``HF_SAFE_EXIT_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import warnings
from pathlib import Path

from .cli_grid import describe_fit, grid_from_args, load_results, print_grid_summary, provenance_of, replaced_files
from .cli_parser import UsageError, build_parser
from .config import EarlyExitConfig, config_fields

__all__ = ["main", "build_parser"]

_DEBUG_ENV = "HF_SAFE_EXIT_DEBUG"


# ------------------------------------------------------------------------------------------- helpers
def _load_model(path: str, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    import hf_safe_exit

    path = os.fspath(path)
    if not os.path.isdir(path) and not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", path):
        raise FileNotFoundError(f"no model directory at '{path}': pass a local model directory (config.json, weights, "
                                "tokenizer) or a Hub model id.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"could not load a model and tokenizer from '{path}' ({first}): pass a local model "
                                "directory (config.json, weights, tokenizer) or a reachable Hub model id.") from None
    return tokenizer, hf_safe_exit.enable(model.eval())


def _load_table(path: str):
    from .risk.loss_table import LossTable

    if not os.path.exists(path):
        raise FileNotFoundError(f"no results file at '{path}': write one with `hf-safe-exit collect ... --output {path}`.")
    return LossTable.load(path)  # a CalibrationFileError naming the file and the fix when it is not a loss table


def _subset(dataset, n: int | None, seed: int):
    import numpy as np

    if n is None or n >= len(dataset):
        return dataset
    if n < 1:
        raise ValueError(f"--n {n} must be at least 1.")
    index = np.sort(np.random.default_rng(seed).choice(len(dataset), size=n, replace=False))
    return dataset.select(index.tolist())


def _excluded_ids(path: str, task: str) -> set[str]:
    """The ids in an ``--exclude-ids`` file: a JSON list, or an object holding a ``"<task>_ids"`` list."""
    import json

    from .errors import CorruptFileError

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--exclude-ids: no file at '{path}'.")
    expected = (f"Pass a non-empty JSON list of ids, or an object with a '{task}_ids' list (like a model's "
                "heldout_eval_ids.json)")
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError.about(path, f"--exclude-ids: not JSON ({err})", expected) from None
    ids = content.get(f"{task}_ids") if isinstance(content, dict) else content
    if not isinstance(ids, list) or not ids:
        raise CorruptFileError.about(path, "--exclude-ids: no list of ids in it", expected)
    # an id is a string or a whole number: anything else ({"id": 1}, null, 1e400) would silently exclude nothing
    bad = [i for i in ids if not (isinstance(i, str) or (isinstance(i, int) and not isinstance(i, bool)))]
    if bad:
        raise CorruptFileError.about(path, f"--exclude-ids: {bad[:3]!r} are not ids (strings or whole numbers)",
                                     expected)
    return {str(i) for i in ids}


def _check_excluded_ids(path: str, drop: set[str], data, where: str) -> None:
    """Refuse ids that are no example of ``data``: an id that matches nothing would exclude nothing, silently (a
    typo, a deleted id, the ids of another split or task)."""
    from .errors import CorruptFileError

    unknown = sorted(drop - {str(i) for i in data["id"]})
    if unknown:
        raise CorruptFileError.about(path, f"--exclude-ids: {len(unknown)} of its {len(drop)} ids are no example of "
                                     f"{where} (e.g. {unknown[:3]!r}): they would exclude nothing",
                                     "List ids of examples of that split (a model's heldout_eval_ids.json lists pool "
                                     "rows), or drop those ids")


def _print_collect_summary(table) -> None:
    import numpy as np

    from .calibration.grid import BATCHED_TIMING

    lam = table.lambdas
    wall = table.extras["wall_time"]
    full = int(np.argmin(np.abs(lam - 1.0)))
    bild = "large_calls_per_token" in table.extras
    batched = table.metadata.get("timing") == BATCHED_TIMING
    cost = f"{'rollback':>9} {'large/tok':>9}" if bild else f"{'exit layer':>10} {'layers':>7}"
    print(f"{'lambda':>8} {'task loss':>10} {'gap':>9} {'consist.':>9} {cost} {'seconds':>8} {'speedup':>8}")
    for k in np.argsort(lam):
        if bild:
            rollback = -np.log(lam[k]) if lam[k] > 0 else np.inf
            cost = f"{rollback:>9.3g} {table.extras['large_calls_per_token'][k].mean():>9.3f}"
        else:
            cost = (f"{table.extras['mean_exit_layer'][k].mean():>10.2f} "
                    f"{table.extras['layer_fraction'][k].mean():>7.3f}")
        timing = (f"{'—':>8} {'—':>8}" if batched else
                  f"{wall[k]:>8.2f} {wall[full] / wall[k] if wall[k] > 0 else float('nan'):>8.2f}")
        print(f"{lam[k]:>8.4g} {table.extras['task_loss'][k].mean():>10.4f} "
              f"{table.losses['performance_gap'][k].mean():>+9.4f} {table.losses['consistency'][k].mean():>9.4f} "
              f"{cost} {timing}")
    if batched:
        print("(no time per threshold: they were decoded as rows of one batch; --time-each-threshold measures them)")


# ------------------------------------------------------------------------------------------- commands
def _config_options(args) -> dict:
    """The early-exit settings given as ``--<setting>`` options (unset ones take the configuration's defaults)."""
    return {k: getattr(args, k) for k in config_fields() if getattr(args, k) is not None}


def _cmd_collect(args) -> int:
    import torch

    from .lazy import require

    PartialState = require("accelerate", "hf-safe-exit collect").PartialState

    from .calibration.runner import collect
    from .tasks import get_task, load_split

    _refuse_existing(Path(args.output), args.overwrite, "the result of a finished collect run")
    task = get_task(args.task)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be at least 1.")
    bild = args.strategy == "bild"
    if bild and not args.small_model:
        raise UsageError("--strategy bild needs --small-model DIR (the small draft model; --model is the large one).")
    if not bild and (args.small_model or args.fallback is not None or args.max_draft_len is not None):
        raise UsageError("--small-model, --fallback and --max-draft-len are for --strategy bild.")
    settings = _config_options(args)
    grid = grid_from_args(args, settings)  # None unless a grid option (--measures, ...) is given
    if bild and settings:
        raise UsageError(f"--{next(iter(settings)).replace('_', '-')} is an early-exit setting: drop it for "
                         "--strategy bild.")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    state = PartialState(cpu=args.cpu or (world > 1 and not torch.cuda.is_available()))
    data = load_split(task, args.split, path=args.data)
    excluded = 0
    if args.exclude_ids:
        drop = _excluded_ids(args.exclude_ids, task.name)
        _check_excluded_ids(args.exclude_ids, drop, data, f"the {args.split} split of {task.name}")
        before = len(data)
        data = data.filter(lambda example: str(example["id"]) not in drop)
        excluded = before - len(data)
        if len(data) == 0:
            raise ValueError(f"--exclude-ids '{args.exclude_ids}' leaves no example of the {args.split} split.")
    data = _subset(data, args.n, args.seed)
    tokenizer, model = _load_model(args.model, args.dtype)
    model.to(state.device)
    source = os.fspath(args.data) if args.data else task.hub_id
    metadata = {"split": args.split, "subset_seed": args.seed, "data_source": source,
                "model_path": os.fspath(args.model)}
    if args.exclude_ids:
        metadata["excluded_ids"] = {"file": os.fspath(args.exclude_ids), "n_excluded": excluded}
    factory = None
    if bild:
        from .decoding.bild import DEFAULT_FALLBACK, DEFAULT_MAX_DRAFT_LEN, bild_policy_factory

        small_tokenizer, small = _load_model(args.small_model, args.dtype)
        small.to(state.device)
        factory = bild_policy_factory(
            small, fallback=DEFAULT_FALLBACK if args.fallback is None else args.fallback,
            max_draft_len=DEFAULT_MAX_DRAFT_LEN if args.max_draft_len is None else args.max_draft_len,
            small_tokenizer=small_tokenizer)
        metadata["small_model_path"] = os.fspath(args.small_model)
    run = dict(lambdas=args.lambdas, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
               max_input_length=args.max_input_length, output=args.output, fresh=args.fresh,
               progress=not args.no_progress, metadata=metadata,
               batch_thresholds=False if args.time_each_threshold else None)
    if grid is not None:
        from .calibration.configuration_grid import collect_grid

        table = collect_grid(model, tokenizer, task, data, grid, **run)
        if state.is_main_process:
            print_grid_summary(table)
            print(f"wrote {args.output} ({table.n} examples × {table.num_configurations} (configuration, λ) rows)")
        _close_processes(state)
        return 0
    table = collect(model, tokenizer, task, data, config=None if bild else EarlyExitConfig.from_dict(settings),
                    policy_factory=factory, **run)
    if state.is_main_process:
        _print_collect_summary(table)
        print(f"wrote {args.output} ({table.n} examples × {table.lambdas.size} thresholds)")
    _close_processes(state)
    return 0


def _close_processes(state) -> None:
    """Under ``accelerate launch``: every process waits, then the process group is destroyed. A gloo group left
    for the interpreter's exit can abort a process ("terminate called without an active exception"), which fails
    the launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        state.wait_for_everyone()
        dist.destroy_process_group()


def _refuse_existing(path: Path, overwrite: bool, what: str) -> None:
    """Raise :class:`~hf_safe_exit.errors.WouldOverwriteError` if ``path`` exists and ``--overwrite`` was not given."""
    from .errors import WouldOverwriteError

    if Path(path).exists() and not overwrite:
        raise WouldOverwriteError(f"'{path}' exists ({what}): pass --overwrite to replace it, or write elsewhere.")


def _cmd_calibrate(args) -> int:
    from .calibration.runner import check_model_matches
    from .risk import RISK_CONTROL_FILENAME, LossTable, RiskControlled, calibration_dir, store_calibration
    from .risk.stored_fit import check_table_settings

    table = load_results(args.results, args.method)  # pareto: a configuration table (or 1-D tables stacked)
    if isinstance(table, LossTable):
        check_table_settings(table, args.results[0])  # a measure the CLI cannot rebuild is the file's problem, named
    store = args.store_in_model or (args.output is None and args.model is not None)
    if args.output is not None:
        _refuse_existing(Path(args.output) / RISK_CONTROL_FILENAME, args.overwrite, "a calibration")
    task = args.task or table.metadata.get("task")  # store_calibration refuses a table without one, naming the fix
    stored = calibration_dir(args.model, task) if store and task and args.model is not None else None
    replaced = replaced_files(stored, table) if stored is not None else []  # the other kind of table is kept
    if replaced:  # refused before anything is written
        _refuse_existing(stored, args.overwrite, "the model's calibration of this task: "
                         + ", ".join(p.name for p in replaced))
    if args.output is None and args.model is None:
        raise UsageError("say where to write the calibration: pass --model DIR (stored under DIR/calibration/<task>/) "
                         "or --output DIR.")
    if args.store_in_model and args.model is None:
        raise UsageError("--store-in-model needs --model DIR.")
    if args.model is not None:
        _, model = _load_model(args.model)
        check_model_matches(provenance_of(table), model, allow_missing=args.allow_missing_fingerprint,
                            path=", ".join(args.results))
    rc = RiskControlled(args.eps, delta=args.delta, method=args.method, bound=args.bound, risk=args.risk,
                        monotonize=args.monotonize, p_value=args.p_value, opt_fraction=args.opt_fraction,
                        seed=args.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc.fit_table(table, cost=args.cost)
    for w in caught:
        print(f"hf-safe-exit calibrate: warning: {' '.join(str(w.message).split())}", file=sys.stderr)
    print(describe_fit(rc, args.method, args.risk))
    if args.output is not None:
        print(f"wrote {rc.save_pretrained(args.output)}")
    if store:
        for path in replaced:  # --overwrite replaces the task's calibration of this kind, never half of it
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        for path in store_calibration(args.model, table=table, controlled=rc, task=args.task,
                                      primary=True if args.primary else None):
            print(f"wrote {path}")
    return 0


def _cmd_evaluate(args) -> int:
    from .calibration.evaluate import DEFAULT_EPS, DEFAULT_METHODS, evaluate_table, format_table, write_evaluation

    _refuse_existing(Path(args.output), args.overwrite, "an evaluation")
    table = _load_table(args.results)
    result = evaluate_table(table, eps=args.eps or DEFAULT_EPS, methods=args.methods or DEFAULT_METHODS,
                            delta=args.delta, bound=args.bound, risk=args.risk, n_cal=args.n_cal,
                            repeats=args.repeats, seed=args.seed, monotonize=args.monotonize, source=args.results)
    result["results_file"] = os.fspath(args.results)
    write_evaluation(result, args.output)  # with its digest; never a NaN or Infinity token: evaluate_table has none
    print(format_table(result))
    print(f"wrote {args.output}")
    return 0


def _cmd_plot(args) -> int:
    from .calibration.evaluate import read_evaluation
    from .plotting import plot_evaluation

    path = Path(args.evaluation)
    if not path.is_file():
        raise FileNotFoundError(f"no evaluation file at '{path}': write one with `hf-safe-exit evaluate ... --output {path}`.")
    evaluation = read_evaluation(path)  # a CorruptFileError naming the file when it is not an evaluation
    for p in plot_evaluation(evaluation, args.output_dir):
        print(f"wrote {p}")
    return 0


def _cmd_card(args) -> int:
    from .cards import calibration_directory, push_to_hub
    from .cards.write import write_card
    from .risk import CALIBRATION_FILENAME, CONFIGURATIONS_FILENAME, RISK_CONTROL_FILENAME, RiskControlled
    from .risk.certificate import PARETO

    model = Path(args.model)
    model_dir = model.parent if model.suffix.lower() == ".md" else model
    source = Path(args.calibration or model_dir)
    rc = RiskControlled.from_pretrained(source)
    table = args.results
    # a pareto calibration was fitted on the configuration table: that is the one its card draws
    name = CONFIGURATIONS_FILENAME if rc.certificate.method == PARETO else CALIBRATION_FILENAME
    beside = (source if source.is_dir() else source.parent) / name
    if table is None and args.calibration and beside.is_file():
        table = beside
    kwargs = dict(test_results=args.evaluation, table=table, plots=args.plots, hardware=args.hardware,
                  calibration_split=args.split, overwrite=args.overwrite)
    path, plan = write_card(model, rc, model_name=args.model_name, **kwargs)
    print(f"wrote {path} (section of task {rc.certificate.task!r}; λ̂ = {rc.threshold:.6g}; {rc.certificate.guarantee})")
    saved = calibration_directory(path.parent, rc.certificate.task) / RISK_CONTROL_FILENAME
    if saved not in plan.writes:
        print(f"kept {saved} (it holds this calibration)")
    for written in plan.writes:
        print(f"wrote {written}")
    for removed in plan.removals:
        print(f"removed {removed} (it described the calibration that was replaced)")
    if args.push_to_hub:
        print(f"pushed: {push_to_hub(rc, args.push_to_hub, model_name=args.model_name, **kwargs)}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_from_args

    return run_from_args(args)


def _cmd_monitor(args) -> int:
    from .models import default_model_path
    from .monitor.replay import replay_from_args

    for path, what in ((args.output, "a replay log"), (args.plot, "a figure"), (args.state, "a monitor state")):
        if path:  # refused before the model loads and the stream decodes
            _refuse_existing(Path(path), args.overwrite, what)
    tokenizer, model = _load_model(args.model or os.fspath(default_model_path()))
    return replay_from_args(args, model, tokenizer)


def _quiet_libraries() -> None:
    """Keep stderr for our own progress bar and one-line errors: no per-file bars or info logs from HF libraries."""
    try:
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


_COMMANDS = {"collect": _cmd_collect, "calibrate": _cmd_calibrate, "evaluate": _cmd_evaluate, "plot": _cmd_plot,
             "card": _cmd_card, "demo": _cmd_demo, "monitor": _cmd_monitor}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 error: one line on stderr)."""
    parser = build_parser()
    command = "hf-safe-exit"
    _quiet_libraries()
    try:
        args = parser.parse_args(argv)
        command = f"hf-safe-exit {args.command}"
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"{command}: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI reports every failure in one line
        if os.environ.get(_DEBUG_ENV):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
