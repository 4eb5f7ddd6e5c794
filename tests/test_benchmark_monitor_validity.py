"""Smoke test of benchmarks/monitor_validity.py on a few short streams: every task and risk runs, the re-weighted
streams have the means they claim (eps at the null's boundary, 2 eps shifted), the history-then-shift scenario
reports both bettors, the JSON and plot are written; and its NumPy cumulative-only bettor alarms where the
library's own cumulative bettor (SequentialRiskTest's log_wealth_cum) first reaches 1/alpha."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from hf_safe_exit.risk import SequentialRiskTest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "monitor_validity.py"


def load():
    spec = importlib.util.spec_from_file_location("monitor_validity", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_tilt_reaches_the_target_mean_and_refuses_what_it_cannot():
    bench = load()
    losses = np.array([0.0, 0.0, 0.1, 0.4, 1.0])
    w, theta = bench.tilt(losses, 0.5)
    assert w @ losses == pytest.approx(0.5, abs=1e-12) and theta > 0 and np.all(np.diff(w[1:]) > 0)
    assert bench.tilt(np.zeros(4), 0.05) is None and bench.tilt(losses, 1.0) is None


def test_monitor_validity_smoke(tmp_path):
    bench = load()
    out = tmp_path / "mv.json"
    doc = bench.main(["--streams", "6", "--calls", "2000", "--detect-calls", "40000", "--history-calls", "3000",
                      "--history-streams", "4", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    assert [(c["task"], c["risk"]) for c in doc["cases"]] == [(t, r) for t in bench.TASKS for r in bench.RISKS]
    for case in doc["cases"]:
        assert case["true_risk"] <= bench.EPS  # the stored rows satisfy H0 at the deployed threshold
        assert case["worst_null"]["weighted_mean"] == pytest.approx(bench.EPS, abs=1e-12)
        assert case["shifted"]["weighted_mean"] == pytest.approx(2 * bench.EPS, abs=1e-12)
        for alpha in ("0.05", "0.01"):
            assert 0 <= case["exchangeable"][alpha]["alarms"] <= 6
            assert case["shifted"][alpha]["closed_form_calls"] > 0
        (history,) = case["history_then_shift"]
        assert history["history_calls"] == 3000 and history["closed_form_calls"] == pytest.approx(
            case["shifted"]["0.05"]["closed_form_calls"], rel=1e-12)
        for name in ("test", "cumulative_only"):
            assert history[name]["alarmed_within_horizon"] == 1.0 and history[name]["median_calls_after_shift"] >= 0
    squad_consistency = doc["cases"][2]
    assert squad_consistency["distinct_losses"] == 2 and "degenerate" in squad_consistency["notes"][0]
    assert out.with_suffix(".png").is_file()


def test_cumulative_only_bettor_matches_the_library_s_cumulative_wealth():
    bench = load()
    rng = np.random.default_rng(6)
    for _ in range(10):
        x = np.r_[rng.random(200) < 0.05, rng.random(600) < 0.25].astype(float)
        test, expected = SequentialRiskTest(0.1, 0.05), None
        for t, v in enumerate(x):
            test.update(v)
            if expected is None and test.to_dict()["log_wealth_cum"] >= math.log(20):
                expected = t
        assert expected is not None and bench.cumulative_only_alarms(x, 0.1, 0.05) == expected
