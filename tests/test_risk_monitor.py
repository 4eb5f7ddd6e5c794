"""RiskMonitor: decoding as the policy, shadow decodes against HF's own generate, alarm and fallback, state files.

References are independent of the monitor: HF's own ``generate`` (``type(model).generate``) for the full model,
``rouge_score`` called directly for the consistency loss (ROUGE-L F of the early-exit text against the full
model's), numpy's generator with the same seed for the sampling decisions.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import hf_safe_exit
from hf_safe_exit import EarlyExit, LossTable, RiskControlled, RiskMonitor, generate
from hf_safe_exit.errors import CorruptFileError, MissingCalibrationError, WouldOverwriteError
from hf_safe_exit.fingerprint import model_fingerprint
from hf_safe_exit.monitor import MonitoredCall, MonitorStateMismatchError, RiskAlarmWarning
from hf_safe_exit.risk.sequential_test import SequentialRiskTest, first_alarm
from hf_safe_exit.tasks import shared_data_dir

from tiny_calibration import build_tiny_t5, tiny_cnndm

MAX_NEW = 8
pytestmark = pytest.mark.usefixtures("one_thread", "fresh_risk_cache")


@pytest.fixture(scope="module")
def setup():
    """A tiny CNN/DM T5 (3+3 layers, seed 2: its λ = 0 outputs differ from the full model's on most rows), its word
    tokenizer, and 6 prompts."""
    task, rows, tokenizer, _ = tiny_cnndm(6, shared_data_dir())
    model = build_tiny_t5(len(tokenizer), seed=2, num_layers=3)
    inputs = tokenizer([task.prompt(r) for r in rows], return_tensors="pt", padding=True, truncation=True,
                       max_length=48)
    return task, tokenizer, model, dict(inputs)


def _table(model, lambdas=(0.0, 0.5, 1.0), losses=None, n=50) -> LossTable:
    """A consistency loss table for ``model`` (softmax, 8 new tokens); zero losses: CRC picks λ̂ = the lowest λ."""
    lam = np.asarray(lambdas)
    losses = np.zeros((len(lam), n)) if losses is None else losses
    meta = {"task": "cnndm", "measure": "softmax", "schedule": "constant", "min_exit_layer": 1,
            "model_fingerprint": model_fingerprint(model), "max_new_tokens": MAX_NEW}
    return LossTable.from_task_losses(lam, np.zeros((len(lam), n)), consistency_losses=losses, metadata=meta)


def _policy(model, eps=0.05, risk="consistency") -> RiskControlled:
    return RiskControlled(eps, risk=risk).fit_table(_table(model))  # λ̂ = 0: every token exits at layer 1


def _hf(model, inputs, rows=None):
    """HF's own generate (the full model), on ``rows`` of the batch."""
    if rows is not None:
        inputs = {k: v[list(rows)] for k, v in inputs.items()}
    return type(model).generate(model, **inputs, max_new_tokens=MAX_NEW)


def _texts(tokenizer, ids) -> list[str]:
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def _consistency(early: list[str], full: list[str]) -> list[float]:
    """1 − ROUGE-L F (rouge_score, stemming, as CNN/DM scores) of each early-exit text against the full model's."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    return [0.0 if e == f else 1.0 - scorer.score(f, e)["rougeL"].fmeasure for e, f in zip(early, full)]


def _monitor(policy, tokenizer, **kwargs) -> RiskMonitor:
    return RiskMonitor(policy, tokenizer=tokenizer, **{"sample_rate": 1.0, "seed": 0, **kwargs})


# ---------------------------------------------------------------- decoding as the policy
def test_outputs_are_the_policy_s(setup):
    _, tokenizer, model, inputs = setup
    rc = _policy(model)
    assert rc.threshold == 0.0
    monitor = _monitor(rc, tokenizer, eps=0.95)
    expected = generate(model, **inputs, early_exit=rc, return_dict_in_generate=True)
    out = generate(model, **inputs, early_exit=monitor, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected.sequences) and torch.equal(out.exit_layers, expected.exit_layers)
    assert out.certificate is rc.certificate and out.early_exit.threshold == 0.0
    assert torch.equal(generate(model, **inputs, early_exit=monitor), expected.sequences)
    enabled = hf_safe_exit.enable(build_tiny_t5(len(tokenizer), seed=2, num_layers=3))
    assert torch.equal(enabled.generate(**inputs, early_exit=monitor), expected.sequences)
    assert monitor.calls == 3 and monitor.rows_seen == 18 and monitor.test.n == 18


def test_every_sampled_row_feeds_the_consistency_loss_against_hf_s_full_model(setup):
    _, tokenizer, model, inputs = setup
    rc = _policy(model)
    monitor = _monitor(rc, tokenizer, eps=0.95)
    early = generate(model, **inputs, early_exit=monitor)
    losses = _consistency(_texts(tokenizer, early), _texts(tokenizer, _hf(model, inputs)))
    assert len(set(losses)) > 2  # rows lose different amounts: the order in which they are fed matters
    assert monitor.test.n == monitor.rows_sampled == monitor.rows_seen == 6
    reference = SequentialRiskTest(0.95, 0.05)
    reference.update(losses)  # the same losses in row order
    assert monitor.test.to_dict() == reference.to_dict()
    assert monitor.state()["mean"] == pytest.approx(np.mean(losses))


def test_rows_of_a_batch_are_sampled_independently(setup):
    _, tokenizer, model, inputs = setup
    batch = {k: v[:3] for k, v in inputs.items()}
    seed = next(s for s in range(100) if 0 < (np.random.default_rng(s).random(3) < 0.5).sum() < 3)
    rc = _policy(model)
    monitor = _monitor(rc, tokenizer, sample_rate=0.5, seed=seed)
    draws, fed = np.random.default_rng(seed), []
    for call in range(3):
        rows = np.flatnonzero(draws.random(3) < 0.5)
        early = generate(model, **batch, early_exit=monitor)
        predictions = _texts(tokenizer, early[rows])
        full = _texts(tokenizer, _hf(model, batch, rows)) if rows.size else []
        losses = _consistency(predictions, full)
        fed += losses
        record = monitor.last_call  # what this call sampled, decoded and fed
        assert (record.call, record.rows, record.sampled_rows, record.fallback) == (call, 3, tuple(rows), False)
        assert list(record.predictions) == predictions and list(record.full_predictions) == full
        assert record.losses == pytest.approx(losses) and len(record.losses) == rows.size
    reference = SequentialRiskTest(0.05, 0.05)
    reference.update(fed)
    assert monitor.rows_seen == 9 and monitor.rows_sampled == len(fed) == monitor.test.n
    assert monitor.test.to_dict() == reference.to_dict()
    assert json.loads(json.dumps(monitor.last_call.to_dict())) == {
        "call": 2, "rows": 3, "sampled_rows": list(rows), "predictions": predictions, "full_predictions": full,
        "losses": list(monitor.last_call.losses), "fallback": False}
    with pytest.raises(AttributeError):
        monitor.last_call.losses = ()  # frozen: the record is what the call did
    monitor.reset()
    assert monitor.last_call is None


def test_call_sampling_decodes_every_row_of_a_sampled_call(setup):
    _, tokenizer, model, inputs = setup
    batch = {k: v[:3] for k, v in inputs.items()}
    seed = next(s for s in range(100) if 0 < (np.random.default_rng(s).random(4) < 0.5).sum() < 4)
    monitor = _monitor(_policy(model), tokenizer, sample_rate=0.5, seed=seed, sample="call", eps=0.95)
    draws, fed, sampled_calls = np.random.default_rng(seed), [], 0
    for call in range(4):
        sampled = draws.random() < 0.5  # one draw per call: all of its rows, or none
        early = generate(model, **batch, early_exit=monitor)
        losses = _consistency(_texts(tokenizer, early), _texts(tokenizer, _hf(model, batch))) if sampled else []
        fed += losses
        sampled_calls += sampled
        assert monitor.last_call.sampled_rows == ((0, 1, 2) if sampled else ())
        assert monitor.last_call.losses == pytest.approx(losses)
    reference = SequentialRiskTest(0.95, 0.05)
    reference.update(fed)  # the rows of a sampled call, in row order
    assert 0 < sampled_calls < 4 and monitor.rows_sampled == 3 * sampled_calls == monitor.test.n
    assert monitor.test.to_dict() == reference.to_dict() and monitor.state()["sample"] == "call"


def test_the_shadow_decode_leaves_the_streamer_and_the_random_stream_alone(setup):
    _, tokenizer, model, inputs = setup
    rc = _policy(model)

    class Streamer:
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens.append(value.tolist())

        def end(self):
            self.tokens.append("end")

    def run(early_exit):
        streamer = Streamer()
        one = {k: v[:1] for k, v in inputs.items()}
        generate(model, **one, early_exit=early_exit, streamer=streamer)
        torch.manual_seed(0)
        sampled = [generate(model, **inputs, early_exit=early_exit, do_sample=True) for _ in range(2)]
        return streamer.tokens, sampled

    tokens, sampled = run(rc)
    monitor = _monitor(rc, tokenizer, eps=0.9)
    tokens_m, sampled_m = run(monitor)
    assert tokens_m == tokens and all(torch.equal(a, b) for a, b in zip(sampled, sampled_m))
    assert monitor.test.n == 13  # the shadow decodes ran


# ---------------------------------------------------------------- alarm and fallback
def _until_alarm(model, inputs, monitor, max_calls=10) -> list:
    with pytest.warns(RiskAlarmWarning) as caught:
        for _ in range(max_calls):
            generate(model, **inputs, early_exit=monitor)
            if monitor.alarm is not None:
                break
    assert monitor.alarm is not None and len([w for w in caught if w.category is RiskAlarmWarning]) == 1
    return [str(w.message) for w in caught if w.category is RiskAlarmWarning]


def test_an_alarm_then_the_full_model(setup):
    _, tokenizer, model, inputs = setup
    rc = _policy(model)
    monitor = _monitor(rc, tokenizer, eps=0.01)  # the λ = 0 outputs lose far more than 0.01
    messages = _until_alarm(model, inputs, monitor)
    alarm = monitor.alarm
    calls, n = monitor.calls, monitor.test.n
    losses = _consistency(_texts(tokenizer, generate(model, **inputs, early_exit=rc)),
                          _texts(tokenizer, _hf(model, inputs)))
    assert alarm.sample_index == first_alarm(losses * calls, 0.01, 0.05)
    assert alarm.calls_seen == calls and alarm.eps == 0.01 and alarm.alpha == 0.05 and alarm.e_value >= 1 / 0.05
    assert alarm.risk_interval[1] > 0.01
    assert "eps=0.01" in messages[0] and "alpha=0.05" in messages[0] and "full model" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RiskAlarmWarning)  # warned once only
        out = generate(model, **inputs, early_exit=monitor, return_dict_in_generate=True)
    assert torch.equal(out.sequences, _hf(model, inputs))
    assert out.certificate is None and out.early_exit.threshold == 1.0
    assert monitor.test.n == n and monitor.calls == calls + 1  # no shadow decode after the alarm
    assert monitor.last_call == MonitoredCall(calls, 6, fallback=True)
    assert monitor.state()["fallback_active"] and monitor.state()["alarm"]["sample_index"] == alarm.sample_index
    monitor.reset()
    assert monitor.alarm is None and monitor.test.n == 0 and not monitor.fallback_active
    with pytest.warns(RiskAlarmWarning):  # the fresh test finds the same evidence again, after this call
        assert torch.equal(generate(model, **inputs, early_exit=monitor), generate(model, **inputs, early_exit=rc))


def test_without_fallback_it_warns_and_keeps_early_exit(setup):
    _, tokenizer, model, inputs = setup
    rc = _policy(model)
    monitor = _monitor(rc, tokenizer, eps=0.01, fallback=False)
    messages = _until_alarm(model, inputs, monitor)
    assert "fallback=False" in messages[0]
    n = monitor.test.n
    assert torch.equal(generate(model, **inputs, early_exit=monitor), generate(model, **inputs, early_exit=rc))
    assert monitor.test.n == n + 6 and not monitor.fallback_active


# ---------------------------------------------------------------- the state file
def test_save_and_load_continue_identically(setup, tmp_path):
    _, tokenizer, model, inputs = setup
    rc = _policy(model)
    kwargs = dict(tokenizer=tokenizer, sample_rate=0.5, eps=0.6, seed=7)
    original = RiskMonitor(rc, **kwargs)
    for _ in range(2):
        generate(model, **inputs, early_exit=original)
    path = original.save(tmp_path / "monitor.json")
    assert (tmp_path / "monitor.json").stat().st_size < 4096
    restored = RiskMonitor.load(path, rc, **kwargs)
    assert restored.state() == original.state() and restored.test.to_dict() == original.test.to_dict()
    for _ in range(3):
        generate(model, **inputs, early_exit=original)
        generate(model, **inputs, early_exit=restored)
    assert restored.state() == original.state() and restored.test.to_dict() == original.test.to_dict()
    assert original.rows_sampled not in (0, original.rows_seen)  # sampling decisions were made, and matched
    fresh = RiskMonitor(rc, **kwargs)  # the same seed, run uninterrupted, makes the same decisions
    for _ in range(5):
        generate(model, **inputs, early_exit=fresh)
    assert fresh.test.to_dict() == original.test.to_dict()


def test_a_saved_alarm_keeps_the_fallback(setup, tmp_path):
    _, tokenizer, model, inputs = setup
    rc = _policy(model)
    monitor = _monitor(rc, tokenizer, eps=0.01)
    _until_alarm(model, inputs, monitor)
    restored = RiskMonitor.load(monitor.save(tmp_path / "m.json"), rc, tokenizer=tokenizer, eps=0.01)
    assert restored.alarm == monitor.alarm and restored.fallback_active
    assert torch.equal(generate(model, **inputs, early_exit=restored), _hf(model, inputs))


def test_state_files_refused(setup, tmp_path):
    _, tokenizer, model, _ = setup
    rc = _policy(model)
    path = _monitor(rc, tokenizer).save(tmp_path / "m.json")
    with pytest.raises(WouldOverwriteError, match="overwrite=True"):
        _monitor(rc, tokenizer).save(path)
    _monitor(rc, tokenizer, alpha=0.01).save(path, overwrite=True)
    with pytest.raises(MonitorStateMismatchError, match=r"m\.json.*alpha=0\.01"):
        RiskMonitor.load(path, rc, tokenizer=tokenizer)
    with pytest.raises(MonitorStateMismatchError, match=r"m\.json.*eps=0\.05"):
        RiskMonitor.load(path, RiskControlled(0.1, risk="consistency").fit_table(_table(model)), tokenizer=tokenizer,
                         alpha=0.01)
    data = json.loads(open(path).read())
    data["calls"] = 5
    (tmp_path / "edited.json").write_text(json.dumps(data))
    with pytest.raises(CorruptFileError, match=r"edited\.json.*digest"):
        RiskMonitor.load(tmp_path / "edited.json", rc, tokenizer=tokenizer, alpha=0.01)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CorruptFileError, match=r"bad\.json"):
        RiskMonitor.load(tmp_path / "bad.json", rc, tokenizer=tokenizer)


def test_a_recalibrated_policy_needs_a_reset(setup):
    _, tokenizer, model, inputs = setup
    rc = _policy(model)
    monitor = _monitor(rc, tokenizer, eps=0.9)
    generate(model, **inputs, early_exit=monitor)
    rc.fit_table(_table(model, lambdas=(0.5, 1.0)))  # λ̂ = 0.5 now
    with pytest.raises(ValueError, match="reset"):
        generate(model, **inputs, early_exit=monitor)
    monitor.reset()
    generate(model, **inputs, early_exit=monitor)
    assert monitor.state()["threshold"] == 0.5 and monitor.test.n == 6


# ---------------------------------------------------------------- labels
@pytest.mark.parametrize("risk", ["performance_gap", "performance_gap_bounded"])
def test_performance_gap_monitors_keep_samples_and_take_labels(setup, risk):
    task, tokenizer, model, inputs = setup
    rc = _policy(model, risk=risk)
    monitor = _monitor(rc, tokenizer, risk=risk)
    early = generate(model, **inputs, early_exit=monitor)
    assert monitor.test.n == 0 and len(monitor.samples) == 6
    record = monitor.last_call  # the kept pairs, no loss fed yet: they need labels
    assert record.losses == () and record.sampled_rows == tuple(range(6))
    assert list(record.predictions) == [s["prediction"] for s in monitor.samples]
    assert list(record.full_predictions) == [s["full_prediction"] for s in monitor.samples]
    assert [s["prediction"] for s in monitor.samples] == _texts(tokenizer, early)
    assert [s["full_prediction"] for s in monitor.samples] == _texts(tokenizer, _hf(model, inputs))
    preds = [s["prediction"] for s in monitor.samples]
    fulls = [s["full_prediction"] for s in monitor.samples]
    refs = [fulls[0]] * 6  # "labels": the first full output, so that the gaps are not all 0
    fed = monitor.record(preds, refs, fulls)
    gaps = np.subtract(_consistency(preds, refs), _consistency(fulls, refs))
    expected = np.maximum(gaps, 0.0) if risk == "performance_gap_bounded" else gaps
    assert fed == pytest.approx(expected) and monitor.test.n == 6 and np.any(expected != 0)
    assert monitor.test.loss_range == ((0.0, 1.0) if risk == "performance_gap_bounded" else (-1.0, 1.0))
    with pytest.raises(ValueError, match="one reference per prediction"):
        monitor.record(preds, refs[:2], fulls)


def test_a_consistency_monitor_records_pairs_without_references(setup):
    _, tokenizer, model, _ = setup
    monitor = _monitor(_policy(model), tokenizer)
    fed = monitor.record(["a cat sat", "a dog"], full_predictions=["a cat sat", "the dog ran"])
    assert fed == pytest.approx(_consistency(["a cat sat", "a dog"], ["a cat sat", "the dog ran"]))
    with pytest.raises(ValueError, match="no references"):
        monitor.record(["a"], ["ref"], ["a"])


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs, match", [
    (dict(sample_rate=0), "sample_rate=0"), (dict(sample_rate=1.5), "sample_rate=1.5"),
    (dict(alpha=0), "alpha=0"), (dict(alpha=1), "alpha=1"), (dict(risk="accuracy"), "risk='accuracy'"),
    (dict(seed=-1), "seed=-1"), (dict(eps=1.0), "eps=1.0"), (dict(sample="batch"), "sample='batch'")])
def test_bad_settings(setup, kwargs, match):
    _, tokenizer, model, _ = setup
    with pytest.raises(ValueError, match=match):
        RiskMonitor(_policy(model), tokenizer=tokenizer, **kwargs)


def test_bad_policies_and_tokenizers(setup):
    _, tokenizer, model, inputs = setup
    with pytest.raises(TypeError, match="RiskControlled"):
        RiskMonitor(EarlyExit(0.5), tokenizer=tokenizer)
    with pytest.raises(TypeError, match="tokenizer"):
        RiskMonitor(_policy(model))
    with pytest.raises(ValueError, match="needs labels.*risk='consistency'.*eps="):
        RiskMonitor(RiskControlled(0.05), tokenizer=tokenizer)  # a performance_gap policy, no eps=
    assert RiskMonitor(RiskControlled(0.05), tokenizer=tokenizer, eps=0.1).eps == 0.1
    with pytest.raises(ValueError, match="num_return_sequences=2"):
        generate(model, **inputs, early_exit=_monitor(_policy(model), tokenizer), num_return_sequences=2,
                 do_sample=True)


def test_an_unfitted_policy_uses_the_stored_calibration_or_says_there_is_none(setup):
    _, tokenizer, model, inputs = setup
    bare = build_tiny_t5(len(tokenizer), seed=2, num_layers=3)
    monitor = RiskMonitor(RiskControlled(0.05, risk="consistency"), tokenizer=tokenizer)
    with pytest.raises(MissingCalibrationError):
        generate(bare, **inputs, early_exit=monitor)
    assert monitor.calls == 0
    bare.early_exit_calibration = _table(bare)
    out = generate(bare, **inputs, early_exit=monitor)
    assert torch.equal(out, generate(model, **inputs, early_exit=_policy(model)))
    assert monitor.calls == 1 and monitor.state()["threshold"] == 0.0
