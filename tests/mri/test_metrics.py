"""Metrics agree with scikit-image on random and structured magnitude images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

from mri.metrics import fastmri_nmse, fastmri_psnr, fastmri_ssim, nrmse, psnr, ssim, ssim3d


def sk_ssim(ref: np.ndarray, pred: np.ndarray, data_range: float) -> float:
    return structural_similarity(
        ref,
        pred,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=data_range,
    )


def pairs(phantom_2d, spatial: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, *spatial, dtype=torch.complex64, generator=g)
    rand = torch.rand(2, *spatial, generator=g) * torch.exp(1j * torch.rand(2, *spatial))
    structured = phantom_2d(spatial[-1]).expand(2, *spatial)
    return [(rand + 0.2 * noise, rand), (structured + 0.05 * noise, structured)]


@pytest.mark.parametrize("spatial", [(32, 32), (3, 32, 32)])
def test_psnr_nrmse_ssim_match_scikit_image_per_sample(phantom_2d, spatial):
    for pred, ref in pairs(phantom_2d, spatial):
        got_psnr, got_nrmse, got_ssim = psnr(pred, ref), nrmse(pred, ref), ssim(pred, ref)
        assert got_psnr.shape == got_nrmse.shape == got_ssim.shape == (2,)
        assert got_psnr.dtype == torch.float32
        for b in range(2):
            r = ref[b].abs().double().numpy()
            p = pred[b].abs().double().numpy()
            peak = r.max()
            assert got_psnr[b].item() == pytest.approx(
                peak_signal_noise_ratio(r, p, data_range=peak), rel=1e-5
            )
            assert got_nrmse[b].item() == pytest.approx(normalized_root_mse(r, p), rel=1e-5)
            frames = r.reshape(-1, *r.shape[-2:])
            want = np.mean(
                [
                    sk_ssim(fr, fp, peak)
                    for fr, fp in zip(frames, p.reshape(frames.shape), strict=True)
                ]
            )
            assert got_ssim[b].item() == pytest.approx(want, abs=1e-6)


def test_fastmri_volume_metrics_match_scikit_image(phantom_2d):
    (pred, ref), (spred, sref) = pairs(phantom_2d, (4, 24, 24))
    for p_t, r_t in ((pred[0], ref[0]), (spred[0], sref[0])):
        r, p = r_t.abs().double().numpy(), p_t.abs().double().numpy()
        nmse = np.linalg.norm(r - p) ** 2 / np.linalg.norm(r) ** 2
        assert fastmri_nmse(p_t, r_t).item() == pytest.approx(nmse, rel=1e-5)
        assert fastmri_psnr(p_t, r_t).item() == pytest.approx(
            peak_signal_noise_ratio(r, p, data_range=r.max()), rel=1e-5
        )
        want = np.mean([structural_similarity(r[i], p[i], data_range=r.max()) for i in range(4)])
        assert fastmri_ssim(p_t, r_t).item() == pytest.approx(want, abs=1e-6)


def test_ssim3d_matches_scikit_image_on_the_whole_series_and_differs_from_frame_wise(
    cine_phantom,
):
    g = torch.Generator().manual_seed(1)
    ref = torch.stack([cine_phantom(12, 32), cine_phantom(12, 32).flip(-1) * 2])
    pred = ref + 0.1 * torch.randn(ref.shape, dtype=ref.dtype, generator=g)
    got = ssim3d(pred, ref)
    assert got.shape == (2,) and got.dtype == torch.float32
    for b in range(2):
        r, p = ref[b].abs().double().numpy(), pred[b].abs().double().numpy()
        assert got[b].item() == pytest.approx(sk_ssim(r, p, r.max()), abs=1e-6)
    # Whole-series SSIM is a different number from the frame-wise mean the tables use.
    assert (got.double() - ssim(pred, ref).double()).abs().min() > 1e-3


def test_identical_images_score_perfectly_and_worse_images_score_worse(phantom_2d):
    ref = phantom_2d(32)[None]
    noisy = ref + 0.1 * torch.randn(1, 32, 32, dtype=torch.complex64)
    noisier = ref + 0.3 * torch.randn(1, 32, 32, dtype=torch.complex64)
    assert ssim(ref, ref).item() == pytest.approx(1.0)
    assert nrmse(ref, ref).item() == 0.0
    assert psnr(noisy, ref) > psnr(noisier, ref)
    assert ssim(noisy, ref) > ssim(noisier, ref)
    assert nrmse(noisy, ref) < nrmse(noisier, ref)


def test_phase_is_ignored():
    ref = torch.rand(2, 16, 16) + 0.5
    rotated = ref * torch.exp(1j * torch.rand(2, 16, 16))
    torch.testing.assert_close(nrmse(rotated, ref), torch.zeros(2))


class TestErrors:
    def test_shape_mismatch_names_both(self):
        with pytest.raises(ValueError, match=r"\(2, 16, 16\).*\(2, 16, 15\)"):
            psnr(torch.rand(2, 16, 16), torch.rand(2, 16, 15))

    def test_frame_smaller_than_window(self):
        with pytest.raises(ValueError, match="11x11"):
            ssim(torch.rand(1, 8, 16), torch.rand(1, 8, 16))
        with pytest.raises(ValueError, match="7x7"):
            fastmri_ssim(torch.rand(2, 6, 16), torch.rand(2, 6, 16))

    def test_ssim3d_needs_the_window_along_every_dim(self):
        with pytest.raises(ValueError, match=r"ssim3d.*>= 11.*\(1, 8, 16, 16\)"):
            ssim3d(torch.rand(1, 8, 16, 16), torch.rand(1, 8, 16, 16))
        with pytest.raises(ValueError, match="at least 4 dims"):
            ssim3d(torch.rand(1, 16, 16), torch.rand(1, 16, 16))

    def test_missing_batch_dim_and_integer_inputs(self):
        with pytest.raises(ValueError, match="at least 3 dims"):
            ssim(torch.rand(16, 16), torch.rand(16, 16))
        with pytest.raises(TypeError, match="complex or floating"):
            nrmse(torch.ones(1, 4, dtype=torch.int64), torch.ones(1, 4, dtype=torch.int64))
