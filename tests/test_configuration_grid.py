"""Collect over a grid of configurations (issue 28, items 1-2) and ``calibrate --method pareto`` (item 3, the CLI).

* ``ConfigurationGrid.configurations`` against the configurations listed by hand for a 4-layer decoder.
* ``collect_grid`` against separate ``collect`` calls, one per configuration, whose rows are stacked here by hand
  (numpy, not ``from_tables``): the same settings, losses, costs and metadata; resuming after an interruption decodes
  only the configurations left and gives the same table; another grid, or a finished table of another configuration,
  is refused.
* The CLI: the grid options parse into the grid; ``collect --measures ...`` then ``calibrate --method pareto
  --store-in-model`` on a tiny model folder, the other kind of table kept with ``--overwrite``, and ``generate`` with
  the stored calibration decodes the chosen configuration as ``EarlyExit`` at it does.
"""

import json
import shutil

import numpy as np
import pytest
import torch

import hf_safe_exit
from hf_safe_exit import EarlyExit, EarlyExitConfig
from hf_safe_exit.calibration import StateMismatchError, collect
from hf_safe_exit.calibration import runner
from hf_safe_exit.calibration.configuration_grid import GRID_STATE_FILENAME, ConfigurationGrid, collect_grid
from hf_safe_exit.cli import main
from hf_safe_exit.cli_grid import grid_from_args
from hf_safe_exit.cli_parser import UsageError, build_parser
from hf_safe_exit.risk import ConfigurationTable, LossTable, RiskControlled, clear_cache
from hf_safe_exit.tasks import get_task, load_split, shared_data_dir

from cli_lines import one_error_line
from tiny_calibration import save_tiny_t5, tiny_cnndm

DATA = shared_data_dir()
pytestmark = [pytest.mark.skipif(DATA is None, reason="offline data folder ../shared/data is absent"),
              pytest.mark.usefixtures("one_thread")]
LAMBDAS = [0.0, 0.5, 0.9, 1.0]
RUN = dict(lambdas=LAMBDAS, batch_size=3, max_new_tokens=5, max_input_length=40, progress=False)
CONFIGS = [EarlyExitConfig(measure="softmax"), EarlyExitConfig(measure="saturation", min_exit_layer=2),
           EarlyExitConfig(measure="softmax", schedule="decaying", decay_tau=2.0)]


def _c(measure, schedule="constant", tau=4.0, first=1, layers=None):
    return EarlyExitConfig(measure=measure, schedule=schedule, decay_tau=tau, min_exit_layer=first, exit_layers=layers)


def test_the_grid_lists_each_distinct_configuration_once():
    grid = ConfigurationGrid(measures=["meta", "saturation"], schedules=["constant", "decaying"], decay_taus=[1, 4],
                             min_exit_layers=[1, 2, 3], exit_every=[1, 2])
    per_measure = [  # by hand, for 4 decoder layers: constant ignores τ; exit layers 2 from min 1 or 2 are one setting
        ("constant", 4.0, 1, None), ("constant", 4.0, 1, (2,)), ("constant", 4.0, 2, None), ("constant", 4.0, 3, None),
        ("decaying", 1.0, 1, None), ("decaying", 1.0, 1, (2,)), ("decaying", 1.0, 2, None), ("decaying", 1.0, 3, None),
        ("decaying", 4.0, 1, None), ("decaying", 4.0, 1, (2,)), ("decaying", 4.0, 2, None), ("decaying", 4.0, 3, None)]
    expected = [_c(m, *row) for m in ("meta", "saturation") for row in per_measure]
    assert grid.configurations(4) == expected
    # multiples of k from min_exit_layer on, below the last of 8 layers; the same layers listed once
    assert ConfigurationGrid(measures=["softmax"], min_exit_layers=[1, 3, 5], exit_every=[2, 3]).configurations(8) == \
        [_c("softmax", first=1, layers=(2, 4, 6)), _c("softmax", first=1, layers=(3, 6)),
         _c("softmax", first=3, layers=(4, 6)), _c("softmax", first=5, layers=(6,))]
    # every third layer of 3: none below the last, left out; every layer from 2 of 3 is exit layer 2 alone
    assert ConfigurationGrid(measures=["softmax"], min_exit_layers=[2], exit_every=[1, 3]).configurations(3) == \
        [_c("softmax", first=2)]
    base = EarlyExitConfig(measure="softmax", anytime="poe")
    assert ConfigurationGrid(min_exit_layers=[1, 2], base=base).configurations(4) == \
        [base, EarlyExitConfig(measure="softmax", anytime="poe", min_exit_layer=2)]


@pytest.mark.parametrize("kwargs,match", [
    (dict(measures=[]), r"measures=\[\] must be a non-empty list"),
    (dict(measures="meta"), "measures='meta' must be a non-empty list"),
    (dict(measures=["meta", "meta"]), "lists a value twice"),
    (dict(measures=["nope"]), "nope"),
    (dict(schedules=["linear"]), "schedule='linear' is unknown"),
    (dict(decay_taus=[0]), "decay_tau=0"),
    (dict(min_exit_layers=[0]), "min_exit_layer=0"),
    (dict(exit_every=[0]), "exit_every=0"),
    (dict(base=EarlyExitConfig(exit_layers=(2,))), "drop them from base"),
])
def test_bad_grids_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConfigurationGrid(**kwargs)


def test_a_grid_that_cannot_exit_is_refused():
    with pytest.raises(ValueError, match="no configuration .* can exit before the last of 3"):
        ConfigurationGrid(min_exit_layers=[3]).configurations(3)


@pytest.fixture(scope="module")
def tiny():
    task, rows, tokenizer, model = tiny_cnndm(6, DATA)
    return task, rows, tokenizer, hf_safe_exit.enable(model)


@pytest.fixture(scope="module")
def separate(tiny):
    """One collect per configuration: the reference."""
    task, rows, tokenizer, model = tiny
    return [collect(model, tokenizer, task, rows, config=c, **RUN) for c in CONFIGS]


def _stacked_by_hand(tables):
    """Every table's rows below λ = 1, the first table's λ = 1 row in its place (λ = 1 is last in LAMBDAS)."""
    settings, rows = [], {}
    for i, table in enumerate(tables):
        ks = [k for k, lam in enumerate(LAMBDAS) if lam < 1 or i == 0]
        settings += [{**CONFIGS[i].to_dict(), "threshold": LAMBDAS[k]} for k in ks]
        for name, arr in [*table.losses.items(), *table.extras.items()]:
            if arr.ndim == 2:
                rows.setdefault(name, []).append(arr[ks])
    return settings, {name: np.vstack(parts) for name, parts in rows.items()}


def _assert_same(table, reference_tables):
    settings, arrays = _stacked_by_hand(reference_tables)
    assert table.settings == settings and table.full_model_index == 3
    for name, arr in arrays.items():
        if name == "example_time":
            continue  # seconds: measured, not the same twice
        got = table.losses.get(name, table.costs.get(name, table.extras.get(name)))
        np.testing.assert_array_equal(got, arr, err_msg=name)
    keys = set(reference_tables[0].metadata) - {"lambdas", "lambda_order", *EarlyExitConfig().to_dict()}
    assert {k: table.metadata[k] for k in keys} == {k: reference_tables[0].metadata[k] for k in keys}


def test_collect_grid_equals_separate_collects_stacked_by_hand(tiny, separate, tmp_path):
    task, rows, tokenizer, model = tiny
    out = tmp_path / "grid.npz"
    table = collect_grid(model, tokenizer, task, rows, CONFIGS, output=out, **RUN)
    _assert_same(table, separate)
    assert ConfigurationTable.load(out) == table
    assert not (tmp_path / "grid.npz.partial").exists()  # the default state folder goes once the output is written


class Interrupted(Exception):
    pass


def test_collect_grid_resumes_and_refuses_another_run(tiny, separate, tmp_path, monkeypatch):
    task, rows, tokenizer, model = tiny
    state = tmp_path / "state"
    calls, stop = [], [True]
    real = runner.collect

    def interrupted(*args, **kwargs):
        calls.append(kwargs["config"])
        if len(calls) == 2 and stop and stop.pop():
            raise Interrupted  # as a killed run: configuration 0 finished, 1 not
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "collect", interrupted)
    with pytest.raises(Interrupted):
        collect_grid(model, tokenizer, task, rows, CONFIGS, state_dir=state, **RUN)
    assert (state / "0.npz").is_file() and not (state / "1.npz").exists() and (state / GRID_STATE_FILENAME).is_file()
    assert not stop
    calls.clear()
    table = collect_grid(model, tokenizer, task, rows, CONFIGS, state_dir=state, **RUN)
    assert calls == CONFIGS[1:]  # configuration 0 read back, not decoded again
    _assert_same(table, separate)
    assert state.is_dir()  # a state folder the caller names is kept
    with pytest.raises(StateMismatchError, match="other settings .*configurations.*--fresh"):
        collect_grid(model, tokenizer, task, rows, CONFIGS[:2], state_dir=state, **RUN)
    with pytest.raises(StateMismatchError, match="other settings .*max_new_tokens"):
        collect_grid(model, tokenizer, task, rows, CONFIGS, state_dir=state, **{**RUN, "max_new_tokens": 4})
    shutil.copy(state / "1.npz", state / "0.npz")  # a finished table of another configuration in 0's place
    with pytest.raises(StateMismatchError, match=r"0.npz' was collected with other settings \(measure, min_exit"):
        collect_grid(model, tokenizer, task, rows, CONFIGS, state_dir=state, **RUN)
    calls.clear()
    table = collect_grid(model, tokenizer, task, rows, CONFIGS[:2], state_dir=state, fresh=True, **RUN)
    assert calls == CONFIGS[:2] and table.num_configurations == 7


def test_collect_grid_refuses_one_configuration_settings(tiny):
    task, rows, tokenizer, model = tiny
    with pytest.raises(ValueError, match=r"\['config'\] describe one configuration"):
        collect_grid(model, tokenizer, task, rows, CONFIGS, config=CONFIGS[0], **RUN)
    with pytest.raises(ValueError, match="configurations 0 and 1 are the same"):
        collect_grid(model, tokenizer, task, rows, [CONFIGS[0], CONFIGS[0]], **RUN)
    with pytest.raises(TypeError, match="grid must be a ConfigurationGrid"):
        collect_grid(model, tokenizer, task, rows, CONFIGS[0], **RUN)


# ---------------------------------------------------------------- the CLI
def _collect_args(*extra):
    return build_parser().parse_args(["collect", "--model", "m", "--task", "cnndm", "--output", "o.npz", *extra])


def test_the_grid_options_parse_into_the_grid():
    args = _collect_args("--measures", "meta,saturation", "--schedules", "constant,decaying", "--decay-taus", "1,4",
                         "--min-exit-layers", "1,2", "--exit-every", "1,2", "--anytime", "poe")
    grid = grid_from_args(args, {"anytime": "poe"})
    assert grid == ConfigurationGrid(measures=("meta", "saturation"), schedules=("constant", "decaying"),
                                     decay_taus=(1.0, 4.0), min_exit_layers=(1, 2), exit_every=(1, 2),
                                     base=EarlyExitConfig(anytime="poe"))
    assert grid_from_args(_collect_args("--measure", "meta"), {"measure": "meta"}) is None
    with pytest.raises(UsageError, match="--measure and --measures both set measure"):
        grid_from_args(_collect_args("--measures", "meta"), {"measure": "softmax"})
    with pytest.raises(UsageError, match="drop it for --strategy bild"):
        grid_from_args(_collect_args("--measures", "meta", "--strategy", "bild"), {})
    with pytest.raises(UsageError, match="comma-separated whole numbers"):
        _collect_args("--min-exit-layers", "1,x")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny model folder, a grid collected on 24 CNN/DM pool rows through the CLI, and one 1-D table."""
    root = tmp_path_factory.mktemp("grid_cli")
    task = get_task("cnndm")
    texts = [task.prompt(r) + " " + r["highlights"] for r in load_split(task, "pool", path=DATA).select(range(40))]
    model_dir = save_tiny_t5(root / "model", texts, seed=0)
    common = ["--model", model_dir, "--task", "cnndm", "--data", str(DATA), "--n", "24", "--lambdas", "0,0.5,1",
              "--batch-size", "8", "--max-new-tokens", "4", "--max-input-length", "32", "--no-progress"]
    assert main(["collect", *common, "--measures", "softmax,saturation", "--min-exit-layers", "1,2",
                 "--output", str(root / "grid.npz")]) == 0
    assert main(["collect", *common, "--measure", "softmax", "--output", str(root / "softmax.npz")]) == 0
    return root, model_dir


def test_calibrate_pareto_stores_beside_the_1d_table_and_generate_decodes_the_choice(folder, tmp_path, capsys):
    root, model_dir = folder
    local = tmp_path / "model"
    shutil.copytree(model_dir, local)
    stored = local / "calibration" / "cnndm"
    assert main(["calibrate", "--results", str(root / "softmax.npz"), "--eps", "0.3", "--model", str(local)]) == 0
    one_d = (stored / "early_exit_calibration.npz").read_bytes()
    argv = ["calibrate", "--results", str(root / "grid.npz"), "--eps", "0.3", "--delta", "0.1", "--method", "pareto",
            "--p-value", "wsr", "--seed", "3", "--model", str(local), "--store-in-model"]
    line = one_error_line(capsys, argv)  # the 1-D calibration's risk_control.json would be replaced
    assert "pass --overwrite" in line and "risk_control.json" in line and "early_exit_calibration" not in line
    assert main([*argv, "--overwrite"]) == 0
    printed = capsys.readouterr().out
    table = ConfigurationTable.load(root / "grid.npz")
    rc = RiskControlled(0.3, 0.1, method="pareto", p_value="wsr", seed=3).fit_table(table)
    cert = rc.certificate
    assert cert.feasible and rc.threshold < 1  # a real choice: the test below decodes with early exit
    assert f"row {cert.configuration_index} of {table.num_configurations}" in printed
    assert f"front of {cert.front_size}" in printed and f"n_opt/n_test = {cert.n_opt}/{cert.n_test}" in printed
    assert (stored / "early_exit_calibration.npz").read_bytes() == one_d  # the other kind of table is kept
    assert ConfigurationTable.load(stored) == table
    clear_cache()
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = hf_safe_exit.enable(AutoModelForSeq2SeqLM.from_pretrained(local))
    tokenizer = AutoTokenizer.from_pretrained(local)
    enc = tokenizer(["summarize: police said the man was arrested on tuesday"], return_tensors="pt")
    got = model.generate(**enc, early_exit=RiskControlled(0.3, 0.1, method="pareto", p_value="wsr", seed=3),
                         max_new_tokens=4, return_dict_in_generate=True)
    config = EarlyExitConfig.from_dict({k: v for k, v in cert.configuration.items() if k != "threshold"})
    ref = model.generate(**enc, early_exit=EarlyExit(rc.threshold, config=config), max_new_tokens=4,
                         return_dict_in_generate=True)
    assert torch.equal(got.sequences, ref.sequences) and torch.equal(got.exit_layers, ref.exit_layers)
    assert got.certificate.configuration == cert.configuration
    # the scalar one-liner still fits from the 1-D table kept beside it
    assert RiskControlled(0.3).resolve(model).threshold == \
        RiskControlled(0.3).fit_table(LossTable.load(root / "softmax.npz")).threshold
    # and a scalar calibration stored again keeps the configuration table
    assert main(["calibrate", "--results", str(root / "softmax.npz"), "--eps", "0.2", "--model", str(local),
                 "--overwrite"]) == 0
    assert ConfigurationTable.load(stored) == table


def test_calibrate_pareto_stacks_1d_tables_and_reports_nothing_certified(folder, capsys):
    root, model_dir = folder
    assert "hold the same configuration" in one_error_line(
        capsys, ["calibrate", "--results", str(root / "softmax.npz"), str(root / "softmax.npz"), "--eps", "0.01",
                 "--delta", "0.1", "--method", "pareto", "--output", str(root / "twice")])
    assert main(["calibrate", "--results", str(root / "softmax.npz"), "--eps", "0.001", "--delta", "0.1",
                 "--method", "pareto", "--output", str(root / "one")]) == 0
    captured = capsys.readouterr()
    assert "nothing certified below the full model" in captured.out and "bound none, p-value none" in captured.out
    assert "warning: RiskControlled(pareto" in captured.err
    assert "--method crc calibrates λ of one configuration" in one_error_line(
        capsys, ["calibrate", "--results", str(root / "grid.npz"), "--eps", "0.1", "--output", str(root / "x")])
    assert "configure Pareto Testing" in one_error_line(
        capsys, ["calibrate", "--results", str(root / "softmax.npz"), "--eps", "0.1", "--seed", "2",
                 "--output", str(root / "x")])
    assert "cost='time' is not a cost" in one_error_line(
        capsys, ["calibrate", "--results", str(root / "grid.npz"), "--eps", "0.1", "--delta", "0.1", "--method",
                 "pareto", "--cost", "time", "--output", str(root / "x")])
