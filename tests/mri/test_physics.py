"""SenseOp is the exact adjoint pair, agrees with SigPy's Sense, and rejects bad layouts."""

from __future__ import annotations

import re

import numpy as np
import pytest
import sigpy.mri
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mri import Measurement, SenseOp, fftc
from mri.coils import birdcage_maps


def randc(*shape: int, dtype: torch.dtype = torch.complex64, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


DTYPES = st.sampled_from([torch.complex64, torch.complex128])


def _inner(a: torch.Tensor, b: torch.Tensor) -> complex:
    return complex(torch.vdot(a.flatten().to(torch.complex128), b.flatten().to(torch.complex128)))


def _assert_adjoint(op: SenseOp, x: torch.Tensor, y: torch.Tensor) -> None:
    lhs = _inner(op(x), y)
    rhs = _inner(x, op.adjoint(y))
    tol = 1e-4 if x.dtype == torch.complex64 else 1e-10
    scale = float(x.abs().norm() * y.abs().norm())
    assert abs(lhs - rhs) <= tol * scale, (lhs, rhs)


@st.composite
def problems(draw, kind: str):
    b, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    n_spatial = 2 if kind == "2d" else 3
    spatial = tuple(draw(st.lists(st.integers(1, 6), min_size=n_spatial, max_size=n_spatial)))
    dtype = draw(DTYPES)
    seed = draw(st.integers(0, 1000))
    shared = kind == "2d+t" and draw(st.booleans())
    maps_shape = (b, c, *spatial[1:]) if shared else (b, c, *spatial)
    kshape = (b, c, *spatial)
    mask_kind = draw(st.sampled_from(["none", "spatial", "batch", "last", "bool"]))
    g = torch.Generator().manual_seed(seed)
    mask = {
        "none": None,
        "spatial": torch.rand(spatial, generator=g),  # real weights, not only 0/1
        "batch": (torch.rand(b, 1, *spatial, generator=g) > 0.5).float(),
        "last": (torch.rand(spatial[-1], generator=g) > 0.3).float(),
        "bool": torch.rand(spatial, generator=g) > 0.5,
    }[mask_kind]
    fft_dims = {"2d": None, "3d": draw(st.sampled_from([None, 3, (-3, -2, -1)])), "2d+t": 2}[kind]
    op = SenseOp(randc(*maps_shape, dtype=dtype, seed=seed), mask, fft_dims=fft_dims)
    x = randc(b, *spatial, dtype=dtype, seed=seed + 1)
    y = randc(*kshape, dtype=dtype, seed=seed + 2)
    return op, x, y


@pytest.mark.parametrize("kind", ["2d", "3d", "2d+t"])
def test_adjoint_identity_holds_for_random_shapes_masks_and_dtypes(kind):
    @settings(max_examples=25, deadline=None)
    @given(problems(kind))
    def check(case):
        op, x, y = case
        _assert_adjoint(op, x, y)
        assert op(x).shape == y.shape and op.adjoint(y).shape == x.shape
        assert op(x).dtype == x.dtype and op.adjoint(y).dtype == x.dtype

    check()


@pytest.mark.parametrize("spatial", [(6, 5), (4, 5, 6)])
def test_matches_sigpy_sense_per_sample(spatial):
    b, c = 2, 3
    maps = randc(b, c, *spatial, seed=1)
    mask = (torch.rand(spatial, generator=torch.Generator().manual_seed(2)) > 0.4).float()
    op = SenseOp(maps, mask)
    x, y = randc(b, *spatial, seed=3), randc(b, c, *spatial, seed=4)
    fwd, adj = op(x), op.adjoint(y)
    for i in range(b):
        ref = sigpy.mri.linop.Sense(maps[i].numpy(), weights=mask.numpy())
        np.testing.assert_allclose(fwd[i].numpy(), ref(x[i].numpy()), atol=1e-5)
        np.testing.assert_allclose(adj[i].numpy(), ref.H(y[i].numpy()), atol=1e-5)


def test_2d_plus_time_is_the_2d_operator_applied_frame_by_frame():
    b, c, t, h, w = 2, 3, 4, 6, 5
    maps_t = randc(b, c, t, h, w, seed=5)
    mask = (torch.rand(t, h, w, generator=torch.Generator().manual_seed(6)) > 0.5).float()
    op = SenseOp(maps_t, mask, fft_dims=2)
    x = randc(b, t, h, w, seed=7)
    y = op(x)
    for f in range(t):
        frame_op = SenseOp(maps_t[:, :, f], mask[f])
        torch.testing.assert_close(y[:, :, f], frame_op(x[:, f]))
    # Maps shared over time give the same result as maps repeated over time.
    maps = maps_t[:, :, :1].squeeze(2)
    shared = SenseOp(maps, mask)
    repeated = SenseOp(maps.unsqueeze(2).expand(b, c, t, h, w), mask, fft_dims=2)
    torch.testing.assert_close(shared(x), repeated(x))
    torch.testing.assert_close(shared.adjoint(y), repeated.adjoint(y))


def test_3d_transforms_all_three_dims_but_2d_plus_time_only_two():
    maps = torch.ones(1, 1, 4, 4, 4, dtype=torch.complex64)
    x = randc(1, 4, 4, 4, seed=8)
    torch.testing.assert_close(SenseOp(maps)(x)[:, 0], fftc(x, dims=(-3, -2, -1)))
    torch.testing.assert_close(SenseOp(maps, fft_dims=2)(x)[:, 0], fftc(x, dims=(-2, -1)))


def test_fully_sampled_normal_is_identity_with_normalised_maps():
    maps = birdcage_maps((8, 8), 4)[None]
    op = SenseOp(maps)
    x = randc(1, 8, 8, seed=9)
    torch.testing.assert_close(op.normal(x), x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(op.normal(x), op.adjoint(op(x)))


def test_to_returns_a_new_cast_operator_and_measurement_moves_too():
    maps = randc(1, 2, 4, 4, seed=10)
    mask = torch.rand(4, 4)
    op = SenseOp(maps, mask)
    op64 = op.to(torch.complex128)
    assert op64 is not op and op.maps.dtype == torch.complex64
    assert op64.maps.dtype == torch.complex128 and op64.mask.dtype == torch.float64
    assert op.to("cpu", dtype=torch.complex128).dtype == torch.complex128
    x = randc(1, 4, 4, dtype=torch.complex128, seed=11)
    torch.testing.assert_close(op64(x), op(x.to(torch.complex64)).to(torch.complex128))
    meas = Measurement(op, op(x.to(torch.complex64)))
    moved = meas.to("cpu")
    assert moved is not meas and isinstance(moved.op, SenseOp)
    torch.testing.assert_close(moved.zero_filled(), op.adjoint(meas.kspace))
    assert meas.to(torch.complex128).kspace.dtype == torch.complex128
    assert "SenseOp" in repr(meas)


def test_bool_mask_acts_like_float_mask():
    maps = randc(1, 2, 4, 4, seed=12)
    mask = torch.rand(4, 4, generator=torch.Generator().manual_seed(0)) > 0.5
    x = randc(1, 4, 4, seed=13)
    torch.testing.assert_close(SenseOp(maps, mask)(x), SenseOp(maps, mask.float())(x))


class TestErrors:
    maps = randc(2, 3, 4, 5, seed=14)

    def test_real_image_is_a_type_error_naming_its_shape(self):
        with pytest.raises(TypeError, match=r"x must be complex.*float32.*\(2, 4, 5\)"):
            SenseOp(self.maps)(torch.zeros(2, 4, 5))

    def test_real_maps_and_complex_mask_are_type_errors(self):
        with pytest.raises(TypeError, match="maps must be complex"):
            SenseOp(self.maps.real)
        with pytest.raises(TypeError, match="mask must be bool or real"):
            SenseOp(self.maps, torch.ones(4, 5, dtype=torch.complex64))

    def test_dtype_mismatch_names_both(self):
        with pytest.raises(TypeError, match="complex128.*maps are a complex64"):
            SenseOp(self.maps)(randc(2, 4, 5, dtype=torch.complex128))

    @pytest.mark.parametrize("shape", [(2, 4, 6), (3, 4, 5), (2, 5)])
    def test_image_shape_mismatch_names_both_shapes(self, shape):
        with pytest.raises(ValueError, match=r"\(2, 3, 4, 5\)"):
            SenseOp(self.maps)(randc(*shape))

    @pytest.mark.parametrize("shape", [(2, 2, 4, 5), (2, 3, 4, 4), (2, 3, 4)])
    def test_kspace_shape_mismatch_names_both_shapes(self, shape):
        with pytest.raises(ValueError, match=re.escape(str(shape))):
            SenseOp(self.maps).adjoint(randc(*shape))

    def test_mask_that_does_not_broadcast_names_both_shapes(self):
        with pytest.raises(ValueError, match=r"mask of shape \(4, 4\).*\(2, 3, 4, 5\)"):
            SenseOp(self.maps, torch.ones(4, 4))

    def test_mask_for_time_rejects_a_plain_2d_image(self):
        op = SenseOp(self.maps, torch.ones(6, 4, 5))
        assert op(randc(2, 6, 4, 5)).shape == (2, 3, 6, 4, 5)
        with pytest.raises(ValueError, match="mask of shape"):
            op(randc(2, 4, 5))

    @pytest.mark.parametrize("fft_dims", [0, 3, (), (-1, -1), (0, 1), "2", True])
    def test_bad_fft_dims_are_rejected(self, fft_dims):
        with pytest.raises((ValueError, TypeError), match="fft_dims"):
            SenseOp(self.maps, fft_dims=fft_dims)

    def test_wrong_map_rank(self):
        with pytest.raises(ValueError, match=r"maps must be .*\(3, 4, 5\)"):
            SenseOp(randc(3, 4, 5))

    def test_measurement_checks_its_kspace(self):
        op = SenseOp(self.maps)
        with pytest.raises(TypeError, match="op must be a SenseOp"):
            Measurement(self.maps, randc(2, 3, 4, 5))
        with pytest.raises(ValueError, match=r"kspace has shape \(2, 3, 4, 4\)"):
            Measurement(op, randc(2, 3, 4, 4))
        with pytest.raises(TypeError, match="kspace must be complex"):
            Measurement(op, torch.zeros(2, 3, 4, 5))
