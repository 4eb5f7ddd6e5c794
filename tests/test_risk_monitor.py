"""RiskMonitor: decoding as the policy, shadow decodes against HF's own generate, alarm and fallback, state files.

References are independent of the monitor: HF's own ``generate`` (``type(model).generate``) for the full model,
``rouge_score`` called directly for the consistency loss (ROUGE-L F of the early-exit text against the full
model's), numpy's generator with the same seed for the sampling decisions.
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import hf_safe_exit
from hf_safe_exit import EarlyExit, LossTable, RiskControlled, RiskMonitor, generate
from hf_safe_exit.errors import CorruptFileError, MissingCalibrationError, WouldOverwriteError
from hf_safe_exit.fingerprint import model_fingerprint
from hf_safe_exit.monitor import MonitoredCall, MonitorStateMismatchError, RiskAlarmWarning, ShadowDecodeWarning
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
        # no row sampled: nothing decoded (transformers 5.15's batch_decode reads an empty (0, L) batch as [''])
        predictions = _texts(tokenizer, early[rows]) if rows.size else []
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
        "losses": list(monitor.last_call.losses), "fallback": False, "unmonitored_rows": [], "shadow_error": None}
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


class _Noise(LogitsProcessor):
    """A caller's processor that draws from torch's random stream (tiny noise: greedy outputs as without it)."""

    def __call__(self, input_ids, scores):
        return scores + 1e-6 * torch.rand_like(scores)


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
        out = generate(model, **inputs, early_exit=early_exit, logits_processor=LogitsProcessorList([_Noise()]))
        return streamer.tokens, out, torch.rand(4)  # what the caller draws after the call

    tokens, out, after = run(rc)
    monitor = _monitor(rc, tokenizer, eps=0.9)
    tokens_m, out_m, after_m = run(monitor)
    assert tokens_m == tokens and torch.equal(out_m, out) and torch.equal(after_m, after)
    assert monitor.test.n == 7  # the shadow decodes ran (and drew their own noise, on a fork of the stream)


@pytest.mark.parametrize("where", ["call", "call's generation_config", "model's generation_config"])
def test_sampling_calls_are_refused(setup, where):
    _, tokenizer, model, inputs = setup
    monitor = _monitor(_policy(model), tokenizer, eps=0.9)
    sampling = copy.deepcopy(model.generation_config)
    sampling.do_sample = True
    kwargs = {"call": dict(do_sample=True), "call's generation_config": dict(generation_config=sampling),
              "model's generation_config": {}}[where]
    saved = model.generation_config
    if where == "model's generation_config":
        model.generation_config = sampling
    try:
        with pytest.raises(ValueError, match="do_sample=True.*greedy.*early_exit=monitor.policy") as err:
            generate(model, **inputs, early_exit=monitor, **kwargs)
        assert "\n" not in str(err.value) and monitor.calls == 0 and monitor.test.n == 0
        # the call's own do_sample=False overrides a sampling config: greedy, monitored
        generate(model, **inputs, early_exit=monitor, **{**kwargs, "do_sample": False})
        assert monitor.calls == 1 and monitor.test.n == 6
    finally:
        model.generation_config = saved


def _sampled_with_row(seed_ok) -> int:
    return next(s for s in range(200) if seed_ok(np.flatnonzero(np.random.default_rng(s).random(6) < 0.5)))


def test_a_row_indexed_prefix_fn_sees_the_caller_s_row_numbers(setup):
    _, tokenizer, model, inputs = setup
    vocab = list(range(len(tokenizer)))

    def allowed(batch_id, ids):  # only row 3 of the caller's batch is constrained
        return [5, 1] if batch_id == 3 else vocab

    # row 3 sampled, but not as the 4th row of the sub-batch (where a renumbered id would still say 3)
    seed = _sampled_with_row(lambda rows: 3 in rows and list(rows).index(3) != 3 and 0 in rows)
    monitor = _monitor(_policy(model), tokenizer, sample_rate=0.5, seed=seed, eps=0.9)
    generate(model, **inputs, early_exit=monitor, prefix_allowed_tokens_fn=allowed)
    rows = list(monitor.last_call.sampled_rows)
    hf = type(model).generate(model, **inputs, max_new_tokens=MAX_NEW, prefix_allowed_tokens_fn=allowed)
    assert list(monitor.last_call.full_predictions) == _texts(tokenizer, hf[rows])
    assert len(set(monitor.last_call.full_predictions)) > 1  # the constrained row differs from the others


class _RowBias(LogitsProcessor):
    """A per-row bias sized to the caller's batch (row-indexed state no sub-batch can use)."""

    def __init__(self, bias):
        self.bias = bias

    def __call__(self, input_ids, scores):
        return scores + self.bias


def test_a_caller_s_row_indexed_processor_is_shadowed_on_the_whole_batch(setup):
    _, tokenizer, model, inputs = setup
    bias = torch.zeros(6, len(tokenizer))
    bias[3, 5] = 100.0  # row 3 is pushed to token 5
    processors = LogitsProcessorList([_RowBias(bias)])
    seed = _sampled_with_row(lambda rows: 3 in rows and 0 < len(rows) < 6)
    rc = _policy(model)
    monitor = _monitor(rc, tokenizer, sample_rate=0.5, seed=seed, eps=0.9)
    out = generate(model, **inputs, early_exit=monitor, logits_processor=processors)
    assert torch.equal(out, generate(model, **inputs, early_exit=rc, logits_processor=processors))
    rows = list(monitor.last_call.sampled_rows)
    hf = type(model).generate(model, **inputs, max_new_tokens=MAX_NEW, logits_processor=processors)
    assert list(monitor.last_call.full_predictions) == _texts(tokenizer, hf[rows])
    assert monitor.rows_sampled == monitor.test.n == len(rows)


def test_a_failing_shadow_decode_or_scoring_returns_the_output_and_warns(setup, monkeypatch):
    _, tokenizer, model, inputs = setup
    rc = _policy(model)
    monitor = _monitor(rc, tokenizer, eps=0.9)
    decodes = []

    def decode(model, inputs=None, **kwargs):  # what generate hands the monitor; the second decode is the shadow
        decodes.append(kwargs["early_exit"])
        if len(decodes) == 2:
            raise RuntimeError("out of memory\n(a second line)")
        return generate(model, inputs, **kwargs)

    expected = generate(model, **inputs, early_exit=rc)
    with pytest.warns(ShadowDecodeWarning, match=r"call 0 failed \(RuntimeError: out of memory\).*not monitored") as w:
        out = monitor.generate(model, decode=decode, **inputs)
    assert torch.equal(out, expected) and "\n" not in str(w[0].message)
    assert (monitor.calls, monitor.rows_seen, monitor.rows_sampled, monitor.test.n) == (1, 6, 0, 0)
    assert monitor.last_call == MonitoredCall(0, 6, unmonitored_rows=tuple(range(6)),
                                              shadow_error="RuntimeError: out of memory")

    def broken(prediction, full_prediction):
        raise KeyError("rouge")

    monkeypatch.setattr(monitor.task, "consistency_loss", broken)  # the scoring fails now
    with pytest.warns(ShadowDecodeWarning, match="KeyError"):
        assert torch.equal(generate(model, **inputs, early_exit=monitor), expected)
    assert (monitor.calls, monitor.rows_sampled, monitor.test.n) == (2, 0, 0)
    monkeypatch.undo()
    generate(model, **inputs, early_exit=monitor)  # the next call is monitored as usual
    assert (monitor.calls, monitor.rows_sampled, monitor.test.n) == (3, 6, 6)


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
    assert alarm.sample_index % 6 != 5  # it fired inside a call's losses, not at the call's last one
    at_alarm = SequentialRiskTest(0.01, 0.05)
    at_alarm.update((losses * calls)[:alarm.sample_index + 1])  # the evidence when it fired, not after the call
    assert alarm.e_value == at_alarm.e_value >= 1 / 0.05 and alarm.risk_interval == at_alarm.confidence_interval()
    assert alarm.calls_seen == calls and alarm.eps == 0.01 and alarm.alpha == 0.05
    assert monitor.test.to_dict() != at_alarm.to_dict() and monitor.test.n == 6 * calls  # the whole call was fed
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
    restored = RiskMonitor.load(monitor.save(tmp_path / "m.json"), rc, tokenizer=tokenizer, eps=0.01, sample_rate=1.0)
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


@pytest.mark.parametrize("field, value", [("sample_rate", 0.5), ("sample", "call"), ("fallback", False)])
def test_a_state_saved_with_other_sampling_or_fallback_is_refused(setup, tmp_path, field, value):
    _, tokenizer, model, inputs = setup
    rc = _policy(model)
    saved = RiskMonitor(rc, tokenizer=tokenizer, eps=0.9, seed=4, **{field: value})
    generate(model, **inputs, early_exit=saved)
    path = saved.save(tmp_path / "m.json")
    assert json.loads(open(path).read())[field] == value
    with pytest.raises(MonitorStateMismatchError, match=rf"m\.json.*{field}={value!r} \(this monitor: ") as err:
        RiskMonitor.load(path, rc, tokenizer=tokenizer, eps=0.9)  # built with the defaults: another sampling
    assert "\n" not in str(err.value)
    assert RiskMonitor.load(path, rc, tokenizer=tokenizer, eps=0.9, **{field: value}).state() == saved.state()


def test_evidence_for_another_calibration_at_the_same_threshold_is_refused(setup, tmp_path):
    _, tokenizer, model, inputs = setup
    rc = _policy(model)
    monitor = _monitor(rc, tokenizer, eps=0.9)
    generate(model, **inputs, early_exit=monitor)
    path = monitor.save(tmp_path / "m.json")
    other = RiskControlled(0.05, risk="consistency").fit_table(_table(model, n=80))  # other rows, the same λ̂ = 0
    assert other.threshold == rc.threshold == 0.0 and other.calibration != rc.calibration
    for watched in (monitor, RiskMonitor.load(path, rc, tokenizer=tokenizer, eps=0.9, sample_rate=1.0)):
        watched.policy = other  # swapped behind the monitor's back (reset(other) is the way)
        with pytest.raises((ValueError, MonitorStateMismatchError), match="another one.*same λ̂=0.0.*reset"):
            generate(model, **inputs, early_exit=watched)
        assert watched.calls == 1 and watched.test.n == 6
    loaded = RiskMonitor.load(path, other, tokenizer=tokenizer, eps=0.9, sample_rate=1.0)
    with pytest.raises(MonitorStateMismatchError, match=r"m\.json.*another one"):
        generate(model, **inputs, early_exit=loaded)
    generate(model, **inputs, early_exit=loaded.reset(other))  # a fresh test for the new calibration
    assert loaded.test.n == 6 and loaded.state()["calibration"] != monitor.state()["calibration"]


def _edited(path, tmp_path, edit):
    """The state at ``path`` with ``edit`` applied to its content and the digest recomputed (a forger's edit)."""
    from hf_safe_exit.digest import with_digest, without_digest

    data = without_digest(json.loads(open(path).read()))
    edit(data)
    out = tmp_path / "edited.json"
    out.write_text(json.dumps(with_digest(data)))
    return out


def test_re_digested_inconsistent_states_are_refused(setup, tmp_path):
    _, tokenizer, model, inputs = setup
    rc = _policy(model)
    monitor = _monitor(rc, tokenizer, eps=0.01)
    _until_alarm(model, inputs, monitor)
    path = monitor.save(tmp_path / "m.json")
    load = dict(tokenizer=tokenizer, eps=0.01, sample_rate=1.0)
    n = monitor.test.n
    assert monitor.rows_seen == monitor.rows_sampled == n and monitor.calls < n
    assert RiskMonitor.load(_edited(path, tmp_path, lambda d: None), rc, **load).alarm == monitor.alarm
    edits = {
        "alarm.*not its test's": lambda d: d["alarm"].update(sample_index=d["alarm"]["sample_index"] + 1),
        "alarm.*eps=0.5": lambda d: d["alarm"].update(eps=0.5),
        "alarm.*alpha=0.5": lambda d: d["alarm"].update(alpha=0.5),
        "alarm.*e-value 0.1": lambda d: d["alarm"].update(e_value=0.1),
        "alarm.*after 1000000 calls": lambda d: d["alarm"].update(calls_seen=10**6),
        "records no alarm": lambda d: d.update(alarm=None),
        f"n={n} losses but the counters account for 0": lambda d: d.update(rows_sampled=0),
        f"calls={n + 1} exceeds rows_seen={n}": lambda d: d.update(calls=n + 1),
        f"rows_sampled={n + 1} exceeds rows_seen={n}": lambda d: d.update(rows_sampled=n + 1),
        f"account for {n + 1}": lambda d: d.update(recorded=1),
        r"n=1000\d* must be a count": lambda d: d["test"].update(n=10**400),
    }
    for match, edit in edits.items():
        with pytest.raises(CorruptFileError, match=rf"edited\.json.*{match}") as err:
            RiskMonitor.load(_edited(path, tmp_path, edit), rc, **load)
        assert "\n" not in str(err.value)


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


def test_take_samples_hands_each_pair_over_once(setup):
    _, tokenizer, model, inputs = setup
    monitor = _monitor(_policy(model, risk="performance_gap"), tokenizer, risk="performance_gap")
    early = generate(model, **inputs, early_exit=monitor)
    first = monitor.take_samples()
    assert [p["id"] for p in first] == list(range(6)) and [p["row"] for p in first] == list(range(6))
    assert [p["prediction"] for p in first] == _texts(tokenizer, early) and {p["call"] for p in first} == {0}
    assert monitor.take_samples() == [] and len(monitor.samples) == 0  # taken: not handed over again
    generate(model, **{k: v[:2] for k, v in inputs.items()}, early_exit=monitor)
    second = monitor.take_samples()
    assert [(p["id"], p["call"], p["row"]) for p in second] == [(6, 1, 0), (7, 1, 1)]
    pairs = first + second
    fulls = [p["full_prediction"] for p in pairs]
    monitor.record([p["prediction"] for p in pairs], fulls, fulls)
    assert monitor.test.n == monitor.recorded == 8 and monitor.rows_sampled == 8


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
    for asked in (2, "x"):
        with pytest.raises(ValueError, match=f"num_return_sequences={asked!r}.*num_return_sequences=1"):
            generate(model, **inputs, early_exit=_monitor(_policy(model), tokenizer), num_return_sequences=asked)


def test_record_refuses_what_is_not_a_list_of_texts(setup):
    _, tokenizer, model, _ = setup
    consistency = _monitor(_policy(model), tokenizer)
    gap = _monitor(_policy(model, risk="performance_gap"), tokenizer, risk="performance_gap", task="cnndm")
    cases = [(consistency, (None,), TypeError, "predictions must be a list of strings.*NoneType"),
             (consistency, (["a"], None, "b"), TypeError, "full_predictions must be a list.*str"),
             (gap, (["a"], 5, ["a"]), TypeError, "references as a list.*int"),
             (gap, (["a"], "r", ["a"]), TypeError, "references as a list.*str"),
             (gap, (["a", "b"], ["r"], ["a", "b"]), ValueError, r"one reference per prediction \(2\), got 1")]
    for monitor, args, error, match in cases:
        with pytest.raises(error, match=match) as err:
            monitor.record(*args)
        assert "\n" not in str(err.value) and monitor.test.n == 0


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
