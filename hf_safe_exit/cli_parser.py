"""The ``hf-safe-exit`` command line's parser: every subcommand, option and help text (run by :mod:`hf_safe_exit.cli`).

Every option has a help text and every subcommand a description (``tests/test_cli_help.py``). Bad usage raises
:class:`UsageError`, which the CLI reports in one line with exit status 2.
"""

from __future__ import annotations

import argparse

__all__ = ["UsageError", "build_parser"]


class UsageError(Exception):
    """Bad command-line usage (reported in one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message, and no SystemExit from deep inside
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _names(text: str) -> list[str]:
    return [v for v in text.replace(" ", "").split(",") if v]


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _grid_options(p) -> None:
    """collect over a grid of configurations: any of these makes the output a configuration table (Pareto Testing)."""
    p.add_argument("--measures", type=_names, default=None, help="grid: comma-separated confidence measures, e.g. "
                   "meta,softmax_shortlist,saturation. Any grid option (--measures, --schedules, --decay-taus, "
                   "--min-exit-layers, --exit-every) collects every configuration of their product at every λ and "
                   "writes one configuration table (for `calibrate --method pareto`); a setting no grid option spans "
                   "takes its --<setting> value")
    p.add_argument("--schedules", type=_names, default=None, help="grid: comma-separated threshold schedules, from "
                   "constant,decaying")
    p.add_argument("--decay-taus", type=_floats, default=None, help="grid: comma-separated τ of the decaying schedule, "
                   "e.g. 1,2,4,8 (the constant schedule ignores τ)")
    p.add_argument("--min-exit-layers", type=_ints, default=None, help="grid: comma-separated first exit layers "
                   "(1-based), e.g. 1,2")
    p.add_argument("--exit-every", type=_ints, default=None, help="grid: comma-separated k: check every k-th decoder "
                   "layer below the last (1: every layer; 2: layers 2, 4, ...), e.g. 1,2,3")


def _pareto_options(p) -> None:
    """calibrate --method pareto: Pareto Testing's settings."""
    p.add_argument("--p-value", default=None, help="pareto: the p-value of the fixed-sequence test, hoeffding_bentkus "
                   "(default) or wsr")
    p.add_argument("--opt-fraction", type=float, default=None, help="pareto: the share of the examples that finds "
                   "the Pareto front (default 0.5); the rest tests it")
    p.add_argument("--seed", type=int, default=None, help="pareto: the seed of the split into the two parts "
                   "(default 0; recorded, so that the fit can be recomputed)")
    p.add_argument("--cost", default=None, help="pareto: the cost minimised among the certified configurations "
                   "(default layer_fraction, the fraction of decoder blocks run)")


def _selection_options(p) -> None:
    """--bound, --risk and --monotonize: how λ̂ is selected, shared by calibrate and evaluate."""
    p.add_argument("--bound", default="wsr", help="UCB bound (method ucb): wsr (default), hoeffding or "
                   "hoeffding_bentkus")
    p.add_argument("--risk", default="performance_gap",
                   help="performance_gap (default), performance_gap_bounded or consistency")
    p.add_argument("--monotonize", default=None, choices=("per_example",), help="per_example: make each example's "
                   "loss non-increasing in λ before testing (default: none)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hf-safe-exit", description="Risk-controlled early-exit decoding for HuggingFace T5: "
                     "collect calibration losses, calibrate a threshold, evaluate and plot.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("collect", help="decode examples at every threshold of a grid and store per-example losses",
                       description="Decode the examples at every threshold λ of a grid with early exit and store "
                       "their losses (the loss table, .npz) that `calibrate` and `evaluate` read. The work is cut into "
                       "cells, one batch of examples decoded at one λ (the progress bar counts them, batch×λ); each "
                       "finished cell is kept in OUTPUT.partial/, so an interrupted run resumes where it stopped. "
                       "OUTPUT.partial/ is removed once the result file is written.")
    p.add_argument("--model", required=True, help="local model directory (or Hub id) of a T5-family model")
    p.add_argument("--task", required=True, help="cnndm or squad")
    p.add_argument("--data", default=None, help="local data file or folder (e.g. ../shared/data); "
                   "default: download from the Hub")
    p.add_argument("--split", default="pool", help="train, pool (calibration/test pool; default) or all")
    p.add_argument("--n", type=int, default=None, help="number of examples (a seeded random subset of the split); "
                   "default all")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset (default 0)")
    p.add_argument("--exclude-ids", default=None, help="JSON file of example ids to leave out before the subset is "
                   "drawn: a list, or an object with a '<task>_ids' list (e.g. a model's heldout_eval_ids.json), "
                   "so that calibration rows stay disjoint from rows that were used to choose the model; an id "
                   "that is not an example of the split is refused")
    p.add_argument("--lambdas", type=_floats, default=None, help="comma-separated grid incl. 1.0; default 20 levels "
                   "(bild: λ = exp(-rollback) for rollback = inf, 8, 6, ..., 0.1, 0)")
    p.add_argument("--strategy", default="early_exit", choices=("early_exit", "bild"),
                   help="early_exit (default): the exit threshold; bild: BiLD's rollback threshold, "
                   "λ = exp(-rollback), with --model as the large model")
    p.add_argument("--small-model", default=None, help="bild: the small (draft) model directory, same tokenizer")
    p.add_argument("--fallback", type=float, default=None, help="bild: fallback threshold (default 0.6)")
    p.add_argument("--max-draft-len", type=int, default=None, help="bild: tokens drafted per verification "
                   "(default 10)")
    _add_config_options(p)
    _grid_options(p)
    p.add_argument("--batch-size", type=int, default=8, help="examples per generate call (default 8); a cell of "
                   "the progress bar is one batch at one threshold")
    p.add_argument("--time-each-threshold", action="store_true", help="early_exit: decode each threshold in its own "
                   "generate calls, so that the table holds a measured time per threshold (evaluate and card then "
                   "show speed-ups); default: the thresholds of a batch decode as rows of one batch, the encoder "
                   "once (about 3-4x faster; no per-threshold time)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's")
    p.add_argument("--max-input-length", type=int, default=None, help="default: the task's")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype the model is loaded in (default float32); the calibration holds for that dtype")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is available")
    p.add_argument("--output", required=True, help="result file (.npz); partial state in OUTPUT.partial/ (a grid: "
                   "one table per configuration there, <i>.npz)")
    p.add_argument("--fresh", action="store_true", help="discard partial results of an earlier run")
    _overwrite_option(p, "an existing --output file (a finished run's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("calibrate", help="choose the threshold λ̂ for a target risk and save risk_control.json",
                       description="Choose the exit threshold λ̂ from a loss table for a target risk ε with a "
                       "distribution-free guarantee (crc: in expectation; ucb, ltt: with probability 1 - δ) and "
                       "save it as risk_control.json, in the model folder (calibration/<task>/) or --output.")
    p.add_argument("--results", required=True, nargs="+", help="result file written by `collect`; with --method "
                   "pareto a configuration table (collect with grid options) or several 1-D tables of one run's "
                   "examples, stacked")
    p.add_argument("--eps", type=float, required=True, help="target risk ε in (0, 1)")
    p.add_argument("--delta", type=float, default=None, help="failure probability δ (ucb, ltt, pareto)")
    p.add_argument("--method", default="crc", help="selection method: crc (default; in expectation), ucb, ltt (with "
                   "probability 1 - δ), pareto (Pareto Testing: chooses the configuration too, with probability "
                   "1 - δ) or naive (no guarantee)")
    _selection_options(p)
    _pareto_options(p)
    p.add_argument("--model", default=None, help="the model directory: checks that the results belong to it; "
                   "without --output, the calibration is stored in it (as with --store-in-model)")
    p.add_argument("--output", default=None, help="also write risk_control.json into this directory")
    p.add_argument("--store-in-model", action="store_true", help="store risk_control.json and the loss table "
                   "(early_exit_calibration.npz; pareto: early_exit_configurations.npz) in the model directory under "
                   "calibration/<task>/, where RiskControlled(eps=..., task=...) fits any ε from it and the demo and "
                   "model card find it; the other kind of table stored there is kept")
    p.add_argument("--task", default=None, help="the task to store the calibration under (default: the one the "
                   "results were collected on)")
    p.add_argument("--primary", action="store_true", help="make this task the one a bare RiskControlled(eps) uses "
                   "(the first task stored is primary by default)")
    p.add_argument("--allow-missing-fingerprint", action="store_true", help="accept results that do not record the "
                   "model they were collected on (no model_fingerprint) for --model: only if you know they were")
    _overwrite_option(p, "an existing --output calibration, or the model's calibration of the task (risk_control.json, "
                      "the table of the same kind, and evaluation.json unless the 1-D table it evaluated is kept)")

    p = sub.add_parser("evaluate", help="repeated random calibration/test splits: test risk, exit layer, speed-up",
                       description="Split the examples of a loss table at random into calibration and test parts, "
                       "--repeats times; on each split fit λ̂ per method and ε on the calibration part and measure "
                       "test risk, violations, exit layer and speed-up per token on the test part.")
    p.add_argument("--results", required=True, help="result file written by `collect` (on the pool)")
    p.add_argument("--eps", type=_floats, default=None, help="comma-separated ε (default 0.01,0.02,0.05,0.1,0.15,0.2)")
    p.add_argument("--methods", type=_names, default=None, help="comma-separated selection methods, from: crc, ucb, "
                   "ltt, naive (default crc,ucb,ltt)")
    p.add_argument("--delta", type=float, default=0.1, help="δ for ucb and ltt (default 0.1)")
    _selection_options(p)
    p.add_argument("--n-cal", type=int, default=None, help="calibration examples per split (default half)")
    p.add_argument("--repeats", type=int, default=100, help="random splits (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random splits (default 0)")
    p.add_argument("--output", required=True, help="JSON file for the results")
    _overwrite_option(p, "an existing --output file")

    p = sub.add_parser("plot", help="PNG figures from an evaluation: risk, exit layer and speed-up vs ε",
                       description="Three PNG figures of the repeated-split procedure in an evaluation: test risk, "
                       "mean exit layer (BiLD: large-model calls per token) and speed-up against the target risk ε, "
                       "one line per method, with n_cal, n_test and the number of splits on each figure.")
    p.add_argument("--evaluation", required=True, help="JSON written by `evaluate`")
    p.add_argument("--output-dir", required=True, help="folder for risk_vs_eps.png, exit_layer_vs_eps.png (or "
                   "large_calls_vs_eps.png) and speedup_vs_eps.png (created if missing; files there are replaced)")

    p = sub.add_parser("card", help="write or update the model card (README.md) with the risk guarantee",
                       description="Write the guarantee of one calibration into the model card: one section per "
                       "task, model-index results on the dataset's real split, the calibration, evaluation and plots "
                       "beside it. An existing calibration, evaluation or plot of other content is only replaced "
                       "with --overwrite.")
    p.add_argument("--model", required=True, help="model directory (its README.md is written) or a .md file")
    p.add_argument("--calibration", default=None, help="risk_control.json or its directory (default: the model's); "
                   "run once per task (e.g. DIR/calibration/cnndm, then DIR/calibration/squad): each task gets its "
                   "own section")
    p.add_argument("--evaluation", default=None, help="JSON written by `evaluate` on the calibration's loss table: "
                   "the repeated-split procedure (test risk, violations, exit layers, speed-up per token)")
    p.add_argument("--results", default=None, help="the loss table (.npz from `collect`) the calibration was fitted "
                   "on, for what the shipped λ̂ does against the full model on its examples (default: "
                   "early_exit_calibration.npz beside the calibration, if there)")
    p.add_argument("--plots", nargs="*", default=[], help="images to show in the card (e.g. from `plot`)")
    p.add_argument("--hardware", default=None, help="where the times were measured ('auto': this machine)")
    p.add_argument("--split", default=None, help="which rows calibrated it, in words, for the card's text (default: "
                   "from the loss table, e.g. 'validation rows 500–899 (the calibration/test pool)'); the "
                   "model-index split is always the dataset's own (validation)")
    p.add_argument("--model-name", default=None, help="name in the model-index metadata (default: the card's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing calibration, evaluation or plot of "
                   "other content (without it the card refuses, naming the file)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also upload card + calibration there "
                   "(the same --overwrite rule applies to the repo's files)")

    _monitor_parser(sub)

    from .demo import build_parser as _demo_parser

    demo_help = ("summarise an article and answer a question with risk-controlled early exit on the shipped default "
                 "model, tokens coloured by exit layer")
    _demo_parser(sub.add_parser("demo", help=demo_help, description=demo_help[0].upper() + demo_help[1:] + ", with the "
                                "full model's output and time per token beside it (offline)."))
    return parser


def _monitor_parser(sub) -> None:
    p = sub.add_parser("monitor", help="replay a stream, then a shifted one, through a RiskMonitor: e-value, risk "
                       "bound and alarm over time", description="Replay the task's pool rows (seeded random order, "
                       "the calibration's own rows left out), then a shifted stream, through a RiskMonitor watching "
                       "RiskControlled(eps) fitted on the model's stored calibration; print the evidence at "
                       "checkpoints and when the alarm fired, and write the log, a plot and the monitor's state.")
    p.add_argument("--model", default=None, help="model directory with a stored calibration (default: the shipped "
                   "default model)")
    p.add_argument("--task", required=True, help="the calibration's task: cnndm or squad")
    p.add_argument("--data", default=None, help="local data file or folder (e.g. ../shared/data); default: download "
                   "from the Hub")
    p.add_argument("--eps", type=float, default=0.2, help="target risk ε of the policy and of the monitor's test "
                   "(default 0.2)")
    p.add_argument("--delta", type=float, default=None, help="failure probability δ of the calibration (ucb, ltt; "
                   "default 0.1)")
    p.add_argument("--method", default="ucb", help="selection method of λ̂: ucb (default), crc, ltt or naive")
    p.add_argument("--risk", default="consistency", choices=("consistency", "performance_gap"),
                   help="the monitored risk: consistency (default; label-free shadow decodes) or performance_gap "
                   "(the sampled pairs are scored against the stream's references through monitor.record)")
    p.add_argument("--sample-rate", type=float, default=0.2, help="probability p in (0, 1] that a row is also decoded "
                   "by the full model (default 0.2)")
    p.add_argument("--sample", default="row", choices=("row", "call"), help="what --sample-rate applies to: row "
                   "(default; each row of a call independently) or call (all rows of a call together)")
    p.add_argument("--alpha", type=float, default=0.05, help="level α of the anytime-valid test: P(any false alarm) "
                   "<= α (default 0.05)")
    p.add_argument("--n", type=int, default=100, help="rows of the task's pool replayed first (default 100)")
    p.add_argument("--shift", default="other-task", choices=("other-task", "noise", "lowercase", "none"),
                   help="the second phase: other-task (the other task's pool inputs; default), noise (the task's rows "
                   "with 30%% of the article's or context's words replaced by random words of the same text), "
                   "lowercase (the task's rows with the article or context lowercased) or none")
    p.add_argument("--shift-n", type=int, default=None, help="rows of the shifted phase (default: --n)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per generate call (default 8); --sample says whether "
                   "the rows of a call are sampled one by one or together")
    p.add_argument("--seed", type=int, default=0, help="seed of the stream's order, the noise and the monitor's "
                   "sampling (default 0)")
    p.add_argument("--no-fallback", action="store_true", help="keep early exit on after an alarm (default: fall back "
                   "to the full model, λ = 1)")
    p.add_argument("--output", default=None, help="JSON log: per call the losses fed, running mean, confidence "
                   "sequence, e-value and alarm")
    p.add_argument("--plot", default=None, help="PNG of the running mean with its confidence sequence and of the "
                   "e-value over calls (needs matplotlib)")
    p.add_argument("--state", default=None, help="write the monitor's final state here (RiskMonitor.load continues "
                   "from it)")
    _overwrite_option(p, "existing --output, --plot or --state files")


def _add_config_options(p) -> None:
    """One ``--<setting>`` option per field of :class:`~hf_safe_exit.EarlyExitConfig` (its help text and type)."""
    from .config import EarlyExitConfig

    for name, options in EarlyExitConfig.cli_options().items():
        p.add_argument("--" + name.replace("_", "-"), default=None, **options)


def _overwrite_option(p, what: str) -> None:
    p.add_argument("--overwrite", action="store_true", help=f"replace {what}; without it the command refuses, "
                   "naming the file")

