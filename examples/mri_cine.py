"""2D+time cine: train an unrolled network with 3D convolutions over (T, H, W); compare it
with zero-filled and spatio-temporal TV.

    python examples/mri_cine.py                       # built-in simulated cine (config cpu-cine)
    python examples/mri_cine.py --data DIR            # prepared cine series (kind "cine")
    python examples/mri_cine.py --config cine-pgd-r10-gleam --data DIR   # the paper's cine run

The training method is the config's (GLEAM in cpu-cine). Writes into --out (default
runs/cine): metrics.json ({"zero_filled", "cs" (spatial + temporal TV, converged), METHOD}),
comparison.png (middle frame), depth.png, best.pt and last.pt.
"""

from __future__ import annotations

import sys

from mri_knee import main as run_job

DESCRIPTION = (
    "2D+time cine: train an unrolled network with 3D convolutions over (T, H, W) on cine "
    "series (built-in simulated cine unless --data) and compare it with zero-filled and "
    "spatio-temporal TV."
)


def main(argv: list[str] | None = None) -> int:
    """The cine job: the main job's steps with cine defaults and its own --help."""
    return run_job(
        argv, description=DESCRIPTION, default_config="cpu-cine", default_out="runs/cine"
    )


if __name__ == "__main__":
    sys.exit(main())
