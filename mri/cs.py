"""Compressed-sensing baselines: l1-wavelet, total variation and their sum (the GLEAM paper's cine
baseline), solved by FISTA on torch tensors, or by BART's ``pics`` when ``bartorch`` is installed.

Every slice is scaled so that its zero-filled image ``A^H y`` peaks at 1 before solving and the
scale is undone afterwards, so a weight ``lamda`` means the same for any intensity scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pywt
import torch
from torch import Tensor

from mri._cs_solver import SPINS, Regulariser, fista
from mri.physics import Measurement, SenseOp

__all__ = ["cs_recon", "l1_wavelet_recon", "tv_recon", "wavelet_tv_recon", "tune_lamda"]

_BACKENDS = ("torch", "bart")


# --------------------------------------------------------------------------------------------
# Validation and the public functions.
# --------------------------------------------------------------------------------------------


def _check_number(where: str, name: str, value: Any, low: float, strict: bool = False) -> None:
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
    if bad or not (value > low if strict else value >= low) or not math.isfinite(value):
        rel = ">" if strict else ">="
        raise ValueError(f"{where}: {name} must be a finite number {rel} {low}, got {value!r}")


def _check_int(where: str, name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{where}: {name} must be an int >= {low}, got {value!r}")


def cs_recon(
    kspace: Tensor,
    maps: Tensor,
    mask: Tensor | None = None,
    *,
    lamda_wavelet: float = 0.0,
    lamda_tv: float = 0.0,
    lamda_t: float = 0.0,
    fft_dims: int | Sequence[int] | None = None,
    max_iter: int = 100,
    tol: float = 1e-4,
    wave_name: str = "db2",
    levels: int | None = None,
    spin: str = "average",
    num_shifts: int = 8,
    inner_iter: int = 10,
    seed: int = 0,
    backend: str = "torch",
) -> Tensor:
    """Compressed sensing with any sum of l1-wavelet, isotropic spatial TV and temporal TV.

    ```python
    x = cs_recon(kspace, maps, mask, lamda_wavelet=1e-3)     # 2D: (B, C, H, W) -> (B, H, W)
    x = cs_recon(k, maps, mask, lamda_tv=2e-3, lamda_t=1.6e-2, fft_dims=2)     # cine
    ```

    Solves, for each sample scaled so that ``max |A^H y| = 1``,

    ``min_x 1/2 ||A x - y||^2 + lamda_wavelet ||Psi x||_1 + lamda_tv sum_r ||(D_s x)_r||_2
    + lamda_t ||D_t x||_1``

    with ``A`` the [`SenseOp`][mri.physics.SenseOp] of ``maps``, ``mask`` and ``fft_dims``;
    ``Psi`` an orthonormal Daubechies wavelet over the Fourier-encoded dims, cycle-spun
    (``spin``), with the coarsest band unpenalised; ``D_s`` circular differences along the
    Fourier-encoded dims (isotropic TV: the l2 norm over directions at each voxel); ``D_t``
    differences along the other image dims (time). FISTA takes steps ``1/L`` with ``L`` an upper
    bound of ``||A||^2`` and stops when the relative change of the iterate falls below ``tol``
    or after ``max_iter`` iterations.
    With TV the proximal step is solved by ``inner_iter`` warm-started dual FISTA steps.
    The default cycle spinning, ``spin="average"``, averages the wavelet over ``num_shifts``
    fixed shifts spread over its finest levels: a fixed convex problem, so the iterates converge
    and ``tol`` applies. ``spin="random"`` shifts by a random offset at every
    iteration, as BART's ``pics -R W`` does: its iterates fluctuate about the solution, so the
    result is the mean of the last quarter of ``max_iter`` iterates and ``tol`` is not used.

    Args:
        kspace: Measured k-space ``(B, C, *spatial)``, complex.
        maps: Coil maps as for [`SenseOp`][mri.physics.SenseOp].
        mask: Sampling mask broadcastable to ``kspace``; ``None`` reads it off the non-zero
            entries of ``kspace``.
        lamda_wavelet: l1-wavelet weight (>= 0) on the normalised scale.
        lamda_tv: Isotropic spatial TV weight (>= 0).
        lamda_t: Temporal TV weight (>= 0); acts along the image dims that are not
            Fourier-encoded, so it needs ``fft_dims`` to leave one (2D+time).
        fft_dims: As for [`SenseOp`][mri.physics.SenseOp]; ``2`` for 2D+time.
        max_iter: Most FISTA iterations (>= 1).
        tol: Stop once ``||x_k - x_{k-1}|| / ||x_k|| < tol`` for every sample (0 runs
            ``max_iter``); not used with ``spin="random"``.
        wave_name: A PyWavelets orthogonal wavelet (``"db4"``, ``"db2"``, ``"haar"``...).
        levels: Wavelet levels; ``None`` takes up to 4 that fit the image.
        spin: Cycle spinning of the wavelet: ``"average"`` (the mean over ``num_shifts``
            fixed shifts; deterministic, converges; one wavelet transform pair per shift and
            iteration), ``"random"`` (one random shift per iteration, as BART) or ``"none"``.
        num_shifts: Shifts of ``spin="average"``, a power of 2 (>= 1): 8 by default; 4 is
            about 1.6x faster and 0.2 dB worse on the built-in knee-like slices.
        inner_iter: Dual iterations of the TV proximal step (>= 1).
        seed: Seed of the random shifts (``spin="random"``).
        backend: ``"torch"`` (this module's FISTA) or ``"bart"`` (BART's ``pics`` via the
            optional ``bartorch`` package, 2D and 3D without a temporal term; BART picks
            FISTA or ADMM itself and runs ``max_iter`` iterations).

    Returns:
        The reconstruction ``(B, *spatial)``, with the dtype and device of ``kspace``.

    Raises:
        TypeError: If ``kspace`` or ``maps`` is not complex.
        ValueError: On invalid weights, iteration counts, backend or mismatched shapes.
        ImportError: For ``backend="bart"`` without ``bartorch`` installed.
    """
    where = "cs_recon"
    for name, value in (("lamda_wavelet", lamda_wavelet), ("lamda_tv", lamda_tv),
                        ("lamda_t", lamda_t), ("tol", tol)):  # fmt: skip
        _check_number(where, name, value, 0.0)
    _check_int(where, "max_iter", max_iter, 1)
    _check_int(where, "inner_iter", inner_iter, 1)
    if levels is not None:
        _check_int(where, "levels", levels, 1)
    if spin not in SPINS:
        raise ValueError(f"{where}: spin must be one of {SPINS}, got {spin!r}")
    _check_int(where, "num_shifts", num_shifts, 1)
    if num_shifts & (num_shifts - 1):
        raise ValueError(
            f"{where}: num_shifts must be a power of 2 (1, 2, 4, 8...), got {num_shifts}"
        )
    if backend not in _BACKENDS:
        raise ValueError(f"{where}: backend must be one of {_BACKENDS}, got {backend!r}")
    if wave_name not in pywt.wavelist(kind="discrete") or not pywt.Wavelet(wave_name).orthogonal:
        raise ValueError(
            f"{where}: wave_name must name an orthogonal PyWavelets wavelet such as 'db4', "
            f"got {wave_name!r}"
        )
    if not isinstance(kspace, Tensor) or not kspace.is_complex():
        got = kspace.dtype if isinstance(kspace, Tensor) else type(kspace).__name__
        raise TypeError(f"{where}: kspace must be a complex torch.Tensor, got {got}")
    if mask is None:
        # Unsampled k-space is stored as exact zeros, so the sampling pattern can be read off.
        mask = kspace.abs() > 0
    op = SenseOp(maps, mask, fft_dims=fft_dims)
    Measurement(op, kspace)  # validates kspace against maps and mask, naming both shapes
    ndim = kspace.ndim - 2
    space = tuple(sorted(1 + d % ndim for d in op.fft_dims))  # image dims, batch dim 0
    time = tuple(d for d in range(1, ndim + 1) if d not in space)
    if lamda_t > 0 and not time:
        raise ValueError(
            f"{where}: lamda_t={lamda_t} needs a temporal dim, but fft_dims={fft_dims!r} "
            f"encodes every image dim of shape {tuple(kspace.shape[2:])}; use fft_dims=2"
        )

    # Scale each sample so that max |A^H y| = 1: lamda is then independent of intensity.
    scale = op.adjoint(kspace).abs().flatten(1).amax(1).clamp_min(1e-30)
    view = (-1,) + (1,) * (kspace.ndim - 1)
    y = kspace / scale.view(view).to(kspace.dtype)
    lamdas = (float(lamda_wavelet), float(lamda_tv), float(lamda_t))
    if backend == "bart":
        x = _bart(where, y, op, lamdas, time, max_iter)
    else:
        shape = (kspace.shape[0], *kspace.shape[2:])
        reg = Regulariser(
            shape, space, time, lamdas, wave_name, levels, spin, inner_iter, seed, num_shifts
        )
        x, _ = fista(op, y, reg, max_iter, tol)
    return x * scale.view(view[:-1]).to(x.dtype)


def _bart(
    where: str,
    y: Tensor,
    op: SenseOp,
    lamdas: tuple[float, float, float],
    time: tuple[int, ...],
    max_iter: int,
) -> Tensor:
    """BART's ``pics`` per sample, on the already scaled data (``scaling=1``: same lamda scale)."""
    try:
        from bartorch import apps, priors
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            f"{where}: backend='bart' needs the optional bartorch package: "
            "pip install 'greedywrap[bart]'"
        ) from err
    if time or op.maps.ndim != y.ndim:
        raise ValueError(
            f"{where}: backend='bart' reconstructs 2D and 3D images with per-sample maps; "
            f"got k-space {tuple(y.shape)} with maps {tuple(op.maps.shape)} and fft_dims "
            f"{op.fft_dims} (2D+time): use backend='torch'"
        )
    lw, ls, _ = lamdas
    axes = tuple(range(-len(op.fft_dims), 0))
    terms = []
    if lw > 0:
        terms.append(priors.Wavelet(axes, lw))
    if ls > 0:
        terms.append(priors.TotalVariation(axes, ls))
    mask = op.mask if op.mask is not None else torch.ones(y.shape[-len(axes) :])
    mask = torch.broadcast_to(mask.to(y.real.dtype), y.shape)
    out = []
    for b in range(y.shape[0]):
        ksp = (y[b] * mask[b]).cpu().to(torch.complex64)
        if len(axes) == 2:
            ksp = ksp[:, None]  # pics takes (coils, z, y, x) and modulates the last three axes
        sens = op.maps[b].cpu().to(torch.complex64)
        pattern = (mask[b, 0] > 0).to(torch.complex64)
        x = apps.pics(ksp, sens, regularizers=terms or None, maxiter=max_iter, pattern=pattern,
                      scaling=1.0, l2=None if terms else 0.0)  # fmt: skip
        out.append(x.reshape(y.shape[2:]))
    return torch.stack(out).to(y.dtype).to(y.device)


def l1_wavelet_recon(
    kspace: Tensor,
    maps: Tensor,
    mask: Tensor | None = None,
    lamda: float = 1e-3,
    max_iter: int = 100,
    *,
    tol: float = 1e-4,
    wave_name: str = "db2",
    fft_dims: int | Sequence[int] | None = None,
    backend: str = "torch",
    spin: str = "average",
    num_shifts: int = 8,
    show_pbar: bool = False,
) -> Tensor:
    """l1-wavelet compressed sensing: [`cs_recon`][mri.cs.cs_recon] with ``lamda_wavelet=lamda``.

    ```python
    x = l1_wavelet_recon(kspace, maps, mask)     # (B, C, H, W) -> (B, H, W)
    ```

    The default ``lamda = 1e-3`` (on the ``max |A^H y| = 1`` scale) is the grid optimum on
    a 256x256 Shepp-Logan slice at R=6; tune it on validation data with
    [`tune_lamda`][mri.cs.tune_lamda]. The paper's weights (0.12 / 0.07 / 0.06 for knee
    R=4 / 12 / 16, 0.001 for brain, 100 iterations) are on its own code's data scale, not this
    one. ``spin`` and ``num_shifts`` are [`cs_recon`][mri.cs.cs_recon]'s. ``show_pbar`` is
    accepted for compatibility and ignored (the batch is solved at once).
    """
    del show_pbar
    return cs_recon(kspace, maps, mask, lamda_wavelet=lamda, max_iter=max_iter, tol=tol,
                    wave_name=wave_name, fft_dims=fft_dims, backend=backend, spin=spin,
                    num_shifts=num_shifts)  # fmt: skip


def tv_recon(
    kspace: Tensor,
    maps: Tensor,
    mask: Tensor | None = None,
    lamda: float = 2e-3,
    lamda_t: float | None = None,
    fft_dims: int | Sequence[int] | None = 2,
    max_iter: int = 100,
    *,
    tol: float = 1e-4,
    backend: str = "torch",
    show_pbar: bool = False,
) -> Tensor:
    """Isotropic spatial TV plus temporal TV: [`cs_recon`][mri.cs.cs_recon] with
    ``lamda_tv=lamda`` and ``lamda_t``.

    ```python
    x = tv_recon(kspace, maps, mask)     # 2D+time: (B, C, T, H, W) -> (B, T, H, W)
    ```

    ``lamda_t=None`` means ``8 * lamda`` when the image has a temporal dim (cine frames are
    strongly correlated) and 0 otherwise; ``lamda = 2e-3, lamda_t = 1.6e-2`` is the best of a
    3x3 grid on the ``cpu-cine`` validation split at 100 iterations. ``show_pbar`` is
    accepted and ignored.
    """
    del show_pbar
    if not isinstance(kspace, Tensor) or not kspace.is_complex():
        got = kspace.dtype if isinstance(kspace, Tensor) else type(kspace).__name__
        raise TypeError(f"tv_recon: kspace must be a complex torch.Tensor, got {got}")
    if lamda_t is None:
        _check_number("tv_recon", "lamda", lamda, 0.0)
        encoded = len(SenseOp(maps, None, fft_dims).fft_dims)
        lamda_t = 8 * lamda if kspace.ndim - 2 > encoded else 0.0
    return cs_recon(kspace, maps, mask, lamda_tv=lamda, lamda_t=lamda_t, fft_dims=fft_dims,
                    max_iter=max_iter, tol=tol, backend=backend)  # fmt: skip


def wavelet_tv_recon(
    kspace: Tensor,
    maps: Tensor,
    mask: Tensor | None = None,
    lamda: float = 2.5e-4,
    lamda_tv: float = 2e-3,
    lamda_t: float = 1.6e-2,
    fft_dims: int | Sequence[int] | None = 2,
    max_iter: int = 200,
    *,
    tol: float = 1e-4,
    backend: str = "torch",
    spin: str = "average",
    num_shifts: int = 8,
) -> Tensor:
    """The GLEAM paper's cine CS: l1-wavelet + spatial TV + temporal TV, via
    [`cs_recon`][mri.cs.cs_recon].

    ```python
    x = wavelet_tv_recon(kspace, maps, mask)     # (B, C, T, H, W) -> (B, T, H, W)
    ```

    The paper uses spatial TV 0.05 and temporal TV 0.01 with 200 iterations, on its own
    code's data scale; the defaults here are on the ``max |A^H y| = 1`` scale. ``spin`` and
    ``num_shifts`` are [`cs_recon`][mri.cs.cs_recon]'s; each shift adds a dual variable and a
    wavelet transform pair per inner step.
    """
    return cs_recon(kspace, maps, mask, lamda_wavelet=lamda, lamda_tv=lamda_tv,
                    lamda_t=lamda_t, fft_dims=fft_dims, max_iter=max_iter, tol=tol,
                    backend=backend, spin=spin, num_shifts=num_shifts)  # fmt: skip


def tune_lamda(
    items: Iterable[tuple[Tensor, Tensor, Tensor | None, Tensor]],
    grid: Sequence[float],
    recon: Callable[..., Tensor] = l1_wavelet_recon,
    **kwargs: Any,
) -> tuple[float, dict[float, float]]:
    """Pick the weight with the best mean PSNR over validation items, on a grid.

    ```python
    best, table = tune_lamda(val_items, [5e-4, 1e-3, 2e-3, 4e-3], l1_wavelet_recon, max_iter=100)
    ```

    Args:
        items: ``(kspace, maps, mask, target)`` tuples (e.g. the validation split); read once.
        grid: Candidate values of ``recon``'s ``lamda`` argument (each >= 0).
        recon: A reconstruction taking ``(kspace, maps, mask, lamda=..., **kwargs)``.
        **kwargs: Passed to every call of ``recon`` (``max_iter``, ``fft_dims``...).

    Returns:
        The best weight and the mean PSNR (dB, magnitude, per item) for every weight.

    Raises:
        ValueError: If ``grid`` or ``items`` is empty or a weight is negative.
    """
    from mri.metrics import psnr

    items = list(items)
    grid = list(grid)
    if not grid:
        raise ValueError("tune_lamda: grid must hold at least one weight, got an empty grid")
    if not items:
        raise ValueError("tune_lamda: items must hold at least one (kspace, maps, mask, target)")
    for value in grid:
        _check_number("tune_lamda", "every grid value", value, 0.0)
    table: dict[float, float] = {}
    for lam in grid:
        scores = [psnr(recon(k, m, mk, lamda=lam, **kwargs), t).mean() for k, m, mk, t in items]
        table[float(lam)] = float(torch.stack(scores).mean())
    best = max(table, key=table.__getitem__)
    return best, table
