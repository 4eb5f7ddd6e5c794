"""Smoke test of benchmarks/exit_layers.py on a tiny T5: both rows per measure and exit layer, JSON written."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=4, num_decoder_layers=4,
            feed_forward_proj="relu", tie_word_embeddings=True)


def load_script():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("exit_layers_bench", BENCH / "exit_layers.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_exit_layers_smoke(tmp_path, monkeypatch):
    bench = load_script()
    monkeypatch.setitem(bench.SHAPES, "tiny", TINY)
    out = tmp_path / "el.json"
    bench.main(["--shape", "tiny", "--grid", "1", "3", "--input-length", "8", "--new-tokens", "3", "--repeats", "1",
                "--measures", "softmax", "--out", str(out)])
    saved = json.loads(out.read_text())
    rows = [(r["experiment"], r["measure"], r["exit_layer"]) for r in saved["rows"]]
    assert rows == [("every", "softmax", 1), ("grid", "softmax", 1), ("every", "softmax", 3), ("grid", "softmax", 3)]
    assert all(r["generated_tokens_ours"] == r["generated_tokens_hf"] == 3 for r in saved["rows"])
    assert saved["grid"] == [1, 3] and saved["threads"] == 1 and saved["cpu"]
    with pytest.raises(SystemExit, match="must lie in --grid"):
        bench.main(["--shape", "tiny", "--grid", "1", "3", "--exit-layers", "2", "--out", str(out)])
