"""Smoke test of benchmarks/speed_shapes.py on a tiny T5: every experiment runs, JSON and plot are written."""

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed_shapes.py"
TINY = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, num_decoder_layers=2,
            feed_forward_proj="relu", tie_word_embeddings=True)
ROW_KEYS = {"experiment", "shape", "batch", "input_length", "new_tokens", "generated_tokens_hf",
            "generated_tokens_ours", "measure", "exit_layer", "mean_exit_layer", "num_decoder_layers",
            "same_tokens_as_hf", "ms_per_token_hf", "ms_per_token_ours", "ratio", "ratio_paired", "speedup",
            "floor_ms_per_token",
            "ratio_to_floor", "encoder_ms", "floor_total_ms", "ratio_total_to_floor", "floor_kind", "seconds_hf",
            "seconds_ours", "load1", "exit_table"}


def load_script():
    spec = importlib.util.spec_from_file_location("speed_shapes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_shapes_smoke(tmp_path):
    bench = load_script()
    out, png = tmp_path / "speed.json", tmp_path / "speed.png"
    threads = torch.get_num_threads()
    doc = bench.main([
        "--shapes", "tiny", "--measures", "softmax_shortlist", "meta", "--batch-sizes", "1", "2",
        "--input-lengths", "8", "--new-tokens", "3", "--repeats", "1", "--exit-layers", "1", "2",
        "--rc-shape", "tiny", "--rc-exit", "1", "--mixed-shape", "tiny", "--mixed-batch", "2",
        "--mixed-input-length", "8", "--mixed-lengths", "3", "--micro-seconds", "0.001",
        "--out", str(out), "--plot", str(png),
    ], shapes={"tiny": TINY})
    assert torch.get_num_threads() == threads  # main restores the caller's thread count

    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(doc["rows"]))
    for key in ("cpu", "cpu_count", "platform", "torch", "transformers", "threads", "loadavg_before",
                "loadavg_after", "date", "git_commit", "command"):
        assert key in saved, key
    rows = saved["rows"]
    assert {r["experiment"] for r in rows} == {"lambda1", "full_depth", "sweep", "rc_uniform", "mixed"}
    # 2 contexts x (λ=1 + full depth + 2 layers x (forced + 2 measures)) + 2 x (forced + 2 measures)
    # + mixed (λ=1, full depth, forced)
    assert len(rows) == 2 * 8 + 2 * 3 + 3
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["generated_tokens_hf"] == r["generated_tokens_ours"] == r["new_tokens"] == 3
        for key in ("ms_per_token_hf", "ms_per_token_ours", "ratio", "ratio_paired", "speedup", "floor_ms_per_token",
                    "ratio_to_floor", "ratio_total_to_floor"):
            assert r[key] > 0, (key, r)
    assert all(r["same_tokens_as_hf"] for r in rows if r["measure"] == "lambda1" or r["experiment"] == "full_depth")
    sweep = {(r["batch"], r["measure"], r["exit_layer"]) for r in rows if r["experiment"] == "sweep"}
    assert sweep == {(b, m, k) for b in (1, 2) for m in ("forced", "softmax_shortlist", "meta") for k in (1, 2)}
    mixed = next(r for r in rows if r["experiment"] == "mixed" and r["measure"] == "forced")
    assert mixed["mean_exit_layer"] == 1.5 and len(mixed["exit_table"]) == 2
    assert png.exists() and png.stat().st_size > 0
