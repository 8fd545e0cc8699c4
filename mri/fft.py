"""Centered, orthonormal FFTs over chosen dimensions.

The convention matches fastMRI's ``fft2c`` and SigPy's ``sigpy.fft(center=True, norm="ortho")``:
the zero frequency sits at index ``n // 2`` of every transformed dimension, in image and k-space.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["fftc", "ifftc"]


def _check(x: Tensor, dims: Sequence[int], name: str) -> tuple[int, ...]:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dims, int):
        dims = (dims,)
    dims = tuple(dims)
    if len(dims) == 0:
        raise ValueError(f"{name}: dims must name at least one dimension, got {dims}")
    for d in dims:
        if not isinstance(d, int) or not -x.ndim <= d < x.ndim:
            raise ValueError(
                f"{name}: dims={dims} is out of range for a tensor of shape {tuple(x.shape)} "
                f"(valid: integers in [{-x.ndim}, {x.ndim - 1}])"
            )
    normalized = [d % x.ndim for d in dims]
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"{name}: dims={dims} names a dimension twice")
    return dims


def fftc(x: Tensor, dims: Sequence[int] = (-2, -1)) -> Tensor:
    """Centered orthonormal forward FFT: ``fftshift(fftn(ifftshift(x)))`` over ``dims``.

    Args:
        x: Tensor of any shape; real inputs are transformed as complex.
        dims: Dimensions to transform (an int is accepted for a single dimension).

    Returns:
        Complex tensor of the same shape as ``x``.

    Raises:
        TypeError: If ``x`` is not a tensor.
        ValueError: If ``dims`` is empty, repeats a dimension or is out of range.
    """
    dims = _check(x, dims, "fftc")
    x = torch.fft.ifftshift(x, dim=dims)
    x = torch.fft.fftn(x, dim=dims, norm="ortho")
    return torch.fft.fftshift(x, dim=dims)


def ifftc(x: Tensor, dims: Sequence[int] = (-2, -1)) -> Tensor:
    """Centered orthonormal inverse FFT: ``fftshift(ifftn(ifftshift(x)))`` over ``dims``.

    The exact inverse and adjoint of [`fftc`][mri.fft.fftc] for the same ``dims``.

    Args:
        x: Tensor of any shape; real inputs are transformed as complex.
        dims: Dimensions to transform (an int is accepted for a single dimension).

    Returns:
        Complex tensor of the same shape as ``x``.

    Raises:
        TypeError: If ``x`` is not a tensor.
        ValueError: If ``dims`` is empty, repeats a dimension or is out of range.
    """
    dims = _check(x, dims, "ifftc")
    x = torch.fft.ifftshift(x, dim=dims)
    x = torch.fft.ifftn(x, dim=dims, norm="ortho")
    return torch.fft.fftshift(x, dim=dims)
