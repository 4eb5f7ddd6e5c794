"""Fuzz every file hf_safe_exit reads (issue 26): nothing well-formed but wrong gets through.

Each artifact of a freshly calibrated tiny model (two tasks, measure ``meta``, a meta head, an evaluation, a policy
stored in ``generation_config.json``, a resumable collect state, an ``--exclude-ids`` file) is mutated with the
seeded mutations of ``tests/fuzz_mutations.py`` (truncations, random bytes, every JSON leaf replaced or deleted,
arrays and tensors of a wrong shape or dtype or with a NaN) and with forged edits that look consistent (λ̂ and the
certificate changed together, the task folders swapped, another model's table or another seed's meta head copied
in). Each mutated file goes through the Python entry points, ``generate`` and the CLI that read it.

The oracle (``fuzz_mutations.judge_python`` / ``judge_cli``), per entry point:

* refused: a ``CalibrationFileError`` whose message names the mutated file (CLI: exit status 2, one stderr line
  naming it, no traceback); a calibration file is named with its task's folder (``cnndm/risk_control.json``), since a
  model has one per task, and a generic mention in a fix (``<task>/risk_control.json``) names nothing
  (``fuzz_mutations.names_file``);
* accepted: only with the result of the unmutated file (λ̂, certificate, configuration and fingerprints; tokens and
  exit layers; the card's text), and only for a mutation listed in :data:`DOCUMENTED` with the reason;
* anything else fails: another exception, a different result, a hang (20 s per call), an undocumented acceptance.

Cheap Python readers see every mutation; ``generate``, ``policy_for`` (they load the model) and the CLI see a
seeded sample of them (every forged edit and whole-file mutation, then leaf mutations drawn with a fixed seed).
Each test reports its counts; a failing one lists every failure, grouped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import hf_safe_exit
from hf_safe_exit.calibration.evaluate import read_evaluation
from hf_safe_exit.calibration.state import open_state
from hf_safe_exit.confidence import MetaClassifierHead, MetaHeadConfig
from hf_safe_exit.digest import with_digest
from hf_safe_exit.risk import Calibration, LossTable, RiskControlled, RiskController, clear_cache, find_stored
from hf_safe_exit.tasks import get_task, load_split, shared_data_dir

from collect_helpers import interrupted_after
from fuzz_mutations import (Mutation, byte_mutations, canonical, documented_by, file_mutations, json_mutations,
                            no_unpickling, npz_mutations, read_npz, run_cli, run_mutations, tensor_mutations, write_npz,
                            write_to)
from tiny_calibration import save_tiny_t5

DATA = shared_data_dir()
pytestmark = [pytest.mark.skipif(DATA is None, reason="offline data folder ../shared/data is absent"),
              pytest.mark.usefixtures("one_thread")]

EPS = 0.3
IDS = [[5, 6, 7, 8, 9, 1]]
SEED = 26
CALIBRATE = ["--n", "6", "--lambdas", "0,0.5,0.9,1", "--batch-size", "3", "--max-new-tokens", "5",
             "--max-input-length", "40", "--no-progress", "--measure", "meta"]
SMALL = ["--task", "cnndm", "--n", "4", "--lambdas", "0.5,1", "--batch-size", "2", "--max-new-tokens", "3",
         "--max-input-length", "30", "--no-progress", "--measure", "softmax"]
TIMING = ("example_time", "wall_time")  # measured anew by every run: not part of a collect's result

NPZ = "model/calibration/cnndm/early_exit_calibration.npz"
RC = "model/calibration/cnndm/risk_control.json"
EVALUATION = "model/calibration/cnndm/evaluation.json"
STORE_CONFIG = "model/calibration/config.json"
GENERATION_CONFIG = "model/generation_config.json"
HEAD = "model/meta_head.safetensors"
HEAD_CONFIG = "model/meta_head_config.json"
STATE = "state/out.npz.partial"
CELLS = STATE + "/cells-000-of-001.jsonl"
EXCLUDE = "exclude.json"
# what a refusal must name: a calibration file with its task's folder (a model has one per task; or its quoted base
# name, for a file known by its name only), a file a model has one of by its name, collect's state by its folder
TABLE_NAME, EVALUATION_NAME = "cnndm/early_exit_calibration.npz", "cnndm/evaluation.json"
RC_NAMES = ("cnndm/risk_control.json", "rc_alone/risk_control.json")

# Mutations accepted with the unmutated file's result, and why that is right: (artifact, mutation pattern, reason).
DOCUMENTED = [
    ("*", "*unchanged, re-encoded*", "the same content written again (JSON re-indented with its keys reversed, or the "
     "same arrays zipped again) is the same file"),
    ("risk_control.json", "hf_safe_exit_version *", "informational: which release wrote the file; format_version "
     "says how to read it"),
    ("*", "*format_version = 0", "format 0 is a file written before format numbers, read as such"),
    ("*", "*format_version deleted", "no format_version: a file written before format numbers, read as format 0"),
    ("early_exit_calibration.npz", "header_json bounds = {}", "bounds left out are the defaults (DEFAULT_LOSS_BOUNDS), "
     "which these are"),
    *(("early_exit_calibration.npz", f"header_json bounds{key} deleted", "bounds left out are the defaults "
       "(DEFAULT_LOSS_BOUNDS), which these are") for key in ("", ".performance_gap", ".performance_gap_bounded",
                                                              ".consistency")),
    *(("risk_control.json", f"params.{key} deleted", "a request parameter left out takes RiskController's default, "
       "which is the value stored") for key in ("delta", "method", "bound", "risk", "monotonize")),
    ("risk_control.json", "calibration.exit_layers deleted", "a setting left out takes its default "
     "(EarlyExitConfig.from_dict: a file written before the setting existed), which is the value stored"),
    ("risk_control.json", "calibration.anytime deleted", "a setting left out takes its default, which is the value "
     "stored"),
    *(("risk_control.json", f"{where}.{key} {change}", reason) for key in ("max_new_tokens", "max_input_length")
      for change in ("= null", "deleted") for where, reason in (
          ("certificate", "the lengths are read from 'calibration'; the certificate's copy stands in only for files "
           "that lack them there"),
          ("calibration", "alone, the certificate's copy of the lengths stands in (files of either age); beside its "
           "table, the refit is compared"))),
    *(("generation_config.json", f"early_exit.{key} deleted", "a RiskControlled parameter left out of the spec takes "
       "its default, which is the value stored") for key in ("delta", "method", "bound", "risk", "monotonize", "config",
                                                              "allow_missing_fingerprint")),
    *(("generation_config.json", f"early_exit.task {change}", "no task: the model's primary task, which is the one "
       "stored (cnndm)") for change in ("= null", "deleted")),
    ("generation_config.json", "early_exit.allow_missing_fingerprint = true", "the opt-out matters only for a "
     "calibration that records no model; this one records it, and it is checked"),
    ("meta head", "meta_head_config.json: hidden_size deleted", "a head setting left out takes MetaHeadConfig's "
     "default, which is the value stored"),
    ("meta head", "meta_head_config.json: dropout deleted", "a head setting left out takes MetaHeadConfig's default, "
     "which is the value stored"),
    ("collect state", "cells-000-of-001.jsonl: empty file", "no finished cells: every cell is decoded again, with the "
     "same result"),
    ("collect state", "cells-000-of-001.jsonl: truncated to *", "a torn last line is a write that was cut off: it is "
     "dropped and its cell decoded again, with the same result"),
    *(("collect state", f"config.json: {key} deleted", "a setting left out of the state reads as null, which is this "
       "run's value of it") for key in ("anytime", "exit_layers")),
    # a file without a digest is one written before digests (hf_safe_exit/digest.py): read as such, its content
    # checked as any file's; here its content is the original's
    *((artifact, f"{prefix}digest {change}", "no digest: read as a file written before digests; its content checks "
       "apply, and its content is the original's") for artifact, prefix in (
          ("risk_control.json", ""), ("evaluation.json", ""), ("early_exit_calibration.npz", "header_json "))
      for change in ("= null", "deleted")),
    ("collect state", "cells-000-of-001.jsonl: first cell digest *", "a cell without a digest is read as one written "
     "before digests; its content is checked against this run (λ, ids, costs), and it is the original's"),
]


# ============================================================================================ the originals
def _fixed_bytes(path: Path) -> None:
    """Rewrite a loss table with fixed times (1 ms per layer an example ran), through LossTable.save (its digest
    then covers them; numpy dates every zip member 1980), so that the same bytes are mutated in every run."""
    table = LossTable.load(path)
    table.extras["example_time"] = 1e-3 * table.extras["mean_exit_layer"]
    table.extras["wall_time"] = table.extras["example_time"].sum(axis=1)
    table.save(path)


def _collect(model: str, task: str, output: str) -> None:
    assert run_cli(["collect", "--model", model, "--data", str(DATA), "--task", task, "--output", output,
                    *CALIBRATE])[0] == 0
    _fixed_bytes(Path(output))


def _evaluate(table: str, output: str) -> None:
    assert run_cli(["evaluate", "--results", table, "--eps", "0.1,0.3", "--methods", "crc,ucb", "--repeats", "5",
                    "--output", output])[0] == 0


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """Every artifact, made by the library itself from a tiny random T5 (float32) with a meta head, in ``base/``:
    ``model/`` (calibrated for cnndm, primary, and squad at ε = 0.3 with measure meta; cnndm's evaluation.json; a
    RiskControlled(ε = 0.3, task="cnndm") stored on its generation config), ``state/out.npz.partial/`` (a collect
    interrupted after 2 of its 4 cells) and ``exclude.json``; plus, for forged edits, another model's loss table,
    calibration and evaluation, squad's evaluation, and a meta head of another seed. Made with relative paths and fixed
    times (``_fixed_bytes``), so that every run mutates the same bytes."""
    from transformers import AutoModelForSeq2SeqLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("fuzz")
    base = root / "base"
    rows = {t: load_split(get_task(t), "pool", path=DATA).select(range(30)) for t in ("cnndm", "squad")}
    texts = [get_task(t).prompt(r) for t in rows for r in rows[t]] + list(rows["cnndm"]["highlights"])
    model_dir = save_tiny_t5(base / "model", texts, seed=0)
    torch.manual_seed(1)
    MetaClassifierHead(MetaHeadConfig(d_model=16)).save_pretrained(model_dir)
    model = hf_safe_exit.enable(AutoModelForSeq2SeqLM.from_pretrained(model_dir))
    model.generation_config.early_exit = RiskControlled(eps=EPS, task="cnndm")
    model.save_pretrained(model_dir)  # the policy is written as its JSON spec
    other = save_tiny_t5(root / "other", texts, seed=1)  # another model of the same shape, with the same head
    shutil.copy(base / HEAD, other)
    shutil.copy(base / HEAD_CONFIG, other)
    with contextlib.chdir(root):
        for task in ("cnndm", "squad"):
            _collect("base/model", task, f"{task}.npz")
            assert run_cli(["calibrate", "--results", f"{task}.npz", "--eps", str(EPS), "--model", "base/model",
                            "--store-in-model"])[0] == 0
            _fixed_bytes(base / f"model/calibration/{task}/early_exit_calibration.npz")
        _evaluate("cnndm.npz", EVALUATION.replace("model/", "base/model/"))
        _collect("other", "cnndm", "other.npz")
        assert run_cli(["calibrate", "--results", "other.npz", "--eps", str(EPS), "--output", "other_rc"])[0] == 0
        _evaluate("squad.npz", "squad_evaluation.json")
        _evaluate("other.npz", "other_evaluation.json")
        # a collect run of 2 batches × 2 thresholds stopped after 2 cells (times fixed), and its first batch's ids
        with interrupted_after(2):
            status = run_cli(["collect", "--model", "base/model", "--data", str(DATA), "--output", "base/state/out.npz",
                              *SMALL])[0]
    assert status == 130 and (base / CELLS).is_file()
    cells = [with_digest({**json.loads(line), "seconds": 0.01}) for line in (base / CELLS).read_text().splitlines()]
    (base / CELLS).write_text("".join(json.dumps(cell) + "\n" for cell in cells))
    (base / EXCLUDE).write_text(json.dumps({"cnndm_ids": cells[0]["ids"]}, indent=1))
    torch.manual_seed(2)
    MetaClassifierHead(MetaHeadConfig(d_model=16)).save_pretrained(root / "head_seed2")
    clear_cache()
    yield {"root": root, "base": base, "model": Path(model_dir), "other_table": root / "other.npz",
           "other_rc": root / "other_rc" / "risk_control.json", "head_seed2": root / "head_seed2",
           "squad_evaluation": root / "squad_evaluation.json", "other_evaluation": root / "other_evaluation.json"}
    clear_cache()  # no fit or table of these folders outlives the module


# ============================================================================================ entry points
def _model(root: Path):
    from transformers import AutoModelForSeq2SeqLM

    return hf_safe_exit.enable(AutoModelForSeq2SeqLM.from_pretrained(root / "model").eval())


def _table(table: LossTable, timing: bool = True) -> dict:
    return {"lambdas": table.lambdas.tolist(), "losses": {k: v.tolist() for k, v in table.losses.items()},
            "bounds": {k: list(v) for k, v in table.bounds.items()}, "metadata": table.metadata,
            "extras": {k: v.tolist() for k, v in table.extras.items() if timing or k not in TIMING}}


def _calibration(cal: Calibration) -> dict:
    """What a user sees of a calibration: λ̂, the certificate, the request, configuration, fingerprints, lengths."""
    return {"threshold": cal.threshold, "certificate": cal.certificate.to_dict(),
            "request": RiskController(**cal.request).get_params(),  # as fitted again: the defaults filled in
            "config": None if cal.config is None else cal.config.to_dict(), "bild": cal.bild, "task": cal.task,
            "model_fingerprint": cal.model_fingerprint, "dtype": cal.dtype,
            "meta_head_fingerprint": cal.meta_head_fingerprint, "lengths": cal.lengths}


def _generated(model, **kwargs) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(input_ids=torch.tensor(IDS), max_new_tokens=5, return_dict_in_generate=True, **kwargs)
    return {"sequences": out.sequences.tolist(), "exit_layers": out.exit_layers.tolist()}


def _load_table(root):
    with no_unpickling():
        return _table(LossTable.load(root / NPZ))


def _from_pretrained(root):
    with no_unpickling():
        return _calibration(RiskControlled.from_pretrained(root / "model").calibration)


def _from_json_alone(root):
    alone = root / "rc_alone"
    alone.mkdir(exist_ok=True)
    shutil.copy(root / RC, alone)
    return _calibration(RiskControlled.from_pretrained(alone).calibration)


def _find_stored(root):
    with no_unpickling():
        stored = find_stored(root / "model")
    return {"task": stored.task, "table": None if stored.table is None else _table(stored.table),
            "calibration": None if stored.controlled_json is None else
            _calibration(Calibration.from_dict(stored.controlled_json, stored.controlled_path))}


def _read_evaluation(root):
    return read_evaluation(root / EVALUATION)


def _meta_head(root):
    head = MetaClassifierHead.from_pretrained(root / "model")
    return {"config": asdict(head.config), "weights": {k: v.tolist() for k, v in head.state_dict().items()}}


class _OneProcess:
    """accelerate's PartialState of a single process, as open_state sees it."""

    is_main_process, num_processes, process_index = True, 1, 0

    def wait_for_everyone(self) -> None:
        pass


def _open_state(root, settings: dict, cells: dict):
    """The resume check: the run's settings against the state's; each cell read must be the one written (a cell
    dropped is decoded again, so fewer cells are the same result)."""
    read = open_state(root / STATE, settings, _OneProcess(), fresh=False)
    return {"cells not as written": {f"{k},{b}": cell for (k, b), cell in read.items()
                                     if canonical(cells.get((k, b))) != canonical(cell)}}


def _policy_for(root):
    cal, policy = RiskControlled(eps=EPS).policy_for(_model(root))
    return {"calibration": _calibration(cal), "threshold": policy.threshold, "config": policy.config.to_dict()}


def _generate_unfitted(root):
    return _generated(_model(root), early_exit=RiskControlled(eps=EPS))


def _generate_from_pretrained(root):
    model = _model(root)
    return _generated(model, early_exit=RiskControlled.from_pretrained(root / "model"))


def _generate_stored_policy(root):
    return _generated(_model(root))


def _cli(root, argv, files=()):
    """Run the CLI; the result is its stdout and the files it wrote (paths under ``root`` written as <root>)."""
    status, out, err = run_cli([str(a) for a in argv])
    written = {}
    for name in files:
        path = root / name
        text = path.read_text(encoding="utf-8") if path.is_file() else None
        if text is not None and name.endswith(".json"):  # its digest covers paths under root, which differ by case
            data = json.loads(text)
            data.pop("digest", None)
            text = json.dumps(data, indent=1)
        written[name] = text
    return status, err, {"stdout": out, "files": written}


def _cli_calibrate_results(root):
    return _cli(root, ["calibrate", "--results", root / NPZ, "--eps", EPS, "--output", root / "out/r"],
                ["out/r/risk_control.json"])


def _cli_calibrate_model(root, table):
    return _cli(root, ["calibrate", "--results", table, "--eps", EPS, "--model", root / "model", "--output",
                       root / "out/m"], ["out/m/risk_control.json"])


def _cli_calibrate_results_model(root):
    return _cli(root, ["calibrate", "--results", root / NPZ, "--eps", EPS, "--model", root / "model", "--output",
                       root / "out/rm"], ["out/rm/risk_control.json"])


def _cli_evaluate(root):
    return _cli(root, ["evaluate", "--results", root / NPZ, "--eps", "0.1,0.3", "--methods", "crc,ucb", "--repeats",
                       "5", "--output", root / "out/evaluation.json"], ["out/evaluation.json"])


def _cli_card(root):
    cal = root / "model/calibration/cnndm"
    return _cli(root, ["card", "--model", root / "model", "--calibration", cal, "--evaluation", root / EVALUATION],
                ["model/README.md"])


def _cli_card_default(root):
    return _cli(root, ["card", "--model", root / "model"], ["model/README.md"])


def _cli_plot(root):
    status, err, result = _cli(root, ["plot", "--evaluation", root / EVALUATION, "--output-dir", root / "plots"])
    plots = root / "plots"
    result["files"] = {p.name: p.stat().st_size for p in sorted(plots.iterdir())} if plots.is_dir() else {}
    return status, err, result


def _cli_demo(root):
    status, err, result = _cli(root, ["demo", "--model", root / "model", "--max-new-tokens", "5", "--no-color"])
    # the measured times differ from run to run: everything else the demo prints must not
    result["stdout"] = "\n".join(line for line in result["stdout"].splitlines() if " ms with early exit" not in line)
    return status, err, result


def _collect_result(root, status, err):
    """The table a collect run wrote; of its times (new in every run) only whether they are times (finite, >= 0)."""
    out = root / "state/out.npz"
    if status != 0 or not out.is_file():
        return status, err, {"table": None}
    table = LossTable.load(out)
    times = all(bool(np.all(np.isfinite(table.extras[k]) & (table.extras[k] >= 0))) for k in TIMING)
    return status, err, {"table": _table(table, timing=False), "times are times": times}


def _cli_collect_resume(root, model_dir):
    status, _, err = run_cli(["collect", "--model", str(model_dir), "--data", str(DATA), "--output",
                              str(root / "state/out.npz"), *SMALL])
    return _collect_result(root, status, err)


def _cli_collect_exclude(root, model_dir):
    status, _, err = run_cli(["collect", "--model", str(model_dir), "--data", str(DATA), "--output",
                              str(root / "state/out.npz"), "--fresh", *SMALL, "--exclude-ids", str(root / EXCLUDE)])
    return _collect_result(root, status, err)


def entries(originals) -> dict:
    """Every entry point: name -> (kind, function of a case folder)."""
    model_dir = originals["model"]
    settings = json.loads((originals["base"] / STATE / "config.json").read_text())
    cells = {}
    for line in (originals["base"] / CELLS).read_text().splitlines():
        cell = json.loads(line)
        cell.pop("digest", None)  # open_state returns cells without it
        cells[(cell["k"], cell["batch"])] = cell
    return {
        "LossTable.load": ("python", _load_table),
        "RiskControlled.from_pretrained(model)": ("python", _from_pretrained),
        "RiskControlled.from_pretrained(risk_control.json alone)": ("python", _from_json_alone),
        "find_stored(model)": ("python", _find_stored),
        "read_evaluation": ("python", _read_evaluation),
        "MetaClassifierHead.from_pretrained": ("python", _meta_head),
        "open_state (resume check)": ("python", lambda root: _open_state(root, settings, cells)),
        "RiskControlled(eps).policy_for(model)": ("python", _policy_for),
        "generate(early_exit=RiskControlled(eps))": ("python", _generate_unfitted),
        "generate(early_exit=RiskControlled.from_pretrained)": ("python", _generate_from_pretrained),
        "generate() with the stored policy": ("python", _generate_stored_policy),
        "cli calibrate --results": ("cli", _cli_calibrate_results),
        "cli calibrate --model": ("cli", lambda root: _cli_calibrate_model(root, originals["root"] / "cnndm.npz")),
        "cli calibrate --results --model": ("cli", _cli_calibrate_results_model),
        "cli evaluate": ("cli", _cli_evaluate),
        "cli card": ("cli", _cli_card),
        "cli card (the model's own calibration)": ("cli", _cli_card_default),
        "cli plot": ("cli", _cli_plot),
        "cli demo": ("cli", _cli_demo),
        "cli collect (resume)": ("cli", lambda root: _cli_collect_resume(root, model_dir)),
        "cli collect --exclude-ids": ("cli", lambda root: _cli_collect_exclude(root, model_dir)),
    }


# ============================================================================================ running
def fuzz(originals, artifact: str, mutations, cheap=(), heavy=(), *, tmp: Path, sample: int = 0) -> None:
    """Run the mutations (``fuzz_mutations.run_mutations``), print the counts and fail listing every failure."""
    report = run_mutations(entries(originals), originals["base"], artifact, mutations, cheap, heavy, tmp,
                           sample=sample, seed=SEED, documented=documented_by(DOCUMENTED), reset=clear_cache)
    print("\n" + report.summary())
    if os.environ.get("FUZZ_DUMP"):  # every outcome, for a closer look: FUZZ_DUMP=<folder>
        report.dump(os.environ["FUZZ_DUMP"])
    assert not report.failures, report.summary()


# ============================================================================================ the artifacts
def test_loss_table(originals, tmp_path):
    """early_exit_calibration.npz: bytes, each array (shape, int, str, object, NaN, left out), each header leaf."""
    base, names = originals["base"], (TABLE_NAME,)
    arrays = read_npz(base / NPZ)
    header = json.loads(str(arrays["header_json"]))
    mutations = [Mutation(n, write_to(NPZ, b), names, heavy=True)
                 for n, b in byte_mutations((base / NPZ).read_bytes(), SEED)]
    mutations.append(Mutation("unchanged, re-encoded (the same arrays zipped again)", write_to(NPZ, write_npz(arrays)),
                              names, heavy=True))
    mutations += [Mutation(n, write_to(NPZ, b), names) for n, b in npz_mutations(arrays)]
    for n, h in json_mutations(header, depth=3):
        mutations.append(Mutation(f"header_json {n}", write_to(NPZ, write_npz({**arrays, "header_json":
                                                                                np.array(json.dumps(h))})), names))
    fuzz(originals, "early_exit_calibration.npz", mutations,
         ("LossTable.load", "RiskControlled.from_pretrained(model)"),
         ("find_stored(model)", "RiskControlled(eps).policy_for(model)", "generate(early_exit=RiskControlled(eps))",
          "cli calibrate --results", "cli evaluate", "cli card", "cli demo"), tmp=tmp_path, sample=12)


def test_risk_control_json(originals, tmp_path):
    """risk_control.json with its loss table beside it and alone: bytes and every leaf."""
    fuzz(originals, "risk_control.json", file_mutations(originals["base"], RC, RC_NAMES, SEED),
         ("RiskControlled.from_pretrained(model)", "RiskControlled.from_pretrained(risk_control.json alone)"),
         ("find_stored(model)", "generate(early_exit=RiskControlled.from_pretrained)",
          "generate(early_exit=RiskControlled(eps))", "cli card", "cli demo"), tmp=tmp_path, sample=12)


def test_evaluation_json(originals, tmp_path):
    """evaluation.json (written by `evaluate`, read by `card` and `plot`): bytes and every leaf."""
    fuzz(originals, "evaluation.json", file_mutations(originals["base"], EVALUATION, (EVALUATION_NAME,), SEED),
         ("read_evaluation",), ("cli card", "cli plot"), tmp=tmp_path, sample=6)


def test_store_config(originals, tmp_path):
    """calibration/config.json (the primary task): bytes and its leaf. (The demo names its tasks: it never reads it.)"""
    names = ("calibration/config.json",)
    fuzz(originals, "calibration/config.json", file_mutations(originals["base"], STORE_CONFIG, names, SEED),
         ("find_stored(model)", "RiskControlled.from_pretrained(model)"),
         ("RiskControlled(eps).policy_for(model)", "generate(early_exit=RiskControlled(eps))",
          "cli card (the model's own calibration)"), tmp=tmp_path, sample=6)


def test_generation_config_policy(originals, tmp_path):
    """generation_config.json holding RiskControlled(eps, task=...): bytes, and every leaf of its early_exit spec
    (the other keys are transformers' own)."""
    others = [k for k in json.loads((originals["base"] / GENERATION_CONFIG).read_text()) if k != "early_exit"]
    mutations = []
    for mutation in file_mutations(originals["base"], GENERATION_CONFIG, ("generation_config.json",), SEED,
                                   skip=others):
        if mutation.name in ("early_exit = null", "early_exit deleted"):
            continue  # no stored policy: the documented way to decode without one, not a damaged file
        mutation.heavy = mutation.heavy or mutation.name.startswith("early_exit =")  # the spec itself replaced
        mutations.append(mutation)
    fuzz(originals, "generation_config.json", mutations, (), ("generate() with the stored policy",), tmp=tmp_path,
         sample=30)


def test_meta_head(originals, tmp_path):
    """meta_head.safetensors (bytes; each tensor of a wrong shape or dtype, with a NaN, left out, one added) and
    meta_head_config.json (bytes, every leaf)."""
    from safetensors.torch import load_file

    base, names, weights = originals["base"], ("meta_head.safetensors",), "meta_head.safetensors: "
    mutations = [Mutation(weights + n, write_to(HEAD, b), names, heavy=True)
                 for n, b in byte_mutations((base / HEAD).read_bytes(), SEED)]
    mutations += [Mutation(weights + n, write_to(HEAD, b), names) for n, b in tensor_mutations(load_file(base / HEAD))]
    mutations += file_mutations(base, HEAD_CONFIG, ("meta_head_config.json",), SEED, prefix="meta_head_config.json: ")
    fuzz(originals, "meta head", mutations, ("MetaClassifierHead.from_pretrained",),
         ("RiskControlled(eps).policy_for(model)", "generate(early_exit=RiskControlled(eps))", "cli calibrate --model",
          "cli demo"), tmp=tmp_path, sample=10)


def test_collect_state(originals, tmp_path):
    """A collect state folder (<output>.partial/): its config.json (bytes, every leaf) and its cells file (bytes, every
    leaf of its first cell), through the resume check and `hf-safe-exit collect` resuming. A refusal names the folder
    (a StateMismatchError names the folder, not its config.json) or the file in it."""
    base, names, cells = originals["base"], ("out.npz.partial",), "cells-000-of-001.jsonl: "
    mutations = file_mutations(base, STATE + "/config.json", names, SEED, prefix="config.json: ")
    mutations += [Mutation(cells + n, write_to(CELLS, b), names, heavy=True)
                  for n, b in byte_mutations((base / CELLS).read_bytes(), SEED)]
    lines = (base / CELLS).read_text().splitlines(keepends=True)
    mutations += [Mutation(f"{cells}first cell {n}", write_to(CELLS, (json.dumps(cell) + "\n" + "".join(lines[1:]))
                                                              .encode()), names)
                  for n, cell in json_mutations(json.loads(lines[0]), depth=1)]
    fuzz(originals, "collect state", mutations, ("open_state (resume check)",), ("cli collect (resume)",),
         tmp=tmp_path, sample=6)


def test_exclude_ids(originals, tmp_path):
    """An --exclude-ids file: bytes, and every leaf (its list and the list's first id)."""
    # one id fewer is another valid exclusion list (fewer rows left out), not a damaged one: nothing to refuse
    mutations = [m for m in file_mutations(originals["base"], EXCLUDE, ("exclude.json",), SEED)
                 if not m.name.endswith("cnndm_ids[0] deleted")]
    fuzz(originals, "--exclude-ids", mutations, (), ("cli collect --exclude-ids",), tmp=tmp_path, sample=6)


# ============================================================================================ forged edits
def _edit_json(relpath: str, edit):
    def apply(root: Path) -> None:
        path = root / relpath
        data = json.loads(path.read_text(encoding="utf-8"))
        edit(data)
        path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return apply


def _set_lambda(value: float):
    def edit(data):
        data["lambda_"] = data["certificate"]["lambda_hat"] = value
    return edit


def _set_eps(value: float, guarantee: bool):
    def edit(data):
        old = data["params"]["eps"]
        data["params"]["eps"] = data["certificate"]["eps"] = value
        if guarantee:
            data["certificate"]["guarantee"] = data["certificate"]["guarantee"].replace(f"{old:g}", f"{value:g}")
    return edit


def _set_everywhere(key: str, value):
    def edit(data):
        for section in ("params", "calibration", "certificate"):
            if key in data[section]:
                data[section][key] = value
    return edit


def _copy(pairs):
    """Copy ``(source, relpath)`` pairs into the case."""
    def apply(root: Path) -> None:
        for source, relpath in pairs:
            shutil.copy(source, root / relpath)
    return apply


def _swap_task_folders(root: Path) -> None:
    cal = root / "model/calibration"
    (cal / "cnndm").rename(cal / "tmp")
    (cal / "squad").rename(cal / "cnndm")
    (cal / "tmp").rename(cal / "squad")


def _raise_one_example(root: Path) -> None:
    """One example's gap raised by 0.2 at every λ < 1, in both gap risks (a consistent edit of the losses)."""
    arrays = read_npz(root / NPZ)
    lam = arrays["lambdas"]
    for name in ("loss__performance_gap", "loss__performance_gap_bounded"):
        arr = arrays[name].copy()
        arr[lam < 1, 0] = np.clip(arr[lam < 1, 0] + 0.2, -1, 1)
        arrays[name] = arr
    (root / NPZ).write_bytes(write_npz(arrays))


def _swap_predictions(root: Path) -> None:
    """The first cell's predictions replaced by the second cell's (same number of rows): a cell that looks whole."""
    lines = (root / CELLS).read_text().splitlines(keepends=True)
    first, second = json.loads(lines[0]), json.loads(lines[1])
    first["predictions"] = list(reversed(first["predictions"])) if first["predictions"] == second["predictions"] \
        else second["predictions"][:len(first["predictions"])]
    (root / CELLS).write_text(json.dumps(first) + "\n" + "".join(lines[1:]))


def _shift_test_risk(root: Path) -> None:
    """The test risk of the calibration's own method and ε (the one the card shows) raised by 0.05."""
    data = json.loads((root / EVALUATION).read_text())
    shown = next(r for r in data["results"] if r["method"] == "crc" and r["eps"] == EPS)
    shown["test_risk_mean"] = round(shown["test_risk_mean"] + 0.05, 6)
    (root / EVALUATION).write_text(json.dumps(data, indent=1))


def forged(originals) -> list[Mutation]:
    """Edits that keep each file well-formed and self-consistent where they can: each must be refused by the entry
    points that can tell (those that see what it contradicts: the table beside, the model, the task folder)."""
    rc = RC_NAMES
    calibration_files = (*RC_NAMES, TABLE_NAME)
    with_table = ("RiskControlled.from_pretrained(model)", "find_stored(model)",
                  "generate(early_exit=RiskControlled.from_pretrained)", "cli card")
    self_checked = with_table + ("RiskControlled.from_pretrained(risk_control.json alone)",)
    uses_model = ("RiskControlled(eps).policy_for(model)", "generate(early_exit=RiskControlled(eps))",
                  "generate(early_exit=RiskControlled.from_pretrained)", "cli demo")
    head_files = ("meta_head.safetensors", "meta_head_config.json") + calibration_files
    other_fp = LossTable.load(originals["other_table"]).metadata["model_fingerprint"]
    return [
        *(Mutation(f"risk_control.json: λ̂ = {v} in lambda_ and certificate.lambda_hat", _edit_json(RC, _set_lambda(v)),
                   rc, self_checked) for v in (0.5, 0.9, 1.0)),
        # at ε = 0.1 no λ < 1 passes on these 6 examples (CRC's bound is at least 1/7): the λ̂ stored is not the fit's
        Mutation("risk_control.json: eps = 0.1 in params and certificate", _edit_json(RC, _set_eps(0.1, False)), rc,
                 self_checked),
        Mutation("risk_control.json: eps = 0.1 in params, certificate and its guarantee text",
                 _edit_json(RC, _set_eps(0.1, True)), rc, self_checked),
        Mutation("risk_control.json: another model's fingerprint in calibration and certificate",
                 _edit_json(RC, _set_everywhere("model_fingerprint", other_fp)), rc,
                 ("RiskControlled.from_pretrained(model)", "find_stored(model)",
                  "generate(early_exit=RiskControlled.from_pretrained)")),
        Mutation("risk_control.json: measure 'softmax' in calibration and certificate",
                 _edit_json(RC, _set_everywhere("measure", "softmax")), rc, with_table[:3]),
        Mutation("risk_control.json: task 'squad' in params, calibration and certificate",
                 _edit_json(RC, _set_everywhere("task", "squad")), rc, with_table),
        Mutation("the cnndm and squad task folders swapped", _swap_task_folders,
                 calibration_files + (EVALUATION_NAME,),
                 ("find_stored(model)", "RiskControlled.from_pretrained(model)",
                  "RiskControlled(eps).policy_for(model)",
                  "generate(early_exit=RiskControlled(eps))", "cli card (the model's own calibration)", "cli demo")),
        Mutation("another model's loss table copied in (risk_control.json kept)",
                 _copy([(originals["other_table"], NPZ)]), calibration_files,
                 ("find_stored(model)", "RiskControlled.from_pretrained(model)",
                  "RiskControlled(eps).policy_for(model)",
                  "generate(early_exit=RiskControlled(eps))", "cli calibrate --results --model", "cli demo")),
        Mutation("another model's loss table and risk_control.json copied in",
                 _copy([(originals["other_table"], NPZ), (originals["other_rc"], RC)]), calibration_files,
                 uses_model + ("cli calibrate --results --model",)),
        Mutation("a meta head of another seed (same shape) copied in",
                 _copy([(originals["head_seed2"] / "meta_head.safetensors", HEAD),
                        (originals["head_seed2"] / "meta_head_config.json", HEAD_CONFIG)]), head_files,
                 uses_model + ("cli calibrate --model",)),
        Mutation("loss table: one example's gap raised by 0.2 at every λ < 1 (risk_control.json beside)",
                 _raise_one_example, calibration_files,
                 ("RiskControlled.from_pretrained(model)", "find_stored(model)",
                  "generate(early_exit=RiskControlled(eps))", "cli card", "cli demo")),
        Mutation("evaluation.json of the squad task in the cnndm folder",
                 _copy([(originals["squad_evaluation"], EVALUATION)]), (EVALUATION_NAME,), ("cli card",)),
        Mutation("evaluation.json of another model in the cnndm folder",
                 _copy([(originals["other_evaluation"], EVALUATION)]), (EVALUATION_NAME,), ("cli card",)),
        Mutation("evaluation.json: a test risk raised by 0.05", _shift_test_risk, (EVALUATION_NAME,), ("cli card",)),
        Mutation("collect state: a cell's predictions replaced by another cell's", _swap_predictions,
                 ("out.npz.partial",), ("open_state (resume check)", "cli collect (resume)")),
    ]


def test_forged_edits(originals, tmp_path):
    """Consistent-looking edits (see :func:`forged`) are refused by every entry point that can tell."""
    fuzz(originals, "forged edits", forged(originals), tmp=tmp_path)
