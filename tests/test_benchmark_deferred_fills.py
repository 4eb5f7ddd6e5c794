"""Smoke test of benchmarks/deferred_fills.py on a tiny T5: every case runs, eager and deferred fills give the same
tokens, and the JSON and plot are written."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=4, num_decoder_layers=4,
            feed_forward_proj="relu", tie_word_embeddings=True)


def test_deferred_fills_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the script imports speed_shapes from its folder
    spec = importlib.util.spec_from_file_location("deferred_fills", BENCH / "deferred_fills.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "fills.json"
    doc = bench.main(["--shapes", "tiny", "--rc-shape", "tiny", "--mixed-shape", "tiny", "--mixed-lengths", "6",
                      "--new-tokens", "12", "--repeats", "1", "--out", str(out)], shapes={"tiny": TINY})
    from hf_safe_exit.decoding import early_exit_loop

    assert early_exit_loop.DEFER_FILLS is True  # the benchmark leaves the default on
    rows = json.loads(out.read_text())["rows"]
    assert rows == json.loads(json.dumps(doc["rows"]))
    assert [r["case"] for r in rows] == ["lambda1", "at_1", "at_2", "rc_deep", "mixed"]
    for r in rows:
        assert r["same_tokens"]["eager_vs_deferred"], r["case"]
        assert all(v > 0 for v in r["ms_per_token"].values()) and all(v > 0 for v in r["ratio_paired"].values())
        assert r["floor_ms_per_token"]["deferred"] <= r["floor_ms_per_token"]["eager"]
    assert rows[0]["same_tokens"]["deferred_vs_hf"]  # λ = 1 is HF's own loop
    rc = rows[3]["exit_table"][0]
    assert rc[5::6] == [4, 4] and all(1 <= v <= 4 for v in rc)
    assert (tmp_path / "fills.png").is_file() and "speed_shapes" in sys.modules
    # the read floor, counted by hand from the config: a block reads self-attention q, k, v, o, cross-attention q, o
    # (its K/V are cached per context), the feed-forward and 3 layer norms; a fill a layer norm, K and V; the read-out
    # the final layer norm and lm_head (tied here: the embedding)
    d, inner, ff, vocab, L = 32, 4 * 8, 64, 128, 4
    block, fill, head = 6 * d * inner + 2 * d * ff + 3 * d, d + 2 * d * inner, d + vocab * d
    reads = rows[1]["weights_read_per_step_M"]  # every token at layer 1
    assert abs(reads["hf"] * 1e6 - (L * block + head)) < 1e-3
    assert abs(reads["deferred"] * 1e6 - (block + head)) < 1e-3
    assert abs(reads["eager"] * 1e6 - (block + (L - 1) * fill + head)) < 1e-3
    assert rows[0]["read_floor_ratio"]["deferred/hf"] == 1.0
