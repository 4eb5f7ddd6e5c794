"""benchmarks/bind_once.py runs end to end on the smallest real shape and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bind_once.py"


def test_bind_once_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bind_once", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bind_once.json"
    doc = bench.main(["--shape", "small", "--calls", "2", "--input-length", "8", "--new-tokens", "2",
                      "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["ratio"] == doc["ratio"] > 0 and saved["calls"] == 2
    assert len(saved["seconds_per_call"]["risk_controlled"]) == len(saved["seconds_per_call"]["threshold"]) == 2
    assert 0.0 < saved["threshold"] < 1.0  # the table puts λ̂ inside the grid: both sides really exit early
