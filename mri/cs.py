"""Compressed-sensing baselines via SigPy: l1-wavelet (2D, 3D) and total variation with a
separate temporal weight (2D+time), solved slice by slice with torch tensors in and out.

Both scale each slice so that its zero-filled image ``A^H y`` peaks at 1 before solving and undo
the scale afterwards, so ``lamda`` does not depend on the intensity scale of the data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sigpy as sp
import sigpy.mri.app
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mri.physics import Measurement, SenseOp

__all__ = ["l1_wavelet_recon", "tv_recon"]


def _prepare(
    where: str,
    kspace: Tensor,
    maps: Tensor,
    mask: Tensor | None,
    fft_dims: int | Sequence[int] | None,
    lamdas: dict[str, float | None],
    max_iter: int,
) -> tuple[SenseOp, Tensor]:
    for name, value in lamdas.items():
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0
        ):
            raise ValueError(f"{where}: {name} must be a number >= 0, got {value!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{where}: max_iter must be an int >= 1, got {max_iter!r}")
    if not isinstance(kspace, Tensor) or not kspace.is_complex():
        got = kspace.dtype if isinstance(kspace, Tensor) else type(kspace).__name__
        raise TypeError(f"{where}: kspace must be a complex torch.Tensor, got {got}")
    if mask is None:
        # Unsampled k-space is stored as exact zeros, so the sampling pattern can be read off.
        mask = kspace.abs() > 0
    op = SenseOp(maps, mask, fft_dims=fft_dims)
    Measurement(op, kspace)  # validates kspace against maps and mask, naming both shapes
    return op, kspace


def _slice_arrays(
    op: SenseOp, kspace: Tensor, b: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Numpy k-space (masked), maps, squared weights and the scale of slice ``b``."""
    mask = op.mask if op.mask is not None else torch.ones((), device=kspace.device)
    weights = torch.broadcast_to(mask.to(op.maps.real.dtype), kspace.shape)[b]
    y = kspace[b : b + 1]
    scale = float(SenseOp(op.maps[b : b + 1], weights, op.fft_dims).adjoint(y).abs().max()) or 1.0
    ksp = (y[0] * weights).detach().cpu().numpy() / scale
    maps = op.maps[b].detach().cpu().numpy()
    weights = weights.detach().cpu().numpy()
    return ksp, maps, np.ascontiguousarray(weights**2), scale


def l1_wavelet_recon(
    kspace: Tensor,
    maps: Tensor,
    mask: Tensor | None = None,
    lamda: float = 5e-3,
    max_iter: int = 100,
    wave_name: str = "db4",
    show_pbar: bool = True,
) -> Tensor:
    """l1-wavelet compressed sensing, via ``sigpy.mri.app.L1WaveletRecon``, per slice.

    ```python
    x = l1_wavelet_recon(kspace, maps, mask)     # (B, C, H, W) -> (B, H, W)
    ```

    Solves ``min_x 1/2 ||A x - y||^2 + lamda ||Psi x||_1`` (``Psi`` a Daubechies wavelet
    transform) for each slice, after scaling the slice so that ``max |A^H y| = 1``. The GLEAM
    paper gives no CS settings; ``lamda = 5e-3`` on that scale is a middle-of-the-road
    choice for 4-8x undersampling. The mask is applied as in
    [`SenseOp`][mri.physics.SenseOp] (SigPy's ``weights`` get ``mask**2``, since SigPy takes
    their square root).

    Args:
        kspace: Measured k-space ``(B, C, *spatial)``, 2D or 3D, complex.
        maps: Coil maps, same shape and dtype.
        mask: Sampling mask broadcastable to ``kspace``; ``None`` reads it off the non-zero
            entries of ``kspace``.
        lamda: Regularisation weight (>= 0) on the normalised scale.
        max_iter: Iterations of SigPy's solver.
        wave_name: PyWavelets wavelet name.
        show_pbar: Show a progress bar over slices.

    Returns:
        The reconstruction ``(B, *spatial)``, with the dtype and device of ``kspace``.

    Raises:
        TypeError: If ``kspace`` or ``maps`` is not complex.
        ValueError: On invalid weights or iteration counts, or mismatched shapes.
    """
    where = "l1_wavelet_recon"
    op, kspace = _prepare(where, kspace, maps, mask, None, {"lamda": lamda}, max_iter)
    out = torch.empty((kspace.shape[0], *kspace.shape[2:]), dtype=kspace.dtype)
    for b in tqdm(range(kspace.shape[0]), desc=where, disable=not show_pbar):
        ksp, mps, weights, scale = _slice_arrays(op, kspace, b)
        x = sigpy.mri.app.L1WaveletRecon(
            ksp,
            mps,
            lamda,
            weights=weights,
            wave_name=wave_name,
            max_iter=max_iter,
            show_pbar=False,
        ).run()
        out[b] = torch.from_numpy(np.asarray(x) * scale)
    return out.to(kspace.device)


def tv_recon(
    kspace: Tensor,
    maps: Tensor,
    mask: Tensor | None = None,
    lamda: float = 2e-3,
    lamda_t: float | None = None,
    fft_dims: int | Sequence[int] | None = 2,
    max_iter: int = 100,
    show_pbar: bool = True,
) -> Tensor:
    """Total-variation compressed sensing with a separate temporal weight, per slice.

    ```python
    x = tv_recon(kspace, maps, mask)     # 2D+time: (B, C, T, H, W) -> (B, T, H, W)
    ```

    Solves ``min_x 1/2 ||A x - y||^2 + lamda sum_s ||D_s x||_1 + lamda_t sum_t ||D_t x||_1``
    with anisotropic finite differences ``D_s`` along the Fourier-encoded (spatial) dims and
    ``D_t`` along the others (time), by SigPy's ``LinearLeastSquares`` (primal-dual hybrid
    gradient), after scaling each slice so that ``max |A^H y| = 1``. The operator is built as
    [`SenseOp`][mri.physics.SenseOp] is from ``maps`` and ``fft_dims``, so 2D and 3D data get
    plain spatial TV. The GLEAM paper gives no CS settings; the defaults (``lamda = 2e-3``,
    ``lamda_t = 4 * lamda``, as cine frames are strongly correlated) are documented choices.

    Args:
        kspace: Measured k-space ``(B, C, *spatial)``, e.g. ``(B, C, T, H, W)``, complex.
        maps: Coil maps ``(B, C, *spatial)`` or, for 2D+time, ``(B, C, H, W)`` shared over time.
        mask: Sampling mask broadcastable to ``kspace``; ``None`` reads it off the non-zero
            entries of ``kspace``.
        lamda: Spatial TV weight (>= 0) on the normalised scale.
        lamda_t: Temporal TV weight (>= 0); ``None`` means ``4 * lamda``.
        fft_dims: As for [`SenseOp`][mri.physics.SenseOp]; the default 2 transforms
            ``(H, W)`` and treats a third spatial dim as time. Use ``None`` for 3D.
        max_iter: Iterations of SigPy's solver.
        show_pbar: Show a progress bar over slices.

    Returns:
        The reconstruction ``(B, *spatial)``, with the dtype and device of ``kspace``.

    Raises:
        TypeError: If ``kspace`` or ``maps`` is not complex.
        ValueError: On invalid weights or iteration counts, or mismatched shapes.
    """
    where = "tv_recon"
    if lamda_t is None and isinstance(lamda, (int, float)) and not isinstance(lamda, bool):
        lamda_t = 4 * lamda
    op, kspace = _prepare(
        where, kspace, maps, mask, fft_dims, {"lamda": lamda, "lamda_t": lamda_t}, max_iter
    )
    ishape = tuple(kspace.shape[2:])
    ndim = len(ishape)
    fft_axes = {d % ndim for d in op.fft_dims}
    shared = op.maps.ndim == kspace.ndim - 1
    per_axis = np.array([lamda if a in fft_axes else lamda_t for a in range(ndim)])
    diff = sp.linop.FiniteDifference(ishape)
    reg = sp.linop.Multiply(diff.oshape, per_axis.reshape((ndim,) + (1,) * ndim)) * diff
    out = torch.empty((kspace.shape[0], *ishape), dtype=kspace.dtype)
    for b in tqdm(range(kspace.shape[0]), desc=where, disable=not show_pbar):
        ksp, mps, weights, scale = _slice_arrays(op, kspace, b)
        if shared:
            mps = mps[:, None]
        coil = sp.linop.Multiply(ishape, mps)
        fourier = sp.linop.FFT(coil.oshape, axes=tuple(sorted(op.fft_dims)), center=True)
        forward = sp.linop.Multiply(fourier.oshape, np.sqrt(weights)) * fourier * coil
        x = sp.app.LinearLeastSquares(
            forward,
            ksp,
            proxg=sp.prox.L1Reg(reg.oshape, 1.0),
            G=reg,
            max_iter=max_iter,
            show_pbar=False,
        ).run()
        out[b] = torch.from_numpy(np.asarray(x) * scale)
    return out.to(kspace.device)
