"""benchmarks/pareto_efficiency.py on a toy configuration table: the default configuration's λ path found as listed by
hand, compared with the stored 1-D table, the pool oracle against a brute-force loop, and a smoke run (JSON + PNG)."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_safe_exit.risk import ConfigurationTable

from toy_configurations import one_run

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pareto_efficiency.py"
# the default configuration (meta, constant, min_exit_layer 1) second, so that its λ = 1 row is the first table's
CONFIGS = ({"measure": "saturation"}, {"measure": "meta"}, {"measure": "meta", "min_exit_layer": 2})


def load_script():
    spec = importlib.util.spec_from_file_location("pareto_efficiency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench(tmp_path, monkeypatch):
    module = load_script()
    tables = one_run(n=60, configs=CONFIGS)
    (tmp_path / "grid").mkdir()
    ConfigurationTable.from_tables(tables).save(tmp_path / "grid" / "cnndm.npz")
    (tmp_path / "stored" / "cnndm").mkdir(parents=True)
    tables[1].save(tmp_path / "stored" / "cnndm" / "early_exit_calibration.npz")  # the meta table: the default's
    monkeypatch.setattr(module, "TABLES", tmp_path / "grid")
    monkeypatch.setattr(module, "STORED", tmp_path / "stored")
    return module, tables


def test_the_default_path_and_the_pool_oracle(bench):
    module, tables = bench
    data = module.load("cnndm")
    # rows: saturation λ 0, .25, .5, .75, 1 (the full model, 4), then meta λ 0 .. .75 (5-8), meta min 2 (9-12)
    assert data["path"].tolist() == [5, 6, 7, 8, 4]
    assert data["lambdas"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    # the meta table's λ = 1 row is the saturation table's (one full model), so the path equals the stored table
    assert data["default_equals_stored"]
    for eps in (0.02, 0.1, 0.3):
        oracle = module.pool_oracle(data, eps)
        best = None
        for g in range(data["losses"].shape[0]):  # brute force: every row, its mean gap and blocks
            gap, blocks = float(np.mean(data["losses"][g])), float(np.mean(data["cost"][g]))
            if gap <= eps and (best is None or blocks < best[1]):
                best = (g, blocks)
        assert oracle["grid"]["block_fraction"] == pytest.approx(best[1], abs=1e-12)
        assert oracle["grid"]["threshold"] == data["table"].thresholds[best[0]]
        assert oracle["default_configuration"]["block_fraction"] >= oracle["grid"]["block_fraction"]


def test_a_smoke_run_writes_json_and_figure(bench, tmp_path, capsys):
    module, _ = bench
    out = tmp_path / "result.json"
    assert module.main(["--splits", "4", "--tasks", "cnndm", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file() and len(result["efficiency"]) == 3
    for row in result["efficiency"]:
        for method in ("pareto_hb", "pareto_wsr_opt0.25", "ucb_wsr", "ltt"):
            assert 0.0 <= row[method]["mean_block_fraction"] <= 1.0
            assert 0.0 <= row[method]["violation_rate"] <= 1.0
            assert sum(row[method]["configurations_chosen"].values()) == round(4 * row[method]["certified_rate"])
    assert result["tables"][0]["default_path_equals_stored_calibration"]


def test_the_anchored_combination_takes_the_cheaper_of_its_two_certified_choices(bench):
    """UCB-WSR on the default path at δ·s and Pareto-WSR at δ·(1 − s), each run here on its own: the combination
    decodes the one of lower calibration-half cost (or the full model when neither certifies)."""
    from hf_safe_exit.risk import pareto_test, select

    module, _ = bench
    data = module.load("cnndm")
    n = data["losses"].shape[1]
    perm = np.random.default_rng(3).permutation(n)
    cal, test = np.sort(perm[: n // 2]), np.sort(perm[n // 2:])
    path, cost = data["path"], data["cost"][:, cal].mean(axis=1)
    for eps in (0.05, 0.1, 0.3):
        out = module.one_split(data, cal, test, eps, seed=3)
        for name, share in module.ANCHORED.items():
            sel = select("ucb", data["lambdas"], data["losses"][path][:, cal], eps, 0.1 * share, bound="wsr",
                         loss_bounds=(-1, 1))
            res = pareto_test(data["losses"][:, cal], data["cost"][:, cal], eps, 0.1 * (1 - share), p_value="wsr",
                              seed=3, loss_range=(-1, 1))
            options = ([int(path[sel.index])] if sel.feasible else []) + ([res.index] if res.index is not None else [])
            chosen = out[name][2]
            if not options:
                assert chosen is None
                continue
            assert chosen in options and cost[chosen] == min(cost[g] for g in options)
