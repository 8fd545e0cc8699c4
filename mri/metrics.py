"""Image quality metrics on magnitude images: PSNR, nRMSE and SSIM as defined by GLEAM/meddlr
(per sample), and fastMRI's volume-wise NMSE, PSNR and SSIM.

Complex inputs are reduced to their magnitude ``|x|``; real inputs are taken as ``|x|`` too, so
both are compared as magnitude images. Sums run in float64; results come back in the real dtype
of the inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["psnr", "nrmse", "ssim", "ssim3d", "fastmri_nmse", "fastmri_psnr", "fastmri_ssim"]


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


def _gaussian_taps(size: int, sigma: float) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(x: Tensor, taps: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Separable 'valid' correlation of ``x`` with the 1D ``taps`` along each of ``dims``.

    A sum of shifted slices, one axpy per tap: on CPU this is several times faster than
    ``conv2d``/``conv3d`` with the same taps.
    """
    k = taps.numel()
    weights = taps.tolist()
    for d in dims:
        n = x.shape[d] - k + 1
        out = x.narrow(d, 0, n) * weights[0]
        for i in range(1, k):
            out.add_(x.narrow(d, i, n), alpha=weights[i])
        x = out
    return x


def _ssim_maps_mean(
    p: Tensor, r: Tensor, taps: Tensor, dims: tuple[int, ...], data_range: Tensor, cov_norm: float
) -> Tensor:
    """Mean SSIM over ``dims`` of each leading entry of ``p``, ``r`` (float64, equal shapes).

    A valid filter equals scikit-image's filtered maps with the half-window border cropped
    off, which is what it averages; so no padding mode has to be matched. Each entry is
    divided by its data range (SSIM is invariant to that, with ``C1 = 0.01**2``,
    ``C2 = 0.03**2``) and filtered in float32, one entry at a time so the five maps stay in
    cache; the SSIM formula runs in float64. Against float64 filtering this changes the mean
    SSIM by about 1e-9, far below the 1e-6 the tests hold it to against scikit-image.
    """
    c1, c2 = 0.01**2, 0.03**2
    taps32 = taps.to(torch.float32)
    out = torch.empty(p.shape[0], dtype=torch.float64, device=p.device)
    for i in range(p.shape[0]):
        scale = float(data_range[i]) or 1.0
        pi, ri = (p[i] / scale).to(torch.float32), (r[i] / scale).to(torch.float32)
        stack = torch.stack([pi, ri, pi * pi, ri * ri, pi * ri])
        filt = _filter_valid(stack, taps32, dims).to(torch.float64)  # stack replaces batch dim
        mu_p, mu_r, pp, rr, pr = filt.unbind(0)
        var_p = cov_norm * (pp - mu_p**2)
        var_r = cov_norm * (rr - mu_r**2)
        cov = cov_norm * (pr - mu_p * mu_r)
        num = (2 * mu_p * mu_r + c1) * (2 * cov + c2)
        den = (mu_p**2 + mu_r**2 + c1) * (var_p + var_r + c2)
        out[i] = (num / den).mean()
    return out


def _check_frame(where: str, shape: torch.Size, win: int) -> None:
    if shape[-1] < win or shape[-2] < win:
        raise ValueError(
            f"{where}: frames of shape {tuple(shape[-2:])} are smaller than the {win}x{win} "
            "window; each of the last two dims must be at least that"
        )


def ssim(pred: Tensor, ref: Tensor) -> Tensor:
    """Structural similarity per sample, frame by frame (Wang et al. 2004, as in GLEAM/meddlr).

    11x11 Gaussian window with sigma 1.5, ``K1 = 0.01``, ``K2 = 0.03``, population
    covariances, data range ``max|ref|`` of the sample. Equal to scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=max|ref|)``. For 3D and 2D+time samples ``(B, D|T, H, W)`` SSIM is computed
    on every 2D frame (the last two dims) with the sample's data range and averaged over
    frames; [`ssim3d`][mri.metrics.ssim3d] is the whole-series alternative. The filter is
    separable and the whole batch is filtered at once.

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
    per_frame = _ssim_maps_mean(
        p.reshape(-1, h, w),
        r.reshape(-1, h, w),
        _gaussian_taps(11, 1.5),
        (1, 2),
        data_range.repeat_interleave(frames),
        cov_norm=1.0,
    )
    return per_frame.view(b, frames).mean(dim=1).to(_out_dtype(ref))


def ssim3d(pred: Tensor, ref: Tensor) -> Tensor:
    """Structural similarity of whole 3D samples (a volume or a 2D+time series) per sample.

    The same definition as [`ssim`][mri.metrics.ssim] with an 11x11x11 Gaussian window over
    the last three dims, so motion between frames counts: equal to scikit-image's
    ``structural_similarity`` of the ``(D|T, H, W)`` array with ``gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=max|ref|``. Every one of the three
    dims must hold the window (>= 11, e.g. at least 11 cine frames).

    Args:
        pred: Prediction ``(B, D|T, H, W)``, complex or real.
        ref: Reference, same shape.

    Returns:
        SSIM, shape ``(B,)``.

    Raises:
        TypeError: If an input is not a floating or complex tensor.
        ValueError: If the shapes differ, the samples are not 3D or a dim is below 11.
    """
    p, r = _magnitudes("ssim3d", pred, ref, 4)
    if r.ndim != 4 or min(r.shape[1:]) < 11:
        raise ValueError(
            f"ssim3d: inputs must be (B, D|T, H, W) with each of D|T, H, W >= 11 (the window), "
            f"got shape {tuple(r.shape)}; use ssim for frame-wise SSIM"
        )
    data_range = _per_sample(r).amax(dim=1)
    return _ssim_maps_mean(p, r, _gaussian_taps(11, 1.5), (1, 2, 3), data_range, 1.0).to(
        _out_dtype(ref)
    )


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
    taps = torch.full((7,), 1 / 7, dtype=torch.float64)
    data_range = r.max().expand(r.shape[0])
    per_slice = _ssim_maps_mean(p, r, taps, (1, 2), data_range, cov_norm=49 / 48)
    return per_slice.mean().to(_out_dtype(ref))
