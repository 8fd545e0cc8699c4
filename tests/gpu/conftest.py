"""Settings for the CUDA suite: deterministic kernels, so P-GLEAM can be compared bit for bit.

cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when it first creates a handle, so it is set here, at
collection, before any test touches CUDA; a value the user exported is kept. Run the suite on
its own (``python -m pytest tests/gpu -q``) so that no earlier test initialises cuBLAS first.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(autouse=True)
def _deterministic_cuda_kernels() -> Iterator[None]:
    # Several streams (one per P-GLEAM worker) may share a cuBLAS handle; with a fixed
    # workspace per stream and no autotuning every run picks the same kernels.
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
