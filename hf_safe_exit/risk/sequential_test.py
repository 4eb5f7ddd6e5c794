"""An anytime-valid test of "the deployed risk is at most ε", by betting, for monitoring a deployed λ̂.

Losses x_1, x_2, ... in [a, b] (``loss_range``; the deployed threshold's losses on sampled live calls) are mapped to
x' = (x − a)/(b − a) ∈ [0, 1] and ε to ε' = (ε − a)/(b − a) ∈ (0, 1). The test bets against H₀: "every conditional
mean E[x'_i | x'_<i] is ≤ ε'". A bettor with predictable bets λ_i ∈ [0, c/ε'], c = 1/2, has the wealth
∏_{i ≤ t} (1 + λ_i (x'_i − ε')), whose factors have conditional mean ≤ 1 under H₀ and are ≥ 1 − c > 0: a
nonnegative supermartingale from 1 (c = 1/2, not 1: a bet of 1/ε' would lose everything on one loss of 0). The
test's wealth mixes two such bettors on the same losses,

    K_t = w K_t^cum + (1 − w) K_t^disc,   w = :data:`MIXTURE_WEIGHT`,

again a nonnegative supermartingale from 1 (an average of e-processes is one), so by Ville's inequality
P_H₀(∃ t: K_t ≥ 1/α) ≤ α: the alarm at the first t with K_t ≥ 1/α is valid under continuous monitoring and
optional stopping (Shafer 2021; Ramdas, Grünwald, Vovk, Shafer 2023). Both bet aGRAPA (Waudby-Smith & Ramdas
2023, App. B.3), a second-order approximation of the Kelly bet, from their own mean and variance estimates:

    λ_t = clip( (μ_{t−1} − ε') / (σ²_{t−1} + (μ_{t−1} − ε')²), 0, c/ε' )   (0 when μ_{t−1} ≤ ε'),

* K^cum: μ̂_t = (1/2 + Σ_{i≤t} x'_i)/(t + 1), σ̂²_t = (1/4 + Σ_{i≤t} (x'_i − μ̂_i)²)/(t + 1) (WSR's prior: one
  pseudo-observation of mean 1/2, variance 1/4);
* K^disc: every term, the prior's too, discounted by γ = :data:`DISCOUNT` per loss: D_t = Σ_{j=0}^{t} γ^j,
  μ̃_t = (γ^t/2 + Σ_{i≤t} γ^{t−i} x'_i)/D_t, σ̃²_t = (γ^t/4 + Σ_{i≤t} γ^{t−i} (x'_i − μ̃_i)²)/D_t.

Why two: after N losses at mean m₀ < ε' the cumulative mean needs more than N(ε' − m₀)/(r − ε') losses at a
shifted mean r before its bet turns positive, so its delay grows with how long the service has run; the
discounted estimates forget within about 1/(1 − γ) losses, and the cumulative bettor keeps the power against
small shifts. Both start equal (the same prior). The wealths are kept as logarithms (log K_t by log-sum-exp). One
scalar function (:func:`_step`) does the work of a loss for :func:`first_alarm` and :class:`SequentialRiskTest`
alike, so feeding losses in any chunks, or saving the state and loading it back, gives the state of one run on
the whole prefix bit for bit.

:meth:`SequentialRiskTest.confidence_interval` is the predictable plug-in empirical-Bernstein confidence sequence
(Waudby-Smith & Ramdas 2023, Thm 2) at level α: it holds the mean at every t at once with probability ≥ 1 − α
(i.i.d. losses, or a constant conditional mean). The construction follows continuous risk monitoring by testing
by betting (Timans, Verma, Nalisnick, Naesseth, UAI 2025).

References: [WSR] Waudby-Smith & Ramdas (2023), *Estimating means of bounded random variables by betting*, JRSS-B.
Shafer (2021), *Testing by betting*, JRSS-A. Ramdas, Grünwald, Vovk, Shafer (2023), *Game-theoretic statistics and
safe anytime-valid inference*, Statistical Science. Timans, Verma, Nalisnick, Naesseth (2025), *On continuous
monitoring of risk violations under unknown shift*, UAI.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .bounds import check_level

__all__ = ["first_alarm", "SequentialRiskTest", "BET_CAP", "DISCOUNT", "MIXTURE_WEIGHT"]

BET_CAP = 0.5  # c: λ ≤ c/ε' keeps every factor ≥ 1 − c (see the module docstring); also the CS's λ cap
# γ and w, chosen by measurement (benchmarks/monitor_discount.py: 200 Bernoulli streams at ε = 0.1, α = 0.05, median
# losses from a shift to 2ε to the alarm; fresh, 72 for every γ and w). After 1,000 losses at ε/2: 163 at γ = 0.98,
# 197 at 0.99, 272 at 0.995 (the cumulative bettor alone: 883); the shipped model's real lowercase shift after its
# 150 in-distribution losses: 159 / 209 / 269 (alone: 390). A larger γ drains less, its noisy mean passing ε less
# often while H₀ holds (after 30,000 losses at 0.8ε: 1030 / 540 / 345; alone: 7565), but is slower wherever the risk
# sits well below ε, as conservative calibrations put it. w = 1/2: 1/4 saves ~15 losses after a history, 3/4 ~40
# against a small fresh shift (1.3ε); either bettor costs at most log 2 nats of evidence.
DISCOUNT = 0.98  # γ: the discounted bettor's memory is about 1/(1 − γ) = 50 losses
MIXTURE_WEIGHT = 0.5  # w: the cumulative bettor's share of the initial wealth
_PRIOR_MEAN, _PRIOR_VAR = 0.5, 0.25  # WSR's one pseudo-observation, for both bets and the confidence sequence
_RANGE_TOL = 1e-12  # relative: a loss this far outside [a, b] is float rounding (as LossTable allows), clipped
_MAX_N = 2**53  # a state's n beyond this is no count of fed losses (and overflows the discounted weight's float)
_FORMAT = "hf_safe_exit.SequentialRiskTest"
_VERSION = 2  # 2: the mixture of a cumulative and a discounted bettor; 1 (cumulative only) is refused


class _Constants(NamedTuple):
    eps: float  # ε' (scaled)
    bet_max: float  # c/ε'
    log_threshold: float  # log(1/α)
    cs_log: float  # log(2/α)
    log_w: float  # log w
    log_1mw: float  # log(1 − w)


class _State(NamedTuple):
    n: int = 0
    sum_x: float = 0.0  # Σ x'_i
    sum_sq: float = 0.0  # Σ (x'_i − μ̂_i)²
    log_wealth_cum: float = 0.0  # log K^cum_t
    disc_sum_x: float = _PRIOR_MEAN  # γ^t/2 + Σ γ^{t−i} x'_i
    disc_sum_sq: float = _PRIOR_VAR  # γ^t/4 + Σ γ^{t−i} (x'_i − μ̃_i)²
    log_wealth_disc: float = 0.0  # log K^disc_t
    max_log_wealth: float = 0.0  # max_{s ≤ t} log K_s of the mixture (K_0 = 1)
    alarm_index: int | None = None
    cs_sum_lam: float = 0.0  # Σ λ_i (the confidence sequence's bets)
    cs_sum_lam_x: float = 0.0  # Σ λ_i x'_i
    cs_sum_penalty: float = 0.0  # Σ v_i ψ_E(λ_i)


_ALARM = _State._fields.index("alarm_index")


def _disc_weight(t: int) -> float:
    """D_t = Σ_{j=0}^{t} γ^j, the total weight of the discounted sums after t losses (a function of t alone)."""
    return (1.0 - DISCOUNT ** (t + 1)) / (1.0 - DISCOUNT)


def _bet(mean: float, var: float, k: _Constants) -> float:
    """aGRAPA's bet from estimates of the mean and variance; 0 unless the mean is above ε' (then var + edge² > 0
    even where a discounted variance has underflowed to 0)."""
    edge = mean - k.eps
    return min(edge / (var + edge * edge), k.bet_max) if edge > 0.0 else 0.0


def _mixture(log_cum: float, log_disc: float, k: _Constants) -> float:
    """log(w K^cum + (1 − w) K^disc) by log-sum-exp (either wealth may be far beyond a float's range)."""
    a, b = k.log_w + log_cum, k.log_1mw + log_disc
    hi, lo = (a, b) if a >= b else (b, a)
    return hi + math.log1p(math.exp(lo - hi))


def _step(s: tuple, x: float, k: _Constants) -> tuple:
    """One scaled loss x' ∈ [0, 1]: both bets, the wealths, the confidence sequence's sums and the estimates.

    ``s`` and the result are :class:`_State` fields as a plain tuple (a NamedTuple per loss costs a third more)."""
    (n, sum_x, sum_sq, log_cum, disc_x, disc_sq, log_disc, max_log_wealth, alarm,
     cs_sum_lam, cs_sum_lam_x, cs_sum_penalty) = s
    t = n + 1
    mu_prev = (_PRIOR_MEAN + sum_x) / t  # μ̂_{t−1}
    var_prev = (_PRIOR_VAR + sum_sq) / t  # σ̂²_{t−1} ≥ 1/(4t) > 0
    weight_prev = _disc_weight(n)  # D_{t−1}
    log_cum += math.log1p(_bet(mu_prev, var_prev, k) * (x - k.eps))
    log_disc += math.log1p(_bet(disc_x / weight_prev, disc_sq / weight_prev, k) * (x - k.eps))
    log_wealth = _mixture(log_cum, log_disc, k)
    if alarm is None and log_wealth >= k.log_threshold:
        alarm = n
    # WSR Thm 2: λ_t = min(sqrt(2 log(2/α) / (σ̂²_{t−1} t log(1 + t))), c); v_t ψ_E(λ_t) = (x'_t − μ̂_{t−1})² (−log(1 − λ_t) − λ_t)
    cs_lam = min(math.sqrt(2.0 * k.cs_log / (var_prev * t * math.log1p(t))), BET_CAP)
    dev = x - mu_prev
    sum_x += x
    dev_now = x - (_PRIOR_MEAN + sum_x) / (t + 1)  # x'_t − μ̂_t, which σ̂²_t sums
    disc_x = DISCOUNT * disc_x + x
    disc_dev = x - disc_x / _disc_weight(t)  # x'_t − μ̃_t, which σ̃²_t sums
    return (t, sum_x, sum_sq + dev_now * dev_now, log_cum, disc_x, DISCOUNT * disc_sq + disc_dev * disc_dev, log_disc,
            max(max_log_wealth, log_wealth), alarm, cs_sum_lam + cs_lam, cs_sum_lam_x + cs_lam * x,
            cs_sum_penalty + dev * dev * (-math.log1p(-cs_lam) - cs_lam))


def _run(s: _State, xs: list, k: _Constants, *, stop_at_alarm: bool) -> _State:
    s = tuple(s)
    for x in xs:
        s = _step(s, x, k)
        if stop_at_alarm and s[_ALARM] is not None:
            break
    return _State(*s)


def _check_range(loss_range) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in loss_range)
    except (TypeError, ValueError):
        raise ValueError(f"loss_range={loss_range!r} must be a pair (a, b) of numbers: the losses' bounds.") from None
    if not (math.isfinite(a) and math.isfinite(b) and a < b):
        raise ValueError(f"loss_range={loss_range!r} must be finite with a < b (e.g. (0.0, 1.0), or (-1.0, 1.0) "
                         "for the performance gap).")
    return a, b


def _check_eps(eps, a: float, b: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)):
        raise TypeError(f"eps={eps!r} must be a number (the risk level the deployment guarantees).")
    if not a < float(eps) < b:
        raise ValueError(f"eps={eps!r} must lie strictly inside loss_range ({a:g}, {b:g}): at an end of the range "
                         "H0 'mean risk <= eps' is either always true or never testable; pass the eps calibrated.")
    return float(eps)


def _scaled(losses, a: float, b: float) -> list:
    """The losses mapped to [0, 1] as Python floats (the whole chunk is checked before any is used)."""
    if isinstance(losses, (float, int, np.floating, np.integer)) and not isinstance(losses, bool):
        x = float(losses)  # one loss per sampled call is the monitor's case: no array for it (same IEEE result)
        if math.isfinite(x) and a - _RANGE_TOL * (b - a) <= x <= b + _RANGE_TOL * (b - a):
            return [(min(max(x, a), b) - a) / (b - a)]
    return ((np.clip(_checked(losses, a, b), a, b) - a) / (b - a)).tolist()


def _checked(losses, a: float, b: float) -> np.ndarray:
    """The losses as a 1-D float64 array in loss units, after every check (type, shape, finite, in [a, b])."""
    try:
        raw = np.asarray(losses)
        if raw.dtype.kind not in "iuf":  # a string or a bool is not a loss: refused, not parsed or counted as 0/1
            first = raw.reshape(-1).tolist()[0] if raw.size else None
            raise TypeError(f"losses must be real numbers (int or float), got {raw.dtype.name} values (e.g. "
                            f"{first!r}): feed the losses as numbers, converted where they are computed.")
        arr = raw.astype(np.float64)
    except ValueError:  # a ragged nesting
        raise TypeError(f"losses of type {type(losses).__name__} must be a number or a 1-D sequence of numbers.") \
            from None
    if arr.ndim > 1:
        raise ValueError(f"losses must be one number or a 1-D sequence, got shape {arr.shape}: flatten it in the "
                         "order the losses were observed.")
    arr = arr.reshape(-1)
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"losses[{i}]={float(arr[i])!r} is not finite: drop the call or fix the loss before feeding it.")
    slack = _RANGE_TOL * (b - a)
    out = (arr < a - slack) | (arr > b + slack)
    if out.any():
        i = int(np.flatnonzero(out)[0])
        raise ValueError(f"losses[{i}]={float(arr[i])!r} lies outside loss_range [{a:g}, {b:g}]: pass the losses' true "
                         "bounds as loss_range (the test's validity needs them).")
    return arr


def _constants(eps: float, alpha: float, a: float, b: float) -> _Constants:
    e = (eps - a) / (b - a)
    return _Constants(e, BET_CAP / e, math.log(1.0 / alpha), math.log(2.0 / alpha), math.log(MIXTURE_WEIGHT),
                      math.log1p(-MIXTURE_WEIGHT))


def first_alarm(losses, eps: float, alpha: float, *, loss_range=(0.0, 1.0)) -> int | None:
    """Index (0-based) of the loss at which H₀: "the mean risk ≤ eps" is first rejected at level alpha, or None.

    The first t with K_t ≥ 1/α (module docstring); under H₀, P(an index is returned, for any length) ≤ α
    (Ville's inequality). Equals :class:`SequentialRiskTest` fed the same losses in any chunks.
    """
    test = SequentialRiskTest(eps, alpha, loss_range=loss_range)
    test._state = _run(test._state, _scaled(losses, *test.loss_range), test._k, stop_at_alarm=True)
    return test.alarm_index


class SequentialRiskTest:
    """Incremental :func:`first_alarm`: feeding losses in any chunks gives, bit for bit, the state of a fresh run
    on the whole prefix; :meth:`to_dict` / :meth:`from_dict` carry it across a restart, bit for bit.

    Attributes: ``n`` (losses seen), ``alarm_index`` (the loss at which K_t first reached 1/α; fixed afterwards,
    while the wealth and the estimates keep updating), ``alarmed``, ``e_value`` (K_t, the mixture),
    ``max_e_value``, ``log_e_value``, ``mean`` (of the losses seen, in loss units; nan before any).
    """

    def __init__(self, eps: float, alpha: float, *, loss_range=(0.0, 1.0)):
        a, b = _check_range(loss_range)
        self.loss_range = (a, b)
        self.eps = _check_eps(eps, a, b)
        self.alpha = check_level(alpha, "alpha")
        self._k = _constants(self.eps, self.alpha, a, b)
        self._state = _State()

    def update(self, losses) -> int | None:
        """Feed one loss or a 1-D sequence of losses, in the order observed; returns :attr:`alarm_index`.

        A chunk with a bad loss (NaN, outside ``loss_range``) raises before any of it is used."""
        self._state = _run(self._state, _scaled(losses, *self.loss_range), self._k, stop_at_alarm=False)
        return self._state.alarm_index

    def check_losses(self, losses) -> list[float]:
        """``losses`` as Python floats (loss units, as given) after the checks :meth:`update` makes, raising as it
        would: a caller can check a chunk whole, then feed it one loss at a time (the same state, bit for bit)."""
        return _checked(losses, *self.loss_range).tolist()

    @property
    def n(self) -> int:
        return self._state.n

    @property
    def alarm_index(self) -> int | None:
        return self._state.alarm_index

    @property
    def alarmed(self) -> bool:
        return self._state.alarm_index is not None

    @property
    def threshold(self) -> float:
        """1/α, the e-value at which the alarm fires."""
        return 1.0 / self.alpha

    @property
    def log_e_value(self) -> float:
        """log K_t = log(w K^cum_t + (1 − w) K^disc_t)."""
        return _mixture(self._state.log_wealth_cum, self._state.log_wealth_disc, self._k)

    @property
    def e_value(self) -> float:
        """K_t (inf if it overflows a float: the evidence is overwhelming)."""
        return _exp(self.log_e_value)

    @property
    def max_e_value(self) -> float:
        return _exp(self._state.max_log_wealth)

    @property
    def mean(self) -> float:
        a, b = self.loss_range
        return a + (b - a) * self._state.sum_x / self._state.n if self._state.n else math.nan

    def confidence_interval(self) -> tuple[float, float]:
        """The (1 − α) confidence sequence for the mean at this t, in loss units, clipped to ``loss_range``
        ([WSR] Thm 2, predictable plug-in empirical Bernstein, λ capped at 1/2):

            Σλ_i x'_i / Σλ_i  ±  (log(2/α) + Σ v_i ψ_E(λ_i)) / Σλ_i,   v_i = 4 (x'_i − μ̂_{i−1})², ψ_E(λ) = (−log(1−λ) − λ)/4.

        With probability ≥ 1 − α it holds the mean at every t simultaneously (so the running intersection of
        the intervals is valid too). Before any loss it is the whole range."""
        s, (a, b) = self._state, self.loss_range
        if s.n == 0:
            return a, b
        centre = s.cs_sum_lam_x / s.cs_sum_lam
        radius = (self._k.cs_log + s.cs_sum_penalty) / s.cs_sum_lam
        lo, hi = max(centre - radius, 0.0), min(centre + radius, 1.0)
        return a + (b - a) * lo, a + (b - a) * hi

    def __repr__(self) -> str:
        return (f"SequentialRiskTest(eps={self.eps!r}, alpha={self.alpha!r}, loss_range={self.loss_range!r}, "
                f"n={self.n}, e_value={self.e_value:.4g}, alarm_index={self.alarm_index})")

    def to_dict(self) -> dict:
        """The whole state as JSON-able Python numbers (floats round-trip through ``json`` exactly)."""
        return {"format": _FORMAT, "version": _VERSION, "eps": self.eps, "alpha": self.alpha,
                "loss_range": list(self.loss_range), **self._state._asdict()}

    @classmethod
    def from_dict(cls, data: dict) -> "SequentialRiskTest":
        """A test that continues, bit for bit, the one that wrote ``data`` (:meth:`to_dict`). A dict that no
        test could have written raises a one-line ``ValueError`` naming the key."""
        if not isinstance(data, dict):
            raise TypeError(f"SequentialRiskTest.from_dict expects the dict to_dict() wrote, got {type(data).__name__}.")
        _check_keys(data)
        try:
            test = cls(data["eps"], data["alpha"], loss_range=data["loss_range"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"SequentialRiskTest.from_dict: eps/alpha/loss_range are invalid ({err}); pass a dict "
                             "written by to_dict().") from None
        state = _State(**{name: data[name] if name in ("n", "alarm_index") else float(data[name])
                          for name in _State._fields})
        _check_state(state, test._k)
        test._state = state
        return test


def _exp(log_value: float) -> float:
    try:
        return math.exp(log_value)
    except OverflowError:
        return math.inf


def _check_keys(data: dict) -> None:
    """Raise ``ValueError`` naming the key unless ``data`` has to_dict()'s keys with values of the right type."""
    def bad(key, why):
        raise ValueError(f"SequentialRiskTest.from_dict: {key}={data.get(key)!r} {why}; pass a dict written by "
                         "to_dict().")

    if data.get("format") != _FORMAT:
        bad("format", f"must be {_FORMAT!r}")
    if data.get("version") == 1 and not isinstance(data["version"], bool):
        raise ValueError("SequentialRiskTest.from_dict: version=1 is the cumulative-only test, whose state cannot "
                         f"continue the version {_VERSION} mixture (it lacks the discounted bettor); start a fresh "
                         "SequentialRiskTest (or RiskMonitor) and feed it new losses.")
    if data.get("version") != _VERSION or isinstance(data.get("version"), bool):
        bad("version", f"must be {_VERSION} (this library reads that version)")
    expected = ("format", "version", "eps", "alpha", "loss_range", *_State._fields)
    for key in expected:
        if key not in data:
            bad(key, "is missing")
    for key in data:
        if key not in expected:
            bad(key, "is not a key to_dict() writes")
    for key in ("n", "alarm_index"):
        value = data[key]
        if not (key == "alarm_index" and value is None) and (isinstance(value, bool) or not isinstance(value, int)):
            bad(key, "must be an int" + (" or None" if key == "alarm_index" else ""))
    for key in _State._fields:
        value = data[key]
        if key not in ("n", "alarm_index") and (isinstance(value, bool) or not isinstance(value, (int, float))
                                                or not math.isfinite(value)):
            bad(key, "must be a finite number")


def _check_state(state: _State, k: _Constants) -> None:
    """Raise ``ValueError`` naming the key unless ``state`` is one the test could have reached."""
    n = state.n

    def bad(key, why):
        raise ValueError(f"SequentialRiskTest.from_dict: {key}={getattr(state, key)!r} {why}; pass a dict written "
                         "by to_dict().")

    if not 0 <= n <= _MAX_N:
        bad("n", "must be a count in [0, 2**53] (losses a float counts exactly)")
    if not 0.0 <= state.sum_x <= n:
        bad("sum_x", f"must lie in [0, n={n}] (a sum of n losses scaled to [0, 1])")
    for key in ("sum_sq", "cs_sum_penalty", "cs_sum_lam"):
        if getattr(state, key) < 0.0:
            bad(key, "must be >= 0")
    if (state.cs_sum_lam > 0.0) != (n > 0):
        bad("cs_sum_lam", "must be > 0 exactly when n > 0")
    if not 0.0 <= state.cs_sum_lam_x <= state.cs_sum_lam * (1.0 + 1e-12):
        bad("cs_sum_lam_x", "must lie in [0, cs_sum_lam]")
    weight = _disc_weight(n) * (1.0 + 1e-12)
    for key in ("disc_sum_x", "disc_sum_sq"):  # γ^n/2 (γ^n/4) plus discounted terms each in [0, 1]
        if not 0.0 <= getattr(state, key) <= weight:
            bad(key, f"must lie in [0, {weight:.6g}] (the discounted weight of n={n} losses and the prior)")
    for key in ("log_wealth_cum", "log_wealth_disc"):
        if getattr(state, key) < n * math.log1p(-BET_CAP) * (1.0 + 1e-12) - 1e-12:
            bad(key, f"is below n log(1/2), which {n} bets capped at c = 1/2 cannot reach")
    if state.max_log_wealth < max(_mixture(state.log_wealth_cum, state.log_wealth_disc, k), 0.0):
        bad("max_log_wealth", "must be >= max(log of the mixture's wealth, 0)")
    crossed = state.max_log_wealth >= k.log_threshold
    if state.alarm_index is None and crossed:
        bad("alarm_index", f"is None although max_log_wealth reached log(1/alpha) = {k.log_threshold!r}")
    if state.alarm_index is not None and not (crossed and 0 <= state.alarm_index < n):
        bad("alarm_index", f"must be None or an index in [0, n={n}) reached with max_log_wealth >= log(1/alpha)")
