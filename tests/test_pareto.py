"""Pareto Testing (risk/pareto.py) against a plain loop reading of the procedure, a double-loop Pareto front,
scipy's binomial tail, the library's betting test, simulated validity and the 1-D (λ grid) special case."""

import math

import numpy as np
import pytest
from scipy.stats import binom

from hf_safe_exit.risk import ParetoResult, pareto_front, pareto_test, select_pareto
from hf_safe_exit.risk.bounds import wsr_rejects
from hf_safe_exit.risk.pareto import split_examples, wsr_pvalue
from hf_safe_exit.risk.selection import select_ltt


# ---------------------------------------------------------------- plain references

def _dominated_by_loop(risks, costs):
    """For each g: does some h have risk <= and cost <= with one strict? (double loop)"""
    G = len(risks)
    return [any(risks[h] <= risks[g] and costs[h] <= costs[g] and (risks[h] < risks[g] or costs[h] < costs[g])
                for h in range(G) if h != g) for g in range(G)]


def _hb_pvalue_scipy(row, eps, lower, upper, binary):
    """Hoeffding–Bentkus p-value written out with scipy (RCPS Sec. 3.1): losses mapped to [0, 1]."""
    n = len(row)
    r = (sum(row) / n - lower) / (upper - lower)
    e = (eps - lower) / (upper - lower)
    if binary:
        return binom.cdf(int(sum(row)), n, e)
    m = min(r, e)
    kl = (m * math.log(m / e) if m > 0 else 0.0) + (1 - m) * math.log((1 - m) / (1 - e))
    return min(math.exp(-n * kl), math.e * binom.cdf(math.ceil(n * r), n, e), 1.0)


def _reference(losses, costs, eps, delta, opt_fraction, seed, loss_range, p_value):
    """The procedure of issue 28, read plainly: split, estimate on D_opt, front by double loop, order by
    estimated risk, fixed-sequence test on D_test, cheapest rejected (ties: lower risk, lower index)."""
    G, n = losses.shape
    n_opt = min(max(round(opt_fraction * n), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    opt, test = sorted(perm[:n_opt]), sorted(perm[n_opt:])
    risk = [sum(losses[g, j] for j in opt) / len(opt) for g in range(G)]
    cost = list(costs) if costs.ndim == 1 else [sum(costs[g, j] for j in opt) / len(opt) for g in range(G)]
    dominated = _dominated_by_loop(risk, cost)
    order = sorted((g for g in range(G) if not dominated[g]), key=lambda g: (risk[g], g))
    binary = tuple(loss_range) == (0.0, 1.0) and all(v in (0.0, 1.0) for v in losses.ravel())
    rejected = []
    for g in order:
        row = [losses[g, j] for j in test]
        if p_value == "wsr":  # the library's own betting test (bounds.py), at the null mean ε
            ok = bool(wsr_rejects(np.array(row), delta, eps, upper=loss_range[1]))
        else:
            ok = _hb_pvalue_scipy(row, eps, *loss_range, binary) <= delta
        if not ok:
            break
        rejected.append(g)
    chosen = min(rejected, key=lambda g: (cost[g], risk[g], g)) if rejected else None
    return chosen, order


def _random_case(rng):
    """Small matrices on a k/4 grid (sums exact in float64, so estimates tie exactly where they should)."""
    G, n = int(rng.integers(1, 9)), int(rng.integers(4, 60))
    kind = rng.choice(["binary", "unit", "signed"])
    if kind == "binary":
        losses, loss_range = (rng.random((G, n)) < rng.uniform(0, 0.5, (G, 1))).astype(float), (0.0, 1.0)
    elif kind == "unit":
        losses, loss_range = rng.integers(0, 5, (G, n)) * rng.integers(0, 2, (G, 1)) / 4.0, (0.0, 1.0)
    else:
        losses, loss_range = rng.integers(-4, 5, (G, n)) * (rng.random((G, n)) < 0.3) / 4.0, (-1.0, 1.0)
    costs = rng.integers(0, 4, G).astype(float) if rng.random() < 0.6 else rng.integers(0, 5, (G, n)) / 4.0
    eps = float(rng.uniform(0.05, 0.6))
    return losses, costs, eps, loss_range


# ---------------------------------------------------------------- the procedure

@pytest.mark.parametrize("p_value", ["hoeffding_bentkus", "wsr"])
def test_pareto_test_equals_plain_reading_on_random_small_cases(p_value):
    rng = np.random.default_rng(28)
    chosen_some = none_some = 0
    for case in range(300):
        losses, costs, eps, loss_range = _random_case(rng)
        delta, opt_fraction, seed = float(rng.uniform(0.05, 0.5)), float(rng.uniform(0.2, 0.8)), case
        expected, order = _reference(losses, costs, eps, delta, opt_fraction, seed, loss_range, p_value)
        got = pareto_test(losses, costs, eps, delta, opt_fraction=opt_fraction, p_value=p_value, seed=seed,
                          loss_range=loss_range)
        assert got.index == expected, (case, got, expected)
        assert list(got.front) == order, case
        assert select_pareto(losses, costs, eps, delta, opt_fraction=opt_fraction, p_value=p_value, seed=seed,
                             loss_range=loss_range) == expected
        chosen_some += expected is not None
        none_some += expected is None
    assert chosen_some > 50 and none_some > 50  # both outcomes exercised


def test_result_fields_are_consistent():
    rng = np.random.default_rng(3)
    losses = (rng.random((30, 400)) < np.linspace(0.0, 0.3, 30)[:, None]).astype(float)
    res = pareto_test(losses, np.linspace(1.0, 0.1, 30), 0.1, 0.1, seed=5)
    assert isinstance(res, ParetoResult) and res.feasible
    assert res.n_opt + res.n_test == 400 and res.n_opt == 200 and res.num_configurations == 30
    assert res.front_size == len(res.front) == len(res.p_values) == len(res.front_risk) == len(res.front_cost)
    assert np.all(res.p_values[:res.num_rejected] <= 0.1) and res.p_values[res.num_rejected] > 0.1
    assert res.index in res.front[:res.num_rejected]
    assert np.all(np.diff(res.front_risk) >= 0) and np.all(np.diff(res.front_cost) <= 0)
    # exact binomial UCB of the chosen row on D_test, inverted by scipy: below ε since its null was rejected
    _, test = split_examples(400, 0.5, 5)
    k = int(losses[res.index, test].sum())
    grid = np.linspace(0, 1, 100001)
    ucb = grid[binom.cdf(k, test.size, grid) > 0.1].max()
    assert res.risk_bound == pytest.approx(ucb, abs=2e-5) and res.risk_bound < 0.1


def test_split_contract_and_seed():
    opt, test = split_examples(10, 0.3, seed=7)
    perm = np.random.default_rng(7).permutation(10)
    assert list(opt) == sorted(perm[:3]) and list(test) == sorted(perm[3:])
    assert [len(p) for p in split_examples(2, 0.01)] == [1, 1] and [len(p) for p in split_examples(2, 0.99)] == [1, 1]


def test_per_example_costs_are_estimated_on_the_optimisation_part():
    losses = np.zeros((3, 100))  # all certifiable: the choice is the cost rule alone
    costs = np.ones((3, 100))
    opt, _ = split_examples(100, 0.5, 11)
    test_only = np.setdiff1d(np.arange(100), opt)
    costs[1, test_only] = -50.0  # cheap only where the rule must not look
    costs[2, opt] = 0.5
    assert select_pareto(losses, costs, 0.1, 0.1, seed=11) == 2


# ---------------------------------------------------------------- the front

def test_pareto_front_equals_double_loop():
    rng = np.random.default_rng(0)
    for _ in range(300):
        G = int(rng.integers(1, 14))
        risks, costs = rng.integers(0, 4, G).astype(float), rng.integers(0, 4, G).astype(float)
        expected = [g for g, d in enumerate(_dominated_by_loop(risks, costs)) if not d]
        assert list(pareto_front(risks, costs)) == expected


def test_pareto_front_edge_cases():
    assert list(pareto_front([0.3], [2.0])) == [0]
    assert list(pareto_front([0.1, 0.1, 0.2], [1.0, 1.0, 0.5])) == [0, 1, 2]  # equal points are both kept
    assert list(pareto_front([0.1, 0.1], [1.0, 2.0])) == [0]  # equal risk, dearer: dominated
    assert list(pareto_front([0.1, 0.2], [1.0, 1.0])) == [0]  # equal cost, riskier: dominated


def test_nothing_certifiable_gives_none():
    res = pareto_test(np.ones((4, 200)), np.arange(4.0), 0.1, 0.1, seed=0)
    assert res.index is None and not res.feasible and res.num_rejected == 0 and res.risk_bound is None


@pytest.mark.parametrize("p_value,loss_range", [("hoeffding_bentkus", (0.0, 1.0)), ("wsr", (0.0, 1.0)),
                                                 ("hoeffding_bentkus", (-1.0, 1.0)), ("wsr", (-1.0, 1.0))])
def test_zero_loss_configuration_is_always_certified(p_value, loss_range):
    """Like λ = 1 (the full model: gap 0 on every example), the zero row is certified whatever the split."""
    losses = np.vstack([np.zeros(1200), np.full((3, 1200), loss_range[1])])
    for seed in range(10):
        res = pareto_test(losses, [1.0, 0.1, 0.2, 0.3], 0.1, 0.1, seed=seed, p_value=p_value, loss_range=loss_range)
        assert res.index == 0 and res.num_rejected == 1


# ---------------------------------------------------------------- p-values

def test_wsr_pvalue_equals_a_plain_capital_loop():
    rng = np.random.default_rng(4)
    for loss_range, eps in [((0.0, 1.0), 0.3), ((-1.0, 1.0), 0.05), ((-1.0, 1.0), -0.2), ((0.2, 1.0), 0.5)]:
        a, b = loss_range
        x = rng.uniform(a, b, 40) * 0.5 + (a + b) / 4
        c = max(a, min(0.0, eps))
        y, mu, n = (x - c) / (b - c), (eps - c) / (b - c), len(x)
        cap, best, s, ss, sig_prev = 1.0, 1.0, 0.0, 0.0, 0.25
        for i, yi in enumerate(y, start=1):
            nu = min(1.0, math.sqrt(2 * math.log(1 / 0.1) / (n * sig_prev)))
            cap *= 1 - nu * (yi - mu)
            best = max(best, cap)
            s += yi
            ss += (yi - (s + 0.5) / (i + 1)) ** 2
            sig_prev = (ss + 0.25) / (i + 1)
        assert wsr_pvalue(x[None], eps, 0.1, loss_range)[0] == pytest.approx(min(1.0, 1 / best), rel=1e-9)


def test_wsr_pvalue_rejects_exactly_where_the_library_betting_test_does():
    rng = np.random.default_rng(5)
    x = np.clip(rng.normal(0.02, 0.2, (400, 150)) * rng.uniform(0, 1, (400, 1)), -1, 1)
    for delta in (0.05, 0.2):
        assert np.array_equal(wsr_pvalue(x, 0.05, delta, (-1.0, 1.0)) <= delta, wsr_rejects(x, delta, 0.05))


@pytest.mark.parametrize("loss_range,eps", [((0.0, 1.0), 0.3), ((-1.0, 1.0), 0.1), ((0.2, 1.0), 0.6)])
def test_wsr_pvalue_is_valid_at_the_null_boundary(loss_range, eps):
    """Losses with mean exactly ε (two-point, the hardest bounded law): P(p ≤ α) ≤ α + 3 s.e."""
    a, b = loss_range
    rng = np.random.default_rng(6)
    x = np.where(rng.random((4000, 60)) < (eps - a) / (b - a), b, a)
    p = wsr_pvalue(x, eps, 0.1, loss_range)
    for alpha in (0.05, 0.1, 0.2):
        assert np.mean(p <= alpha) <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / 4000)


# ---------------------------------------------------------------- validity and power

def _near_eps_configs():
    """One zero-risk expensive configuration, a clearly safe mid-price one, 20 cheap ones just above ε = 0.1."""
    true = np.concatenate([[0.0, 0.03], np.full(20, 0.11)])
    costs = np.concatenate([[1.0, 0.6], np.linspace(0.1, 0.3, 20)])
    return true, costs


def test_validity_and_power_on_bernoulli_configurations():
    true, costs = _near_eps_configs()
    eps, delta, draws, n = 0.1, 0.1, 400, 300
    rng = np.random.default_rng(2023)
    violations = naive_violations = picked_safe_cheap = 0
    for d in range(draws):
        losses = (rng.random((true.size, n)) < true[:, None]).astype(float)
        chosen = select_pareto(losses, costs, eps, delta, seed=d)
        violations += chosen is not None and true[chosen] > eps
        picked_safe_cheap += chosen == 1
        # teeth: the same D_test, every configuration tested alone, cheapest rejected (no family-wise control)
        _, test = split_examples(n, 0.5, d)
        p = binom.cdf(losses[:, test].sum(axis=1), test.size, eps)
        naive = min(np.flatnonzero(p <= delta), key=lambda g: costs[g], default=None)
        naive_violations += naive is not None and true[naive] > eps
    limit = delta + 3 * math.sqrt(delta * (1 - delta) / draws)
    assert violations / draws <= limit
    assert naive_violations / draws > limit  # the design is one where an uncontrolled choice fails
    assert picked_safe_cheap / draws >= 0.85  # not trivially conservative


def test_one_dimensional_grid_is_learn_then_test_on_the_testing_part():
    """Configurations = a λ grid with cost rising in λ and risk strictly falling: the front is the whole grid in
    λ-descending order, so Pareto Testing is LTT's fixed sequence on D_test and the cheapest rejected is LTT's λ̂."""
    rng = np.random.default_rng(9)
    lam = np.linspace(0, 1, 11)
    feasible = 0
    for seed in range(20):
        v = rng.uniform(0, 1, 400)
        losses = (1 - lam)[:, None] * v[None, :]  # true risk (1 − λ)/2
        res = pareto_test(losses, 0.25 + 0.75 * lam, 0.1, 0.1, seed=seed)
        _, test = split_examples(400, 0.5, seed)
        ltt = select_ltt(lam, losses[:, test], 0.1, 0.1)
        assert list(res.front) == list(range(10, -1, -1))
        assert (res.index is None) == (not ltt.feasible)
        if res.index is not None:
            assert lam[res.index] == ltt.threshold and (1 - lam[res.index]) / 2 <= 0.1
            feasible += 1
    assert feasible >= 15


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,match", [
    ({"costs": np.ones(3)}, r"costs must have shape \(4,\)"),
    ({"costs": np.ones((4, 9))}, "costs must have shape"),
    ({"costs": [1, 2, np.nan, 3]}, "costs contain NaN"),
    ({"losses": np.full((4, 10), np.nan)}, "losses contain NaN"),
    ({"losses": np.full((4, 10), 1.5)}, r"outside loss_range=\(0, 1\)"),
    ({"losses": np.zeros((4, 1))}, "at least 2 examples"),
    ({"losses": np.zeros(10)}, "shape"),
    ({"losses": [["a", "b"]] * 4}, "numeric"),
    ({"eps": 1.0}, r"eps=1.0 must be a number strictly between 0 and 1"),
    ({"eps": 0.0}, "eps=0.0"),
    ({"eps": True}, "eps=True"),
    ({"eps": 0.5, "loss_range": (0.5, 1.0), "losses": np.ones((4, 10))},
     "eps=0.5 must be a number strictly between 0.5 and 1"),
    ({"delta": 0.0}, "delta=0.0"),
    ({"opt_fraction": 1.0}, "opt_fraction=1.0"),
    ({"opt_fraction": 0}, "opt_fraction=0"),
    ({"p_value": "bonferroni"}, r"p_value='bonferroni' is unknown: use one of \('hoeffding_bentkus', 'wsr'\)"),
    ({"loss_range": (1.0, 0.0)}, "loss_range"),
    ({"loss_range": "ab"}, "loss_range"),
])
def test_bad_input_raises_one_line_value_error(kwargs, match):
    args = {"losses": np.zeros((4, 10)), "costs": np.arange(4.0), "eps": 0.1, "delta": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match) as err:
        pareto_test(args.pop("losses"), args.pop("costs"), args.pop("eps"), args.pop("delta"), **args)
    assert "\n" not in str(err.value)


def test_pareto_front_bad_input():
    with pytest.raises(ValueError, match="same length"):
        pareto_front([0.1, 0.2], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        pareto_front([0.1, np.nan], [1.0, 2.0])


def test_helpers_bad_input():
    with pytest.raises(ValueError, match="n=1 must be an integer >= 2"):
        split_examples(1)
    with pytest.raises(ValueError, match="opt_fraction=1.5"):
        split_examples(10, 1.5)
    with pytest.raises(ValueError, match="delta=1"):
        wsr_pvalue(np.zeros((2, 5)), 0.1, 1)
    with pytest.raises(ValueError, match="eps=2"):
        wsr_pvalue(np.zeros((2, 5)), 2, 0.1, (-1, 1))
