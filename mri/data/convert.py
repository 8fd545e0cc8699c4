"""Converters of real data into the h5 slice format: mridata.org ISMRMRD, fastMRI h5, NIfTI.

Each converter takes one source file (or a folder of them) and writes one h5 slice file per
source into ``out_dir``, named after the source, with the converter, the source file and the
parameters recorded as provenance. ``python -m mri prepare {mridata,fastmri,nifti} SRC --out DIR``
calls them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from mri.data._backend import (
    estimate_maps_espirit,
    estimate_maps_jsense,
    fftc,
    ifftc,
    sense_combine,
)
from mri.data.fastmri import read_fastmri
from mri.data.h5format import DataFormatError, _open, write_slices
from mri.data.simulate import coil_maps, simulate_multicoil

__all__ = ["CONVERTER_VERSION", "convert_fastmri", "convert_mridata", "convert_nifti"]

#: Recorded in every converted file's provenance; bump it when a converter's output changes.
CONVERTER_VERSION = 1

_JSENSE_KEYS = ("mps_ker_width", "lamda", "max_iter", "max_inner_iter")
_ESPIRIT_KEYS = ("thresh", "crop", "kernel_width", "max_iter")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: Acquisition records read per HDF5 call (a 3D FSE knee readout of 8 coils is 20 KiB).
_ACQ_CHUNK = 2048


# --------------------------------------------------------------------------------------------
# Shared helpers


def _sources(src: str | os.PathLike, what: str, accept: Callable[[Path], bool]) -> list[Path]:
    """The source files: ``src`` itself, or the accepted files of a folder, sorted."""
    src = Path(src)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.is_file() and accept(p))
        if not files:
            raise DataFormatError(f"{src}: folder holds no {what} files")
        return files
    if not src.exists():
        raise DataFormatError(f"{src}: file does not exist (expected a {what} file or a folder)")
    return [src]


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".h5", ".hdf5", ".mrd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _check_calib(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 4:
        raise ValueError(f"{name} must be an int >= 4, got {value!r}")
    return value


def _check_kwargs(name: str, kwargs: dict[str, Any] | None, valid: tuple[str, ...]) -> dict:
    kwargs = dict(kwargs or {})
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"{name}: unknown keys {unknown}; valid keys are {list(valid)}")
    return kwargs


def _select(where: str, num: int, slices: slice | Sequence[int] | None) -> list[int]:
    """Indices chosen by ``slices`` (None: all) out of ``num``, validated."""
    if slices is None:
        return list(range(num))
    if isinstance(slices, slice):
        chosen = list(range(num))[slices]
    else:
        chosen = [int(i) for i in slices]
        bad = [i for i in chosen if not 0 <= i < num]
        if bad:
            raise ValueError(f"{where}: slices {bad} out of range; valid are 0..{num - 1}")
    if not chosen:
        raise ValueError(f"{where}: slices={slices!r} selects none of the {num} slices")
    return chosen


def _provenance(converter: str, src: Path, parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        "converter": f"mri.data.convert.{converter}",
        "source": str(src.resolve()),
        "parameters": parameters,
        "version": CONVERTER_VERSION,
    }


def _combine(kspace: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    return sense_combine(kspace, maps, "2d").to(torch.complex64)


# --------------------------------------------------------------------------------------------
# mridata.org ISMRMRD (3D Cartesian, e.g. the Stanford fully sampled 3D FSE knees)


def _header_limit(where: str, limits: Any, step: str) -> Any:
    limit = getattr(limits, step, None) if limits is not None else None
    if limit is None:
        raise DataFormatError(
            f"{where}: XML header lacks encoding[0].encodingLimits.{step}; a 3D Cartesian "
            "acquisition needs limits for kspace_encoding_step_1 (ky) and _2 (kz)"
        )
    return limit


def _read_header(path: Path) -> Any:
    """The ISMRMRD XML header of ``path``, parsed by the ``ismrmrd`` package."""
    import ismrmrd
    import ismrmrd.xsd

    where = str(path)
    # ismrmrd opens with h5py underneath; checking first gives our error, not a LookupError.
    _, f = _open(path)
    with f:
        if "dataset" not in f or "xml" not in f["dataset"] or "data" not in f["dataset"]:
            raise DataFormatError(
                f"{where}: not an ISMRMRD file: expected groups/datasets 'dataset/xml' and "
                f"'dataset/data', found top-level keys {sorted(f.keys())}"
            )
    dset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=False)
    try:
        return ismrmrd.xsd.CreateFromDocument(dset.read_xml_header())
    except Exception as err:  # xsdata raises its own parser errors on invalid XML
        raise DataFormatError(f"{where}: 'dataset/xml' is not an ISMRMRD header: {err}") from err
    finally:
        dset.close()


def _acquisition_chunks(path: Path) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first index, records)`` of the ISMRMRD acquisition table, in chunks.

    ``ismrmrd.Dataset.read_acquisition`` reads one record per HDF5 call (about 8 ms each, so
    over ten minutes for the 81,920 readouts of a 3D FSE knee); reading the same standard
    table (``head``, ``traj``, ``data`` records) in chunks is hundreds of times faster.
    """
    with h5py.File(path, "r") as f:
        table = f["dataset/data"]
        total = table.shape[0]
        with tqdm(total=total, desc=f"read {path.name}", unit="acq", leave=False) as bar:
            for first in range(0, total, _ACQ_CHUNK):
                try:
                    records = table[first : first + _ACQ_CHUNK]
                except OSError as err:
                    raise DataFormatError(
                        f"{path}: cannot read acquisitions {first}.. of {total}; truncated? {err}"
                    ) from err
                yield first, records
                bar.update(len(records))


def _read_ismrmrd(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Read an ISMRMRD 3D Cartesian file into centered k-space ``(coils, kx, ky, kz)``."""
    import ismrmrd

    where = str(path)
    header = _read_header(path)
    if not header.encoding:
        raise DataFormatError(f"{where}: XML header has no encoding section")
    enc = header.encoding[0]
    matrix = enc.encodedSpace.matrixSize if enc.encodedSpace is not None else None
    if matrix is None or matrix.x is None:
        raise DataFormatError(f"{where}: XML header lacks encoding[0].encodedSpace.matrixSize")
    limit_y = _header_limit(where, enc.encodingLimits, "kspace_encoding_step_1")
    limit_z = _header_limit(where, enc.encodingLimits, "kspace_encoding_step_2")
    ny = max(int(limit_y.maximum) + 1, int(matrix.y or 0))
    nz = max(int(limit_z.maximum) + 1, int(matrix.z or 0))
    if ny < 8 or nz < 8:
        raise DataFormatError(
            f"{where}: ky x kz grid {ny} x {nz} from the header is not a 3D acquisition "
            "(need at least 8 x 8 phase encodes)"
        )
    system = header.acquisitionSystemInformation
    num_coils = system.receiverChannels if system is not None else None
    noise_bit = np.uint64(1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1))

    kspace = None
    filled = np.zeros((ny, nz), dtype=bool)
    for first, records in _acquisition_chunks(path):
        head = records["head"]
        for j in range(len(records)):
            # Noise pre-scans carry no image encoding; they would land on ky = kz = 0.
            if head["flags"][j] & noise_bit:
                continue
            shape = (int(head["active_channels"][j]), int(head["number_of_samples"][j]))
            if kspace is None:
                num_coils = num_coils or shape[0]
                kspace = np.zeros((num_coils, shape[1], ny, nz), dtype=np.complex64)
            if shape != kspace.shape[:2] or records["data"][j].size != 2 * shape[0] * shape[1]:
                raise DataFormatError(
                    f"{where}: acquisition {first + j} has data shape {shape} (coils, samples), "
                    f"expected {kspace.shape[:2]} like the first acquisition and the header"
                )
            ky = int(head["idx"]["kspace_encode_step_1"][j])
            kz = int(head["idx"]["kspace_encode_step_2"][j])
            if not (0 <= ky < ny and 0 <= kz < nz):
                raise DataFormatError(
                    f"{where}: acquisition {first + j} has (ky, kz) = ({ky}, {kz}) outside the "
                    f"header's grid {ny} x {nz}"
                )
            # Samples are stored as interleaved float32 (re, im), coil-major.
            kspace[:, :, ky, kz] = records["data"][j].view(np.complex64).reshape(shape)
            filled[ky, kz] = True
    if kspace is None:
        raise DataFormatError(f"{where}: file holds no imaging acquisitions")
    missing = int((~filled).sum())
    if missing:
        raise DataFormatError(
            f"{where}: {missing} of {ny * nz} (ky, kz) phase encodes were never acquired; "
            "convert_mridata needs fully sampled data"
        )
    # Masks put their calibration region at index n // 2 (the centered FFT's zero frequency), so
    # k-space is rolled to match when the header says the centre lies elsewhere; a centre of 0
    # is how some writers leave the field unset, and is then ignored.
    shifts = []
    for limit, n in ((limit_y, ny), (limit_z, nz)):
        center = int(limit.center or 0)
        shifts.append(n // 2 - center if 0 < center < n else 0)
    if any(shifts):
        kspace = np.roll(kspace, shifts, axis=(2, 3))
    info = {
        "matrix": [int(matrix.x), ny, nz],
        "num_samples": int(kspace.shape[1]),
        "num_coils": int(kspace.shape[0]),
        "roll_ky_kz": shifts,
    }
    return kspace, info


def convert_mridata(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    calib: int = 24,
    slices: slice | Sequence[int] | None = None,
    jsense_kwargs: dict[str, Any] | None = None,
) -> list[Path]:
    """Convert a fully sampled 3D Cartesian ISMRMRD file (mridata.org) into 2D slices.

    Example:
        >>> convert_mridata("knee1.h5", "data/knee/train", slices=range(40, 280))
        [PosixPath('data/knee/train/knee1.h5')]

    The XML header is parsed with the ``ismrmrd`` package. Acquisitions (noise scans skipped)
    are placed on a ``(coils, kx, ky, kz)`` grid by their
    ``kspace_encode_step_1`` (ky) and ``kspace_encode_step_2`` (kz) indices, the readout (x) is
    inverse Fourier transformed, and every readout position becomes one 2D slice whose k-space
    spans ``(ky, kz)``: the setting of the Stanford 3D FSE knees, where undersampling masks are
    drawn over the two phase-encode axes. Coil maps are estimated per slice with JSENSE and the
    target is the SENSE combination of the fully sampled slice. If the readout is oversampled
    (more samples than ``encodedSpace.matrixSize.x``) the central ``matrixSize.x`` slices are
    kept, which is where the object lies.

    Args:
        src: an ISMRMRD ``.h5`` file, or a folder of them (each converted).
        out_dir: output folder; ``out_dir/<name>.h5`` is written per source.
        calib: width of the k-space centre JSENSE calibrates on (``ksp_calib_width``).
        slices: readout positions to keep (a `slice` or ints); all if None. The outermost
            positions of a knee hold little signal.
        jsense_kwargs: more `mri.coils.estimate_maps_jsense` arguments: ``mps_ker_width``,
            ``lamda``, ``max_iter``, ``max_inner_iter``.

    Returns:
        The files written.

    Raises:
        DataFormatError: if a source is missing, not HDF5, not ISMRMRD, its header lacks the
            encoding matrix or limits, an acquisition does not fit the grid, or phase encodes
            are missing (the message names the file and what is wrong).
        ValueError: on a bad ``calib``, ``slices`` or ``jsense_kwargs``.
    """
    calib = _check_calib("calib", calib)
    jsense = _check_kwargs("jsense_kwargs", jsense_kwargs, _JSENSE_KEYS)
    written = []
    for path in _sources(src, "ISMRMRD .h5", lambda p: p.suffix in (".h5", ".mrd")):
        kspace3d, info = _read_ismrmrd(path)
        image_x = ifftc(torch.from_numpy(kspace3d), dims=(1,))  # (C, x, ky, kz)
        del kspace3d
        num_x = image_x.shape[1]
        keep_x = min(info["matrix"][0], num_x)
        start = (num_x - keep_x) // 2
        chosen = _select(str(path), keep_x, slices)
        kspace = image_x[:, [start + i for i in chosen]].transpose(0, 1).contiguous()
        del image_x
        maps = estimate_maps_jsense(kspace, ksp_calib_width=calib, show_pbar=True, **jsense)
        target = _combine(kspace, maps)
        parameters = {"calib": calib, "slices": chosen, "jsense_kwargs": jsense, **info}
        written.append(
            write_slices(
                Path(out_dir) / f"{_stem(path)}.h5",
                kspace,
                maps,
                target,
                kind="2d",
                provenance=_provenance("convert_mridata", path, parameters),
            )
        )
    return written


# --------------------------------------------------------------------------------------------
# fastMRI multicoil h5


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


# --------------------------------------------------------------------------------------------
# NIfTI magnitude volumes


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
