"""fastMRI multicoil h5 files, as published, to h5 slice files with ESPIRiT maps."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mri.coils import estimate_maps_espirit
from mri.data.convert._common import (
    _check_calib,
    _check_kwargs,
    _combine,
    _provenance,
    _select,
    _sources,
    _stem,
)
from mri.data.fastmri import read_fastmri
from mri.data.h5format import DataFormatError, _open, write_slices
from mri.fft import fftc, ifftc

_ESPIRIT_KEYS = ("thresh", "crop", "kernel_width", "max_iter")


def _crop_readout(kspace: torch.Tensor, size: int) -> torch.Tensor:
    """Keep the central ``size`` image rows along H (the readout), back in k-space."""
    image = ifftc(kspace, dims=(-2,))
    start = (image.shape[-2] - size) // 2
    return fftc(image[..., start : start + size, :].contiguous(), dims=(-2,))


def convert_fastmri(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    calib_width: int = 24,
    crop_readout: bool = True,
    slices: slice | Sequence[int] | None = None,
    espirit_kwargs: dict[str, Any] | None = None,
) -> list[Path]:
    """Convert a fastMRI multicoil file (train or validation, fully sampled) into 2D slices.

    Example:
        >>> convert_fastmri("file1000000.h5", "data/fastmri/train")
        [PosixPath('data/fastmri/train/file1000000.h5')]

    fastMRI k-space is ``(slices, coils, H, W)`` with H the readout, oversampled twice (a knee
    file has H = 640 for a 320 mm field of view). With ``crop_readout`` (the default) the image
    is cropped along H to the header's ``reconSpace.matrixSize.x`` (320) and transformed back:
    the cropped half is outside the object (oversampling exists to keep aliasing there), the
    result matches the field of view of fastMRI's ``reconstruction_rss``, and every later step
    costs half. W, the phase-encode axis that fastMRI's masks undersample, is left as it is.
    Coil maps are estimated per slice with ESPIRiT (zero outside the object) and the target is
    the SENSE combination of the fully sampled slice.

    Args:
        src: a fastMRI multicoil ``.h5`` file, or a folder of them.
        out_dir: output folder; ``out_dir/<name>.h5`` is written per source.
        calib_width: width of the ESPIRiT calibration region.
        crop_readout: crop the readout oversampling (see above).
        slices: the slices to keep (a `slice` or ints); all if None.
        espirit_kwargs: more `mri.coils.estimate_maps_espirit` arguments: ``thresh``,
            ``crop``, ``kernel_width``, ``max_iter``.

    Returns:
        The files written.

    Raises:
        DataFormatError: if a source is missing or truncated, lacks ``kspace`` or
            ``ismrmrd_header``, is single-coil, or is an undersampled test/challenge file
            (it has a ``mask``).
        ValueError: on a bad ``calib_width``, ``slices`` or ``espirit_kwargs``.
    """
    calib_width = _check_calib("calib_width", calib_width)
    espirit = _check_kwargs("espirit_kwargs", espirit_kwargs, _ESPIRIT_KEYS)
    written = []
    for path in _sources(src, "fastMRI .h5", lambda p: p.suffix == ".h5"):
        vol = read_fastmri(path)
        _, f = _open(path)
        with f:
            if "mask" in f:
                raise DataFormatError(
                    f"{path}: has a 'mask': an undersampled fastMRI test/challenge file; "
                    "convert_fastmri needs fully sampled train or validation files"
                )
        chosen = _select(str(path), vol.num_slices, slices)
        kspace = torch.from_numpy(vol.kspace[chosen])
        height = kspace.shape[-2]
        recon_x = vol.recon_shape[0]
        cropped = crop_readout and 0 < recon_x < height
        if cropped:
            kspace = _crop_readout(kspace, recon_x)
        maps = estimate_maps_espirit(kspace, calib_width=calib_width, show_pbar=True, **espirit)
        target = _combine(kspace, maps)
        parameters = {
            "calib_width": calib_width, "crop_readout": bool(crop_readout),
            "readout_cropped_to": recon_x if cropped else None, "slices": chosen,
            "espirit_kwargs": espirit, "encoded_shape": list(vol.encoded_shape),
            "recon_shape": list(vol.recon_shape),
            "acquisition": str(vol.attrs.get("acquisition", "")),
        }  # fmt: skip
        written.append(
            write_slices(
                Path(out_dir) / f"{_stem(path)}.h5",
                kspace.to(torch.complex64).contiguous(),
                maps,
                target,
                kind="2d",
                provenance=_provenance("convert_fastmri", path, parameters),
            )
        )
    return written
