"""The quality benchmark runs end to end and reports every method in a well-formed JSON file.

``benchmarks/quality.py --quick`` trains the tiny network for a few steps, so the numbers say
nothing about quality; the test checks the structure every full run relies on: each method and
baseline present with finite metrics, a PSNR-versus-depth curve with one value per unroll, and
measured training times.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"e2e", "checkpoint", "gleam", "gleam_deep"}
METRICS = ("psnr", "ssim", "nrmse")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("quality")
    json_path = out / "quality.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--quick"]
    cmd += ["--json", str(json_path), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(json_path.read_text()), out


@pytest.mark.slow
def test_quick_run_reports_every_method_with_finite_metrics(quick: tuple[dict, Path]) -> None:
    result, _ = quick
    assert result["mode"] == "quick"
    assert set(result["methods"]) == METHODS
    for key, entry in result["methods"].items():
        assert len(entry[METRICS[0]]["values"]) == len(result["seeds"]), key
        for k in METRICS:
            assert math.isfinite(entry[k]["mean"]) and math.isfinite(entry[k]["std"]), (key, k)
        assert entry["train_seconds"]["mean"] > 0, key
        assert all(s > 0 for s in entry["train_seconds"]["values"]), key


@pytest.mark.slow
def test_depth_curves_have_one_psnr_per_unroll(quick: tuple[dict, Path]) -> None:
    result, out = quick
    for key, entry in result["methods"].items():
        assert len(entry["depth_psnr"]) == entry["N"], key
        assert all(math.isfinite(v) for v in entry["depth_psnr"]), key
        assert 0 <= entry["depth_increases"] <= entry["N"] - 1, key
    # The deep network is the equal-memory one: 3x the unrolls, in stages that fit the budget.
    deep, e2e = result["methods"]["gleam_deep"], result["methods"]["e2e"]
    assert deep["N"] == 3 * e2e["N"] and deep["N"] % deep["M"] == 0
    memory = result["equal_memory"]
    assert memory["footprints"][str(deep["M"])] <= memory["budget"] or deep["M"] == deep["N"]
    assert (out / "depth_curves.png").stat().st_size > 0


@pytest.mark.slow
def test_baselines_are_scored_on_the_same_slices(quick: tuple[dict, Path]) -> None:
    result, _ = quick
    assert {"zero_filled", "cs"} <= set(result["baselines"])
    for name, scores in result["baselines"].items():
        assert all(math.isfinite(scores[k]) for k in METRICS), name


@pytest.mark.slow
def test_mel_section_compares_modl_trained_three_ways(quick: tuple[dict, Path]) -> None:
    result, _ = quick
    assert set(result["mel"]) == {"modl_e2e", "modl_gleam", "modl_mel"}
    assert result["mel"]["modl_mel"]["method"] == "mel"
    for key, entry in result["mel"].items():
        assert all(math.isfinite(entry[k]["mean"]) for k in METRICS), key
        assert entry["train_seconds"]["mean"] > 0, key


@pytest.mark.slow
def test_training_curves_are_recorded_for_every_run(quick: tuple[dict, Path]) -> None:
    # (f): the flatness check reads validation PSNR along training and the loss from log.csv.
    result, out = quick
    for key, entry in {**result["methods"], **result["mel"]}.items():
        steps = entry["val_steps"]
        assert steps == sorted(steps) and steps[-1] == result["iterations"], key
        assert len(entry["val_psnr"]) == len(steps), key
        gains = entry["last_quarter_gain"]["values"]
        assert len(gains) == len(entry["val_psnr_per_seed"]) and all(map(math.isfinite, gains))
        assert [s for s, _ in entry["loss_seed0"]][-1] == result["iterations"], key
    assert (out / "training_curves.png").stat().st_size > 0


@pytest.mark.slow
def test_reuse_evaluates_finished_runs_without_training_them_again(quick: tuple[dict, Path]):
    result, out = quick
    checkpoints = {p: p.stat().st_mtime_ns for p in out.glob("*/best.pt")}
    assert len(checkpoints) == 4 + 3  # (a)-(d) and the MoDL section, one seed each
    again_path = out / "again.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--quick", "--reuse"]
    cmd += ["--json", str(again_path), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/best.pt")} == checkpoints
    again = json.loads(again_path.read_text())
    for key, entry in {**result["methods"], **result["mel"]}.items():
        other = {**again["methods"], **again["mel"]}[key]
        assert other["train_seconds"] == entry["train_seconds"], key
        assert other["psnr"] == entry["psnr"] and other["val_psnr"] == entry["val_psnr"], key
