"""Image quality metrics on magnitude images: PSNR, nRMSE and SSIM as defined by GLEAM/meddlr
(per sample), and fastMRI's volume-wise NMSE, PSNR and SSIM.

Complex inputs are reduced to their magnitude ``|x|``; real inputs are taken as ``|x|`` too, so
both are compared as magnitude images. Sums run in float64; results come back in the real dtype
of the inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["psnr", "nrmse", "ssim", "fastmri_nmse", "fastmri_psnr", "fastmri_ssim"]


def _magnitudes(where: str, pred: Tensor, ref: Tensor, min_ndim: int) -> tuple[Tensor, Tensor]:
    for name, t in (("pred", pred), ("ref", ref)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not (t.is_complex() or t.is_floating_point()):
            raise TypeError(f"{where}: {name} must be complex or floating point, got {t.dtype}")
    if pred.shape != ref.shape:
        raise ValueError(
            f"{where}: pred has shape {tuple(pred.shape)} but ref has shape {tuple(ref.shape)}; "
            "they must match"
        )
    if ref.ndim < min_ndim:
        raise ValueError(
            f"{where}: inputs need at least {min_ndim} dims, got shape {tuple(ref.shape)}"
        )
    return pred.abs().to(torch.float64), ref.abs().to(torch.float64)


def _out_dtype(ref: Tensor) -> torch.dtype:
    return ref.real.dtype if ref.is_complex() else ref.dtype


def _per_sample(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def _rmse(pred: Tensor, ref: Tensor) -> Tensor:
    return ((_per_sample(pred) - _per_sample(ref)) ** 2).mean(dim=1).sqrt()


def psnr(pred: Tensor, ref: Tensor) -> Tensor:
    """Peak signal-to-noise ratio per sample: ``20 log10(max|ref| / RMSE(|pred|, |ref|))``.

    Args:
        pred: Prediction ``(B, *spatial)``, complex or real.
        ref: Reference, same shape.

    Returns:
        PSNR in dB, shape ``(B,)``.

    Raises:
        TypeError: If an input is not a floating or complex tensor.
        ValueError: If the shapes differ or there is no spatial dim.
    """
    p, r = _magnitudes("psnr", pred, ref, 2)
    peak = _per_sample(r).amax(dim=1)
    return (20 * torch.log10(peak / _rmse(p, r))).to(_out_dtype(ref))


def nrmse(pred: Tensor, ref: Tensor) -> Tensor:
    """Normalised RMSE per sample: ``RMSE(|pred|, |ref|) / RMS(|ref|)``.

    This is meddlr's normalisation (by ``sqrt(mean |ref|^2)``), equal to
    ``||pred - ref||_2 / ||ref||_2`` and to scikit-image's ``normalized_root_mse`` with
    ``normalization="euclidean"``.

    Args:
        pred: Prediction ``(B, *spatial)``, complex or real.
        ref: Reference, same shape.

    Returns:
        nRMSE, shape ``(B,)``.

    Raises:
        TypeError: If an input is not a floating or complex tensor.
        ValueError: If the shapes differ or there is no spatial dim.
    """
    p, r = _magnitudes("nrmse", pred, ref, 2)
    rms = (_per_sample(r) ** 2).mean(dim=1).sqrt()
    return (_rmse(p, r) / rms).to(_out_dtype(ref))


def _gaussian_window(size: int, sigma: float) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def _ssim_frames(
    p: Tensor, r: Tensor, window: Tensor, data_range: Tensor, cov_norm: float
) -> Tensor:
    """Mean SSIM of each 2D frame; ``p``, ``r`` are ``(N, H, W)``, ``data_range`` is ``(N,)``.

    A valid convolution equals scikit-image's filtered maps with the half-window border
    cropped off, which is what it averages; so no padding mode has to be matched.
    """
    c1 = ((0.01 * data_range) ** 2).view(-1, 1, 1, 1)
    c2 = ((0.03 * data_range) ** 2).view(-1, 1, 1, 1)
    n = p.shape[0]
    stack = torch.cat([p, r, p * p, r * r, p * r]).unsqueeze(1)
    filt = F.conv2d(stack, window[None, None])
    mu_p, mu_r, pp, rr, pr = filt.split(n)
    var_p = cov_norm * (pp - mu_p**2)
    var_r = cov_norm * (rr - mu_r**2)
    cov = cov_norm * (pr - mu_p * mu_r)
    num = (2 * mu_p * mu_r + c1) * (2 * cov + c2)
    den = (mu_p**2 + mu_r**2 + c1) * (var_p + var_r + c2)
    return (num / den).flatten(1).mean(dim=1)


def _check_frame(where: str, shape: torch.Size, win: int) -> None:
    if shape[-1] < win or shape[-2] < win:
        raise ValueError(
            f"{where}: frames of shape {tuple(shape[-2:])} are smaller than the {win}x{win} "
            "window; each of the last two dims must be at least that"
        )


def ssim(pred: Tensor, ref: Tensor) -> Tensor:
    """Structural similarity per sample (Wang et al. 2004, as in GLEAM/meddlr).

    11x11 Gaussian window with sigma 1.5, ``K1 = 0.01``, ``K2 = 0.03``, population
    covariances, data range ``max|ref|`` of the sample. Equal to scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=max|ref|)``. For 3D and 2D+time samples ``(B, D|T, H, W)`` SSIM is computed
    on every 2D frame (the last two dims) with the sample's data range and averaged over
    frames.

    Args:
        pred: Prediction ``(B, ..., H, W)``, complex or real, ``H, W >= 11``.
        ref: Reference, same shape.

    Returns:
        SSIM, shape ``(B,)``.

    Raises:
        TypeError: If an input is not a floating or complex tensor.
        ValueError: If the shapes differ, there are fewer than 2 spatial dims, or a frame is
            smaller than the window.
    """
    p, r = _magnitudes("ssim", pred, ref, 3)
    _check_frame("ssim", r.shape, 11)
    b, (h, w) = r.shape[0], r.shape[-2:]
    data_range = _per_sample(r).amax(dim=1)
    frames = r[0].numel() // (h * w)
    per_frame = _ssim_frames(
        p.reshape(-1, h, w),
        r.reshape(-1, h, w),
        _gaussian_window(11, 1.5),
        data_range.repeat_interleave(frames),
        cov_norm=1.0,
    )
    return per_frame.view(b, frames).mean(dim=1).to(_out_dtype(ref))


def fastmri_nmse(pred: Tensor, ref: Tensor) -> Tensor:
    """fastMRI's NMSE of a whole volume: ``||ref - pred||^2 / ||ref||^2`` on magnitudes.

    Args:
        pred: Predicted volume of any shape (e.g. ``(slices, H, W)``), complex or real.
        ref: Reference volume, same shape.

    Returns:
        A 0-dim tensor.

    Raises:
        TypeError: If an input is not a floating or complex tensor.
        ValueError: If the shapes differ.
    """
    p, r = _magnitudes("fastmri_nmse", pred, ref, 1)
    return (((r - p) ** 2).sum() / (r**2).sum()).to(_out_dtype(ref))


def fastmri_psnr(pred: Tensor, ref: Tensor) -> Tensor:
    """fastMRI's PSNR of a whole volume: ``10 log10(max(ref)^2 / MSE)`` on magnitudes.

    Args:
        pred: Predicted volume of any shape, complex or real.
        ref: Reference volume, same shape.

    Returns:
        A 0-dim tensor, in dB.

    Raises:
        TypeError: If an input is not a floating or complex tensor.
        ValueError: If the shapes differ.
    """
    p, r = _magnitudes("fastmri_psnr", pred, ref, 1)
    mse = ((r - p) ** 2).mean()
    return (10 * torch.log10(r.max() ** 2 / mse)).to(_out_dtype(ref))


def fastmri_ssim(pred: Tensor, ref: Tensor) -> Tensor:
    """fastMRI's SSIM of a volume ``(slices, H, W)``: the mean over slices.

    Each slice uses scikit-image's defaults as fastMRI does: a 7x7 uniform window, sample
    covariances, ``K1 = 0.01``, ``K2 = 0.03``, and data range ``max(ref)`` over the whole
    volume.

    Args:
        pred: Predicted volume ``(..., H, W)``, complex or real, ``H, W >= 7``; all leading
            dims count as slices.
        ref: Reference volume, same shape.

    Returns:
        A 0-dim tensor.

    Raises:
        TypeError: If an input is not a floating or complex tensor.
        ValueError: If the shapes differ or a slice is smaller than the window.
    """
    p, r = _magnitudes("fastmri_ssim", pred, ref, 2)
    _check_frame("fastmri_ssim", r.shape, 7)
    h, w = r.shape[-2:]
    p, r = p.reshape(-1, h, w), r.reshape(-1, h, w)
    window = torch.full((7, 7), 1 / 49, dtype=torch.float64)
    per_slice = _ssim_frames(p, r, window, r.max().expand(r.shape[0]), cov_norm=49 / 48)
    return per_slice.mean().to(_out_dtype(ref))
