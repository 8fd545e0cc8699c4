"""The P-GLEAM overlap benchmark runs, reports every row, and its schedule model is right."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "async_overlap.py"


def _load_benchmark():
    # benchmarks/ is a folder of scripts, not a package, so load the file itself.
    spec = importlib.util.spec_from_file_location("async_overlap", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_simulation_matches_hand_computed_schedule_with_a_worker_per_stage():
    # f = 1, b = 2, stages on workers 0 and 1. Step 1: F0 [0,1], U0 [1,3], F1 [1,2], U1 [2,4].
    # Step 2: F0 waits for U0 -> [3,4], U0 [4,6]; F1 [4,5] (U1 ended at 4), U1 [5,7].
    bench = _load_benchmark()
    assert bench.simulate_schedule([1, 1], [2, 2], [0, 1], steps=1) == 4
    assert bench.simulate_schedule([1, 1], [2, 2], [0, 1], steps=2) == 7
    # Each stage's own forward->update->forward loop (f + b = 3) sets the pace: 6 / 3 = 2x.
    assert bench.steady_step_time([1, 1], [2, 2], [0, 1]) == pytest.approx(3)
    steady, window = bench.ideal_speedups([1, 1], [2, 2], [0, 1], steps=2)
    assert steady == pytest.approx(2) and window == pytest.approx(12 / 7)


def test_simulation_matches_hand_computed_schedule_with_one_shared_worker():
    # Both updates queue on worker 0. Step 1: F0 [0,1], U0 [1,3], F1 [1,2], U1 waits -> [3,5].
    # Step 2: F0 [3,4], U0 waits for U1 -> [5,7]; F1 waits for U1 -> [5,6], U1 [7,9].
    bench = _load_benchmark()
    assert bench.simulate_schedule([1, 1], [2, 2], [0, 0], steps=2) == 9
    # The worker is the bottleneck: 2 + 2 seconds of updates per step.
    assert bench.steady_step_time([1, 1], [2, 2], [0, 0]) == pytest.approx(4)
    # One stage cannot overlap with anything: f + b per step, no speed-up.
    assert bench.simulate_schedule([1], [2], [0], steps=5) == 15
    assert bench.round_robin(5, 2) == [0, 1, 0, 1, 0]


def test_quick_benchmark_reports_two_and_four_workers_and_async_equals_sequential(tmp_path):
    out = tmp_path / "overlap.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {r["workers"] for r in rows if r["part"] == "A"} == {2, 4}
    assert any(r["part"] == "B" and r["workers"] == 2 for r in rows)
    for r in rows:
        assert r["seq_s_per_step"] > 0 and r["async_s_per_step"] > 0
        assert r["speedup"] == pytest.approx(r["seq_s_per_step"] / r["async_s_per_step"])
        assert r["ideal_speedup"] >= 1 and r["ideal_speedup_window"] >= 1
        assert r["bitwise_equal"]
    assert report["bitwise_equal"] and report["machine"]["cpu_count"] >= 1
    assert "bitwise" in proc.stdout
