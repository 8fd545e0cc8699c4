"""The examples run as documented."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_quickstart_trains_and_reports_less_memory_for_more_stages():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(re.findall(r"loss per stage: (?:\S+\s*){4}", done.stdout)) == 3
    peaks = dict(re.findall(r"splits=(\d+): peak training memory ([\d.]+) MiB", done.stdout))
    assert float(peaks["8"]) < float(peaks["4"]) < float(peaks["1"])
