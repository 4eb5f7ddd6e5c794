"""Stacking the 1-D λ tables of several early-exit configurations into the parts of one configuration table.

``collect`` writes one :class:`~hf_safe_exit.risk.LossTable` per early-exit configuration (its losses on a λ grid).
Pareto Testing (Laufer-Goldshtein et al., ICLR 2023) needs them as one matrix of (configuration, λ) rows on the same
examples: :func:`stack_tables` gives its parts, which
:meth:`ConfigurationTable.from_tables <hf_safe_exit.risk.ConfigurationTable.from_tables>` builds and checks.

It refuses tables that are not rows of one calibration: other examples, model, task, lengths, risks, bounds or
measurements (every metadata key but the configuration's and the grid's must be equal), another meta head, a
configuration given twice, or a λ = 1 row (the full model whatever the configuration, kept once) whose losses or
task losses differ from the first table's: the gaps would then be relative to other full-model outputs.
"""

from __future__ import annotations

import os

import numpy as np

from ..config import EarlyExitConfig, config_fields
from .loss_table import LossTable

__all__ = ["COST_NAMES", "PER_CONFIGURATION_KEYS", "stack_tables"]

# what a stack files under costs (lower is cheaper); the other extras of a 1-D table stay extras
COST_NAMES = ("layer_fraction", "mean_exit_layer", "wall_time", "example_time")
# metadata of a 1-D table that describes its configuration or grid: in a configuration table these are per row
PER_CONFIGURATION_KEYS = ("lambdas", "lambda_order", *config_fields())
_TOL = 1e-12  # λ = 1 up to float rounding (as selection.prepare_losses); the full model's losses equal to this


def stack_tables(tables) -> dict:
    """The keyword arguments of a :class:`~hf_safe_exit.risk.ConfigurationTable` (``settings``, ``losses``,
    ``costs``, ``bounds``, ``extras``, ``metadata``) holding ``tables`` (LossTables, or paths to them) as rows: every
    (configuration, λ) in the order given, the λ = 1 row once (the first table's). Raises ``ValueError`` naming the
    two tables that disagree (see the module docstring), ``TypeError`` for what is not a table."""
    named = _named_tables(tables)
    (first_name, first), configs = named[0], [_configuration_of(name, t) for name, t in named]
    _check_meta_heads(named)
    for i, (name, table) in enumerate(named[1:], start=1):
        _check_same_run(first_name, first, name, table)
        earlier = next((j for j in range(i) if configs[j] == configs[i]), None)
        if earlier is not None:
            raise ValueError(f"{named[earlier][0]} and {name} hold the same configuration ({configs[i]}): give "
                             "each configuration's table once.")
    settings, rows, full = [], {}, None
    for (name, table), config in zip(named, configs):
        for k, lam in enumerate(table.lambdas):
            if abs(lam - 1.0) <= _TOL:
                if full is not None:
                    _check_full_rows(full, (name, table, k))
                    continue
                full = (name, table, k)
            settings.append({**config, "threshold": 1.0 if abs(lam - 1.0) <= _TOL else float(lam)})
            for key, arr in _row_arrays(table).items():
                rows.setdefault(key, []).append(arr[k])
    stacked = {key: np.stack(values) for key, values in rows.items()}
    pick = {kind: {key[1]: v for key, v in stacked.items() if key[0] == kind} for kind in ("loss", "cost", "extra")}
    return {"settings": settings, "losses": pick["loss"], "costs": pick["cost"], "bounds": dict(first.bounds),
            "extras": pick["extra"], "metadata": _stacked_metadata(named)}


def _named_tables(tables) -> list:
    if isinstance(tables, (LossTable, str, os.PathLike)) or not hasattr(tables, "__iter__"):
        raise TypeError(f"from_tables takes a list of LossTables (or paths to them), got {type(tables).__name__}.")
    named = []
    for i, table in enumerate(tables):
        if isinstance(table, (str, os.PathLike)):
            named.append((f"'{os.fspath(table)}'", LossTable.load(table)))
        elif isinstance(table, LossTable):
            source = getattr(table, "source", None)
            named.append((f"tables[{i}]" + (f" ('{source}')" if source else ""), table))
        else:
            raise TypeError(f"tables[{i}] is a {type(table).__name__}, not a LossTable or a path to one.")
    if not named:
        raise ValueError("from_tables needs at least one LossTable.")
    return named


def _configuration_of(name: str, table: LossTable) -> dict:
    """The early-exit configuration a 1-D table's losses were collected with (``to_dict()`` form)."""
    meta = table.metadata
    if meta.get("strategy") not in (None, "early_exit"):
        raise ValueError(f"{name} calibrates a {meta['strategy']!r} policy: a ConfigurationTable holds early-exit "
                         "configurations only.")
    if meta.get("measure") is None:
        raise ValueError(f"{name} records no early-exit configuration (no measure in its metadata): a configuration "
                         "table needs each row's settings. Use the tables `hf-safe-exit collect` writes, or add "
                         "the settings to its metadata.")
    return EarlyExitConfig.from_dict(meta, strict=False).to_dict()


def _row_arrays(table: LossTable) -> dict:
    """A 1-D table's arrays with one row per λ, keyed (kind, name)."""
    out = {("loss", k): v for k, v in table.losses.items()}
    out.update({("cost" if k in COST_NAMES else "extra", k): v for k, v in table.extras.items()})
    return out


def _check_same_run(a_name: str, a: LossTable, b_name: str, b: LossTable) -> None:
    """The two tables' losses are comparable rows of one table: same examples, model, task, lengths, risks, bounds
    and measurements; every metadata key but the configuration's and the grid's equal."""
    def differ(what: str, va, vb) -> ValueError:
        return ValueError(f"{a_name} and {b_name} cannot be stacked: {what} is {va!r} in the first and {vb!r} in the "
                          "second; a configuration table holds configurations collected on the same examples, model, "
                          "task and lengths. Recollect one of them to match.")

    if a.bounds != b.bounds:
        raise differ("their risks and bounds", a.bounds, b.bounds)
    shapes_a = {k: v.ndim for k, v in a.extras.items()}
    shapes_b = {k: v.ndim for k, v in b.extras.items()}
    if shapes_a != shapes_b:
        raise differ("the measurements (extras, by number of axes)", shapes_a, shapes_b)
    if a.n != b.n:
        raise differ("the number of examples", a.n, b.n)
    ignored = set(PER_CONFIGURATION_KEYS) | {"meta_head_fingerprint"}
    for key in sorted((set(a.metadata) | set(b.metadata)) - ignored):
        if a.metadata.get(key, "<absent>") != b.metadata.get(key, "<absent>"):
            raise differ(f"metadata {key}", a.metadata.get(key, "<absent>"), b.metadata.get(key, "<absent>"))


def _check_meta_heads(named: list) -> None:
    """One meta head for the whole table: every table that records one records the same, and so does every table
    of the meta measure (a meta table without one was read with an unknown head)."""
    recorded = [(name, t.metadata.get("meta_head_fingerprint")) for name, t in named
                if t.metadata.get("meta_head_fingerprint") is not None or t.metadata.get("measure") == "meta"]
    for name, head in recorded[1:]:
        if head != recorded[0][1]:
            raise ValueError(f"{recorded[0][0]} and {name} cannot be stacked: metadata meta_head_fingerprint is "
                             f"{recorded[0][1]!r} in the first and {head!r} in the second; the meta measure must read "
                             "one head in every configuration. Recollect one of them with the other's head.")


def _check_full_rows(full: tuple, other: tuple) -> None:
    """Every table's λ = 1 row is the full model's: the same losses and task losses as the row kept."""
    (a_name, a, ka), (b_name, b, kb) = full, other
    for kind, arrays_a, arrays_b in (("losses", a.losses, b.losses), ("extras", a.extras, b.extras)):
        for key in (arrays_a if kind == "losses" else [k for k in ("task_loss",) if k in arrays_a]):
            if not np.allclose(arrays_a[key][ka], arrays_b[key][kb], rtol=0.0, atol=_TOL):
                j = int(np.argmax(np.abs(arrays_a[key][ka] - arrays_b[key][kb])))
                raise ValueError(f"{a_name} and {b_name} disagree at λ = 1, the full model whatever the configuration: "
                                 f"{kind}[{key!r}] of example {j} is {arrays_a[key][ka][j]!r} in the first and "
                                 f"{arrays_b[key][kb][j]!r} in the second, so their losses are not relative to the same "
                                 "full-model outputs. Recollect them in one run (same model, data and settings).")


def _stacked_metadata(named: list) -> dict:
    """The first table's metadata less the per-configuration keys, with the meta head's fingerprint any records."""
    meta = {k: v for k, v in named[0][1].metadata.items() if k not in PER_CONFIGURATION_KEYS}
    heads = [t.metadata["meta_head_fingerprint"] for _, t in named if t.metadata.get("meta_head_fingerprint")]
    if heads:
        meta["meta_head_fingerprint"] = heads[0]
    return meta
