"""mridata.org ISMRMRD (3D Cartesian, e.g. the Stanford fully sampled 3D FSE knees) to slices.

Acquisitions are placed by their ky/kz encoding indices into a (coils, kx, ky, kz) array; an
inverse FFT along the readout splits the volume into 2D (ky, kz) slices, each with JSENSE maps
and a SENSE-combined target.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from mri.coils import estimate_maps_jsense
from mri.data.convert._common import (
    _check_calib,
    _check_kwargs,
    _combine,
    _provenance,
    _select,
    _sources,
    _stem,
)
from mri.data.h5format import DataFormatError, _open, write_slices
from mri.fft import ifftc

_JSENSE_KEYS = ("mps_ker_width", "lamda", "max_iter", "max_inner_iter")
#: Acquisition records read per HDF5 call (a 3D FSE knee readout of 8 coils is 20 KiB).
_ACQ_CHUNK = 2048


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
