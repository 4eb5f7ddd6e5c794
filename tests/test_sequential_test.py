"""The anytime-valid risk test (hf_safe_exit/risk/sequential_test.py) against independent readings of its formulas
(a plain loop for the two bettors' wealths and their mixture, NumPy cumulative sums for the confidence sequence,
hand arithmetic), and its behaviour: false alarms <= alpha on many short streams under H0, detection near Wald's
closed form, fast detection after a long in-distribution history (where the cumulative bettor alone is slow),
coverage of the confidence sequence, incremental / saved state equal to a fresh run bit for bit, clear errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hf_safe_exit.risk import SequentialRiskTest, expected_samples_to_alarm, first_alarm
from hf_safe_exit.risk import sequential_test

GAMMA, W = 0.98, 0.5  # the discount and the cumulative bettor's weight the module documents (checked below)


def bettor_log_wealth(x, e, gamma):
    """log of ∏ (1 + λ_i (x_i − e)) with aGRAPA bets from estimates whose terms (the prior's too) are weighted
    gamma^(age): gamma = 1 is the cumulative bettor. A plain loop over explicit weighted sums (O(n^2))."""
    def estimates(i):  # (μ_i, σ²_i) after i losses
        weights = [gamma ** (i - j) for j in range(i + 1)]  # weights[0]: the prior, then losses 1..i
        total = sum(weights)
        mu = (weights[0] * 0.5 + sum(weights[j] * x[j - 1] for j in range(1, i + 1))) / total
        return mu, total, weights

    mus = [estimates(i)[0] for i in range(len(x) + 1)]
    out, log_k = [], 0.0
    for t in range(1, len(x) + 1):
        mu, total, weights = estimates(t - 1)
        var = (weights[0] * 0.25 + sum(weights[i] * (x[i - 1] - mus[i]) ** 2 for i in range(1, t))) / total
        d = mu - e
        bet = min(d / (var + d * d), 0.5 / e) if d > 0 else 0.0
        log_k += math.log(1.0 + bet * (x[t - 1] - e))
        out.append(log_k)
    return np.array(out)


def reference_log_wealths(losses, eps, loss_range=(0.0, 1.0)):
    """(log K^cum_t, log K^disc_t, log K_t) for t = 1..n, K_t = W K^cum_t + (1 − W) K^disc_t, from the formulas."""
    a, b = loss_range
    x = [(v - a) / (b - a) for v in losses]
    e = (eps - a) / (b - a)
    cum, disc = bettor_log_wealth(x, e, 1.0), bettor_log_wealth(x, e, GAMMA)
    return cum, disc, np.log(W * np.exp(cum) + (1 - W) * np.exp(disc))


def cumulative_only_alarm(x, eps, alpha):
    """The first index at which the cumulative bettor alone reaches 1/alpha (the version-1 test), by a plain O(n)
    loop over running sums; None if it never does."""
    sum_x = sum_sq = log_k = 0.0
    for t, v in enumerate(x, start=1):
        mu, var = (0.5 + sum_x) / t, (0.25 + sum_sq) / t
        d = mu - eps
        log_k += math.log1p((min(d / (var + d * d), 0.5 / eps) if d > 0 else 0.0) * (v - eps))
        if log_k >= math.log(1 / alpha):
            return t - 1
        sum_x += v
        sum_sq += (v - (0.5 + sum_x) / (t + 1)) ** 2
    return None


def reference_cs(x, alpha):
    """WSR (2023) Thm 2 for x in [0, 1], vectorised with cumulative sums: (lower, upper) at every t, unclipped."""
    t = np.arange(1, x.size + 1)
    mu = (0.5 + np.cumsum(x)) / (t + 1)
    var = (0.25 + np.cumsum((x - mu) ** 2)) / (t + 1)
    mu_prev, var_prev = np.r_[0.5, mu[:-1]], np.r_[0.25, var[:-1]]
    lam = np.minimum(np.sqrt(2 * np.log(2 / alpha) / (var_prev * t * np.log(1 + t))), 0.5)
    psi = (-np.log(1 - lam) - lam) / 4
    centre = np.cumsum(lam * x) / np.cumsum(lam)
    radius = (np.log(2 / alpha) + np.cumsum(4 * (x - mu_prev) ** 2 * psi)) / np.cumsum(lam)
    return centre - radius, centre + radius


def alarm_rate(streams, eps, alpha, loss_range=(0.0, 1.0)):
    return float(np.mean([first_alarm(s, eps, alpha, loss_range=loss_range) is not None for s in streams]))


def bits(test):
    return json.dumps(test.to_dict())  # repr of every float: equal strings are equal bits


# -------------------------------------------------------------------------------------------- independent readings
def test_the_documented_constants():
    assert (sequential_test.DISCOUNT, sequential_test.MIXTURE_WEIGHT, sequential_test.BET_CAP) == (GAMMA, W, 0.5)


@pytest.mark.parametrize("loss_range, eps", [((0.0, 1.0), 0.1), ((-1.0, 1.0), 0.05), ((0.0, 5.0), 1.0)])
def test_wealth_and_alarm_match_a_plain_loop(loss_range, eps):
    rng = np.random.default_rng(3)
    a, b = loss_range
    e = (eps - a) / (b - a)
    apart = []
    for seed in range(12):
        # 80 losses at mean e/2, then a shift to mean m above eps' (most streams alarm inside the 200 losses): the
        # discounted bettor sees the shift sooner, so the two wealths part
        m = e + 0.3 * (1 - e)
        x = a + (b - a) * np.r_[rng.beta(1.0, (2 - e) / e, size=80), rng.beta(1.0, (1 - m) / m, size=120)]
        cum, disc, ref = reference_log_wealths(x.tolist(), eps, loss_range)
        test = SequentialRiskTest(eps, 0.05, loss_range=loss_range)
        for t, v in enumerate(x):
            test.update(float(v))
            assert test.log_e_value == pytest.approx(ref[t], rel=1e-12, abs=1e-12)
            state = test.to_dict()
            assert state["log_wealth_cum"] == pytest.approx(cum[t], rel=1e-12, abs=1e-12)
            assert state["log_wealth_disc"] == pytest.approx(disc[t], rel=1e-12, abs=1e-12)
        apart.append(abs(disc[-1] - cum[-1]))
        crossed = np.flatnonzero(ref >= math.log(20.0))
        expected = int(crossed[0]) if crossed.size else None
        assert first_alarm(x, eps, 0.05, loss_range=loss_range) == expected == test.alarm_index
        assert test.max_e_value == pytest.approx(math.exp(max(0.0, ref.max())), rel=1e-12)
        assert test.mean == pytest.approx(x.mean(), rel=1e-12)
    assert np.median(apart) > 1.0, apart  # the mixture is not one bettor twice: the discounted one matters here


def test_hand_computed_constant_streams():
    # losses of 1 at eps = 1/2: the first bet (μ̂_0 = 1/2) is 0; from the second on aGRAPA asks for more than the
    # cap c/ε' = 1, so every factor is 1 + 1·(1 − 1/2) = 3/2 and K_t = 1.5^(t − 1): 1.5^5 = 7.6 < 10 <= 1.5^6 = 11.4
    assert first_alarm([1.0] * 20, 0.5, 0.1) == 6
    test = SequentialRiskTest(0.5, 0.1)
    assert test.update([1.0] * 7) == 6 and test.e_value == pytest.approx(1.5 ** 6, rel=1e-12)
    assert first_alarm([1.0] * 6, 0.5, 0.1) is None
    # at alpha = 0.01 it needs 1.5^(t−1) >= 100: t − 1 = 12
    assert first_alarm([1.0] * 40, 0.5, 0.01) == 12
    # losses equal to eps: every factor is exactly 1; losses of 0: the wealth never grows
    flat = SequentialRiskTest(0.3, 0.05)
    assert flat.update([0.3] * 500) is None and flat.e_value == 1.0
    assert first_alarm(np.zeros(500), 0.3, 0.05) is None


def test_confidence_interval_matches_numpy_reading_and_is_in_loss_units():
    rng = np.random.default_rng(5)
    x = rng.beta(2.0, 5.0, size=400)
    lo, hi = reference_cs(x, 0.1)
    unit, scaled = SequentialRiskTest(0.2, 0.1), SequentialRiskTest(-0.6, 0.1, loss_range=(-1.0, 1.0))
    assert unit.confidence_interval() == (0.0, 1.0) and math.isnan(unit.mean)
    for t, v in enumerate(x):
        unit.update(v)
        scaled.update(2 * v - 1)  # the same losses in [-1, 1]
        want = (max(lo[t], 0.0), min(hi[t], 1.0))
        assert unit.confidence_interval() == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert scaled.confidence_interval() == pytest.approx((2 * want[0] - 1, 2 * want[1] - 1), rel=1e-12, abs=1e-12)
    assert hi[-1] - lo[-1] < 0.12  # it has shrunk around the mean (2/7), not stayed the whole range


# ---------------------------------------------------------------------------------------- incremental and saved state
def test_chunked_feeding_equals_a_fresh_run_on_every_prefix():
    rng = np.random.default_rng(11)
    for seed in range(4):
        x = np.clip(rng.uniform(-1, 1, size=240) * rng.random(240) + 0.15, -1, 1)  # gap-like losses in [-1, 1], mean above eps
        test, pos = SequentialRiskTest(0.05, 0.05, loss_range=(-1.0, 1.0)), 0
        while pos < x.size:
            size = int(rng.integers(0, 9))
            chunk = x[pos:pos + size]
            test.update(chunk.tolist() if seed % 2 else chunk)  # lists and arrays alike
            pos += chunk.size
            fresh = SequentialRiskTest(0.05, 0.05, loss_range=(-1.0, 1.0))
            fresh.update(x[:pos])
            assert bits(test) == bits(fresh)
            assert test.alarm_index == first_alarm(x[:pos], 0.05, 0.05, loss_range=(-1.0, 1.0))
    assert test.alarmed  # the alarm fired on the way and the comparison went on past it


def test_saved_state_continues_bit_for_bit():
    rng = np.random.default_rng(12)
    x = np.where(rng.random(600) < 0.15, rng.random(600), 0.0)
    whole = SequentialRiskTest(0.1, 0.01)
    whole.update(x)
    for cut in (0, 1, 37, 250, 599, 600):
        head = SequentialRiskTest(0.1, 0.01)
        head.update(x[:cut])
        restored = SequentialRiskTest.from_dict(json.loads(json.dumps(head.to_dict(), allow_nan=False)))
        restored.update(x[cut:])
        assert bits(restored) == bits(whole)
        assert restored.confidence_interval() == whole.confidence_interval()


# ------------------------------------------------------------------------------------------ validity and power
@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_false_alarm_rate_at_most_alpha_under_the_worst_null(alpha):
    rng = np.random.default_rng(2024)
    eps, n_streams = 0.1, 2000
    bernoulli = (rng.random((n_streams, 300)) < eps).astype(float)  # mean exactly eps: the largest variance there
    real = rng.beta(2.0, 18.0, size=(n_streams, 300))  # mean 2/20 = eps
    limit = alpha + 3 * math.sqrt(alpha * (1 - alpha) / n_streams)
    assert alarm_rate(bernoulli, eps, alpha) <= limit
    assert alarm_rate(real, eps, alpha) <= limit
    # strictly inside H0 (mean eps/2) a bet allowed to go negative would win: the clip at 0 keeps it valid
    assert alarm_rate(bernoulli[:500] * (rng.random((500, 300)) < 0.5), eps, alpha) <= limit
    # and it is not trivially conservative: at mean 2 eps nearly every stream alarms within the 300 losses
    assert alarm_rate((rng.random((500, 300)) < 2 * eps).astype(float), eps, alpha) >= 0.95


@pytest.mark.parametrize("eps", [0.05, 0.1])
def test_detection_delay_near_the_closed_form(eps):
    rng = np.random.default_rng(7)
    alpha = 0.05
    streams = (rng.random((600, 3000)) < 2 * eps).astype(float)
    taus = np.array([first_alarm(s, eps, alpha) for s in streams], dtype=float) + 1  # losses up to the alarm
    expected = expected_samples_to_alarm([0.0, 1.0], eps, alpha, weights=[1 - 2 * eps, 2 * eps])
    # Bernoulli(q = 2 eps) against eps, by hand: the growth rate's derivative q(1-eps)/(1+λ(1-eps)) - (1-q)eps/(1-λeps)
    # vanishes at λ = (q - eps)/(eps(1 - eps)) = 1/(1 - eps), inside the cap 1/(2 eps)
    kelly = 1.0 / (1 - eps)
    growth = 2 * eps * math.log1p(kelly * (1 - eps)) + (1 - 2 * eps) * math.log1p(-kelly * eps)
    # the mixture's wealth is at least W K^cum: the threshold of the closed form is 1/(W alpha) = 40
    assert expected == pytest.approx(math.log(40) / growth, rel=1e-9)
    # the measured median is 0.94-0.97x the closed form here (0.94-1.08 over seeds 7-9: aGRAPA learns its bet and
    # bets less than Kelly, the overshoot over the threshold and the discounted bettor pull the other way): a wrong
    # g* (e.g. a Kelly bet off by 2x, or the threshold 1/alpha^2) leaves this band
    assert 0.8 <= np.median(taus) / expected <= 1.25
    assert expected_samples_to_alarm([0.0, 1.0], eps, alpha, weights=[1 - eps, eps]) == math.inf


def test_detection_after_a_long_in_distribution_history_stays_near_the_fresh_closed_form():
    """1,000 losses at mean eps/2, then a shift to 2 eps. The cumulative mean after the history is about
    (0.5 + 50)/1001 ≈ 0.05, and it passes eps = 0.1 only after k shifted losses with 0.1 k > 49.6, i.e. k > 496:
    before that the cumulative bettor alone bets nothing, 6x the fresh closed form (83 losses) already (it takes
    about 840: checked below with a plain loop). The discounted bettor forgets the history within ~50 losses: the
    mixture's median is about 2x the closed form."""
    rng = np.random.default_rng(29)
    eps, alpha, history, n_streams = 0.1, 0.05, 1000, 300
    expected = expected_samples_to_alarm([0.0, 1.0], eps, alpha, weights=[1 - 2 * eps, 2 * eps])
    mixture, cumulative = [], []
    for _ in range(n_streams):
        x = np.r_[rng.random(history) < eps / 2, rng.random(4000) < 2 * eps].astype(float)
        for delays, index in ((mixture, first_alarm(x, eps, alpha)),
                              (cumulative, cumulative_only_alarm(x, eps, alpha))):
            delays.append(math.inf if index is None else max(index + 1 - history, 0))  # a false alarm counts as 0
    assert np.median(mixture) <= 3 * expected
    assert np.median(cumulative) >= 6 * expected  # the bound the old (cumulative-only) test fails


@pytest.mark.parametrize("alpha", [0.1])
def test_confidence_sequence_covers_at_all_times(alpha):
    rng = np.random.default_rng(9)
    n_streams, length = 400, 300
    for draw, mean in ((lambda: rng.beta(2.0, 8.0, size=length), 0.2),
                       (lambda: (rng.random(length) < 0.3).astype(float), 0.3)):
        misses, widths = 0, []
        for _ in range(n_streams):
            test, missed = SequentialRiskTest(0.5, alpha), False
            for v in draw():
                test.update(v)
                lo, hi = test.confidence_interval()
                missed |= not lo <= mean <= hi
            misses += missed
            widths.append(hi - lo)
        assert misses / n_streams <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / n_streams)
        assert np.median(widths) < 0.25  # informative, not the whole range


# ------------------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=0.1, alpha=0.0), "alpha=0.0"), (dict(eps=0.1, alpha=1.0), "alpha=1.0"),
    (dict(eps=0.1, alpha=float("nan")), "alpha=nan"), (dict(eps=0.1, alpha=True), "alpha=True"),
    (dict(eps=0.0, alpha=0.1), "eps=0.0"), (dict(eps=1.0, alpha=0.1), "eps=1.0"),
    (dict(eps=-1.0, alpha=0.1, loss_range=(-1.0, 1.0)), "eps=-1.0"), (dict(eps=float("nan"), alpha=0.1), "eps=nan"),
    (dict(eps=0.1, alpha=0.1, loss_range=(1.0, 0.0)), "loss_range"), (dict(eps=0.1, alpha=0.1, loss_range=(0,)), "loss_range"),
])
def test_bad_arguments_raise_one_line_value_errors(kwargs, match):
    for make in (lambda: SequentialRiskTest(**kwargs), lambda: first_alarm([0.1], **kwargs),
                 lambda: expected_samples_to_alarm([0.5], **kwargs)):
        with pytest.raises(ValueError, match=match) as err:
            make()
        assert "\n" not in str(err.value)
    with pytest.raises(TypeError, match="eps='0.1'"):
        SequentialRiskTest("0.1", 0.05)


def test_bad_losses_raise_and_leave_the_state_unchanged():
    test = SequentialRiskTest(0.1, 0.05)
    test.update([0.2, 0.0])
    before = bits(test)
    for losses, match in (([0.1, float("nan")], r"losses\[1\]=nan"), ([0.5, 1.5], r"losses\[1\]=1.5"),
                          (-0.1, r"losses\[0\]=-0.1"), ([[0.1, 0.2]], "1-D"), (["a"], "number"),
                          (True, "real numbers.*bool.*True"), (["0.9", "1"], "real numbers.*str.*'0.9'"),
                          (np.array([True, True]), "real numbers.*bool"), ([None], "real numbers.*None")):
        for check in (test.update, test.check_losses, lambda x: first_alarm(x, 0.1, 0.05)):
            with pytest.raises((ValueError, TypeError), match=match) as err:
                check(losses)
            assert "\n" not in str(err.value)
        assert bits(test) == before
    assert test.check_losses([0.2, 0, np.float32(0.5)]) == [0.2, 0.0, 0.5] and bits(test) == before
    with pytest.raises(ValueError, match="outside loss_range"):
        first_alarm([0.0, -1.5], 0.05, 0.1, loss_range=(-1.0, 1.0))
    with pytest.raises(ValueError, match="weights"):
        expected_samples_to_alarm([0.0, 1.0], 0.1, 0.05, weights=[1.0])


def test_from_dict_refuses_a_state_no_test_could_have_written():
    test = SequentialRiskTest(0.1, 0.05)
    test.update([1.0] * 10)
    good = test.to_dict()
    assert test.alarmed and SequentialRiskTest.from_dict(good).alarm_index == test.alarm_index
    cases = [("n", -1), ("n", 2.5), ("n", 10**400), ("sum_x", 11.0), ("log_wealth_cum", float("nan")), ("alarm_index", None),
             ("log_wealth_disc", -100.0), ("disc_sum_x", 10.0), ("disc_sum_sq", -1e-3), ("disc_sum_x", True),
             ("alarm_index", 10), ("format", "other"), ("version", 3), ("max_log_wealth", -1.0), ("eps", 2.0),
             ("cs_sum_lam", 0.0), ("alpha", 0)]
    for key, value in cases:
        bad = dict(good, **{key: value})
        with pytest.raises(ValueError, match=key) as err:
            SequentialRiskTest.from_dict(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="log_wealth_disc.*missing"):
        SequentialRiskTest.from_dict({k: v for k, v in good.items() if k != "log_wealth_disc"})
    # a version-1 state (the cumulative bettor alone: log_wealth, no discounted sums) is refused, saying what to do
    old = {k: v for k, v in good.items() if k not in ("log_wealth_cum", "log_wealth_disc", "disc_sum_x", "disc_sum_sq")}
    with pytest.raises(ValueError, match="version=1 .*cumulative-only.*start a fresh SequentialRiskTest") as err:
        SequentialRiskTest.from_dict(dict(old, version=1, log_wealth=good["log_wealth_cum"]))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="extra"):
        SequentialRiskTest.from_dict(dict(good, extra=1))
    with pytest.raises(TypeError, match="list"):
        SequentialRiskTest.from_dict([good])
