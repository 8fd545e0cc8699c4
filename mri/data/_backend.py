"""Access to the FFT and coil modules of `mri`, and the SENSE helpers the data layer shares.

The data layer is written against `mri.fft` and `mri.coils`; this module is the one place that
imports them, so the rest of `mri.data` never needs to know where an FFT or a coil map comes from.
It also holds what every part of the data layer agrees on: which dims are spatial and which are
Fourier-transformed for each kind of data (DESIGN.md section 4).
"""

from __future__ import annotations

import torch

from mri.coils import birdcage_maps, estimate_maps_espirit, estimate_maps_jsense
from mri.fft import fftc, ifftc

__all__ = [
    "KINDS",
    "birdcage_maps",
    "estimate_maps_espirit",
    "estimate_maps_jsense",
    "fft_dims",
    "fftc",
    "ifftc",
    "sense_combine",
    "sense_expand",
    "spatial_rank",
]

#: The kinds of data and their number of spatial dims: 2D slices ``(H, W)``, 3D volumes
#: ``(D, H, W)`` and 2D+time cine ``(T, H, W)``.
KINDS: dict[str, int] = {"2d": 2, "3d": 3, "cine": 3}


def spatial_rank(kind: str) -> int:
    """Number of spatial dims of a kind of data (``"2d"``: 2, ``"3d"`` and ``"cine"``: 3)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    return KINDS[kind]


def fft_dims(kind: str) -> tuple[int, ...]:
    """Dims the FFT runs over: all spatial dims, except time for cine (DESIGN.md section 4)."""
    spatial_rank(kind)  # validates kind
    return (-3, -2, -1) if kind == "3d" else (-2, -1)


def sense_expand(image: torch.Tensor, maps: torch.Tensor, kind: str) -> torch.Tensor:
    """Fully sampled multi-coil k-space of an image, ``F(S x)``.

    Args:
        image: complex image ``(..., *spatial)``.
        maps: coil maps ``(..., C, *spatial)``.
        kind: ``"2d"``, ``"3d"`` or ``"cine"``; sets the spatial and FFT dims.

    Returns:
        K-space ``(..., C, *spatial)``.
    """
    coil_dim = -spatial_rank(kind) - 1
    return fftc(maps * image.unsqueeze(coil_dim), dims=fft_dims(kind))


def sense_combine(kspace: torch.Tensor, maps: torch.Tensor, kind: str) -> torch.Tensor:
    """SENSE coil combination ``sum_c conj(S_c) F^H y_c``, the adjoint of `sense_expand`.

    Args:
        kspace: multi-coil k-space ``(..., C, *spatial)``, zeros where not sampled.
        maps: coil maps, broadcastable to ``kspace``.
        kind: ``"2d"``, ``"3d"`` or ``"cine"``.

    Returns:
        The combined image ``(..., *spatial)``.
    """
    coil_dim = -spatial_rank(kind) - 1
    return (maps.conj() * ifftc(kspace, dims=fft_dims(kind))).sum(dim=coil_dim)
