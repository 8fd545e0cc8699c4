"""Fixtures for the mri physics tests: small deterministic phantoms."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch


def _phantom_2d(n: int) -> torch.Tensor:
    import sigpy

    img = torch.from_numpy(sigpy.shepp_logan((n, n)).astype(np.complex64))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    return img * torch.exp(1j * (0.6 * xx + 0.3 * yy))


def _cine_phantom(frames: int, n: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    out = []
    for t in range(frames):
        cx = n / 2 - 2 + 0.1 * n * np.sin(2 * np.pi * t / frames)
        disc = ((xx - cx) ** 2 + (yy - n / 2) ** 2 < (0.18 * n) ** 2).float()
        body = ((xx - n / 2) ** 2 / (0.4 * n) ** 2 + (yy - n / 2) ** 2 / (0.3 * n) ** 2 < 1).float()
        out.append(disc + 0.5 * body)
    return torch.stack(out).to(torch.complex64)


@pytest.fixture
def phantom_2d() -> Callable[[int], torch.Tensor]:
    """Shepp-Logan with a smooth phase: ``phantom_2d(n)`` is complex64 ``(n, n)``."""
    return _phantom_2d


@pytest.fixture
def cine_phantom() -> Callable[[int, int], torch.Tensor]:
    """A disc moving inside a static ellipse: ``cine_phantom(T, n)`` is complex64 ``(T, n, n)``."""
    return _cine_phantom
