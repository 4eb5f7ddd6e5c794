"""How the deployment monitor's test chose its discount γ and mixture weight w (issue 29, follow-up).

The test (:mod:`hf_safe_exit.risk.sequential_test`) bets with the mixture K = w K^cum + (1 − w) K^disc of an
aGRAPA bettor on cumulative estimates and one on estimates discounted by γ per loss. Here both bettors are
re-implemented with NumPy across many streams at once, for γ in :data:`GAMMAS` and w in :data:`WEIGHTS` (w = 1:
the cumulative bettor alone, the test's version 1), and the number of losses from the shift to the alarm
(median over the streams, α = 0.05) is measured in:

* ``fresh``: Bernoulli losses at 2ε (ε = 0.1) from the start, and a small shift to 1.3ε (where the noisier
  discounted bettor is weaker and the cumulative one matters);
* ``history``: H losses at m₀ = ε/2 or 0.8ε (in distribution) before the shift to 2ε, H up to 30,000. A bettor
  whose noisy estimate passes ε while H₀ holds bets and, on average, loses; the smaller γ, the more often, so
  its wealth drains as H grows;
* ``real``: the shipped model's consistency losses on CNN/DM rows and on lowercased ones (ε = 0.2, true risks
  0.093 and 0.287; ``benchmarks/results/monitor_shift.json``): its 150 in-distribution losses (then resampled up
  to H) before resampled shifted ones.

Every stream is seeded; the same streams go to every γ and w. The benchmark's smoke test checks that this
re-implementation at the library's γ and w alarms where :func:`~hf_safe_exit.risk.first_alarm` does.

    OMP_NUM_THREADS=1 python benchmarks/monitor_discount.py        # about 2 minutes on one core
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "monitor_discount.json"
SHIFT = ROOT / "benchmarks" / "results" / "monitor_shift.json"
GAMMAS, WEIGHTS, ALPHA, EPS = (0.95, 0.98, 0.99, 0.995), (0.25, 0.5, 0.75, 1.0), 0.05, 0.1
AFTER = 20_000  # losses drawn after the shift: every median here is inside, the cumulative bettor's too


def alarm_delays(x: np.ndarray, eps: float, gamma: float, weights=WEIGHTS, start: int = 0, alpha: float = ALPHA):
    """Per w: for each stream (row of ``x``, losses in [0, 1]), losses from index ``start`` to the mixture's alarm
    (1 = at the first shifted loss; 0 for an alarm before ``start``; inf for none)."""
    streams, length = x.shape
    cap, threshold = 0.5 / eps, math.log(1 / alpha)
    sum_x, sum_sq, log_cum = np.zeros(streams), np.zeros(streams), np.zeros(streams)
    disc_x, disc_sq, log_disc = np.full(streams, 0.5), np.full(streams, 0.25), np.zeros(streams)
    alarm = {w: np.full(streams, -1) for w in weights}
    for t in range(length):
        weight = (1.0 - gamma ** (t + 1)) / (1.0 - gamma)  # Σ_{j ≤ t} γ^j: the discounted sums' weight
        for est_mean, est_var, logs in (((0.5 + sum_x) / (t + 1), (0.25 + sum_sq) / (t + 1), log_cum),
                                        (disc_x / weight, disc_sq / weight, log_disc)):
            edge = est_mean - eps
            bet = np.where(edge > 0, np.minimum(edge / np.maximum(est_var + edge ** 2, 1e-300), cap), 0.0)
            logs += np.log1p(bet * (x[:, t] - eps))
        sum_x += x[:, t]
        sum_sq += (x[:, t] - (0.5 + sum_x) / (t + 2)) ** 2
        disc_x = gamma * disc_x + x[:, t]
        disc_sq = gamma * disc_sq + (x[:, t] - disc_x / (gamma * weight + 1.0)) ** 2
        for w in weights:
            log_k = log_cum if w == 1.0 else np.logaddexp(math.log(w) + log_cum, math.log1p(-w) + log_disc)
            alarm[w][(alarm[w] < 0) & (log_k >= threshold)] = t
        if all((a >= 0).all() for a in alarm.values()):
            break
    return {w: np.where(a < 0, np.inf, np.maximum(a + 1 - start, 0)) for w, a in alarm.items()}


def scenarios(rng, streams: int):
    """Yields (name, eps, shift index, losses) for every scenario, the losses drawn once for all γ and w."""
    def bernoulli(mean, n):
        return (rng.random((streams, n)) < mean).astype(float)

    yield "fresh, 2 eps", EPS, 0, bernoulli(2 * EPS, AFTER)
    yield "fresh, 1.3 eps", EPS, 0, bernoulli(1.3 * EPS, AFTER)
    for m0 in (0.5, 0.8):
        for h in (1_000, 10_000, 30_000):
            yield (f"{h:,} losses at {m0:g} eps, then 2 eps", EPS, h,
                   np.concatenate([bernoulli(m0 * EPS, h), bernoulli(2 * EPS, AFTER)], axis=1))
    shift = json.loads(SHIFT.read_text())["experiments"]["cnndm_to_lowercase"]
    before, after = np.asarray(shift["losses"]["in-distribution"]), np.asarray(shift["losses"]["lowercase"])
    for h in (before.size, 5_000):
        x = np.concatenate([np.tile(before, (streams, 1)), rng.choice(before, size=(streams, h - before.size)),
                            rng.choice(after, size=(streams, AFTER))], axis=1)
        yield f"real: {h:,} CNN/DM losses, then lowercased", shift["eps"], h, x


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    start = time.perf_counter()
    rows = []
    for name, eps, shift, x in scenarios(np.random.default_rng(args.seed), args.streams):
        row = {"scenario": name, "eps": eps, "history": shift, "median_losses_to_alarm": {}}
        for gamma in GAMMAS:
            delays = alarm_delays(x, eps, gamma, start=shift)
            medians = {str(w): _finite(float(np.median(d))) for w, d in delays.items()}
            row["median_losses_to_alarm"][str(gamma)] = medians
        print(name, row["median_losses_to_alarm"], flush=True)
        rows.append(row)
    doc = {"benchmark": "monitor_discount", "issue": 29, "alpha": ALPHA, "gammas": list(GAMMAS),
           "weights": list(WEIGHTS), "streams": args.streams, "seed": args.seed,
           "note": "w = 1.0 is the cumulative bettor alone (the same for every gamma)", "rows": rows,
           "seconds": round(time.perf_counter() - start, 1),
           "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return doc


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no inf: no alarm within the streams' length


if __name__ == "__main__":
    main()
