"""Smoke test of benchmarks/speed_gpu.py on the CPU with a tiny T5: every row runs, exits where told, JSON written."""

import importlib.util
import json
from pathlib import Path

from hf_safe_exit.decoding import dense_rows

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed_gpu.py"
TINY = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=3, num_decoder_layers=3,
            feed_forward_proj="relu", tie_word_embeddings=True)


def test_speed_gpu_smoke_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("speed_gpu", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu.json"
    doc = bench.main(["--device", "cpu", "--dtype", "float32", "--batch-sizes", "1", "3", "--new-tokens", "3",
                      "--repeats", "1", "--exit-layers", "1", "2", "--measure-layers", "2", "--measures", "softmax",
                      "softmax_shortlist", "--shape-override", json.dumps(TINY), "--git-commit", "abc",
                      "--out", str(out)])
    assert dense_rows.DENSE_ROWS["cpu"] is False  # restored
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(doc["rows"])) and saved["git_commit"] == "abc"
    assert saved["device"] == "cpu" and saved["dtype"] == "float32" and "gpu" not in saved
    got = {(r["row"], r["batch"], r["measure"], r["exit_layer"]) for r in saved["rows"]}
    per_batch = {("lambda1", "lambda1", 3), ("full_depth", "forced", 3), ("forced", "forced", 1), ("forced", "forced", 2),
                 ("measure", "softmax", 2), ("measure", "softmax_shortlist", 2)}
    assert got == ({(n, 1, m, k) for n, m, k in per_batch} | {(n, 3, m, k) for n, m, k in per_batch}
                   | {("mixed", 3, "forced", "table"), ("mixed_rowwise", 3, "forced", "table")})
    for r in saved["rows"]:
        assert r["generated_tokens_hf"] == r["generated_tokens_ours"] == 3
        assert r["ms_per_token_hf"] > 0 and r["ms_per_token_ours"] > 0 and r["ratio_paired"] > 0
        assert r["syncs_per_token_hf"] is None and r["syncs_per_token_ours"] is None  # counted on CUDA only
    assert all(r["same_tokens_as_hf"] for r in saved["rows"] if r["row"] in ("lambda1", "full_depth"))
    mixed = [r for r in saved["rows"] if r["row"].startswith("mixed")]
    assert mixed[0]["mean_exit_layer"] == mixed[1]["mean_exit_layer"] == 2.0  # 3 rows at layers 1, 2, 3
