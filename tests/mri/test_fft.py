"""The centered orthonormal FFT equals SigPy's and fastMRI's definitions for any dims and sizes."""

from __future__ import annotations

import numpy as np
import pytest
import sigpy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mri import fftc, ifftc


@st.composite
def array_and_dims(draw):
    ndim = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim))
    dims = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    negative = draw(st.booleans())
    dims = [d - ndim if negative else d for d in dims]
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    return x, tuple(dims)


@settings(max_examples=60, deadline=None)
@given(array_and_dims())
def test_fftc_matches_sigpy_centered_ortho_fft(case):
    x, dims = case
    got = fftc(torch.from_numpy(x), dims=dims).numpy()
    want = sigpy.fft(x, axes=dims, center=True, norm="ortho")
    np.testing.assert_allclose(got, want, atol=1e-10)


@settings(max_examples=60, deadline=None)
@given(array_and_dims())
def test_ifftc_matches_sigpy_centered_ortho_ifft(case):
    x, dims = case
    got = ifftc(torch.from_numpy(x), dims=dims).numpy()
    want = sigpy.ifft(x, axes=dims, center=True, norm="ortho")
    np.testing.assert_allclose(got, want, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(array_and_dims())
def test_fftc_matches_fastmri_formula_and_inverts(case):
    x, dims = case
    # fastMRI's fft2c: ifftshift, fftn (ortho), fftshift over the same dims.
    want = np.fft.fftshift(
        np.fft.fftn(np.fft.ifftshift(x, axes=dims), axes=dims, norm="ortho"), axes=dims
    )
    t = torch.from_numpy(x)
    np.testing.assert_allclose(fftc(t, dims).numpy(), want, atol=1e-10)
    np.testing.assert_allclose(ifftc(fftc(t, dims), dims).numpy(), x, atol=1e-10)


def test_fftc_default_dims_are_last_two_and_keep_complex64():
    x = torch.randn(2, 3, 5, 6, dtype=torch.complex64)
    y = fftc(x)
    assert y.dtype == torch.complex64
    torch.testing.assert_close(y, fftc(x, dims=(2, 3)))
    # Orthonormal: energy is preserved.
    torch.testing.assert_close(y.abs().pow(2).sum(), x.abs().pow(2).sum(), rtol=1e-5, atol=0)


def test_zero_frequency_sits_at_n_over_2():
    for n in (4, 5):
        k = fftc(torch.ones(n, n, dtype=torch.complex64))
        assert k.abs().argmax().item() == (n // 2) * n + n // 2


@pytest.mark.parametrize(
    "dims, match",
    [((), "at least one"), ((0, 0), "twice"), ((3,), "out of range"), ((-4,), "out of range")],
)
def test_bad_dims_are_rejected_with_the_value(dims, match):
    with pytest.raises(ValueError, match=match):
        fftc(torch.zeros(2, 2, 2), dims=dims)


def test_non_tensor_is_rejected():
    with pytest.raises(TypeError, match="torch.Tensor"):
        ifftc(np.zeros((2, 2)))
