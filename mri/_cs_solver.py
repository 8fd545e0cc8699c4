"""The solver behind `mri.cs`: FISTA on ``1/2 ||A x - y||^2 + R(x)`` with ``R`` a weighted sum of
an orthonormal, cycle-spun wavelet l1 norm, isotropic spatial TV and temporal TV."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pywt
import torch
from torch import Tensor

from mri.physics import SenseOp

# --------------------------------------------------------------------------------------------
# Regularisers: an orthonormal wavelet (exact soft-threshold prox) and a general analysis term
# ||K x|| whose prox is found by fast projected gradient on the dual (Beck & Teboulle 2009).
# --------------------------------------------------------------------------------------------


class _Wavelet:
    """Orthonormal multilevel wavelet over ``axes`` (periodized, so ``W^H W = W W^H = I``).

    The image is zero-padded to a multiple of ``2**levels`` along each axis; the approximation
    band is left unpenalised so the regulariser does not shrink the image's mean intensity.
    """

    def __init__(self, shape: tuple[int, ...], axes: tuple[int, ...], wave: str, levels: int):
        self.axes, self.wave, self.levels = axes, wave, levels
        block = 2**levels
        self.shape = shape
        self.pad = [(-shape[a]) % block for a in axes]
        probe = np.zeros(self._padded_shape(), dtype=np.complex64)
        _, self.slices = pywt.coeffs_to_array(self._dec(probe), axes=axes)
        self.detail = np.ones(probe.shape, dtype=bool)
        self.detail[tuple(self.slices[0])] = False

    def _padded_shape(self) -> tuple[int, ...]:
        s = list(self.shape)
        for a, p in zip(self.axes, self.pad, strict=True):
            s[a] += p
        return tuple(s)

    def _dec(self, x: np.ndarray) -> list[Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "level too high": periodization copes
            return pywt.wavedecn(x, self.wave, "periodization", self.levels, self.axes)

    def forward(self, x: Tensor, shift: Sequence[int]) -> np.ndarray:
        a = torch.roll(x, tuple(shift), self.axes).cpu().numpy()
        if any(self.pad):
            widths = [(0, 0)] * a.ndim
            for ax, p in zip(self.axes, self.pad, strict=True):
                widths[ax] = (0, p)
            a = np.pad(a, widths)
        arr, _ = pywt.coeffs_to_array(self._dec(a), axes=self.axes)
        return arr

    def adjoint(self, c: np.ndarray, shift: Sequence[int], like: Tensor) -> Tensor:
        coeffs = pywt.array_to_coeffs(c, self.slices, output_format="wavedecn")
        a = pywt.waverecn(coeffs, self.wave, "periodization", self.axes)
        a = a[tuple(slice(0, n) for n in self.shape)]
        x = torch.from_numpy(np.ascontiguousarray(a)).to(like.dtype).to(like.device)
        return torch.roll(x, tuple(-s for s in shift), self.axes)


def _soft(c: np.ndarray, thresh: float, keep: np.ndarray) -> np.ndarray:
    mag = np.abs(c)
    shrunk = c * np.maximum(1 - thresh / np.maximum(mag, 1e-30), 0)
    return np.where(keep, shrunk, c)


def _grad(x: Tensor, axes: Sequence[int]) -> Tensor:
    """Circular forward differences along ``axes``, stacked in front: ``(len(axes), *x.shape)``."""
    return torch.stack([torch.roll(x, -1, a) - x for a in axes])


def _grad_adjoint(z: Tensor, axes: Sequence[int]) -> Tensor:
    return sum(
        (torch.roll(zi, 1, a) - zi for zi, a in zip(z, axes, strict=True)), torch.zeros_like(z[0])
    )


SPINS = ("average", "random", "none")


def _bit_reverse(i: int, bits: int) -> int:
    return int(format(i, f"0{bits}b")[::-1], 2) if bits else 0


def spin_shifts(count: int, ndim: int, block: int) -> list[list[int]]:
    """``count`` (a power of 2) shifts of ``ndim`` axes that spread over the wavelet's levels.

    Shift ``i`` moves axis 0 by ``i``, axis 1 by ``i`` bit-reversed and axis ``j`` by
    ``(2j - 1) i`` bit-reversed, all modulo ``block = 2**levels``: along each axis the shifts
    take every residue modulo ``count`` (every phase of the finest ``log2(count)`` levels),
    and the axes do not move in step. Duplicates (images with fewer levels) are dropped.
    """
    bits = count.bit_length() - 1
    shifts: list[list[int]] = []
    for i in range(count):
        s = [i] + [_bit_reverse((2 * j - 1) * i % count, bits) for j in range(1, ndim)]
        s = [v % block for v in s]
        if s not in shifts:
            shifts.append(s)
    return shifts


class Regulariser:
    """``lw ||W x||_1 + ls sum_r ||(D_s x)_r||_2 + lt ||D_t x||_1`` and its proximal operator.

    Spatial TV is isotropic (the l2 norm over the spatial difference directions at each voxel);
    the temporal term is a plain l1 of time differences. With only the wavelet term the prox is
    the exact soft-threshold; otherwise it is solved on the dual by ``inner_iter`` steps of
    FISTA, warm-started from the previous outer iteration's dual.

    ``spin`` says how the wavelet is made shift-invariant (cycle spinning). ``"average"`` uses
    ``num_shifts`` fixed shifts (`spin_shifts`): with the wavelet alone the prox is the mean
    of their soft-thresholds, which is the exact prox of their *proximal average* (Bauschke,
    Goebel, Lucet & Wang 2008), a convex function, so FISTA converges to a fixed answer; with
    TV the wavelet term is the mean of the shifted l1 norms, one dual variable each.
    ``"random"`` draws one shift in ``[0, 2**levels)`` per axis at every iteration, as BART's
    ``pics`` does: a stochastic proximal step whose iterates fluctuate (by 0.1-0.3 dB from
    seed to seed). ``"none"`` uses the unshifted wavelet.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        space: tuple[int, ...],
        time: tuple[int, ...],
        lamdas: tuple[float, float, float],
        wave: str,
        levels: int | None,
        spin: str,
        inner_iter: int,
        seed: int,
        num_shifts: int = 8,
    ) -> None:
        self.lw, self.ls, self.lt = lamdas
        self.space, self.time = space, (time if self.lt > 0 else ())
        self.tv_axes = (space if self.ls > 0 else ()) + self.time
        self.inner_iter = inner_iter
        self.spin = spin
        self.gen = torch.Generator().manual_seed(seed)
        self.wavelet: _Wavelet | None = None
        if self.lw > 0:
            if levels is None:
                filt = pywt.Wavelet(wave).dec_len
                levels = max(1, min(4, *(pywt.dwt_max_level(shape[a], filt) for a in space)))
            self.wavelet = _Wavelet(shape, space, wave, levels)
        self.fixed_shifts = [[0] * len(space)]
        if spin == "average" and self.wavelet is not None:
            self.fixed_shifts = spin_shifts(num_shifts, len(space), 2**self.wavelet.levels)
        # With K shifts the wavelet part of K is the stack of W S_k / K: its norm^2 is 1/K.
        # ||D||^2 <= 4 per circular difference axis.
        wavelet_norm2 = 1.0 / len(self.fixed_shifts) if self.wavelet else 0.0
        self.norm2 = 4.0 * len(self.tv_axes) + wavelet_norm2
        self.dual_tv: Tensor | None = None
        self.dual_w: list[np.ndarray] | None = None

    @property
    def stochastic(self) -> bool:
        return self.wavelet is not None and self.spin == "random"

    @property
    def active(self) -> bool:
        return self.wavelet is not None or bool(self.tv_axes)

    def _shifts(self) -> list[list[int]]:
        if self.wavelet is None:
            return []
        if not self.stochastic:
            return self.fixed_shifts
        block = 2**self.wavelet.levels
        return [torch.randint(0, block, (len(self.space),), generator=self.gen).tolist()]

    def _project_tv(self, z: Tensor) -> Tensor:
        n_space = len(self.tv_axes) - len(self.time)
        parts = []
        if n_space:
            zs = z[:n_space]
            norm = zs.abs().square().sum(0).sqrt()
            parts.append(zs * torch.clamp(self.ls / norm.clamp_min(1e-30), max=1.0))
        if self.time:
            zt = z[n_space:]
            parts.append(zt * torch.clamp(self.lt / zt.abs().clamp_min(1e-30), max=1.0))
        return torch.cat(parts)

    def prox(self, v: Tensor, gamma: float) -> Tensor:
        shifts = self._shifts()
        wav = self.wavelet
        if not self.tv_axes:
            assert wav is not None
            parts = [
                wav.adjoint(_soft(wav.forward(v, s), gamma * self.lw, wav.detail), s, v)
                for s in shifts
            ]
            return parts[0] if len(parts) == 1 else torch.stack(parts).mean(0)
        # Dual FISTA for min_z 1/2 ||v - gamma K^H z||^2 over the product of dual balls.
        step = 1.0 / (gamma * self.norm2)
        k = max(1, len(shifts))
        z = self.dual_tv if self.dual_tv is not None else torch.zeros_like(_grad(v, self.tv_axes))
        zw: list[np.ndarray] = []
        if wav is not None:
            zw = self.dual_w or [np.zeros(wav.detail.shape, np.complex128) for _ in shifts]
        bound = np.where(wav.detail, self.lw, 0.0) if wav is not None else None
        pz, pzw, t = z, zw, 1.0
        for _ in range(self.inner_iter):
            x = v - gamma * self._kh(z, zw, shifts, v)
            z_new = self._project_tv(z + step * _grad(x, self.tv_axes))
            zw_new = []
            for zk, s in zip(zw, shifts, strict=True):
                assert wav is not None
                c = zk + step * wav.forward(x, s) / k
                zw_new.append(c * np.minimum(1.0, bound / np.maximum(np.abs(c), 1e-30)))
            t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
            beta = (t - 1) / t_new
            z = z_new + beta * (z_new - pz)
            zw = [a + beta * (a - b) for a, b in zip(zw_new, pzw, strict=True)]
            pz, pzw, t = z_new, zw_new, t_new
        self.dual_tv, self.dual_w = pz, (pzw or None)
        return v - gamma * self._kh(pz, pzw, shifts, v)

    def _kh(self, z: Tensor, zw: list[np.ndarray], shifts: list[list[int]], like: Tensor) -> Tensor:
        out = _grad_adjoint(z, self.tv_axes)
        if zw and self.wavelet is not None:
            k = len(shifts)
            for zk, s in zip(zw, shifts, strict=True):
                out = out + self.wavelet.adjoint(zk, s, like) / k
        return out


# --------------------------------------------------------------------------------------------
# The solver.
# --------------------------------------------------------------------------------------------


def fista(
    op: SenseOp, y: Tensor, reg: Regulariser, max_iter: int, tol: float
) -> tuple[Tensor, int]:
    """FISTA for ``1/2 ||A x - y||^2 + R(x)``; stops when ``||x_k - x_{k-1}|| / ||x_k|| < tol``.

    The step is ``1 / L`` with ``L = max_r sum_c |S_c(r)|^2 * max|M|^2 >= ||A||^2`` (the
    unitary FFT does not change norms), a bound that needs no power iteration and is tight
    for normalised maps, so the iteration is guaranteed to converge.
    """
    aty = op.adjoint(y)
    mask_max = float(op.mask.float().abs().max()) if op.mask is not None else 1.0
    lip = float((op.maps.abs() ** 2).sum(1).amax()) * mask_max**2 or 1.0
    x = aty.clone()
    z, t = x, 1.0
    dims = tuple(range(1, x.ndim))
    # Random shifts make each iterate fluctuate about the solution (a stochastic proximal
    # step), so for them the answer is the mean of the last quarter of the iterates.
    tail_from = max_iter - max_iter // 4 if reg.stochastic else max_iter
    tail, count = torch.zeros_like(x), 0
    it = 0
    while it < max_iter:
        it += 1
        v = z - (op.normal(z) - aty) / lip
        x_new = reg.prox(v, 1.0 / lip) if reg.active else v
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        z = x_new + ((t - 1) / t_new) * (x_new - x)
        change = torch.linalg.vector_norm(x_new - x, dim=dims)
        size = torch.linalg.vector_norm(x_new, dim=dims).clamp_min(1e-30)
        x, t = x_new, t_new
        if it >= tail_from:
            tail, count = tail + x, count + 1
        if not reg.stochastic and tol > 0 and bool((change / size).max() < tol):
            break
    return (tail / count if count else x), it
