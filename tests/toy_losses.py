"""Toy per-example losses on an 11-point threshold grid, shared by the calibration and file tests."""

import numpy as np

from hf_safe_exit.risk import LossTable


def toy_task_losses(seed: int = 0, K: int = 11, n: int = 400):
    """(λ grid, task losses of shape (K, n)): below λ = 1 the loss grows by a noisy gap that shrinks towards λ = 1,
    where it is the full model's loss, in [0, 1]."""
    rng = np.random.default_rng(seed)
    lam = np.linspace(0, 1, K)
    full = rng.uniform(0, 0.6, n)
    harm = (1 - lam)[:, None] ** 2
    task = np.clip(full[None, :] + rng.normal(0.15, 0.2, (K, n)) * harm, 0, 1)
    task[-1] = full
    return lam, task


def toy_table(fingerprint: str | None = None, *, task: str = "cnndm", consistency: bool = False, **meta) -> LossTable:
    """A loss table of :func:`toy_task_losses` with early-exit settings in its metadata (softmax, constant
    schedule, min exit layer 1; ``meta`` adds or replaces keys), and consistency losses when asked."""
    lam, losses = toy_task_losses()
    metadata = {"task": task, "measure": "softmax", "schedule": "constant", "min_exit_layer": 1, **meta}
    if fingerprint is not None:
        metadata["model_fingerprint"] = fingerprint
    kwargs = {"consistency_losses": np.clip(np.abs(losses - losses[-1]) * 1.5, 0, 1)} if consistency else {}
    return LossTable.from_task_losses(lam, losses, metadata=metadata, **kwargs)
