"""The examples run as documented."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_quickstart_trains_and_reports_less_memory_for_more_stages():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(re.findall(r"loss per stage: (?:\S+\s*){4}", done.stdout)) == 3
    peaks = dict(re.findall(r"splits=(\d+): peak training memory ([\d.]+) MiB", done.stdout))
    assert float(peaks["8"]) < float(peaks["4"]) < float(peaks["1"])


def test_main_job_writes_the_metrics_figures_and_checkpoint(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "mri_knee.py"), "--config", "cpu-tiny",
         "--iterations", "2", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    # Two steps of a tiny network need not beat CS: the job says so but still succeeds.
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    loses = metrics["gleam"]["psnr"] <= max(metrics["cs"]["psnr"], metrics["zero_filled"]["psnr"])
    assert loses == ("does not beat" in done.stderr), done.stderr
    assert set(metrics) == {"zero_filled", "cs", "gleam"}
    assert all(set(v) == {"psnr", "ssim", "nrmse"} for v in metrics.values())
    for name in ("comparison.png", "depth.png", "best.pt", "last.pt"):
        assert (out / name).stat().st_size > 0, name
    assert "zero_filled" in done.stdout and "gleam" in done.stdout


def test_main_job_trains_and_reports_the_configs_own_method(tmp_path):
    # An end-to-end config must train end to end and say so, not call itself GLEAM.
    raw = yaml.safe_load((ROOT / "mri" / "configs" / "cpu-tiny.yaml").read_text())
    raw["train"]["method"] = "e2e"
    config = tmp_path / "tiny-e2e.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "e2e"
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "mri_knee.py"), "--config", str(config),
         "--iterations", "2", "--out", str(out), "--no-progress", "--threads", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "end-to-end backpropagation" in done.stdout and "GLEAM" not in done.stdout
    assert set(json.loads((out / "metrics.json").read_text())) == {"zero_filled", "cs", "e2e"}
    # Run again into the same folder: refused, nothing replaced, unless asked.
    before = (out / "best.pt").read_bytes()
    again = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "mri_knee.py"), "--config", str(config),
         "--iterations", "2", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV,
    )  # fmt: skip
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert len(again.stderr.splitlines()) == 1, again.stderr
    assert (out / "best.pt").read_bytes() == before


def test_cine_example_help_describes_the_cine_job():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "mri_cine.py"), "--help"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "cine" in text and "knee" not in text.lower()
    assert "default: cpu-cine" in text and "runs/cine" in text
