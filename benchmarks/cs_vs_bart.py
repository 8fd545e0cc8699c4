"""mri.cs against BART's pics on one 256x256 slice: PSNR and time over a weight grid.

Shepp-Logan with a smooth phase, 8 birdcage coils, Poisson R=6 (24x24 calibration), complex
noise 0.005: the setup of issue 13. ``--backend bart`` needs the optional ``bartorch``.

    .venv/bin/python benchmarks/cs_vs_bart.py --term wavelet --grid 7e-4,1e-3,2e-3 --iters 30,100
    .venv/bin/python benchmarks/cs_vs_bart.py --term tv --backend bart --iters 100
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import sigpy
import torch

from mri import SenseOp, cs
from mri.coils import birdcage_maps
from mri.masks import poisson_disc_mask
from mri.metrics import psnr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--term", choices=("wavelet", "tv"), default="wavelet")
    parser.add_argument("--grid", default="5e-4,1e-3,2e-3,4e-3", help="comma-separated weights")
    parser.add_argument("--iters", default="30,100", help="comma-separated iteration counts")
    parser.add_argument("--backend", choices=("torch", "bart"), default="torch")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--spin", choices=("average", "random", "none"), default="average",
                        help="cycle spinning of mri.cs's wavelet (the torch backend)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)

    n = args.size
    image = torch.from_numpy(sigpy.shepp_logan((n, n)).astype(np.complex64))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    image = (image * torch.exp(1j * (0.6 * xx + 0.3 * yy)))[None]
    maps = birdcage_maps((n, n), 8)[None]
    mask = poisson_disc_mask((n, n), 6, calib=24, seed=0)
    op = SenseOp(maps, mask)
    g = torch.Generator().manual_seed(0)
    y = op(image)
    y = y + 0.005 * torch.randn(y.shape, dtype=y.dtype, generator=g) * mask
    print(f"zero-filled {float(psnr(op.adjoint(y), image)):.2f} dB")
    key = "lamda_wavelet" if args.term == "wavelet" else "lamda_tv"
    for iters in (int(v) for v in args.iters.split(",")):
        for lam in (float(v) for v in args.grid.split(",")):
            kw = {key: lam, "max_iter": iters, "tol": 0.0, "backend": args.backend}
            if args.backend == "torch":
                kw["spin"] = args.spin
            start = time.perf_counter()
            x = cs.cs_recon(y, maps, mask, **kw)
            took = time.perf_counter() - start
            print(f"{args.term} {args.backend} {iters:4d} it  lamda {lam:g}: "
                  f"{float(psnr(x, image)):.2f} dB in {took:.2f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
