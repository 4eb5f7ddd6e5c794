"""benchmarks/measure_choice.py on synthetic loss tables and a tiny T5: λ̂ and the per-token mean exit against a
brute-force CRC written here, each calibrated row decoded at its mean exit layer, and the choice of the fastest."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_safe_exit import LossTable

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "measure_choice.py"
TINY = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=4, num_decoder_layers=4,
            feed_forward_proj="relu", tie_word_embeddings=True)
LAMBDAS = np.array([0.0, 0.5, 1.0])


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


def load_script():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("measure_choice", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def synthetic_table(measure: str, gap_at_0: float, seed: int, n: int = 40) -> LossTable:
    """A 4-layer model's table: exits and losses shrink towards λ = 1 (the full model: gap 0, layer 4)."""
    rng = np.random.default_rng(seed)
    gaps = np.stack([rng.uniform(0, 2 * gap_at_0, n), rng.uniform(0, gap_at_0 / 4, n), np.zeros(n)])
    exits = np.stack([rng.uniform(1, 2, n), rng.uniform(2, 3, n), np.full(n, 4.0)])
    tokens = rng.integers(1, 10, (3, n))
    return LossTable(LAMBDAS, {"performance_gap": gaps},
                     extras={"mean_exit_layer": exits, "layer_fraction": exits / 4, "num_tokens": tokens,
                             "wall_time": np.ones(3), "task_loss": 0.5 + gaps},
                     metadata={"measure": measure, "num_decoder_layers": 4, "task": "cnndm"})


def brute_force_crc(gaps: np.ndarray, eps: float) -> float:
    """CRC (Angelopoulos et al. 2022, Thm. 1), losses in [-1, 1]: the smallest λ of the grid such that every λ' ≥ λ
    has (n R̂(λ') + B) / (n + 1) ≤ ε with B = 1."""
    n = gaps.shape[1]
    ok = [(gaps[k].sum() + 1.0) / (n + 1) <= eps for k in range(len(LAMBDAS))]
    best = 1.0
    for k in reversed(range(len(LAMBDAS))):
        if not ok[k]:
            break
        best = LAMBDAS[k]
    return float(best)


@pytest.mark.filterwarnings("ignore:RiskControlled.*no λ < 1 passes:UserWarning")  # meta's UCB row: λ̂ = 1
def test_measure_choice_on_synthetic_tables(tmp_path):
    bench = load_script()
    tables = {"softmax": synthetic_table("softmax", 0.02, 0), "meta": synthetic_table("meta", 0.3, 1)}
    argv = []
    for measure, table in tables.items():
        table.save(tmp_path / f"{measure}.npz")
        argv += ["--table", "cnndm", measure, str(tmp_path / f"{measure}.npz")]
    out = tmp_path / "choice.json"
    doc = bench.main(argv + ["--eps", "0.1", "--split-repeats", "3", "--shapes", "tiny", "--new-tokens", "4",
                             "--input-length", "8", "--repeats", "1", "--out", str(out)], shapes={"tiny": TINY})
    assert json.loads(out.read_text())["choice"] == doc["choice"]

    risk = {(r["measure"], r["method"]): r for r in doc["risk"]}
    assert set(risk) == {(m, k) for m in tables for k in ("crc", "ucb")}
    for measure, table in tables.items():
        r = risk[(measure, "crc")]
        lam = brute_force_crc(table.losses["performance_gap"], 0.1)
        assert r["lambda_hat"] == lam
        k = int(np.flatnonzero(LAMBDAS == lam)[0])
        exits, tokens = table.extras["mean_exit_layer"][k], table.extras["num_tokens"][k]
        assert r["mean_exit_layer_per_token"] == pytest.approx(float((exits * tokens).sum() / tokens.sum()))
        assert r["mean_exit_layer_per_example"] == pytest.approx(float(exits.mean()))
    # the small-gap softmax table exits at λ = 0; the large-gap meta table cannot
    assert risk[("softmax", "crc")]["lambda_hat"] == 0.0 and risk[("meta", "crc")]["lambda_hat"] > 0.0

    timed = [r for r in doc["rows"] if r["experiment"] == "calibrated"]
    assert len(timed) == 4 and {r["measure"] for r in timed} == set(tables)
    for r in timed:  # decoded on the tiny shape (4 layers) at the calibrated per-token mean exit, to 1/(2N)
        cal = risk[(r["measure"], r["method"])]
        assert r["mean_exit_layer"] == pytest.approx(cal["mean_exit_layer_per_token"], abs=1 / 8 + 1e-9)
        assert r["generated_tokens_ours"] == r["generated_tokens_hf"] == 4
    for method in ("crc", "ucb"):  # per setting: the measure whose row ran fastest
        rows = [r for r in timed if r["method"] == method]
        assert doc["choice"]["fastest_per_setting"][f"tiny/cnndm/{method}"]["measure"] == \
            min(rows, key=lambda r: r["ratio_paired"])["measure"]
    means = {m: np.mean([r["ratio_paired"] for r in timed if r["measure"] == m]) for m in tables}
    assert doc["choice"]["fastest"] == min(means, key=means.get)
    assert doc["choice"]["fastest_without_meta_head"] == "softmax"
