"""benchmarks/monitor_discount.py re-implements the test's two bettors with NumPy across streams to choose γ and w:
at the library's γ and w it must alarm exactly where first_alarm does, and at w = 1 where the library's own
cumulative bettor (its log_wealth_cum) first reaches 1/alpha."""

import importlib.util
import math
from pathlib import Path

import numpy as np

from hf_safe_exit.risk import SequentialRiskTest, first_alarm
from hf_safe_exit.risk.sequential_test import DISCOUNT, MIXTURE_WEIGHT

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "monitor_discount.py"


def load():
    spec = importlib.util.spec_from_file_location("monitor_discount", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def cumulative_alarm(stream, eps, alpha):
    test = SequentialRiskTest(eps, alpha)
    for t, v in enumerate(stream):
        test.update(v)
        if test.to_dict()["log_wealth_cum"] >= math.log(1 / alpha):
            return t
    return None


def test_the_reimplementation_alarms_where_the_library_does():
    bench = load()
    rng = np.random.default_rng(4)
    history, eps = 300, 0.1
    x = np.concatenate([rng.random((24, history)) < eps / 2, rng.random((24, 700)) < 2 * eps], axis=1).astype(float)
    delays = bench.alarm_delays(x, eps, DISCOUNT, weights=(MIXTURE_WEIGHT, 1.0), start=history)

    def delay(index):
        return math.inf if index is None else max(index + 1 - history, 0)

    assert delays[MIXTURE_WEIGHT].tolist() == [delay(first_alarm(s, eps, 0.05)) for s in x]
    assert delays[1.0].tolist() == [delay(cumulative_alarm(s, eps, 0.05)) for s in x]
    assert np.median(delays[MIXTURE_WEIGHT]) < np.median(delays[1.0])  # the history slows the cumulative bettor


def test_scenarios_shift_where_they_say():
    bench = load()
    rows = list(bench.scenarios(np.random.default_rng(0), 3))
    assert len(rows) == 10
    for name, eps, shift, x in rows:
        assert x.shape[0] == 3 and x.shape[1] >= shift + bench.AFTER and 0 <= x.min() and x.max() <= 1
        if name.startswith("real"):
            assert eps == 0.2 and x[:, shift:].mean() > eps > x[:, :shift].mean()
