"""Time SSIM on a 16x320x320 volume, one thread, median of repeats: mri.metrics vs fastMRI's.

fastMRI's ``ssim`` is scikit-image's ``structural_similarity`` (7x7 uniform window) per slice;
the GLEAM/meddlr SSIM is the same with an 11x11 Gaussian window. Calls are interleaved so
that load from other processes hits every entry alike.

    .venv/bin/python benchmarks/ssim_speed.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from skimage.metrics import structural_similarity

from mri import metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    ref = rng.random((16, 320, 320))
    pred = ref + 0.05 * rng.standard_normal(ref.shape)
    rt, pt = torch.from_numpy(ref), torch.from_numpy(pred)

    def fastmri() -> float:
        return float(np.mean([structural_similarity(ref[i], pred[i], data_range=ref.max())
                              for i in range(16)]))  # fmt: skip

    def skimage_gaussian() -> float:
        return float(np.mean([
            structural_similarity(ref[i], pred[i], data_range=ref[i].max(), gaussian_weights=True,
                                  sigma=1.5, use_sample_covariance=False)
            for i in range(16)
        ]))  # fmt: skip

    cases: dict[str, Callable[[], object]] = {
        "fastMRI ssim (scikit-image, 7x7 uniform, per slice)": fastmri,
        "scikit-image, 11x11 Gaussian, per slice": skimage_gaussian,
        "mri.metrics.fastmri_ssim": lambda: metrics.fastmri_ssim(pt, rt),
        "mri.metrics.ssim (16 slices as samples)": lambda: metrics.ssim(pt[:, None], rt[:, None]),
        "mri.metrics.ssim3d (one 16x320x320 volume)": lambda: metrics.ssim3d(pt[None], rt[None]),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        print(f"{name:52s} median {statistics.median(ts):.3f} s")


if __name__ == "__main__":
    main()
