"""Nothing overwritten silently: a card (local, CLI or pushed to the Hub) never replaces a calibration,
evaluation or plot of other content without overwrite=True / --overwrite, and a push keeps the other tasks'."""

from __future__ import annotations

import json

import numpy as np
import pytest
from huggingface_hub import ModelCard

from hf_safe_exit import RiskControlled
from hf_safe_exit.calibration.evaluate import evaluate_table
from hf_safe_exit.cards import WouldOverwriteError, write_guarantee_card
from hf_safe_exit.errors import InconsistentCalibrationError

from card_helpers import calibrated, squad_table  # noqa: F401, F811 (fixtures)
from card_helpers import (CNNDM_END, CNNDM_START, SQUAD_END, SQUAD_START, FakeHub, check_numbers, our_results,
                          section, shipped_like)


def test_push_to_hub_keeps_other_tasks(calibrated, squad_table, tmp_path, monkeypatch):
    import huggingface_hub

    from hf_safe_exit.cards import push_to_hub

    _, _, table = calibrated
    cnndm = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    squad = RiskControlled(eps=0.15, delta=0.1, method="ucb").fit_table(squad_table)
    local = tmp_path / "local"
    write_guarantee_card(local, cnndm, model_name="m", repo_id="me/m")
    hub = FakeHub({p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()})
    generate_files = {"custom_generate/generate.py", "custom_generate/requirements.txt"}
    assert set(hub.files) == {"README.md", "calibration/cnndm/risk_control.json"} | generate_files
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.download(tmp_path))

    push_to_hub(squad, "me/m")
    assert set(hub.uploaded) == {"README.md", "calibration/squad/risk_control.json"} | generate_files
    assert json.loads(hub.files["calibration/cnndm/risk_control.json"])["certificate"]["task"] == "cnndm"
    assert json.loads(hub.files["calibration/squad/risk_control.json"])["certificate"]["task"] == "squad"
    readme = hub.files["README.md"].decode("utf-8")
    check_numbers(section(readme, CNNDM_START, CNNDM_END), cnndm)
    squad_section = section(readme, SQUAD_START, SQUAD_END)
    check_numbers(squad_section, squad)
    assert 'path = "me/m"' in squad_section and "task='squad'" in squad_section

    push_to_hub(cnndm, "me/m")  # cnndm's: updated in its own folder
    assert set(hub.uploaded) == {"README.md", "calibration/cnndm/risk_control.json"} | generate_files
    assert hub.files["calibration/squad/risk_control.json"]  # still there
    assert ModelCard(hub.files["README.md"].decode("utf-8")).text.count(SQUAD_START) == 1


def test_card_never_replaces_a_calibration_evaluation_or_plot_silently(calibrated, tmp_path, capsys):
    from hf_safe_exit.cli import main
    from hf_safe_exit.plotting import plot_evaluation

    _, _, table = calibrated
    model_dir = tmp_path / "model"
    rc, before = shipped_like(model_dir, table, tmp_path)
    cal = model_dir / "calibration" / "cnndm"
    assert {p.name for p in cal.iterdir()} == {"risk_control.json", "evaluation.json", "early_exit_calibration.npz"}

    # writing the same calibration again changes nothing
    write_guarantee_card(model_dir, rc, test_results=str(cal / "evaluation.json"), model_name="m",
                         plots=[model_dir / "hf_safe_exit_plots" / "cnndm" / name for name in
                                ("risk_vs_eps.png", "exit_layer_vs_eps.png", "speedup_vs_eps.png")])
    assert {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()} == before

    # the case: a 24-example CRC calibration from elsewhere, carded into the model -> refused, one line
    small = table.subset(np.arange(24))
    other = RiskControlled(eps=0.3, method="crc").fit_table(small)
    other.save_pretrained(tmp_path / "other")
    assert main(["card", "--model", str(model_dir), "--calibration", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(cal / "risk_control.json") in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()} == before  # nothing written

    # a different plot of the same name: refused too
    changed = evaluate_table(table, eps=(0.1, 0.2), methods=("ucb",), delta=0.1, repeats=2)
    new_plots = plot_evaluation(changed, tmp_path / "plots2")
    with pytest.raises(WouldOverwriteError, match="risk_vs_eps.png"):
        write_guarantee_card(model_dir, rc, plots=new_plots)
    assert {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()} == before

    # --overwrite replaces the calibration as a whole: the old evaluation and the table of 300 examples go
    assert main(["card", "--model", str(model_dir), "--calibration", str(tmp_path / "other"), "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "removed" in out and "evaluation.json" in out
    assert {p.name for p in cal.iterdir()} == {"risk_control.json"}
    assert RiskControlled.from_pretrained(cal).certificate == other.certificate
    assert our_results(ModelCard.load(model_dir / "README.md"))["early_exit_threshold"].metric_value == \
        other.certificate.threshold


def test_overwrite_keeps_a_table_that_still_reproduces_the_calibration(calibrated, tmp_path):
    _, _, table = calibrated
    model_dir = tmp_path / "model"
    shipped_like(model_dir, table, tmp_path)
    eps2 = RiskControlled(eps=0.2, delta=0.1, method="ucb").fit_table(table)  # another ε of the same table
    write_guarantee_card(model_dir, eps2, overwrite=True)
    cal = model_dir / "calibration" / "cnndm"
    assert {p.name for p in cal.iterdir()} == {"risk_control.json", "early_exit_calibration.npz"}
    text = (model_dir / "README.md").read_text(encoding="utf-8")
    assert f"What the shipped λ̂ = {eps2.certificate.threshold:.6g} does" in text  # read from the kept table


def test_push_to_hub_never_replaces_silently(calibrated, tmp_path, monkeypatch):
    import huggingface_hub

    from hf_safe_exit.cards import push_to_hub

    _, _, table = calibrated
    local = tmp_path / "local"
    shipped_like(local, table, tmp_path)
    hub = FakeHub({p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()})
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.download(tmp_path))
    before = dict(hub.files)
    other = RiskControlled(eps=0.3, method="crc").fit_table(table.subset(np.arange(24)))
    with pytest.raises(WouldOverwriteError, match="calibration/cnndm/risk_control.json.*overwrite"):
        push_to_hub(other, "me/m")
    assert hub.files == before and not hub.uploaded and not hub.created  # nothing uploaded, no repo call

    push_to_hub(other, "me/m", overwrite=True)
    assert hub.deleted == ["calibration/cnndm/early_exit_calibration.npz", "calibration/cnndm/evaluation.json"]
    assert json.loads(hub.files["calibration/cnndm/risk_control.json"])["certificate"]["n"] == 24
    assert "calibration/cnndm/evaluation.json" not in hub.files


def test_a_refused_push_leaves_no_empty_repo(calibrated, tmp_path, monkeypatch):
    """Everything that can refuse a push is checked before the repo is created."""
    import huggingface_hub

    from hf_safe_exit.cards import push_to_hub

    _, _, table = calibrated
    rc = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    hub = FakeHub({}, exists=False)  # a repo the push would create
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.download(tmp_path))
    of_another = evaluate_table(table.subset(np.arange(24)), eps=(0.1,), methods=("ucb",), delta=0.1, repeats=2)
    with pytest.raises(InconsistentCalibrationError, match="examples is 24, the calibration's 300"):
        push_to_hub(rc, "me/new", test_results=of_another)
    with pytest.raises(FileNotFoundError, match="plot"):
        push_to_hub(rc, "me/new", plots=[tmp_path / "no_such_plot.png"])
    assert hub.created == [] and not hub.exists and not hub.uploaded

    push_to_hub(rc, "me/new")  # nothing refuses it: created, then uploaded
    assert hub.created == ["me/new"]
    assert json.loads(hub.files["calibration/cnndm/risk_control.json"])["lambda_"] == rc.threshold
