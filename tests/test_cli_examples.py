"""The two examples run end to end, offline, on a local (tiny, random) model directory."""

import runpy
from pathlib import Path

import pytest

from hf_safe_exit.risk import RiskControlled
from hf_safe_exit.tasks import get_task, load_split, shared_data_dir

from tiny_calibration import save_tiny_t5

DATA = shared_data_dir()
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = [pytest.mark.skipif(DATA is None, reason="offline data folder ../shared/data (or $HF_SAFE_EXIT_DATA) "
                                                     "is absent"),
              pytest.mark.usefixtures("one_thread")]



@pytest.mark.parametrize("script,task_name,score_key", [("summarize_cnndm.py", "cnndm", "rougeL_full"),
                                                       ("squad_qa.py", "squad", "f1_full")])
def test_example_runs_offline(tmp_path, capsys, script, task_name, score_key):
    task = get_task(task_name)
    rows = load_split(task, "pool", path=DATA).select(range(30))
    model_dir = save_tiny_t5(tmp_path / "model", [task.prompt(r) for r in rows], seed=0)
    out = tmp_path / "out"
    example = runpy.run_path(str(EXAMPLES / script), run_name="example")
    report = example["main"](["--model", model_dir, "--data", str(DATA), "--n", "8", "--eps", "0.3",
                              "--lambdas", "0,0.5,0.9,1", "--batch-size", "4", "--max-new-tokens", "4",
                              "--max-input-length", "40", "--output-dir", str(out)])
    assert (out / "results.npz").is_file() and (out / "risk_control.json").is_file()
    rc = RiskControlled.from_pretrained(out)
    assert report["threshold"] == rc.threshold and rc.threshold in (0.0, 0.5, 0.9, 1.0)
    assert report["n_cal"] == 4 and report["n_test"] == 4 and 0.0 <= report[score_key] <= 1.0
    assert 1.0 <= report["mean_exit_layer"] <= 3.0
    # speed like for like: per generated token, the token counts recorded (4 test examples x at most 4 tokens)
    assert report["speedup_basis"] == "per generated token"
    assert 1 <= report["tokens_early"] <= 16 and 1 <= report["tokens_full"] <= 16 and report["speedup"] > 0
    if rc.threshold == 1.0:  # no early exit: the early-exit output is the full model's
        assert report["performance_gap"] == 0.0 and report["mean_exit_layer"] == 3.0
    assert "λ̂ =" in capsys.readouterr().out
