"""The multi-coil SENSE forward model and the measurement bundle that unrolled blocks receive.

``A x = M · F(S · x)``: coil sensitivities ``S``, centered orthonormal FFT ``F`` over the encoded
dimensions, sampling mask ``M``. Works for 2D, 3D and 2D+time (FFT over the last two dims only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mri.fft import fftc, ifftc

__all__ = ["SenseOp", "Measurement"]

_COMPLEX = (torch.complex64, torch.complex128)
_REAL_OF = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def _describe(t: Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} tensor of shape {tuple(t.shape)}"


def _require_complex(t: object, name: str, where: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _COMPLEX:
        raise TypeError(
            f"{where}: {name} must be complex (complex64 or complex128), got a {_describe(t)}; "
            "build one with torch.complex(real, imag) or torch.view_as_complex"
        )
    return t


def _parse_fft_dims(fft_dims: int | Sequence[int] | None, maps: Tensor) -> tuple[int, ...]:
    n_spatial = maps.ndim - 2
    if fft_dims is None:
        return tuple(range(-n_spatial, 0))
    if isinstance(fft_dims, bool):
        raise TypeError(f"SenseOp: fft_dims must be an int or a sequence of ints, got {fft_dims!r}")
    if isinstance(fft_dims, int):
        if not 1 <= fft_dims <= n_spatial:
            raise ValueError(
                f"SenseOp: fft_dims={fft_dims} but maps of shape {tuple(maps.shape)} have "
                f"{n_spatial} spatial dims; valid: an int in [1, {n_spatial}] (the number of "
                "trailing dims to Fourier transform), e.g. 2 for 2D or 2D+time, 3 for 3D"
            )
        return tuple(range(-fft_dims, 0))
    try:
        dims = tuple(fft_dims)
    except TypeError:
        raise TypeError(
            f"SenseOp: fft_dims must be None, an int or a sequence of ints, got {fft_dims!r}"
        ) from None
    if (
        len(dims) == 0
        or any(not isinstance(d, int) or isinstance(d, bool) for d in dims)
        or any(not -n_spatial <= d <= -1 for d in dims)
        or len(set(dims)) != len(dims)
    ):
        raise ValueError(
            f"SenseOp: fft_dims={fft_dims!r} is invalid for maps of shape {tuple(maps.shape)}; "
            f"valid: distinct negative spatial dims in [{-n_spatial}, -1], e.g. (-2, -1)"
        )
    return tuple(sorted(dims))


class SenseOp:
    """Multi-coil Cartesian SENSE operator ``A x = M · F(S · x)``.

    ```python
    op = SenseOp(maps, mask)            # maps (B, C, H, W), mask (H, W)
    y = op(x)                           # x (B, H, W) complex -> k-space (B, C, H, W)
    x_zf = op.adjoint(y)                # back to (B, H, W)
    ```

    Shapes (``B`` batch, ``C`` coils):

    | problem | image ``x``  | maps                            | k-space         | FFT over |
    |---------|--------------|---------------------------------|-----------------|----------|
    | 2D      | (B, H, W)    | (B, C, H, W)                    | (B, C, H, W)    | H, W     |
    | 3D      | (B, D, H, W) | (B, C, D, H, W)                 | (B, C, D, H, W) | D, H, W  |
    | 2D+time | (B, T, H, W) | (B, C, T, H, W) or (B, C, H, W) | (B, C, T, H, W) | H, W     |

    Which one is meant is told by ``fft_dims``: by default every spatial dim of ``maps`` is
    transformed (2D for 4-D maps, 3D for 5-D maps); ``fft_dims=2`` with 5-D maps makes it
    2D+time. Maps of shape ``(B, C, H, W)`` are shared over time when the image has a time
    axis, so one operator built from 4-D maps serves both ``(B, H, W)`` and ``(B, T, H, W)``
    images.

    The operator is dtype-generic: complex64 by default, complex128 works (e.g. for
    ``torch.autograd.gradcheck``); image and k-space must have the dtype of ``maps``.

    Args:
        maps: Coil sensitivities, complex, ``(B, C, *spatial)``.
        mask: Sampling mask (bool or real floating), broadcastable to the k-space shape
            ``(B, C, *spatial)`` without enlarging it, e.g. ``(H, W)``, ``(B, 1, H, W)`` or
            ``(T, H, W)``. ``None`` means fully sampled. Real weights are allowed; the
            adjoint applies the same real weights, so ``A^H`` stays the exact adjoint.
        fft_dims: ``None`` (all spatial dims of ``maps``), an int ``n`` (the last ``n`` dims),
            or a sequence of distinct negative dims such as ``(-2, -1)``.

    Raises:
        TypeError: If ``maps`` is not complex or ``mask`` is complex / not a tensor.
        ValueError: If ``maps`` has the wrong rank, ``fft_dims`` is invalid, or ``mask`` does
            not broadcast to the k-space shape.
    """

    def __init__(
        self,
        maps: Tensor,
        mask: Tensor | None = None,
        fft_dims: int | Sequence[int] | None = None,
    ) -> None:
        _require_complex(maps, "maps", "SenseOp")
        if maps.ndim not in (4, 5):
            raise ValueError(
                f"SenseOp: maps must be (B, C, H, W) or (B, C, D|T, H, W), got a {_describe(maps)}"
            )
        self.maps = maps
        self.fft_dims = _parse_fft_dims(fft_dims, maps)
        if mask is not None:
            if not isinstance(mask, Tensor):
                raise TypeError(f"SenseOp: mask must be a torch.Tensor or None, got {type(mask)}")
            if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
                raise TypeError(
                    f"SenseOp: mask must be bool or real floating point, got a {_describe(mask)}"
                )
            shapes = [tuple(maps.shape)]
            if maps.ndim == 4:
                # 4-D maps may be shared over a time axis, so a (T, H, W) mask is legitimate.
                shapes.append((maps.shape[0], maps.shape[1], 1, *maps.shape[2:]))
            if not any(self._mask_fits(mask, s, allow_grow=len(s) == 5) for s in shapes):
                raise ValueError(
                    f"SenseOp: mask of shape {tuple(mask.shape)} does not broadcast to the "
                    f"k-space shape {tuple(maps.shape)} (B, C, *spatial) of maps; valid masks "
                    "are e.g. (*spatial), (B, 1, *spatial) or (1, 1, *spatial)"
                )
        self.mask = mask

    @staticmethod
    def _mask_fits(mask: Tensor, kshape: tuple[int, ...], allow_grow: bool = False) -> bool:
        if mask.ndim > len(kshape):
            return False
        for m, k in zip(reversed(mask.shape), reversed(kshape), strict=False):
            if m != 1 and m != k and not (allow_grow and k == 1):
                return False
        return True

    @property
    def dtype(self) -> torch.dtype:
        """The complex dtype of images and k-space (that of ``maps``)."""
        return self.maps.dtype

    @property
    def device(self) -> torch.device:
        """The device of ``maps``."""
        return self.maps.device

    def _check_input(self, t: Tensor, name: str, where: str, is_image: bool) -> bool:
        _require_complex(t, name, where)
        if t.dtype != self.maps.dtype:
            raise TypeError(
                f"{where}: {name} is a {_describe(t)} but maps are a "
                f"{_describe(self.maps)}; convert one of them (e.g. op.to(dtype={t.dtype}))"
            )
        if t.device != self.maps.device:
            raise ValueError(
                f"{where}: {name} is on {t.device} but maps are on {self.maps.device}; "
                f"use op.to({str(t.device)!r})"
            )
        m = self.maps
        base = m.ndim - 1 if is_image else m.ndim
        shared = m.ndim == 4 and t.ndim == base + 1
        if t.ndim != base and not shared:
            if is_image:
                valid = "(B, *spatial)" + (" or (B, T, H, W)" if m.ndim == 4 else "")
            else:
                valid = "(B, C, *spatial)" + (" or (B, C, T, H, W)" if m.ndim == 4 else "")
            raise ValueError(
                f"{where}: {name} is a {_describe(t)}, which does not fit maps of shape "
                f"{tuple(m.shape)}; valid: {valid}"
            )
        lead = (m.shape[0],) if is_image else tuple(m.shape[:2])
        ok = tuple(t.shape[: len(lead)]) == lead and tuple(t.shape[-(m.ndim - 2) :]) == tuple(
            m.shape[2:]
        )
        if not ok:
            expected = (*lead, *(("T",) if shared else ()), *m.shape[2:])
            raise ValueError(
                f"{where}: {name} has shape {tuple(t.shape)} but maps of shape "
                f"{tuple(m.shape)} require {expected}"
            )
        return shared

    def _masked(self, k: Tensor) -> Tensor:
        if self.mask is None:
            return k
        if not self._mask_fits(self.mask, tuple(k.shape)):
            raise ValueError(
                f"SenseOp: mask of shape {tuple(self.mask.shape)} does not broadcast to k-space "
                f"of shape {tuple(k.shape)}"
            )
        return k * self.mask.to(dtype=_REAL_OF[k.dtype])

    def _maps_for(self, shared: bool) -> Tensor:
        return self.maps.unsqueeze(2) if shared else self.maps

    def forward(self, x: Tensor) -> Tensor:
        """Apply ``A``: image ``(B, *spatial)`` to masked multi-coil k-space ``(B, C, *spatial)``.

        Args:
            x: Complex image with the dtype and device of ``maps``.

        Returns:
            ``M · F(S · x)``.

        Raises:
            TypeError: If ``x`` is real or its dtype differs from ``maps``.
            ValueError: If its shape or device does not fit ``maps``.
        """
        shared = self._check_input(x, "x", "SenseOp.forward", is_image=True)
        coil_images = x.unsqueeze(1) * self._maps_for(shared)
        return self._masked(fftc(coil_images, dims=self.fft_dims))

    __call__ = forward

    def adjoint(self, y: Tensor) -> Tensor:
        """Apply ``A^H``: k-space ``(B, C, *spatial)`` to a coil-combined image ``(B, *spatial)``.

        Computes ``sum_c conj(S_c) · F^H(M · y_c)``.

        Args:
            y: Complex k-space with the dtype and device of ``maps``.

        Returns:
            The coil-combined image.

        Raises:
            TypeError: If ``y`` is real or its dtype differs from ``maps``.
            ValueError: If its shape or device does not fit ``maps``.
        """
        shared = self._check_input(y, "y", "SenseOp.adjoint", is_image=False)
        coil_images = ifftc(self._masked(y), dims=self.fft_dims)
        return (self._maps_for(shared).conj() * coil_images).sum(dim=1)

    def normal(self, x: Tensor) -> Tensor:
        """Apply the normal operator ``A^H A`` to an image ``(B, *spatial)``.

        Args:
            x: Complex image with the dtype and device of ``maps``.

        Returns:
            ``A^H(A x)``, same shape as ``x``.
        """
        return self.adjoint(self.forward(x))

    def to(
        self,
        device: torch.device | str | int | torch.dtype | None = None,
        dtype: torch.dtype | None = None,
        non_blocking: bool = False,
    ) -> SenseOp:
        """Return a new operator with maps and mask moved (and optionally cast).

        Args:
            device: Target device; a complex dtype may also be given here, as in
                ``op.to(torch.complex128)``.
            dtype: Complex dtype for ``maps``; a floating mask is cast to the matching real
                dtype, a bool mask stays bool.
            non_blocking: Passed on to ``Tensor.to``.

        Returns:
            A new [`SenseOp`][mri.physics.SenseOp]; ``self`` is left unchanged.

        Raises:
            TypeError: If ``dtype`` is not complex64 or complex128.
        """
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if dtype is not None and dtype not in _COMPLEX:
            raise TypeError(f"SenseOp.to: dtype must be complex64 or complex128, got {dtype}")
        maps = self.maps.to(device=device, dtype=dtype, non_blocking=non_blocking)
        mask = self.mask
        if mask is not None:
            mask_dtype = (
                _REAL_OF[dtype] if dtype is not None and mask.dtype.is_floating_point else None
            )
            mask = mask.to(device=device, dtype=mask_dtype, non_blocking=non_blocking)
        return SenseOp(maps, mask, fft_dims=self.fft_dims)

    def __repr__(self) -> str:
        mask = "None" if self.mask is None else str(tuple(self.mask.shape))
        return (
            f"SenseOp(maps={tuple(self.maps.shape)}, mask={mask}, fft_dims={self.fft_dims}, "
            f"dtype={self.dtype}, device={self.device})"
        )


class Measurement:
    """What an unrolled block needs from the acquisition: the operator and the k-space.

    ```python
    meas = Measurement(SenseOp(maps, mask), kspace)
    x = meas.zero_filled()              # A^H y, the usual network input
    x = block(x, meas)                  # every block is called as block(x, meas)
    ```

    Args:
        op: The forward operator.
        kspace: Measured (undersampled) k-space ``(B, C, *spatial)``, complex, with the dtype
            and device of ``op.maps``. Entries outside the mask are ignored by ``op.adjoint``.

    Raises:
        TypeError: If ``op`` is not a [`SenseOp`][mri.physics.SenseOp] or ``kspace`` is not
            complex / has another dtype.
        ValueError: If the k-space shape or device does not fit the operator.
    """

    def __init__(self, op: SenseOp, kspace: Tensor) -> None:
        if not isinstance(op, SenseOp):
            raise TypeError(f"Measurement: op must be a SenseOp, got {type(op).__name__}")
        op._check_input(kspace, "kspace", "Measurement", is_image=False)
        if op.mask is not None and not op._mask_fits(op.mask, tuple(kspace.shape)):
            raise ValueError(
                f"Measurement: the op's mask of shape {tuple(op.mask.shape)} does not broadcast "
                f"to kspace of shape {tuple(kspace.shape)}"
            )
        self.op = op
        self.kspace = kspace

    def zero_filled(self) -> Tensor:
        """The zero-filled, coil-combined image ``A^H y`` of shape ``(B, *spatial)``."""
        return self.op.adjoint(self.kspace)

    def to(
        self,
        device: torch.device | str | int | torch.dtype | None = None,
        dtype: torch.dtype | None = None,
        non_blocking: bool = False,
    ) -> Measurement:
        """Return a moved (and optionally cast) copy; ``self`` is left unchanged.

        Args:
            device: Target device (or a complex dtype, as in ``meas.to(torch.complex128)``).
            dtype: Complex dtype for maps and k-space.
            non_blocking: Passed on to ``Tensor.to``.

        Returns:
            A new [`Measurement`][mri.physics.Measurement].
        """
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        op = self.op.to(device, dtype=dtype, non_blocking=non_blocking)
        kspace = self.kspace.to(device=device, dtype=dtype, non_blocking=non_blocking)
        return Measurement(op, kspace)

    def __repr__(self) -> str:
        return f"Measurement(op={self.op!r}, kspace={tuple(self.kspace.shape)})"
