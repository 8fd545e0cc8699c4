"""Cartesian undersampling masks: Poisson disc (2D), fastMRI-style 1D random and equispaced
lines, and variable-density k-t line patterns for 2D+time.

Every mask is a float32 tensor of 0/1 in the centered k-space layout of
[`mri.fft.fftc`][mri.fft.fftc] (zero frequency at index ``n // 2``); acceleration means
``number of k-space points / number of sampled points``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import sigpy.mri
import torch
from torch import Tensor

__all__ = [
    "PoissonDiscSampler",
    "poisson_disc_mask",
    "random_1d_mask",
    "equispaced_1d_mask",
    "kt_mask",
]

Seed = int | str | Sequence[int] | None


def _check_shape(where: str, shape: object, ndim: int | None, what: str) -> tuple[int, ...]:
    ok = isinstance(shape, (tuple, list, torch.Size)) and all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in shape
    )
    if ok and ndim is not None:
        ok = len(shape) == ndim
    if ok and ndim is None:
        ok = len(shape) >= 1
    if not ok:
        raise ValueError(f"{where}: shape must be {what} of positive ints, got {shape!r}")
    return tuple(int(s) for s in shape)


def _check_accel(where: str, accel: object) -> float:
    if isinstance(accel, bool) or not isinstance(accel, (int, float)) or not accel >= 1:
        raise ValueError(f"{where}: accel must be a number >= 1, got {accel!r}")
    return float(accel)


def _rng(where: str, seed: Seed) -> np.random.RandomState:
    # fastMRI seeds numpy's legacy RandomState with tuple(map(ord, fname)); accepting a str does
    # the same, so masks seeded by file name are shared by all slices of that file.
    if isinstance(seed, str):
        seed = tuple(map(ord, seed))
    try:
        return np.random.RandomState(seed)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{where}: seed must be None, a non-negative int, a str or a sequence of such ints, "
            f"got {seed!r}"
        ) from err


_POISSON_ATTEMPTS = 16


def poisson_disc_mask(
    shape: tuple[int, int],
    accel: float,
    calib: int | tuple[int, int] = 24,
    seed: int | None = 0,
    tol: float = 0.1,
) -> Tensor:
    """Variable-density Poisson-disc mask for two phase-encode dims, via ``sigpy.mri.poisson``.

    ```python
    mask = poisson_disc_mask((128, 96), accel=8, calib=20)   # float32 (128, 96)
    ```

    The ``calib``-sized centre block (rows ``H//2 - ch//2`` to ``H//2 - ch//2 + ch``) is fully
    sampled, the corners outside the inscribed ellipse are not sampled, and the achieved
    acceleration ``H*W / mask.sum()`` lies within ``tol`` of ``accel``.

    Args:
        shape: ``(H, W)`` of the mask.
        accel: Target acceleration (>= 1; exactly 1 returns a fully sampled mask).
        calib: Side of the fully sampled centre, an int or ``(ch, cw)``.
        seed: Seed for a reproducible pattern; ``None`` draws a fresh one.
        tol: Allowed absolute deviation of the achieved acceleration from ``accel``.

    Returns:
        A float32 tensor of 0/1 with shape ``(H, W)``.

    Raises:
        ValueError: On invalid arguments, when ``accel`` exceeds ``H*W / (ch*cw)`` (the
            calibration block alone is sampled more densely than that), or when SigPy finds
            no pattern within ``tol``.
    """
    where = "poisson_disc_mask"
    h, w = _check_shape(where, shape, 2, "a tuple (H, W)")
    accel = _check_accel(where, accel)
    if isinstance(calib, (int, np.integer)) and not isinstance(calib, bool):
        calib = (int(calib), int(calib))
    if (
        not isinstance(calib, (tuple, list))
        or len(calib) != 2
        or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in calib)
        or not (0 <= calib[0] <= h and 0 <= calib[1] <= w)
    ):
        raise ValueError(
            f"{where}: calib must be an int or a pair (ch, cw) with 0 <= ch <= H={h} and "
            f"0 <= cw <= W={w}, got {calib!r}"
        )
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"{where}: tol must be a number > 0, got {tol!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"{where}: seed must be an int or None, got {seed!r}")
    if accel == 1:
        return torch.ones(h, w)
    calib_area = calib[0] * calib[1]
    if calib_area > 0 and accel > h * w / calib_area + tol:
        raise ValueError(
            f"{where}: accel={accel} cannot be met with calib={tuple(calib)} on shape {(h, w)}: "
            f"the calibration block alone limits acceleration to H*W/(ch*cw) = "
            f"{h * w / calib_area:.3g}; lower accel or calib"
        )
    # SigPy's generator fails for some seeds that land just outside the tolerance; retrying
    # with seeds derived deterministically from the requested one keeps masks reproducible.
    last_err: ValueError | None = None
    for attempt in range(_POISSON_ATTEMPTS):
        trial_seed = None if seed is None else (seed + attempt * 7919) % 2**32
        try:
            mask = sigpy.mri.poisson(
                (h, w), accel, calib=tuple(calib), dtype=np.float32, seed=trial_seed, tol=tol
            )
        except ValueError as err:
            last_err = err
            continue
        return torch.from_numpy(np.ascontiguousarray(mask))
    if last_err is not None:
        err = last_err
        raise ValueError(
            f"{where}: no Poisson-disc pattern for shape={(h, w)}, accel={accel}, "
            f"calib={tuple(calib)} within tol={tol} (SigPy: {err}); the unsampled corners cap "
            "acceleration near 4/pi from below, and small shapes give coarse steps - try "
            f"another accel, a larger tol or a larger shape ({_POISSON_ATTEMPTS} seeds tried)"
        ) from err
    raise AssertionError("unreachable")


class PoissonDiscSampler:
    """Fresh variable-density Poisson-disc masks, cheap enough to draw one per training sample.

    ```python
    sampler = PoissonDiscSampler((320, 320), accel=12, calib=20)
    mask = sampler(seed=1234)                          # float32 (320, 320)
    ```

    The masks are those of [`poisson_disc_mask`][mri.masks.poisson_disc_mask]: SigPy's
    Poisson-disc kernel (``sigpy.mri.samp._poisson``) with its radius law, growing linearly
    with the distance from the calibration block, and its tolerance on the achieved
    acceleration. SigPy bisects the slope of that law over ``[0, max(H, W)]`` for every mask
    (about 14 kernel calls, 6-8 s per 320x320 mask on one core); here the slopes that meet
    ``accel`` for a few calibration seeds bound the search once, and each mask searches only
    inside that bracket, by secant steps (2-3 calls, 0.5-1 s at 320x320, 60 ms at 96x96).
    A mask is a function of its seed alone, so masks are reproducible in any process and
    order. A seed whose bracket search fails falls back to
    [`poisson_disc_mask`][mri.masks.poisson_disc_mask].

    Args:
        shape: ``(H, W)``.
        accel: Target acceleration (> 1).
        calib: Side of the fully sampled centre block, or a pair ``(ch, cw)``.
        tol: Allowed difference between the achieved and the target acceleration.

    Raises:
        ValueError: as [`poisson_disc_mask`][mri.masks.poisson_disc_mask] on arguments that no
            mask can meet (checked by drawing the calibration masks).
    """

    _CALIBRATION_SEEDS = 4
    _MAX_CALLS = 12

    def __init__(
        self,
        shape: tuple[int, int],
        accel: float,
        calib: int | tuple[int, int] = 24,
        tol: float = 0.1,
    ) -> None:
        poisson_disc_mask(shape, accel, calib=calib, seed=0, tol=tol)  # validates, or raises
        from sigpy.mri.samp import _poisson

        self._kernel = _poisson
        self.shape = (int(shape[0]), int(shape[1]))
        self.accel = float(accel)
        self.calib = (
            (int(calib), int(calib)) if isinstance(calib, (int, np.integer)) else tuple(calib)
        )
        self.tol = float(tol)
        h, w = self.shape
        y, x = np.mgrid[:h, :w]
        x = np.maximum(abs(x - w / 2) - self.calib[1] / 2, 0)
        y = np.maximum(abs(y - h / 2) - self.calib[0] / 2, 0)
        self._r = np.sqrt((x / max(x.max(), 1)) ** 2 + (y / max(y.max(), 1)) ** 2)
        self._bracket = (0.0, float(max(h, w)))
        slopes = [self._search(seed, self._bracket)[1] for seed in range(self._CALIBRATION_SEEDS)]
        found = [s for s in slopes if s is not None]
        self._start: float | None = None
        if found:
            self._bracket = (0.8 * min(found), 1.25 * max(found) + 1e-3)
            self._start = float(np.median(found))

    def _draw(self, slope: float, seed: int) -> np.ndarray:
        h, w = self.shape
        scale = 1 + self._r * slope
        radius_x = np.clip(scale * w / max(h, w), 1, None)
        radius_y = np.clip(scale * h / max(h, w), 1, None)
        return self._kernel(w, h, 30, radius_x, radius_y, self.calib, seed)

    def _search(
        self, seed: int, bracket: tuple[float, float], start: float | None = None
    ) -> tuple[np.ndarray | None, float | None]:
        # The achieved acceleration grows smoothly with the slope, so a secant step from the
        # last two tries usually lands within tol in 2-3 kernel calls; a step that leaves
        # the bracket is replaced by bisection, which always shrinks it.
        lo, hi = bracket
        slope = (lo + hi) / 2 if start is None else start
        tried: list[tuple[float, float]] = []
        for _ in range(self._MAX_CALLS):
            mask = self._draw(slope, seed)
            achieved = mask.size / max(float(mask.sum()), 1.0)
            if abs(achieved - self.accel) < self.tol:
                return mask, slope
            lo, hi = (slope, hi) if achieved < self.accel else (lo, slope)
            tried.append((slope, achieved))
            guess = None
            if len(tried) >= 2 and tried[-1][1] != tried[-2][1]:
                (s1, a1), (s2, a2) = tried[-2:]
                guess = s2 + (self.accel - a2) * (s2 - s1) / (a2 - a1)
            slope = guess if guess is not None and lo < guess < hi else (lo + hi) / 2
        return None, None

    def __call__(self, seed: int) -> Tensor:
        """The mask of ``seed`` (a non-negative int), float32 ``(H, W)``."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"PoissonDiscSampler: seed must be an int >= 0, got {seed!r}")
        seed = int(seed) % 2**32
        state = np.random.get_state()  # the kernel seeds numpy's global generator
        try:
            mask, _ = self._search(seed, self._bracket, self._start)
        finally:
            np.random.set_state(state)
        if mask is None:
            return poisson_disc_mask(
                self.shape, self.accel, calib=self.calib, seed=seed, tol=self.tol
            )
        return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))


def _center_lines(where: str, num_cols: int, center_fraction: object) -> int:
    if (
        isinstance(center_fraction, bool)
        or not isinstance(center_fraction, (int, float))
        or not 0 <= center_fraction <= 1
    ):
        raise ValueError(f"{where}: center_fraction must be in [0, 1], got {center_fraction!r}")
    return int(round(num_cols * center_fraction))


def _lines_to_mask(lines: np.ndarray, shape: tuple[int, ...]) -> Tensor:
    row = torch.from_numpy(lines.astype(np.float32))
    return row.expand(shape).contiguous()


def random_1d_mask(
    shape: Sequence[int], accel: float, center_fraction: float = 0.08, seed: Seed = 0
) -> Tensor:
    """fastMRI's random column mask (``RandomMaskFunc`` with one acceleration).

    ```python
    mask = random_1d_mask((640, 368), accel=4, center_fraction=0.08, seed="file1000.h5")
    ```

    The ``round(W * center_fraction)`` centre columns are always sampled; every other column
    is sampled with probability ``(W / accel - n_center) / (W - n_center)``, so the expected
    acceleration is ``accel``. Columns are the last dim and are shared by all rows. The random
    draws replay fastMRI's exactly, so a file-name seed gives fastMRI's mask for that file;
    using one seed per volume gives every slice the same mask.

    Args:
        shape: Mask shape ``(..., W)``; sampling is along the last dim.
        accel: Target acceleration (>= 1).
        center_fraction: Fraction of fully sampled centre columns, in ``[0, 1]``.
        seed: An int, a sequence of ints, a str (e.g. the file name) or ``None``.

    Returns:
        A float32 tensor of 0/1 with the given shape.

    Raises:
        ValueError: On invalid arguments, or if the centre alone exceeds ``W / accel`` lines.
    """
    where = "random_1d_mask"
    shape = _check_shape(where, shape, None, "a tuple (..., W)")
    accel = _check_accel(where, accel)
    num_cols = shape[-1]
    num_low = _center_lines(where, num_cols, center_fraction)
    if num_low > num_cols / accel:
        raise ValueError(
            f"{where}: center_fraction={center_fraction} samples {num_low} of {num_cols} columns, "
            f"more than W/accel = {num_cols / accel:.3g} for accel={accel}; lower one of them"
        )
    rng = _rng(where, seed)
    rng.randint(0, 1)  # fastMRI's choice among (center_fraction, accel) pairs draws first
    if num_low == num_cols:
        lines = np.ones(num_cols, dtype=bool)
    else:
        prob = (num_cols / accel - num_low) / (num_cols - num_low)
        lines = rng.uniform(size=num_cols) < prob
    pad = (num_cols - num_low + 1) // 2
    lines[pad : pad + num_low] = True
    return _lines_to_mask(lines, shape)


def equispaced_1d_mask(
    shape: Sequence[int], accel: float, center_fraction: float = 0.08, seed: Seed = 0
) -> Tensor:
    """fastMRI's equispaced column mask that keeps a fraction ``1 / accel`` of the columns.

    ```python
    mask = equispaced_1d_mask((640, 368), accel=4, center_fraction=0.08, seed=0)
    ```

    This is fastMRI's ``EquispacedMaskFractionFunc`` (fastMRI >= 0.2) with one acceleration,
    which is what fastMRI 0.1 called ``EquispacedMaskFunc``. It is not the newer
    ``EquispacedMaskFunc``, which samples every ``accel``-th column exactly (so the centre
    comes on top and the total exceeds ``W / accel``). The centre columns as in
    [`random_1d_mask`][mri.masks.random_1d_mask], plus columns at
    ``round(offset + k * a)`` with ``a = accel * (n_center - W) / (n_center * accel - W)`` and
    a random ``offset`` in ``[0, round(a))``, which brings the total close to ``W / accel``.
    Spacings alternate between ``floor(a)`` and ``ceil(a)`` where ``a`` is not an integer, as in
    fastMRI.

    Args:
        shape: Mask shape ``(..., W)``; sampling is along the last dim.
        accel: Target acceleration (>= 1).
        center_fraction: Fraction of fully sampled centre columns, in ``[0, 1]``.
        seed: An int, a sequence of ints, a str (e.g. the file name) or ``None``.

    Returns:
        A float32 tensor of 0/1 with the given shape.

    Raises:
        ValueError: On invalid arguments, or if the centre alone reaches ``W / accel`` lines.
    """
    where = "equispaced_1d_mask"
    shape = _check_shape(where, shape, None, "a tuple (..., W)")
    accel = _check_accel(where, accel)
    num_cols = shape[-1]
    num_low = _center_lines(where, num_cols, center_fraction)
    if num_low * accel >= num_cols:
        raise ValueError(
            f"{where}: center_fraction={center_fraction} samples {num_low} of {num_cols} columns, "
            f"at least W/accel = {num_cols / accel:.3g} for accel={accel}, leaving nothing to "
            "space out; lower center_fraction or accel"
        )
    rng = _rng(where, seed)
    rng.randint(0, 1)  # fastMRI's choice among (center_fraction, accel) pairs draws first
    lines = np.zeros(num_cols, dtype=bool)
    pad = (num_cols - num_low + 1) // 2
    lines[pad : pad + num_low] = True
    spacing = accel * (num_low - num_cols) / (num_low * accel - num_cols)
    offset = rng.randint(0, round(spacing))
    picks = np.around(np.arange(offset, num_cols - 1, spacing)).astype(np.int64)
    lines[picks] = True
    return _lines_to_mask(lines, shape)


#: The golden ratio's fractional part: frame t shifts the lattice by round(t * GOLDEN * R) mod R,
#: so consecutive frames interleave and no short run of frames repeats a shift.
_GOLDEN = (math.sqrt(5) - 1) / 2


def _vd_warp(u: np.ndarray, accel: float, vd_degree: float) -> np.ndarray:
    """Pull uniform positions ``u`` in [-1, 1] towards the centre, keeping the ends fixed.

    ``u * (a |u| + b) ** d`` with ``b = V ** -1``, ``a = 1 - b`` and ``V = accel ** (1 / d)``:
    at the centre the spacing shrinks by ``b ** d = 1 / accel`` (the lattice's ``accel``
    spacing becomes one line, so the centre is sampled densely), at the edge the factor is 1.
    """
    if vd_degree == 0:
        return u
    b = accel ** (-1.0 / vd_degree)
    return u * ((1 - b) * np.abs(u) + b) ** vd_degree


def _snap(positions: np.ndarray, taken: np.ndarray, center: int) -> None:
    """Put every continuous line position on a free grid line of ``taken``, in place.

    Positions are placed from the centre outwards; one whose line is taken moves to the next
    free line further out (and, past the edge, to the nearest free line further in), so close
    positions near the centre spread out instead of merging and the line count is kept.
    """
    w = taken.size
    for q in sorted(positions, key=lambda q: abs(q - center)):
        line = min(max(int(math.floor(q + 1e-4)), 0), w - 1)
        step = 1 if q >= center else -1
        probe = line
        while 0 <= probe < w and taken[probe]:
            probe += step
        if not 0 <= probe < w:
            probe = line
            while 0 <= probe < w and taken[probe]:
                probe -= step
        if 0 <= probe < w:
            taken[probe] = True


def kt_mask(
    shape: tuple[int, int, int],
    accel: float,
    calib: int = 8,
    seed: Seed = 0,
    vd_degree: float = 1.5,
    perturb: float = 0.4,
    adhere: float = 0.33,
) -> Tensor:
    """Variable-density k-t (VD-kt) line mask for Cartesian 2D+time, as used for cine.

    ```python
    mask = kt_mask((20, 192, 160), accel=10, calib=0)   # float32 (T, H, W)
    ```

    The sampling the GLEAM paper's cine experiments use (Peng Lai's VD-kt): every frame starts
    from a uniform lattice of phase-encode columns (last dim) ``accel`` apart, shifted from
    frame to frame by the golden ratio (``round(t * 0.618 * accel) mod accel``), so that over
    time the lattices interleave and fill k-space. Each column is jittered by
    ``perturb * accel * (U - 1/2)``, and its neighbours follow by ``adhere`` times that jitter
    (columns within ``perturb * accel`` of the edges stay), which breaks the lattice's coherent
    aliasing. The positions are then warped towards the centre (`_vd_warp`, degree
    ``vd_degree``): spacing one column at the centre, ``accel`` at the edges, so every frame
    reaches the edge of k-space. Positions are snapped to free columns from the centre out.
    The ``calib`` centre columns ``W//2 - calib//2 ...`` are sampled in every frame in place
    of the lattice's ``calib`` innermost columns, so each frame keeps the lattice's
    ``ceil((W - shift) / accel)`` columns, an acceleration of ``accel`` up to rounding.
    All rows (readout, ``H``) of a column are sampled.

    Args:
        shape: ``(T, H, W)``.
        accel: Target acceleration per frame (>= 1).
        calib: Number of centre columns sampled in every frame (0 <= calib <= W).
        seed: An int, a sequence of ints, a str or ``None``.
        vd_degree: Strength of the density warp (>= 0; 0 keeps the jittered uniform lattice,
            the paper's code uses 1.5).
        perturb: Jitter, as a fraction of the lattice spacing (in [0, 1]).
        adhere: How much of a column's jitter its neighbours follow (in [0, 1]).

    Returns:
        A float32 tensor of 0/1 with shape ``(T, H, W)``.

    Raises:
        ValueError: On invalid arguments, or if ``round(W / accel) < calib``.
    """
    where = "kt_mask"
    t, h, w = _check_shape(where, shape, 3, "a tuple (T, H, W)")
    accel = _check_accel(where, accel)
    if isinstance(calib, bool) or not isinstance(calib, (int, np.integer)) or not 0 <= calib <= w:
        raise ValueError(f"{where}: calib must be an int in [0, W={w}], got {calib!r}")
    for name, value, high in (("vd_degree", vd_degree, math.inf), ("perturb", perturb, 1.0),
                              ("adhere", adhere, 1.0)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
            valid = "a number >= 0" if high == math.inf else f"a number in [0, {high:g}]"
            raise ValueError(f"{where}: {name} must be {valid}, got {value!r}")
    n_lines = int(round(w / accel))
    if n_lines < calib:
        raise ValueError(
            f"{where}: accel={accel} keeps round(W/accel) = {n_lines} of W={w} columns per frame, "
            f"fewer than calib={calib}; lower accel or calib"
        )
    rng = _rng(where, seed)
    center = w // 2
    start = center - calib // 2
    lines = np.zeros((t, w), dtype=bool)
    for frame in range(t):
        shift = round(frame * _GOLDEN * accel) % accel
        q = np.arange(shift, w, accel, dtype=np.float64)
        if perturb > 0:
            jitter = perturb * accel * (rng.random_sample(q.size) - 0.5)
            jitter[(q < perturb * accel) | (q >= w - perturb * accel)] = 0
            q = q + jitter
            q[1:] += adhere * jitter[:-1]
            q[:-1] += adhere * jitter[1:]
        q = np.clip(q, 0, w - 1)
        # To [-1, 1] around the centre column (each side scaled to its own length, so both
        # edges stay reachable when W is even), warp, and back to column positions.
        side = np.where(q >= center, max(w - 1 - center, 1), max(center, 1))
        u = _vd_warp((q - center) / side, accel, vd_degree)
        positions = u * side + center
        # The warped lattice is about one column apart at the centre, so its ``calib``
        # innermost positions are what the calibration block replaces: the frame keeps the
        # lattice's column count whatever ``calib`` is.
        inner = np.argsort(np.abs(positions - center), kind="stable")[:calib]
        taken = lines[frame]
        taken[start : start + calib] = True
        _snap(np.delete(positions, inner), taken, center)
    return torch.from_numpy(lines.astype(np.float32))[:, None, :].expand(t, h, w).contiguous()
