"""Structured random phantoms: the images behind the built-in simulated data.

Each phantom is a body outline filled with random ellipses (ellipsoids in 3D) of varied size,
orientation and intensity. Every ellipse carries one of three textures so that a network has
more to learn than piecewise-constant regions: flat, a smooth low-frequency field, or a fine
grating (edges and high spatial frequencies). Cine phantoms add a "heart": nested ellipses that
contract and dilate periodically over the frames. Everything is drawn from a
`numpy.random.Generator`, so a phantom is a pure function of its seed.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["TEXTURES", "cine_phantom", "random_phantom", "smooth_field", "smooth_phase"]

#: The textures an ellipse can carry.
TEXTURES = ("flat", "smooth", "fine")


def _check_shape(shape: tuple[int, ...], ranks: tuple[int, ...], name: str = "shape") -> None:
    if not isinstance(shape, (tuple, list)) or len(shape) not in ranks:
        raise ValueError(
            f"{name} must be a tuple of {' or '.join(map(str, ranks))} ints, got {shape!r}"
        )
    if not all(isinstance(n, (int, np.integer)) and n >= 4 for n in shape):
        raise ValueError(f"{name} entries must be ints >= 4, got {shape!r}")


def _grid(shape: tuple[int, ...]) -> np.ndarray:
    """Coordinates in [-1, 1) along each axis, stacked: ``(ndim, *shape)``."""
    axes = [np.linspace(-1.0, 1.0, n, endpoint=False, dtype=np.float32) for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def _rotation(ndim: int, rng: np.random.Generator) -> np.ndarray:
    if ndim == 2:
        theta = rng.uniform(0.0, math.pi)
        c, s = math.cos(theta), math.sin(theta)
        return np.array([[c, -s], [s, c]], dtype=np.float32)
    # QR of a Gaussian matrix gives a uniformly random orthogonal matrix.
    q, r = np.linalg.qr(rng.standard_normal((ndim, ndim)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def smooth_field(
    shape: tuple[int, ...], rng: np.random.Generator, cycles: float = 3.0
) -> np.ndarray:
    """A random smooth real field in [-1, 1], band-limited to about ``cycles`` per field of view.

    Args:
        shape: the grid shape (any rank).
        rng: the random generator.
        cycles: the Gaussian low-pass cutoff, in cycles per field of view.

    Returns:
        A float32 array of ``shape`` with max magnitude 1.
    """
    noise = rng.standard_normal(shape)
    freqs = np.meshgrid(*[np.fft.fftfreq(n) * n for n in shape], indexing="ij")
    k2 = sum(f**2 for f in freqs)
    field = np.fft.ifftn(np.fft.fftn(noise) * np.exp(-k2 / (2.0 * cycles**2))).real
    field -= field.mean()
    return (field / max(np.abs(field).max(), 1e-12)).astype(np.float32)


def smooth_phase(
    shape: tuple[int, ...], rng: np.random.Generator, max_phase: float = math.pi
) -> np.ndarray:
    """A smooth random phase map in [-max_phase, max_phase], like B0 and receive phase.

    Args:
        shape: the grid shape.
        rng: the random generator.
        max_phase: the largest absolute phase, in radians.

    Returns:
        A float32 array of ``shape``.
    """
    if not max_phase >= 0:
        raise ValueError(f"max_phase must be >= 0, got {max_phase!r}")
    return (max_phase * smooth_field(shape, rng, cycles=1.5)).astype(np.float32)


def _texture(
    kind: str, grid: np.ndarray, local: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    if kind == "flat":
        return np.ones(grid.shape[1:], dtype=np.float32)
    if kind == "smooth":
        return 1.0 + rng.uniform(0.2, 0.5) * smooth_field(
            grid.shape[1:], rng, rng.uniform(2.0, 6.0)
        )
    # A grating in the ellipse's own frame: fine structure that moves and turns with it.
    direction = rng.standard_normal(local.shape[0]).astype(np.float32)
    direction /= np.linalg.norm(direction)
    freq = rng.uniform(6.0, 16.0)
    phase = np.tensordot(direction, local, axes=1)
    return 1.0 + rng.uniform(0.2, 0.4) * np.sin(2.0 * math.pi * freq * phase + rng.uniform(0, 6.3))


class _Ellipse:
    """One textured ellipse (ellipsoid); drawn once, painted at any scale of its axes."""

    def __init__(self, ndim: int, rng: np.random.Generator, center_range: float, axes: tuple):
        self.center = rng.uniform(-center_range, center_range, ndim).astype(np.float32)
        self.axes = rng.uniform(axes[0], axes[1], ndim).astype(np.float32)
        self.rotation = _rotation(ndim, rng)
        self.intensity = float(rng.uniform(0.15, 1.0))
        self.texture_kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
        self._rng_seed = int(rng.integers(2**31))

    def local(self, grid: np.ndarray) -> np.ndarray:
        offset = grid - self.center.reshape(-1, *([1] * (grid.ndim - 1)))
        return np.tensordot(self.rotation.T, offset, axes=1)

    def paint(self, image: np.ndarray, grid: np.ndarray, scale: float = 1.0) -> None:
        local = self.local(grid)
        inside = ((local / (scale * self.axes).reshape(-1, *([1] * (grid.ndim - 1)))) ** 2).sum(0)
        inside = inside <= 1.0
        if not inside.any():
            return
        if not hasattr(self, "_texture"):
            # Drawn from its own generator so the texture does not depend on paint order.
            rng = np.random.default_rng(self._rng_seed)
            self._texture = _texture(self.texture_kind, grid, local, rng)
        image[inside] = self.intensity * self._texture[inside]


def _draw_scene(ndim: int, rng: np.random.Generator, num_ellipses: int) -> list[_Ellipse]:
    body = _Ellipse(ndim, rng, center_range=0.05, axes=(0.7, 0.9))
    body.intensity = float(rng.uniform(0.2, 0.4))
    body.texture_kind = "smooth"
    return [body] + [
        _Ellipse(ndim, rng, center_range=0.45, axes=(0.06, 0.35)) for _ in range(num_ellipses)
    ]


def _check_count(num_ellipses: int) -> None:
    if not isinstance(num_ellipses, (int, np.integer)) or num_ellipses < 0:
        raise ValueError(f"num_ellipses must be an int >= 0, got {num_ellipses!r}")


def random_phantom(
    shape: tuple[int, ...], rng: np.random.Generator, num_ellipses: int | None = None
) -> np.ndarray:
    """A random textured-ellipse magnitude phantom, 2D or 3D, with maximum 1.

    Example:
        >>> img = random_phantom((64, 64), np.random.default_rng(0))
        >>> img.shape, float(img.max())
        ((64, 64), 1.0)

    Args:
        shape: ``(H, W)`` or ``(D, H, W)``, each at least 4.
        rng: the random generator; the phantom is a function of its state.
        num_ellipses: ellipses inside the body outline; drawn from 6..14 if None.

    Returns:
        A float32 array of ``shape`` in [0, 1].

    Raises:
        ValueError: if ``shape`` is not 2D or 3D, or ``num_ellipses`` is negative.
    """
    _check_shape(shape, (2, 3))
    if num_ellipses is None:
        num_ellipses = int(rng.integers(6, 15))
    _check_count(num_ellipses)
    grid = _grid(tuple(shape))
    image = np.zeros(shape, dtype=np.float32)
    for ellipse in _draw_scene(len(shape), rng, num_ellipses):
        ellipse.paint(image, grid)
    np.clip(image, 0.0, None, out=image)
    return image / max(float(image.max()), 1e-12)


def cine_phantom(
    frames: int,
    shape: tuple[int, int],
    rng: np.random.Generator,
    num_ellipses: int | None = None,
    cycles: float = 1.0,
) -> np.ndarray:
    """A 2D+time phantom with a beating "heart": nested ellipses that contract and dilate.

    The static anatomy is a `random_phantom`-like scene; the heart (a bright ring around a
    textured cavity) scales its axes by ``1 + a sin(2 pi cycles t / frames + phi)`` with a random
    amplitude ``a`` in [0.1, 0.25].

    Args:
        frames: number of time frames ``T`` (>= 2).
        shape: ``(H, W)``.
        rng: the random generator.
        num_ellipses: static ellipses; drawn from 4..9 if None.
        cycles: heart beats over the ``frames``.

    Returns:
        A float32 array ``(T, H, W)`` in [0, 1].

    Raises:
        ValueError: on a bad ``frames``, ``shape``, ``num_ellipses`` or ``cycles``.
    """
    if not isinstance(frames, (int, np.integer)) or frames < 2:
        raise ValueError(f"frames must be an int >= 2, got {frames!r}")
    _check_shape(shape, (2,))
    if not cycles > 0:
        raise ValueError(f"cycles must be > 0, got {cycles!r}")
    if num_ellipses is None:
        num_ellipses = int(rng.integers(4, 10))
    _check_count(num_ellipses)
    grid = _grid(tuple(shape))
    static = np.zeros(shape, dtype=np.float32)
    for ellipse in _draw_scene(2, rng, num_ellipses):
        ellipse.paint(static, grid)

    wall = _Ellipse(2, rng, center_range=0.2, axes=(0.2, 0.3))
    wall.intensity, wall.texture_kind = float(rng.uniform(0.5, 0.7)), "smooth"
    cavity = _Ellipse(2, rng, center_range=0.0, axes=(0.0, 1.0))
    cavity.center, cavity.rotation = wall.center, wall.rotation
    cavity.axes = wall.axes * np.float32(rng.uniform(0.6, 0.75))
    cavity.intensity, cavity.texture_kind = 1.0, TEXTURES[int(rng.integers(2))]
    amplitude, phi = rng.uniform(0.1, 0.25), rng.uniform(0.0, 2.0 * math.pi)

    movie = np.empty((frames, *shape), dtype=np.float32)
    for t in range(frames):
        scale = 1.0 + amplitude * math.sin(2.0 * math.pi * cycles * t / frames + phi)
        movie[t] = static
        wall.paint(movie[t], grid, scale)
        cavity.paint(movie[t], grid, scale)
    np.clip(movie, 0.0, None, out=movie)
    return movie / max(float(movie.max()), 1e-12)
