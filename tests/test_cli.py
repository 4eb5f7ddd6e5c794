"""Each CLI command on tiny inputs (in-process ``main([...])``), and bad input giving one line on stderr, exit 2."""

import json
import shutil
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import hf_safe_exit
from hf_safe_exit.cli import main
from hf_safe_exit.risk import RiskControlled, clear_cache
from hf_safe_exit.risk import LossTable
from hf_safe_exit.tasks import get_task, load_split, shared_data_dir

from cli_lines import one_error_line
from tiny_calibration import save_tiny_t5

DATA = shared_data_dir()
pytestmark = [pytest.mark.skipif(DATA is None, reason="offline data folder ../shared/data (or $HF_SAFE_EXIT_DATA) "
                                                     "is absent"),
              pytest.mark.usefixtures("one_thread")]
GRID = "0,0.5,0.9,1"
COLLECT = ["--task", "cnndm", "--n", "6", "--lambdas", GRID, "--batch-size", "3", "--max-new-tokens", "5",
           "--max-input-length", "40", "--no-progress"]



@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny model directory, and one collect run on 6 CNN/DM pool examples."""
    root = tmp_path_factory.mktemp("cli")
    task = get_task("cnndm")
    rows = load_split(task, "pool", path=DATA)
    texts = [task.prompt(r) + " " + r["highlights"] for r in rows.select(range(40))]
    model_dir = save_tiny_t5(root / "model", texts, seed=0)
    results = root / "results.npz"
    # one threshold per generate call: the table measures a time per threshold (evaluate's speed-ups need it)
    assert main(["collect", "--model", model_dir, "--data", str(DATA), "--output", str(results), *COLLECT,
                 "--time-each-threshold"]) == 0
    return root, model_dir, results


def test_collect_writes_a_table_for_the_model(workdir, capsys):
    root, model_dir, results = workdir
    table = LossTable.load(results)
    assert table.losses["performance_gap"].shape == (4, 6)
    assert table.metadata["data_source"] == str(DATA) and table.metadata["split"] == "pool"
    model = hf_safe_exit.enable(__import__("transformers").AutoModelForSeq2SeqLM.from_pretrained(model_dir))
    assert table.metadata["model_fingerprint"] == hf_safe_exit.model_fingerprint(model)
    pool_ids = load_split("cnndm", "pool", path=DATA)["id"]
    assert set(table.metadata["example_ids"]) <= set(pool_ids) and len(set(table.metadata["example_ids"])) == 6


def test_collect_exclude_ids_keeps_the_rows_disjoint(workdir, tmp_path, capsys):
    """Rows named in a heldout_eval_ids.json-like file never enter the collected table; bad files fail clearly."""
    root, model_dir, results = workdir
    used = LossTable.load(results).metadata["example_ids"]
    pool_ids = list(load_split("cnndm", "pool", path=DATA)["id"])
    keep = pool_ids[:3]  # the exclusion list leaves exactly these three pool rows
    exclude = tmp_path / "heldout_eval_ids.json"
    exclude.write_text(json.dumps({"cnndm_ids": [i for i in pool_ids if i not in keep], "squad_ids": ["x"]}))
    out = tmp_path / "disjoint.npz"
    argv = ["collect", "--model", model_dir, "--data", str(DATA), "--output", str(out), *COLLECT]
    assert main([*argv, "--exclude-ids", str(exclude)]) == 0
    table = LossTable.load(out)
    assert sorted(table.metadata["example_ids"]) == sorted(keep)  # --n 6 > 3 rows left: all of them
    assert table.metadata["excluded_ids"]["n_excluded"] == len(pool_ids) - 3
    exclude.write_text(json.dumps({"cnndm_ids": used}))
    # a finished result is never replaced silently (issue 26): --overwrite says so
    assert "pass --overwrite" in one_error_line(capsys, [*argv, "--exclude-ids", str(exclude), "--fresh"])
    assert main([*argv, "--exclude-ids", str(exclude), "--fresh", "--overwrite"]) == 0
    assert not set(LossTable.load(out).metadata["example_ids"]) & set(used)
    exclude.write_text(json.dumps({"squad_ids": ["x"]}))
    assert "cnndm_ids" in one_error_line(capsys, [*argv, "--exclude-ids", str(exclude), "--fresh", "--overwrite"])
    exclude.write_text(json.dumps(pool_ids))
    assert "leaves no example" in one_error_line(capsys, [*argv, "--exclude-ids", str(exclude), "--fresh",
                                                          "--overwrite"])


def test_calibrate_then_generate_with_the_saved_policy(workdir, capsys, tmp_path):
    root, model_dir, results = workdir
    out = tmp_path / "rc"
    assert main(["calibrate", "--results", str(results), "--eps", "0.3", "--model", model_dir,
                 "--output", str(out)]) == 0
    assert "λ̂ =" in capsys.readouterr().out
    rc = RiskControlled.from_pretrained(out)
    table = LossTable.load(results)
    expected = RiskControlled(0.3).fit_table(table)  # same table, same settings: the same λ̂
    assert rc.threshold == expected.threshold and rc.threshold in table.lambdas
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = hf_safe_exit.enable(AutoModelForSeq2SeqLM.from_pretrained(model_dir))
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(["summarize: police said the man was arrested"], return_tensors="pt")
    got = model.generate(**enc, early_exit=rc, max_new_tokens=5, return_dict_in_generate=True)
    ref = model.generate(**enc, early_exit=hf_safe_exit.EarlyExit(threshold=rc.threshold), max_new_tokens=5,
                         return_dict_in_generate=True)
    assert torch.equal(got.sequences, ref.sequences) and torch.equal(got.exit_layers, ref.exit_layers)


def test_calibrate_store_in_model_enables_the_unfitted_one_liner(workdir, tmp_path, capsys):
    root, model_dir, results = workdir
    import shutil

    from transformers import AutoModelForSeq2SeqLM

    local = tmp_path / "model"
    shutil.copytree(model_dir, local)
    assert main(["calibrate", "--results", str(results), "--eps", "0.4", "--model", str(local),
                 "--store-in-model"]) == 0
    stored = local / "calibration" / "cnndm"  # the one layout (hf_safe_exit.risk.store)
    assert (stored / "risk_control.json").is_file() and (stored / "early_exit_calibration.npz").is_file()
    assert json.loads((local / "calibration" / "config.json").read_text()) == {"primary_task": "cnndm"}
    assert not (local / "risk_control.json").exists()
    clear_cache()
    model = hf_safe_exit.enable(AutoModelForSeq2SeqLM.from_pretrained(local))
    ids = torch.tensor([[5, 6, 7, 1]])
    out = model.generate(input_ids=ids, early_exit=RiskControlled(eps=0.4), max_new_tokens=3)
    expected = RiskControlled(0.4).fit_table(LossTable.load(results)).threshold
    ref = model.generate(input_ids=ids, early_exit=hf_safe_exit.EarlyExit(threshold=expected), max_new_tokens=3)
    assert torch.equal(out, ref)


def test_evaluate_and_plot(workdir, tmp_path, capsys):
    root, model_dir, results = workdir
    ev = tmp_path / "eval.json"
    assert main(["evaluate", "--results", str(results), "--eps", "0.1,0.99", "--methods", "crc,ucb,ltt,naive",
                 "--n-cal", "3", "--repeats", "4", "--output", str(ev)]) == 0
    printed = capsys.readouterr().out
    assert "test risk" in printed and "speedup" in printed
    result = json.loads(ev.read_text())
    rows = {(r["method"], r["eps"]): r for r in result["results"]}
    assert len(rows) == 8 and result["settings"]["n_test"] == 3
    table = LossTable.load(results)
    wall = table.extras["wall_time"]
    # CRC with n_cal = 3 cannot exit below eps = B/(n+1) = 0.25: λ̂ = 1, i.e. exactly the full model
    crc = rows[("crc", 0.1)]
    assert crc["no_exit_rate"] == 1.0 and crc["lambda_hat_mean"] == 1.0 and crc["test_risk_mean"] == 0.0
    assert crc["speedup"] == 1.0 and crc["mean_exit_layer"] == 3.0 and crc["layer_fraction"] == 1.0
    # naive at eps = 0.99 takes the smallest λ (every mean gap is ≤ 1 − 1/n... < 0.99): exits at layer 1
    naive = rows[("naive", 0.99)]
    assert naive["lambda_hat_mean"] == 0.0 and naive["mean_exit_layer"] == 1.0
    tokens = table.extras["num_tokens"].sum(axis=1)  # like for like: seconds per generated token at each λ
    assert naive["speedup"] == pytest.approx((wall[3] / tokens[3]) / (wall[0] / tokens[0]))
    assert result["speedup_basis"] == "per generated token"
    assert result["full_model"]["generated_tokens"] == tokens[3]
    assert naive["layer_fraction"] == pytest.approx(1 / 3)

    figures = tmp_path / "fig"
    assert main(["plot", "--evaluation", str(ev), "--output-dir", str(figures)]) == 0
    for name in ("risk_vs_eps.png", "exit_layer_vs_eps.png", "speedup_vs_eps.png"):
        data = (figures / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name


def test_a_batched_collect_reports_no_speed_up(workdir, tmp_path, capsys):
    """The default collect decodes a batch's thresholds as rows of one batch: it measures no time per threshold, so
    the summary, evaluate and the plot say so instead of showing the apportioned times' ratios (about 1x)."""
    root, model_dir, timed = workdir
    out, ev = tmp_path / "batched.npz", tmp_path / "eval.json"
    assert main(["collect", "--model", model_dir, "--data", str(DATA), "--output", str(out), *COLLECT]) == 0
    assert "no time per threshold" in capsys.readouterr().out
    batched, reference = LossTable.load(out), LossTable.load(timed)
    for risk in reference.losses:  # the same losses as one threshold per call
        np.testing.assert_array_equal(batched.losses[risk], reference.losses[risk])
    assert main(["evaluate", "--results", str(out), "--eps", "0.1,0.99", "--n-cal", "3", "--repeats", "2",
                 "--output", str(ev)]) == 0
    result = json.loads(ev.read_text())
    assert result["speedup_basis"].startswith("not measured")
    assert all(r["speedup"] is None and r["speedup_std"] is None for r in result["results"])
    assert main(["plot", "--evaluation", str(ev), "--output-dir", str(tmp_path / "fig")]) == 0


def test_missing_data_path(workdir, tmp_path, capsys):
    root, model_dir, _ = workdir
    args = ["collect", "--model", model_dir, "--data", str(tmp_path / "nowhere"), "--output",
            str(tmp_path / "x.npz"), *COLLECT]
    line = one_error_line(capsys, args)
    assert "nowhere" in line and "abisee/cnn_dailymail" in line and "local path" in line


def test_unknown_task(workdir, tmp_path, capsys):
    root, model_dir, _ = workdir
    args = ["collect", "--model", model_dir, "--data", str(DATA), "--output", str(tmp_path / "x.npz"), *COLLECT]
    args[args.index("cnndm")] = "xsum"
    line = one_error_line(capsys, args)
    assert "unknown task 'xsum'" in line and "['cnndm', 'squad']" in line


def test_results_from_another_model(workdir, tmp_path, capsys):
    root, model_dir, results = workdir
    other = save_tiny_t5(tmp_path / "other", ["a b c d summarize"], seed=1)
    line = one_error_line(capsys, ["calibrate", "--results", str(results), "--eps", "0.3", "--model", other])
    assert "another model" in line and "collect" in line
    assert not os.path.exists(os.path.join(other, "risk_control.json"))


@pytest.mark.parametrize("argv,needle", [
    (["evaluate", "--results", "no_such.npz", "--output", "e.json"], "no results file"),
    (["calibrate", "--results", "RESULTS", "--eps", "1.5", "--output", "OUT"], "eps"),
    (["calibrate", "--results", "RESULTS", "--eps", "0.1", "--method", "ucb", "--output", "OUT"], "delta"),
    (["calibrate", "--results", "RESULTS", "--eps", "0.1"], "--output"),
    (["evaluate", "--results", "RESULTS", "--eps", "x", "--output", "OUT"], "comma-separated numbers"),
    (["plot", "--evaluation", "RESULTS", "--output-dir", "OUT"], "an evaluation written by `hf-safe-exit evaluate`"),
    (["collect", "--task", "cnndm"], "required"),
    (["collect", "--model", "/no/such/model", "--task", "cnndm", "--data", "DATA", "--output", "OUT"],
     "no model directory"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line(workdir, tmp_path, capsys, argv, needle):
    root, model_dir, results = workdir
    sub = {"RESULTS": str(results), "OUT": str(tmp_path / "out"), "DATA": str(DATA)}
    line = one_error_line(capsys, [sub.get(a, a) for a in argv])
    assert line.startswith("hf-safe-exit") and needle in line, line


@pytest.mark.slow
def test_two_processes_under_accelerate_give_the_same_file(workdir, tmp_path):
    """``accelerate launch -m hf_safe_exit collect`` with 2 CPU processes == the single-process file."""
    root, model_dir, results = workdir
    out = tmp_path / "two.npz"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hf_safe_exit",
           "collect", "--model", model_dir, "--data", str(DATA), "--output", str(out), "--cpu", *COLLECT]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = LossTable.load(results), LossTable.load(out)
    assert not (tmp_path / "two.npz.partial").exists()  # removed by the main process once the file is written
    for name in one.losses:
        np.testing.assert_array_equal(one.losses[name], two.losses[name])
    for name in one.extras:
        if name not in ("wall_time", "example_time"):
            np.testing.assert_array_equal(one.extras[name], two.extras[name])
    # the fixture timed each threshold; this run (the default) decoded them as one batch and says so
    assert "timing" not in one.metadata and two.metadata["timing"].startswith("batched")
    drop = lambda m: {k: v for k, v in m.items() if k not in ("device", "timing")}  # noqa: E731
    assert drop(one.metadata) == drop(two.metadata)


def test_calibrate_and_evaluate_never_overwrite_silently(workdir, tmp_path, capsys):
    # issue 26, root cause 5: an existing calibration or evaluation is replaced only with --overwrite, and then whole
    root, model_dir, results = workdir
    model_copy = tmp_path / "model"
    shutil.copytree(model_dir, model_copy)
    argv = ["calibrate", "--results", str(results), "--eps", "0.5", "--model", str(model_copy), "--store-in-model"]
    assert main(argv) == 0
    folder = model_copy / "calibration" / "cnndm"
    (folder / "evaluation.json").write_text("{}")  # an evaluation of the old calibration, beside it
    before = (folder / "risk_control.json").read_text()
    line = one_error_line(capsys, [*argv[:4], "0.4", *argv[5:]])
    assert "pass --overwrite" in line and str(folder) in line
    assert (folder / "risk_control.json").read_text() == before  # nothing was touched
    assert main([*argv[:4], "0.4", *argv[5:], "--overwrite"]) == 0
    assert not (folder / "evaluation.json").exists()  # the whole task folder was replaced, not half of it
    assert json.loads((folder / "risk_control.json").read_text())["params"]["eps"] == 0.4
    out = tmp_path / "rc"
    assert main(["calibrate", "--results", str(results), "--eps", "0.5", "--output", str(out)]) == 0
    assert "pass --overwrite" in one_error_line(capsys, ["calibrate", "--results", str(results), "--eps", "0.5",
                                                         "--output", str(out)])
    evaluation = tmp_path / "eval.json"
    evaluation.write_text("{}")
    ev = ["evaluate", "--results", str(results), "--eps", "0.5", "--repeats", "2", "--output", str(evaluation)]
    assert "pass --overwrite" in one_error_line(capsys, ev)
    assert evaluation.read_text() == "{}"
    assert main([*ev, "--overwrite"]) == 0 and json.loads(evaluation.read_text())["results"]
