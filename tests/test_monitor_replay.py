"""The monitor's stream replay (``hf-safe-exit monitor``, issue 29): the stream, the losses it logs, the alarm, the CLI.

References are independent of the replay: every row decoded alone, the early exit by ``generate`` at λ̂ and the full
model by HF's own ``generate`` (``type(model).generate``), scored with ``rouge_score`` called directly; the test's
trajectory by a fresh :class:`SequentialRiskTest` / :func:`first_alarm` on those losses.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

import hf_safe_exit
from hf_safe_exit import EarlyExit, LossTable, RiskControlled, RiskMonitor, generate
from hf_safe_exit.cli import build_parser, main
from hf_safe_exit.fingerprint import model_fingerprint
from hf_safe_exit.monitor.replay import NOISE_RATE, build_stream, perturb_words, plot_replay, replay, write_log
from hf_safe_exit.risk import store_calibration
from hf_safe_exit.risk.sequential_test import SequentialRiskTest, first_alarm
from hf_safe_exit.tasks import get_task, load_split, shared_data_dir

from tiny_calibration import build_tiny_t5, build_word_tokenizer

DATA = shared_data_dir()
MAX_NEW, MAX_IN, N_CAL = 8, 48, 50
pytestmark = [pytest.mark.usefixtures("one_thread", "fresh_risk_cache"),
              pytest.mark.skipif(DATA is None, reason="needs the offline data folder (../shared/data)")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny CNN/DM T5 saved with a stored calibration (zero losses at λ ∈ {0, 0.5, 1}: λ̂ = 0, every token exits
    at layer 1, which differs from the full model on most rows) whose table lists the first 50 pool rows."""
    task = get_task("cnndm")
    pool = load_split(task, "pool", path=DATA)
    folder = tmp_path_factory.mktemp("tiny_monitor")
    tokenizer = build_word_tokenizer([task.prompt(r) + " " + r["highlights"] for r in pool.select(range(80))])
    model = build_tiny_t5(len(tokenizer), seed=2, num_layers=3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    lam, zeros = np.array([0.0, 0.5, 1.0]), np.zeros((3, N_CAL))
    meta = {"task": "cnndm", "measure": "softmax", "schedule": "constant", "min_exit_layer": 1,
            "model_fingerprint": model_fingerprint(model), "max_new_tokens": MAX_NEW, "max_input_length": MAX_IN,
            "example_ids": [str(i) for i in pool["id"][:N_CAL]]}
    store_calibration(folder, table=LossTable.from_task_losses(lam, zeros, consistency_losses=zeros, metadata=meta))
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    loaded = hf_safe_exit.enable(AutoModelForSeq2SeqLM.from_pretrained(folder).eval())
    return str(folder), loaded, AutoTokenizer.from_pretrained(folder), meta["example_ids"]


def _reference_losses(model, tokenizer, stream, risk: str) -> list[float]:
    """Each row alone: early exit at λ̂ = 0 vs HF's own generate, 1 − ROUGE-L F (rouge_score) as CNN/DM scores."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    config = RiskControlled(0.5).calibration_for(model).config

    def loss(prediction, reference):
        return 0.0 if prediction == reference else 1.0 - scorer.score(reference, prediction)["rougeL"].fmeasure

    out = []
    with torch.inference_mode():
        for row in stream:
            enc = tokenizer([row.prompt], return_tensors="pt", truncation=True, max_length=MAX_IN)
            early = generate(model, **enc, early_exit=EarlyExit(0.0, config=config), max_new_tokens=MAX_NEW)
            full = type(model).generate(model, **enc, max_new_tokens=MAX_NEW)
            e, f = (tokenizer.batch_decode(ids, skip_special_tokens=True)[0] for ids in (early, full))
            out.append(loss(e, f) if risk == "consistency" else loss(e, row.reference) - loss(f, row.reference))
    return out


def _fed(log) -> tuple[list[str], list[float]]:
    """(row id, loss) of every loss the log says the monitor's test was fed, in order."""
    ids, losses = [], []
    for call in log["calls"]:
        ids += [call["ids"][r] for r in call["sampled_rows"]]
        losses += call["losses"]
    return ids, losses


@pytest.mark.parametrize("risk", ["consistency", "performance_gap"])
def test_sample_rate_one_logs_every_row_s_independent_loss(tiny, risk):
    _, model, tokenizer, _ = tiny
    stream = build_stream("cnndm", DATA, n=5, shift="other-task", shift_n=3, seed=1)
    monitor = RiskMonitor(RiskControlled(0.5, risk=risk), tokenizer=tokenizer, sample_rate=1.0, risk=risk,
                          fallback=False, seed=0)
    log = replay(model, tokenizer, monitor, stream, batch_size=3)
    ids, losses = _fed(log)
    assert ids == [r.id for r in stream]  # p = 1: every row, in stream order; batches stop at the phase boundary
    assert [c["phase"] for c in log["calls"]] == ["in-distribution"] * 2 + ["other-task"]
    expected = _reference_losses(model, tokenizer, stream, risk)
    # the rows differ (a random model's summaries seldom share words with the highlights: gaps are small)
    assert np.ptp(expected) > (0.1 if risk == "consistency" else 0.01)
    np.testing.assert_allclose(losses, expected, atol=1e-9)
    test = SequentialRiskTest(0.5, 0.05, loss_range=(0.0, 1.0) if risk == "consistency" else (-1.0, 1.0))
    for call in log["calls"]:  # the logged evidence after each call is the test's on the prefix of the losses
        test.update(call["losses"])
        assert call["n"] == test.n and call["log_e_value"] == pytest.approx(test.log_e_value, abs=1e-9)
        assert call["confidence_interval"] == pytest.approx(list(test.confidence_interval()), abs=1e-9)
    for phase, part in zip(log["phases"], (expected[:5], expected[5:])):
        assert phase["mean_loss"] == pytest.approx(np.mean(part), abs=1e-12)
    assert json.loads(json.dumps(log, allow_nan=False)) == log  # JSON-able as it is


@pytest.mark.parametrize("sample", ["row", "call"])
def test_sampled_rows_are_logged_with_their_own_losses(tiny, sample):
    _, model, tokenizer, _ = tiny
    stream = build_stream("cnndm", DATA, n=9, shift="none", seed=2)
    seed = 3
    monitor = RiskMonitor(RiskControlled(0.5, risk="consistency"), tokenizer=tokenizer, sample_rate=0.5, seed=seed,
                          fallback=False, sample=sample)
    log = replay(model, tokenizer, monitor, stream, batch_size=3)
    draws = np.random.default_rng(seed)  # the monitor's decisions: numpy's generator, one draw a row (a call)
    expected_rows = [np.flatnonzero(draws.random(3) < 0.5).tolist() if sample == "row" else
                     ([0, 1, 2] if draws.random() < 0.5 else []) for _ in range(3)]
    assert [c["sampled_rows"] for c in log["calls"]] == expected_rows
    assert 0 < sum(map(len, expected_rows)) < 9  # some rows sampled, not all: the rows must be paired right
    ids, losses = _fed(log)
    by_id = dict(zip([r.id for r in stream], _reference_losses(model, tokenizer, stream, "consistency")))
    np.testing.assert_allclose(losses, [by_id[i] for i in ids], atol=1e-9)
    assert len(set(np.round(losses, 9))) > 1 and log["settings"]["sample"] == sample


def test_alarm_fallback_and_where_it_fired(tiny):
    _, model, tokenizer, _ = tiny
    stream = build_stream("cnndm", DATA, n=12, shift="none", seed=0)
    monitor = RiskMonitor(RiskControlled(0.05, risk="consistency"), tokenizer=tokenizer, sample_rate=1.0, seed=0)
    log = replay(model, tokenizer, monitor, stream, batch_size=2)
    _, losses = _fed(log)
    index = first_alarm(losses, 0.05, 0.05)
    assert index is not None and log["alarm"]["sample_index"] == index
    fired = log["alarm"]["call"]
    assert sum(len(c["losses"]) for c in log["calls"][:fired]) <= index < sum(
        len(c["losses"]) for c in log["calls"][:fired + 1])
    after = log["calls"][fired + 1:]
    assert after and all(c["losses"] == [] and c["fallback_active"] for c in after)  # the full model, no shadow
    assert "RiskMonitor alarm" in log["alarm"]["message"]


def test_stream_excludes_calibration_rows_is_seeded_and_noised(tiny):
    ids = tiny[3]
    pool = load_split(get_task("cnndm"), "pool", path=DATA)
    a = build_stream("cnndm", DATA, n=20, shift="noise", shift_n=10, seed=3, exclude_ids=ids)
    assert [r.id for r in a] == [r.id for r in build_stream("cnndm", DATA, n=20, shift="noise", shift_n=10, seed=3,
                                                            exclude_ids=ids)]
    assert not {r.id for r in a} & set(ids) and len({r.id for r in a}) == 30  # disjoint phases: the pool has rows
    by_id = {str(r["id"]): r for r in pool}
    for row in a[20:]:
        original = by_id[row.id]["article"].split()
        noised = row.prompt.removeprefix("summarize: ").split()
        assert len(noised) == len(original) and set(noised) <= set(original)
        changed = sum(x != y for x, y in zip(original, noised))
        assert 0 < changed <= round(NOISE_RATE * len(original))
    assert a[0].prompt == "summarize: " + by_id[a[0].id]["article"]
    low = build_stream("cnndm", DATA, n=20, shift="lowercase", shift_n=10, seed=3, exclude_ids=ids)
    assert [r.id for r in low] == [r.id for r in a] and low[:20] == a[:20]  # the same rows, only the phase differs
    assert all(r.prompt == "summarize: " + by_id[r.id]["article"].lower() for r in low[20:])
    assert all(r.prompt != "summarize: " + by_id[r.id]["article"] for r in low[20:])  # every article had capitals
    assert build_stream("cnndm", DATA, n=20, seed=4)[0].id != a[0].id
    with pytest.raises(ValueError, match="n=400 exceeds the 350 cnndm pool rows"):
        build_stream("cnndm", DATA, n=400, exclude_ids=ids)
    with pytest.raises(ValueError, match="shift='longer' is unknown"):
        build_stream("cnndm", DATA, n=2, shift="longer")


def test_perturb_words_replaces_the_stated_fraction_with_the_text_s_own_words():
    words = [f"w{i}" for i in range(200)]
    out = perturb_words(" ".join(words), 0.3, np.random.default_rng(0)).split()
    changed = [i for i, (x, y) in enumerate(zip(words, out)) if x != y]
    assert len(out) == 200 and set(out) <= set(words) and 55 <= len(changed) <= 60  # 60 drawn, a few redraw themselves
    assert perturb_words("a  b c", 0.0, np.random.default_rng(0)) == "a b c"
    with pytest.raises(ValueError, match="rate=1.5"):
        perturb_words("a b", 1.5, np.random.default_rng(0))


def test_cli_writes_log_plot_state_and_refuses_existing_files(tiny, tmp_path, capsys):
    folder = tiny[0]
    out, png, state = tmp_path / "log.json", tmp_path / "fig.png", tmp_path / "state.json"
    args = ["monitor", "--model", folder, "--task", "cnndm", "--data", str(DATA), "--n", "4", "--shift-n", "2",
            "--sample-rate", "1", "--sample", "call", "--batch-size", "2", "--eps", "0.5", "--method", "crc"]
    assert main([*args, "--output", str(out), "--plot", str(png), "--state", str(state)]) == 0
    printed = capsys.readouterr().out
    assert "λ̂ = 0" in printed and "phase other-task: 2 rows, 2 monitored losses" in printed
    log = json.loads(out.read_text())
    assert log["settings"]["excluded_calibration_rows"] == N_CAL and len(_fed(log)[1]) == 6
    assert log["settings"]["sample"] == "call" and json.loads(state.read_text())["sample"] == "call"
    assert png.read_bytes()[:4] == b"\x89PNG"
    from transformers import AutoTokenizer

    loaded = RiskMonitor.load(state, RiskControlled(0.5, method="crc", risk="consistency"),
                              tokenizer=AutoTokenizer.from_pretrained(folder), sample_rate=1.0, sample="call")
    assert loaded.test.n == 6 and loaded.calls == log["state"]["calls"]
    for flag, path in (("--output", out), ("--state", state), ("--plot", png)):
        before = path.read_bytes()
        assert main([*args, flag, str(path)]) == 2
        err = capsys.readouterr().err
        assert f"'{path}' exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
        assert path.read_bytes() == before


def test_write_log_refuses_an_existing_file_and_plot_needs_a_log(tmp_path):
    path = tmp_path / "log.json"
    path.write_text("{}")
    with pytest.raises(FileExistsError, match="log.json' exists"):
        write_log({"a": 1}, path)
    assert json.loads(open(write_log({"a": 1}, path, overwrite=True)).read()) == {"a": 1}
    for log, match in (({}, "missing.*calls"), ({"a": 1}, "missing"), ([1], "got list")):
        with pytest.raises(ValueError, match=f"plot_replay needs the log replay\\(\\) returns.*{match}") as err:
            plot_replay(log, tmp_path / "x.png")
        assert "\n" not in str(err.value) and not (tmp_path / "x.png").exists()


def test_monitor_help_documents_every_option(capsys):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["monitor"]
    options = {o for a in sub._actions for o in a.option_strings}
    assert options >= {"--model", "--task", "--data", "--eps", "--delta", "--method", "--risk", "--sample-rate",
                       "--sample", "--alpha", "--n", "--shift", "--shift-n", "--batch-size", "--seed", "--no-fallback",
                       "--output", "--plot", "--state", "--overwrite"}
    assert all(a.help and a.help.strip() for a in sub._actions)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["monitor", "--help"])
    assert "other-task" in capsys.readouterr().out
