"""NIfTI magnitude volumes to simulated multi-coil k-space, one 2D slice at a time."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mri.data.convert._common import _provenance, _sources, _stem
from mri.data.h5format import DataFormatError, write_slices
from mri.data.simulate import coil_maps, simulate_multicoil

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _load_nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        volume = np.asanyarray(img.dataobj)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError) as err:
        raise DataFormatError(f"{path}: cannot be read as NIfTI: {err}") from err
    if np.iscomplexobj(volume):
        raise DataFormatError(
            f"{path}: holds complex data ({volume.dtype}); convert_nifti takes magnitude volumes"
        )
    # A 3D volume is often stored with trailing singleton dims (time, channels).
    while volume.ndim > 3 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    if volume.ndim != 3:
        raise DataFormatError(
            f"{path}: volume has shape {volume.shape}; convert_nifti needs a 3D volume"
        )
    volume = np.abs(volume.astype(np.float32))
    if not np.isfinite(volume).all():
        raise DataFormatError(f"{path}: volume holds NaN or Inf values")
    return volume


def convert_nifti(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    num_coils: int = 8,
    slice_axis: int = -1,
    seed: int = 0,
    noise_std: float = 0.01,
) -> list[Path]:
    """Simulate multi-coil k-space from a magnitude NIfTI volume, slice by slice.

    Example:
        >>> convert_nifti("brain_t1.nii.gz", "data/brain/train", num_coils=8)
        [PosixPath('data/brain/train/brain_t1.h5')]

    The volume is scaled to maximum 1 (one scale per volume, like the built-in data) and cut
    along ``slice_axis``; each slice gets a smooth random phase, birdcage coil maps with unit
    root-sum-of-squares and complex Gaussian noise (`mri.data.simulate.simulate_multicoil`), so
    the SENSE combination of noise-free k-space is the complex image whose magnitude is the
    slice. Magnitude images have no phase of their own: this is simulated data with real
    anatomy, not a substitute for raw k-space.

    Args:
        src: a ``.nii`` or ``.nii.gz`` file, or a folder of them.
        out_dir: output folder; ``out_dir/<name>.h5`` is written per source.
        num_coils: simulated coils (>= 1).
        slice_axis: the axis of the 3D volume to slice along.
        seed: seed of the phase and noise; slice ``i`` uses its own stream ``(seed, i)``.
        noise_std: standard deviation of the complex k-space noise, relative to maximum 1.

    Returns:
        The files written.

    Raises:
        DataFormatError: if a source is missing, not NIfTI, complex, not 3D, or not finite.
        ValueError: on a bad ``num_coils``, ``slice_axis``, ``seed`` or ``noise_std``.
    """
    if isinstance(num_coils, bool) or not isinstance(num_coils, int) or num_coils < 1:
        raise ValueError(f"num_coils must be an int >= 1, got {num_coils!r}")
    if isinstance(slice_axis, bool) or not isinstance(slice_axis, int) or not -3 <= slice_axis < 3:
        raise ValueError(f"slice_axis must be an int in [-3, 2] (a 3D volume), got {slice_axis!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")

    def accept(p: Path) -> bool:
        return p.name.endswith(_NIFTI_SUFFIXES)

    written = []
    for path in _sources(src, "NIfTI (.nii, .nii.gz)", accept):
        volume = _load_nifti(path)
        volume_shape = list(volume.shape)
        volume = np.moveaxis(volume, slice_axis, 0)
        shape = tuple(int(n) for n in volume.shape[1:])
        if min(shape) < 8:
            raise DataFormatError(
                f"{path}: slices along axis {slice_axis} are {shape}; need at least 8 x 8 "
                "(choose another slice_axis?)"
            )
        peak = float(volume.max())
        if peak > 0:
            volume = volume / peak
        maps = coil_maps(shape, num_coils, "2d")
        kspace, targets = [], []
        for i in tqdm(range(volume.shape[0]), desc=f"simulate {path.name}", leave=False):
            # One stream per slice: a slice's numbers do not depend on the slices before it.
            rng = np.random.default_rng([seed, i])
            k, t = simulate_multicoil(np.ascontiguousarray(volume[i]), maps, "2d", rng, noise_std)
            kspace.append(k)
            targets.append(t)
        num = len(targets)
        parameters = {
            "num_coils": num_coils, "slice_axis": slice_axis, "seed": seed,
            "noise_std": float(noise_std), "scale": peak, "volume_shape": volume_shape,
        }  # fmt: skip
        written.append(
            write_slices(
                Path(out_dir) / f"{_stem(path)}.h5",
                torch.stack(kspace),
                maps.unsqueeze(0).expand(num, *maps.shape).contiguous(),
                torch.stack(targets),
                kind="2d",
                provenance=_provenance("convert_nifti", path, parameters),
            )
        )
    return written
