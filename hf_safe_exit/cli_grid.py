"""The CLI's configuration grids and Pareto Testing (issue 28), used by :mod:`hf_safe_exit.cli`.

``hf-safe-exit collect ... --measures meta,saturation --schedules constant,decaying --min-exit-layers 1,2`` collects
every configuration of the product (:func:`~hf_safe_exit.calibration.configuration_grid.collect_grid`) into one
:class:`~hf_safe_exit.risk.ConfigurationTable`; ``hf-safe-exit calibrate --method pareto --results TABLE`` chooses a
configuration from it with Pareto Testing (Laufer-Goldshtein et al., ICLR 2023): P(R(chosen) > ε) ≤ δ.
"""

from __future__ import annotations

import os
from pathlib import Path

from .cli_parser import UsageError

__all__ = ["GRID_OPTIONS", "grid_from_args", "print_grid_summary", "load_results", "provenance_of", "describe_fit",
           "replaced_files"]

# grid option -> the single-setting option it spans
GRID_OPTIONS = {"measures": "measure", "schedules": "schedule", "decay_taus": "decay_tau",
                "min_exit_layers": "min_exit_layer", "exit_every": "exit_layers"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def grid_from_args(args, settings: dict):
    """The :class:`~hf_safe_exit.calibration.configuration_grid.ConfigurationGrid` the collect options span, or None
    when no grid option is given. ``settings``: the ``--<setting>`` options given (the grid's base)."""
    from .calibration.configuration_grid import ConfigurationGrid
    from .config import EarlyExitConfig

    given = {name: getattr(args, name) for name in GRID_OPTIONS if getattr(args, name, None) is not None}
    if not given:
        return None
    for name in given:
        if GRID_OPTIONS[name] in settings:
            raise UsageError(f"{_flag(GRID_OPTIONS[name])} and {_flag(name)} both set {GRID_OPTIONS[name]}: give one "
                             f"value with {_flag(GRID_OPTIONS[name])} or the grid's values with {_flag(name)}.")
    if args.strategy == "bild":
        raise UsageError(f"{_flag(next(iter(given)))} spans early-exit configurations: drop it for --strategy bild.")
    return ConfigurationGrid(**given, base=EarlyExitConfig.from_dict(settings))


def print_grid_summary(table) -> None:
    """One line per configuration of a collected grid: its settings, then the mean gap and decoder-block fraction
    at its lowest and its middle λ."""
    import numpy as np

    gap, blocks = table.losses["performance_gap"], table.costs["layer_fraction"]
    rows: dict[str, list[int]] = {}
    for g, s in enumerate(table.settings):
        if s["threshold"] < 1.0:
            rows.setdefault(_short(s), []).append(g)
    print(f"{'configuration':<48} {'λ':>5} {'gap':>8} {'blocks':>7}   {'λ':>5} {'gap':>8} {'blocks':>7}")
    for name, group in rows.items():
        group = sorted(group, key=lambda g: table.settings[g]["threshold"])
        cells = [f"{table.settings[g]['threshold']:>5.3g} {gap[g].mean():>+8.4f} {np.mean(blocks[g]):>7.3f}"
                 for g in (group[0], group[len(group) // 2])]
        print(f"{name:<48} {'   '.join(cells)}")
    print(f"(λ = 1, the full model, once: row {table.full_model_index})")


def _short(setting: dict) -> str:
    schedule = setting["schedule"] + (f" τ={setting['decay_tau']:g}" if setting["schedule"] == "decaying" else "")
    layers = "all" if setting["exit_layers"] is None else ",".join(str(v) for v in setting["exit_layers"])
    extra = "" if setting.get("anytime") is None else " poe"
    return f"{setting['measure']} {schedule} min {setting['min_exit_layer']} layers {layers}{extra}"


def _kind(path: str) -> str | None:
    """The header's ``kind`` of an ``.npz`` table (None: a 1-D λ table, or not readable here: its loader says why)."""
    import json

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as arrays:
            return json.loads(str(arrays["header_json"])).get("kind")
    except Exception:  # noqa: BLE001 - the table's own loader names the file and the problem
        return None


def load_results(paths: list[str], method: str):
    """The table ``calibrate`` fits: for ``pareto`` a configuration table (one file written by a grid collect, or
    several 1-D tables stacked); otherwise the one 1-D loss table given."""
    from .risk import ConfigurationTable, LossTable
    from .risk.configuration_table import CONFIGURATIONS_FILENAME

    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"no results file at '{path}': write one with `hf-safe-exit collect ... --output "
                                    f"{path}`.")
    kinds = [_kind(p) if os.path.isfile(p) else None for p in paths]
    stacked = [p for p, k in zip(paths, kinds) if k is not None]
    if method != "pareto":
        if len(paths) > 1 or stacked:
            raise UsageError(f"--method {method} calibrates λ of one configuration from one 1-D table; "
                             + ("several --results" if len(paths) > 1 else f"'{stacked[0]}' holds several "
                                "configurations") + ": use --method pareto (with --delta), or pass one 1-D table.")
        return LossTable.load(paths[0])
    if len(paths) == 1 and (stacked or (os.path.isdir(paths[0]) and
                                        os.path.isfile(os.path.join(paths[0], CONFIGURATIONS_FILENAME)))):
        return ConfigurationTable.load(paths[0])
    if stacked:
        raise UsageError(f"'{stacked[0]}' is a configuration table already: pass it alone, or the 1-D tables to "
                         "stack.")
    return ConfigurationTable.from_tables([LossTable.load(p) for p in paths])


def provenance_of(table) -> dict:
    """The metadata the model check reads: a configuration table's, with ``measure="meta"`` when a row reads the meta
    head (so that the head is checked too)."""
    from .risk import ConfigurationTable

    if not isinstance(table, ConfigurationTable):
        return table.metadata
    meta = any(s["measure"] == "meta" for s in table.settings)
    return {**table.metadata, **({"measure": "meta"} if meta else {})}


def _number(value, sign: str = "+") -> str:
    return "none" if value is None else f"{value:{sign}.4f}"


def describe_fit(rc, method: str, risk: str) -> str:
    """What ``calibrate`` prints about a fit: λ̂, the risks and the guarantee; for ``pareto`` the chosen
    configuration, the size of the front and of each split part too."""
    cert = rc.certificate
    if method != "pareto":
        return (f"λ̂ = {rc.threshold:.6g} ({method}, {risk}, n = {cert.n}); empirical risk "
                f"{_number(cert.empirical_risk)}, bound {_number(cert.risk_bound)}; guarantee: {cert.guarantee}")
    chosen = cert.configuration
    settings = ", ".join(f"{k}={v}" for k, v in chosen.items() if k != "threshold")
    outcome = ("certified" if cert.feasible else "nothing certified below the full model: it decodes at λ = 1")
    return (f"λ̂ = {rc.threshold:.6g} with {settings} (row {cert.configuration_index} of {cert.num_configurations}; "
            f"{outcome}); pareto ({cert.bound} p-values, {risk}, cost {cert.cost}): front of {cert.front_size}, "
            f"{cert.num_rejected} rejected, n_opt/n_test = {cert.n_opt}/{cert.n_test} (seed {cert.seed}); test-part "
            f"risk {_number(cert.empirical_risk)}, bound {_number(cert.risk_bound)}, p-value "
            f"{_number(cert.p_value, '')}; guarantee: {cert.guarantee}")


def replaced_files(folder: Path, table) -> list[Path]:
    """The files of a task's calibration folder that storing ``table`` (and its fit) replaces: everything but the
    other kind of table (a 1-D λ table beside a configuration table, or the reverse) and, beside a kept 1-D table,
    the evaluation of it (``evaluation.json``)."""
    from .cards.files import EVALUATION_FILENAME
    from .risk import CALIBRATION_FILENAME, ConfigurationTable
    from .risk.configuration_table import CONFIGURATIONS_FILENAME

    if not folder.is_dir():
        return []
    pareto = isinstance(table, ConfigurationTable)
    kept = {CALIBRATION_FILENAME, EVALUATION_FILENAME} if pareto else {CONFIGURATIONS_FILENAME}
    if pareto and not (folder / CALIBRATION_FILENAME).is_file():
        kept = set()  # an evaluation without its table describes nothing kept
    return sorted(p for p in folder.iterdir() if p.name not in kept)
