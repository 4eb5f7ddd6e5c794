"""Swapped task folders (issue 26, root cause 8): ``calibration/cnndm/`` holding the files of the SQuAD calibration
(they record task 'squad') is refused, naming the file and the fix, rather than read as CNN/DM's: through
``RiskControlled(eps)`` and ``generate``, and through the demo (the CLI exits 2 with one line). The shipped model's
folders record their own tasks, so it still loads."""

import io
import os

import pytest
import torch

from hf_safe_exit import enable, model_fingerprint
from hf_safe_exit.demo import DEMO_ARTICLE, DEMO_QUESTION, run_demo
from hf_safe_exit.errors import InconsistentCalibrationError
from hf_safe_exit.models import default_model_available, default_model_path
from hf_safe_exit.risk import RiskControlled, find_stored, store_calibration

from tiny_calibration import save_tiny_t5
from tiny_t5 import random_t5
from toy_losses import toy_table

pytestmark = pytest.mark.usefixtures("fresh_risk_cache")


def _store_both(model_dir, model, files: str) -> None:
    """Calibrations of cnndm (the primary task) and squad for ``model``: loss table, risk_control.json or both."""
    for task in ("cnndm", "squad"):
        table = toy_table(model_fingerprint(model), task=task)
        fitted = RiskControlled(0.1).fit_table(table)
        store_calibration(model_dir, table=table if files != "json" else None,
                          controlled=fitted if files != "table" else None)


def _swap(model_dir) -> None:
    base = os.path.join(model_dir, "calibration")
    os.rename(os.path.join(base, "cnndm"), os.path.join(base, "swapping"))
    os.rename(os.path.join(base, "squad"), os.path.join(base, "cnndm"))
    os.rename(os.path.join(base, "swapping"), os.path.join(base, "squad"))


@pytest.mark.parametrize("files,refused", [("table", "early_exit_calibration.npz"), ("json", "risk_control.json"),
                                           ("both", "early_exit_calibration.npz")])
def test_swapped_task_folders_are_refused(tmp_path, files, refused):
    model = enable(random_t5())
    model.name_or_path = str(tmp_path)
    _store_both(tmp_path, model, files)
    assert RiskControlled(0.1, task="cnndm").policy_for(model)[0].task == "cnndm"  # in place: read as stored
    _swap(tmp_path)
    path = os.path.join(str(tmp_path), "calibration", "cnndm", refused)
    for request in (RiskControlled(0.1, task="cnndm"), RiskControlled(0.1)):  # named, or the primary task
        with pytest.raises(InconsistentCalibrationError) as caught:
            request.policy_for(model)
        message = str(caught.value)
        assert message.startswith(f"'{path}': it is stored in the folder of task 'cnndm' but records task 'squad'")
        assert "Move it to calibration/squad/" in message and "\n" not in message and caught.value.path == path
    with pytest.raises(InconsistentCalibrationError, match="records task 'cnndm'"):
        RiskControlled(0.1, task="squad").policy_for(model)
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 1]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with pytest.raises(InconsistentCalibrationError, match="records task 'squad'"):
        model.generate(**inputs, early_exit=RiskControlled(0.1), max_new_tokens=2)


def test_the_demo_refuses_swapped_task_folders(tmp_path, capsys):
    from transformers import T5ForConditionalGeneration

    from hf_safe_exit.cli import main as cli_main

    save_tiny_t5(tmp_path, [DEMO_ARTICLE, DEMO_QUESTION], seed=0, num_decoder_layers=4)
    _store_both(tmp_path, T5ForConditionalGeneration.from_pretrained(tmp_path), "table")
    _swap(tmp_path)
    with pytest.raises(InconsistentCalibrationError, match="records task 'squad'"):
        run_demo(model_dir=tmp_path, repeats=1, max_new_tokens=2, out=io.StringIO())
    capsys.readouterr()
    assert cli_main(["demo", "--model", str(tmp_path), "--no-color", "--max-new-tokens", "2"]) == 2
    out, err = capsys.readouterr()
    assert "Summary" not in out  # nothing was decoded under the wrong calibration
    assert err.count("\n") == 1 and err.startswith("hf-safe-exit demo: error: '")
    assert "calibration/cnndm/early_exit_calibration.npz': it is stored in the folder of task 'cnndm'" in err


@pytest.mark.skipif(not default_model_available(),
                    reason=f"the default model is not installed in {default_model_path()} (trained separately)")
@pytest.mark.parametrize("task", ["cnndm", "squad"])
def test_the_shipped_models_task_folders_hold_their_own_tasks(task):
    stored = find_stored(default_model_path(), task)
    assert stored.task == task and stored.table.metadata["task"] == task
    assert stored.controlled_json["calibration"]["task"] == task
