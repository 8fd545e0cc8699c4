"""The memory/time and depth benchmarks run end to end and report what greedy training promises.

Both scripts run in subprocesses at their ``--smoke`` sizes; the tests check the JSON they
write and the invariants that must hold on any machine: GLEAM (M=N) and checkpointing need less
step memory than end-to-end, GLEAM trains at least as deep within end-to-end's budget, and
every time is positive, and GLEAM's overhead over its largest stage trained alone is reported.
Timings are not compared: this machine is shared.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["e2e", "ckpt", "gleam", "gleam_half", "gleam_ckpt", "pgleam"]
# The module fixture's two benchmark runs count against whichever test sets it up.
MEMORY_TIME_LIMIT = 600


def _run(script: str, json_path: Path, *extra: str, timeout: float) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--json", str(json_path)]
    proc = subprocess.run([*cmd, *extra], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(json_path.read_text())


@pytest.fixture(scope="module")
def memory_time(tmp_path_factory: pytest.TempPathFactory) -> dict:
    # The fresh-subprocess RSS check is exercised on one model only: each subprocess pays the
    # torch import, and the other models' tracked numbers do not depend on it.
    path = tmp_path_factory.mktemp("bench") / "memory_time.json"
    # Generous limits: they catch a hang, and on a loaded 2-core machine the RSS run (six fresh
    # processes importing torch) alone took 139 s before the standalone-stage rows existed.
    result = _run("memory_time.py", path, "--models", "pgd,modl,cine", "--no-rss", timeout=300)
    rss = _run("memory_time.py", path.with_name("rss.json"), "--models", "pgd", timeout=270)
    result["rss_pgd"] = rss["models"]["pgd"]["methods"]
    return result


@pytest.fixture(scope="module")
def depth(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = tmp_path_factory.mktemp("bench") / "depth.json"
    return _run("depth_at_memory.py", path, timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(MEMORY_TIME_LIMIT)
def test_memory_time_reports_every_method_with_ratios(memory_time: dict) -> None:
    assert {"machine", "mode", "repeats", "device", "models"} <= memory_time.keys()
    assert memory_time["machine"]["torch"] and memory_time["machine"]["cpus"] >= 1
    assert set(memory_time["models"]) == {"pgd", "modl", "cine"}
    for name, entry in memory_time["models"].items():
        rows = entry["methods"]
        # MoDL also gets MEL; PGD's gradient step cannot be inverted.
        assert [r["method"] for r in rows] == METHODS + (["mel"] if name == "modl" else []), name
        for r in rows:
            assert r["peak"] > 0 and r["state_bytes"] > 0, (name, r["method"])
            assert r["x_less_memory"] == pytest.approx(rows[0]["peak"] / r["peak"])
            assert r["time_ratio"] == pytest.approx(r["s_per_iter"] / rows[0]["s_per_iter"])
            assert r["peak_plus_state"] == r["peak"] + r["state_bytes"]


@pytest.mark.slow
@pytest.mark.timeout(MEMORY_TIME_LIMIT)
def test_gleam_and_checkpointing_need_less_step_memory_than_end_to_end(memory_time: dict) -> None:
    for name, entry in memory_time["models"].items():
        peak = {r["method"]: r["peak"] for r in entry["methods"]}
        assert peak["gleam"] < peak["e2e"], name
        assert peak["ckpt"] < peak["e2e"], name
        assert peak["gleam_ckpt"] < peak["e2e"], name
        # Fewer blocks per stage hold fewer activations at once.
        assert peak["gleam"] < peak["gleam_half"] < peak["e2e"], name
        if "mel" in peak:  # inversion stores no activations of the recovered blocks
            assert peak["mel"] < peak["e2e"], name


@pytest.mark.slow
@pytest.mark.timeout(MEMORY_TIME_LIMIT)
def test_memory_time_reports_greedy_overhead_over_the_largest_standalone_stage(
    memory_time: dict,
) -> None:
    for name, entry in memory_time["models"].items():
        rows = {r["method"]: r for r in entry["methods"]}
        measured = {"gleam", "gleam_half"}
        assert set(entry["greedy_overhead"]) == measured, name
        for key, r in rows.items():
            if key not in measured:
                assert r["overhead_vs_stage"] is None and r["largest_stage_peak"] is None
                continue
            stage = r["largest_stage_peak"]
            # A stage trained alone holds at most what the whole network holds end to end.
            assert 0 < stage <= rows["e2e"]["peak"], (name, key)
            assert r["overhead_vs_stage"] == pytest.approx(r["peak"] / stage), (name, key)
            assert entry["greedy_overhead"][key] == r["overhead_vs_stage"]
        # Half as many stages means twice the blocks in the largest one.
        assert rows["gleam"]["largest_stage_peak"] < rows["gleam_half"]["largest_stage_peak"]


@pytest.mark.slow
@pytest.mark.timeout(MEMORY_TIME_LIMIT)
def test_every_time_is_positive(memory_time: dict) -> None:
    for name, entry in memory_time["models"].items():
        for r in entry["methods"]:
            assert r["s_per_iter"] > 0, (name, r["method"])
            if r["method"] in ("pgleam", "mel"):
                assert r["forward_s"] is None and r["backward_s"] is None
            else:
                assert r["forward_s"] > 0 and r["backward_s"] > 0, (name, r["method"])


@pytest.mark.slow
@pytest.mark.timeout(MEMORY_TIME_LIMIT)
def test_rss_cross_check_runs_in_fresh_subprocesses(memory_time: dict) -> None:
    for r in memory_time["rss_pgd"]:
        assert r["rss_subprocess"] is not None and r["rss_subprocess"] >= 0, r["method"]


@pytest.mark.slow
def test_gleam_trains_at_least_as_deep_as_end_to_end_within_its_budget(depth: dict) -> None:
    assert {"machine", "budget", "max_depth", "methods", "probes"} <= depth.keys()
    rows = {r["method"]: r for r in depth["methods"]}
    assert set(rows) == {"e2e", "ckpt", "gleam", "gleam_ckpt"}
    # The budget is end-to-end's own footprint at N=8, so it fits there by definition.
    assert rows["e2e"]["deepest"] >= 8
    assert rows["gleam"]["deepest"] >= rows["e2e"]["deepest"]
    assert rows["gleam"]["deepest"] > 8
    for r in rows.values():
        assert r["footprint"] <= depth["budget"], r["method"]
        assert 0 < r["ratio_to_budget"] <= 1
    for p in depth["probes"]:
        assert p["fits"] == (p["footprint"] <= depth["budget"])
