"""1-D λ tables of several early-exit configurations collected on the same toy examples (one full model), shared by
the configuration-table and Pareto calibration tests."""

import numpy as np

from hf_safe_exit import model_fingerprint
from hf_safe_exit.config import EarlyExitConfig
from hf_safe_exit.risk import ConfigurationTable, LossTable

LAMBDAS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
CONFIGS = ({"measure": "softmax"}, {"measure": "saturation"}, {"measure": "softmax", "schedule": "decaying"})


def one_run(n=40, seed=0, configs=CONFIGS, **meta):
    """1-D λ tables of ``configs`` (up to three) on the same n examples: one full model (the λ = 1 task losses), each
    configuration its own harm below λ = 1 and its own cost (the second is riskier than the first but cheaper, the
    third riskier still), a layer fraction per example and a wall time per λ."""
    rng = np.random.default_rng(seed)
    full = rng.uniform(0, 0.6, n)
    tables = []
    for i, config in enumerate(configs):
        harm = (1 - LAMBDAS)[:, None] ** 2 * rng.normal((0.1, 0.05, 0.3)[i], 0.2, (LAMBDAS.size, n))
        task = np.clip(full[None, :] + harm, 0, 1)
        task[-1] = full
        slope = (0.8, 0.5, 0.3)[i]
        fraction = np.clip(LAMBDAS[:, None] * slope + (1 - slope) * rng.uniform(0, 1, (LAMBDAS.size, n)), 0, 1)
        fraction[-1] = 1.0
        metadata = {"task": "toy", "model_fingerprint": "abc123", "dtype": "float32", "max_new_tokens": 8,
                    "example_ids": [f"ex{j}" for j in range(n)], "n": n, "num_decoder_layers": 3,
                    **EarlyExitConfig(**config).to_dict(), **meta}
        tables.append(LossTable.from_task_losses(
            LAMBDAS, task, consistency_losses=np.abs(task - full) * (LAMBDAS < 1)[:, None],
            extras={"layer_fraction": fraction, "wall_time": 1.0 + LAMBDAS, "num_tokens": np.full((5, n), 7)},
            metadata=metadata))
    return tables


def model_table(model, n=200, task="toy"):
    """A configuration table for ``model``: consistency losses 0 everywhere (every configuration safe), so Pareto
    Testing picks the cheapest; the cheapest is the saturation measure with the decaying schedule at λ = 0.4."""
    settings, costs = [], []
    for measure in ("softmax", "saturation"):
        for schedule in ("constant", "decaying"):
            for lam in (0.4, 0.8, 1.0):
                if lam == 1.0 and settings and any(s["threshold"] == 1.0 for s in settings):
                    continue
                settings.append({**EarlyExitConfig(measure=measure, schedule=schedule).to_dict(), "threshold": lam})
                costs.append(lam - 0.1 * (measure == "saturation") - 0.05 * (schedule == "decaying"))
    G = len(settings)
    return ConfigurationTable(settings, {"consistency": np.zeros((G, n))}, {"layer_fraction": np.array(costs)},
                              metadata={"model_fingerprint": model_fingerprint(model), "task": task, "dtype": "float32",
                                        "max_new_tokens": 5, "num_decoder_layers": 3, "n": n})
