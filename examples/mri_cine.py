"""2D+time cine: train GLEAM with 3D convolutions over (T, H, W) and compare with ZF and TV.

    python examples/mri_cine.py                       # built-in simulated cine (config cpu-cine)
    python examples/mri_cine.py --data DIR            # prepared cine series (kind "cine")
    python examples/mri_cine.py --config cine-pgd-r10-gleam --data DIR   # the paper's cine run

Writes into --out: metrics.json ({"zero_filled", "cs" (spatial + temporal TV, converged), "gleam"}),
comparison.png (middle frame), depth.png, best.pt and last.pt.
"""

from __future__ import annotations

import sys

from mri_knee import main as run_main_job

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--config" not in args:
        args = ["--config", "cpu-cine", *args]
    if "--out" not in args:
        args = [*args, "--out", "runs/cine"]
    sys.exit(run_main_job(args))
