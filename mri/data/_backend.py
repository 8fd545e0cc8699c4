"""What every part of the data layer agrees on: which dims are spatial and which are
Fourier-transformed for each kind of data (DESIGN.md section 4), and SENSE expansion and
combination through `mri.physics.SenseOp` for data of each kind.
"""

from __future__ import annotations

import torch

from mri.physics import SenseOp

__all__ = [
    "KINDS",
    "fft_ndim",
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


def fft_ndim(kind: str) -> int:
    """How many trailing dims the FFT runs over: all spatial dims, except time for cine."""
    spatial_rank(kind)  # validates kind
    return 3 if kind == "3d" else 2


def _sense(maps: torch.Tensor, kind: str) -> SenseOp:
    return SenseOp(maps, fft_dims=fft_ndim(kind))


def sense_expand(image: torch.Tensor, maps: torch.Tensor, kind: str) -> torch.Tensor:
    """Fully sampled multi-coil k-space of an image, ``F(S x)`` (``SenseOp`` without a mask).

    Args:
        image: complex image ``(*spatial)`` or ``(B, *spatial)``.
        maps: coil maps ``(C, *spatial)`` or ``(B, C, *spatial)``, matching ``image``.
        kind: ``"2d"``, ``"3d"`` or ``"cine"``; sets the spatial and FFT dims.

    Returns:
        K-space ``(C, *spatial)`` or ``(B, C, *spatial)``.
    """
    if image.dim() == spatial_rank(kind):
        return _sense(maps[None], kind).forward(image[None])[0]
    return _sense(maps, kind).forward(image)


def sense_combine(kspace: torch.Tensor, maps: torch.Tensor, kind: str) -> torch.Tensor:
    """SENSE coil combination ``sum_c conj(S_c) F^H y_c``, the adjoint of `sense_expand`.

    Args:
        kspace: multi-coil k-space ``(C, *spatial)`` or ``(B, C, *spatial)``, zeros where not
            sampled.
        maps: coil maps of the same shape.
        kind: ``"2d"``, ``"3d"`` or ``"cine"``.

    Returns:
        The combined image ``(*spatial)`` or ``(B, *spatial)``.
    """
    if kspace.dim() == spatial_rank(kind) + 1:
        return _sense(maps[None], kind).adjoint(kspace[None])[0]
    return _sense(maps, kind).adjoint(kspace)
