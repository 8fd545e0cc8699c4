"""Compressed-sensing baselines beat zero-filled reconstructions on simulated data."""

from __future__ import annotations

import pytest
import torch

from mri import SenseOp
from mri.coils import birdcage_maps
from mri.cs import l1_wavelet_recon, tv_recon
from mri.masks import kt_mask, poisson_disc_mask
from mri.metrics import psnr


def noisy_kspace(op: SenseOp, image: torch.Tensor, std: float = 0.005) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    y = op(image)
    noise = torch.randn(y.shape, dtype=y.dtype, generator=g) * std
    return y + noise * (op.mask if op.mask is not None else 1)


def test_l1_wavelet_beats_zero_filled_in_2d(phantom_2d):
    image = torch.stack([phantom_2d(48), phantom_2d(48).flip(-1)])
    maps = birdcage_maps((48, 48), 4).expand(2, -1, -1, -1)
    mask = poisson_disc_mask((48, 48), 5, calib=10, seed=0)
    op = SenseOp(maps, mask)
    kspace = noisy_kspace(op, image)
    recon = l1_wavelet_recon(kspace, maps, mask, max_iter=40, show_pbar=False)
    assert recon.shape == image.shape and recon.dtype == torch.complex64
    gain = psnr(recon, image) - psnr(op.adjoint(kspace), image)
    assert torch.all(gain > 3), gain
    # Without a mask, the sampling pattern is read off the zeros of the k-space.
    inferred = l1_wavelet_recon(kspace[:1], maps[:1], None, max_iter=40, show_pbar=False)
    torch.testing.assert_close(inferred, recon[:1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("shared_maps", [True, False])
def test_spatiotemporal_tv_beats_zero_filled_in_2d_plus_time(cine_phantom, shared_maps):
    frames, n = 6, 32
    image = cine_phantom(frames, n)[None]
    maps = birdcage_maps((n, n), 4)[None]
    if not shared_maps:
        maps = maps.unsqueeze(2).expand(1, 4, frames, n, n)
    mask = kt_mask((frames, n, n), 4, calib=4, seed=0)
    op = SenseOp(maps, mask, fft_dims=2)
    kspace = noisy_kspace(op, image)
    recon = tv_recon(kspace, maps, mask, max_iter=40, show_pbar=False)
    assert recon.shape == image.shape
    gain = psnr(recon, image) - psnr(op.adjoint(kspace), image)
    assert gain.item() > 1.5, gain


def test_temporal_weight_acts_along_time_and_spatial_weight_along_space(cine_phantom):
    frames, n = 6, 32
    image = cine_phantom(frames, n)[None]
    maps = birdcage_maps((n, n), 4)[None]
    mask = kt_mask((frames, n, n), 4, calib=4, seed=1)
    kspace = noisy_kspace(SenseOp(maps, mask), image)

    def variation(x: torch.Tensor, dim: int) -> float:
        return float(x.diff(dim=dim).abs().sum())

    def recon(lamda: float, lamda_t: float) -> torch.Tensor:
        return tv_recon(kspace, maps, mask, lamda, lamda_t, max_iter=30, show_pbar=False)

    plain = recon(0.0, 0.0)
    in_time, in_space = recon(0.0, 0.05), recon(0.05, 0.0)
    assert variation(in_time, 1) < 0.7 * variation(plain, 1)
    assert variation(in_space, -1) < 0.9 * variation(plain, -1)
    assert variation(in_space, 1) > variation(in_time, 1)


class TestErrors:
    maps = birdcage_maps((16, 16), 2)[None]

    @pytest.mark.parametrize(
        "kw, match", [({"lamda": -1.0}, "lamda"), ({"max_iter": 0}, "max_iter")]
    )
    def test_bad_weights_and_iterations(self, kw, match):
        kspace = torch.ones(1, 2, 16, 16, dtype=torch.complex64)
        with pytest.raises(ValueError, match=match):
            l1_wavelet_recon(kspace, self.maps, show_pbar=False, **kw)
        with pytest.raises(ValueError, match=match):
            tv_recon(kspace, self.maps, show_pbar=False, **kw)

    def test_kspace_that_does_not_fit_the_maps(self):
        with pytest.raises(ValueError, match=r"kspace has shape \(1, 3, 16, 16\)"):
            l1_wavelet_recon(torch.ones(1, 3, 16, 16, dtype=torch.complex64), self.maps)
        with pytest.raises(TypeError, match="kspace must be a complex"):
            tv_recon(torch.ones(1, 2, 16, 16), self.maps)
