"""Coil sensitivity maps: birdcage simulation, and estimation from k-space with SigPy's
ESPIRiT and JSENSE, one slice at a time so memory stays bounded by a single slice.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import sigpy.mri
import sigpy.mri.app
import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "birdcage_maps",
    "estimate_maps_espirit",
    "estimate_maps_jsense",
    "random_birdcage_maps",
]


def _check_shape_coils(where: str, shape: tuple[int, ...], num_coils: int) -> None:
    if (
        not isinstance(shape, (tuple, list, torch.Size))
        or len(shape) not in (2, 3)
        or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in shape)
    ):
        raise ValueError(
            f"{where}: shape must be (H, W) or (D, H, W) of positive ints, got {shape!r}"
        )
    if isinstance(num_coils, bool) or not isinstance(num_coils, (int, np.integer)) or num_coils < 1:
        raise ValueError(f"{where}: num_coils must be an int >= 1, got {num_coils!r}")


def birdcage_maps(
    shape: tuple[int, ...],
    num_coils: int,
    r: float = 1.5,
    nzz: int = 8,
) -> Tensor:
    """Simulated birdcage coil sensitivities, via ``sigpy.mri.birdcage_maps``.

    ```python
    maps = birdcage_maps((64, 64), num_coils=8)      # complex64 (8, 64, 64)
    ```

    Birdcage maps are non-zero everywhere and are normalised by their root-sum-of-squares,
    so ``sum_c |S_c|^2 = 1`` at every pixel, like ESPIRiT maps inside the object. That makes
    ``||A^H A|| <= 1`` for [`SenseOp`][mri.physics.SenseOp], and a fully sampled ``A^H A``
    the identity.

    Args:
        shape: Spatial shape, ``(H, W)`` or ``(D, H, W)``.
        num_coils: Number of coils (>= 1).
        r: Relative radius of the birdcage (SigPy's ``r``).
        nzz: Coils per ring in 3D (SigPy's ``nzz``).

    Returns:
        A complex64 tensor of shape ``(num_coils, *shape)``.

    Raises:
        ValueError: On a shape that is not 2D/3D positive ints, or ``num_coils < 1``.
    """
    _check_shape_coils("birdcage_maps", shape, num_coils)
    if not r > 0:
        raise ValueError(f"birdcage_maps: r must be > 0, got {r!r}")
    maps = sigpy.mri.birdcage_maps((int(num_coils), *map(int, shape)), r=r, nzz=nzz)
    # SigPy normalises already; repeating it is cheap and makes the guarantee ours.
    maps = maps / np.sqrt(np.sum(np.abs(maps) ** 2, axis=0, keepdims=True))
    return torch.from_numpy(maps.astype(np.complex64))


def random_birdcage_maps(
    shape: tuple[int, ...],
    num_coils: int,
    rng: np.random.Generator,
    nzz: int = 8,
) -> Tensor:
    """Birdcage-like coil maps with a random coil placement, one draw per scanned subject.

    ```python
    maps = random_birdcage_maps((64, 64), 8, np.random.default_rng(0))  # complex64 (8, 64, 64)
    ```

    Each coil is a conductor outside the field of view whose sensitivity falls off as one over
    the distance, with a phase that turns with the angle around it (the model of
    [`birdcage_maps`][mri.coils.birdcage_maps]). Subjects do not sit the same way in a coil,
    so the array is rotated by a random angle, moved by up to 15% of the field of view, its
    radius drawn from 1.2 to 2.0 (relative to the half field of view), and every coil gets a
    gain from 0.7 to 1.3 (loading differs per coil). Maps are normalised to unit
    root-sum-of-squares. In 3D, coils stand in rings of ``nzz`` along the first axis.

    Args:
        shape: Spatial shape, ``(H, W)`` or ``(D, H, W)``.
        num_coils: Number of coils (>= 1).
        rng: The random generator of the placement.
        nzz: Coils per ring in 3D.

    Returns:
        A complex64 tensor of shape ``(num_coils, *shape)``.

    Raises:
        ValueError: On a shape that is not 2D/3D positive ints, or ``num_coils < 1``.
    """
    _check_shape_coils("random_birdcage_maps", shape, num_coils)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"random_birdcage_maps: rng must be a numpy Generator, got {rng!r}")
    grids = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    # Normalised coordinates in [-1, 1) per axis, the in-plane ones last (y, x).
    coords = [(g - n / 2.0) / (n / 2.0) for g, n in zip(grids, shape, strict=True)]
    y, x = coords[-2] - rng.uniform(-0.15, 0.15), coords[-1] - rng.uniform(-0.15, 0.15)
    rotation = rng.uniform(0, 2 * np.pi)
    radius = rng.uniform(1.2, 2.0)
    per_ring = num_coils if len(shape) == 2 else min(nzz, num_coils)
    rings = -(-num_coils // per_ring)
    gains = rng.uniform(0.7, 1.3, size=num_coils)
    maps = np.empty((num_coils, *shape), dtype=np.complex128)
    for c in range(num_coils):
        ring, k = divmod(c, per_ring)
        angle = rotation + 2 * np.pi * k / per_ring
        dx, dy = x - radius * np.cos(angle), y - radius * np.sin(angle)
        dist2 = dx**2 + dy**2
        if len(shape) == 3:
            dist2 = dist2 + (coords[0] - (ring - 0.5 * (rings - 1))) ** 2
        maps[c] = gains[c] / np.sqrt(dist2) * np.exp(1j * (np.arctan2(dx, -dy) - angle))
    maps /= np.sqrt(np.sum(np.abs(maps) ** 2, axis=0, keepdims=True))
    return torch.from_numpy(maps.astype(np.complex64))


def _per_slice(
    where: str,
    kspace: Tensor,
    spatial_ndim: int,
    show_pbar: bool,
    estimate: Callable[[np.ndarray], np.ndarray],
) -> Tensor:
    if not isinstance(kspace, Tensor) or not kspace.is_complex():
        got = kspace.dtype if isinstance(kspace, Tensor) else type(kspace).__name__
        raise TypeError(f"{where}: kspace must be a complex torch.Tensor, got {got}")
    if spatial_ndim not in (2, 3):
        raise ValueError(f"{where}: spatial_ndim must be 2 or 3, got {spatial_ndim!r}")
    if kspace.ndim not in (spatial_ndim + 1, spatial_ndim + 2):
        raise ValueError(
            f"{where}: kspace of shape {tuple(kspace.shape)} must be (C, *spatial) or "
            f"(B, C, *spatial) with {spatial_ndim} spatial dims (set spatial_ndim for 3D)"
        )
    batched = kspace.ndim == spatial_ndim + 2
    slices = kspace if batched else kspace.unsqueeze(0)
    out = torch.empty(slices.shape, dtype=kspace.dtype)
    for b in tqdm(range(slices.shape[0]), desc=where, disable=not show_pbar):
        ksp = slices[b].detach().cpu().numpy()
        out[b] = torch.from_numpy(np.ascontiguousarray(estimate(ksp)).astype(ksp.dtype))
    out = out.to(kspace.device)
    return out if batched else out[0]


def estimate_maps_espirit(
    kspace: Tensor,
    calib_width: int = 24,
    thresh: float = 0.02,
    crop: float = 0.95,
    kernel_width: int = 6,
    max_iter: int = 100,
    spatial_ndim: int = 2,
    show_pbar: bool = False,
) -> Tensor:
    """ESPIRiT coil maps, via ``sigpy.mri.app.EspiritCalib``, slice by slice.

    ```python
    maps = estimate_maps_espirit(kspace)             # (B, C, H, W) -> (B, C, H, W)
    ```

    The maps have ``sum_c |S_c|^2 = 1`` where the ESPIRiT eigenvalue exceeds ``crop`` and
    are zero elsewhere; their phase is relative to the first coil. For 2D+time data pass
    time-averaged k-space.

    Args:
        kspace: Complex k-space ``(C, *spatial)`` or ``(B, C, *spatial)``, centered layout.
        calib_width: Width of the fully sampled calibration region.
        thresh: Singular-value threshold of the calibration matrix.
        crop: Eigenvalue threshold below which maps are set to zero.
        kernel_width: ESPIRiT kernel width.
        max_iter: Power iterations.
        spatial_ndim: 2 or 3, to tell ``(B, C, H, W)`` from ``(C, D, H, W)``.
        show_pbar: Show a progress bar over slices.

    Returns:
        Maps shaped like ``kspace``, with its complex dtype and device.

    Raises:
        TypeError: If ``kspace`` is not a complex tensor.
        ValueError: If its rank does not fit ``spatial_ndim``.
    """

    def estimate(ksp: np.ndarray) -> np.ndarray:
        return sigpy.mri.app.EspiritCalib(
            ksp,
            calib_width=calib_width,
            thresh=thresh,
            kernel_width=kernel_width,
            crop=crop,
            max_iter=max_iter,
            show_pbar=False,
        ).run()

    return _per_slice("estimate_maps_espirit", kspace, spatial_ndim, show_pbar, estimate)


def estimate_maps_jsense(
    kspace: Tensor,
    mps_ker_width: int = 16,
    ksp_calib_width: int = 24,
    lamda: float = 0.0,
    max_iter: int = 10,
    max_inner_iter: int = 10,
    spatial_ndim: int = 2,
    show_pbar: bool = False,
) -> Tensor:
    """JSENSE coil maps, via ``sigpy.mri.app.JsenseRecon``, slice by slice.

    ```python
    maps = estimate_maps_jsense(kspace)              # (B, C, H, W) -> (B, C, H, W)
    ```

    Maps are smooth (a ``mps_ker_width`` k-space kernel per coil), non-zero everywhere and
    normalised by their root-sum-of-squares, so ``sum_c |S_c|^2 = 1``. For 2D+time data pass
    time-averaged k-space.

    Args:
        kspace: Complex k-space ``(C, *spatial)`` or ``(B, C, *spatial)``, centered layout.
        mps_ker_width: Width of each map's k-space kernel.
        ksp_calib_width: Width of the k-space centre used for the estimate.
        lamda: Regularisation weight.
        max_iter: Outer (alternating) iterations.
        max_inner_iter: Inner iterations per sub-problem.
        spatial_ndim: 2 or 3, to tell ``(B, C, H, W)`` from ``(C, D, H, W)``.
        show_pbar: Show a progress bar over slices.

    Returns:
        Maps shaped like ``kspace``, with its complex dtype and device.

    Raises:
        TypeError: If ``kspace`` is not a complex tensor.
        ValueError: If its rank does not fit ``spatial_ndim``.
    """

    def estimate(ksp: np.ndarray) -> np.ndarray:
        return sigpy.mri.app.JsenseRecon(
            ksp,
            mps_ker_width=mps_ker_width,
            ksp_calib_width=ksp_calib_width,
            lamda=lamda,
            max_iter=max_iter,
            max_inner_iter=max_inner_iter,
            show_pbar=False,
        ).run()

    return _per_slice("estimate_maps_jsense", kspace, spatial_ndim, show_pbar, estimate)
