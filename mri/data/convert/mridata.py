"""mridata.org ISMRMRD (3D Cartesian, e.g. the Stanford fully sampled 3D FSE knees) to slices.

Acquisitions are placed by their ky and kz (or, for the hybrid-space knee files, slice)
indices into a (coils, kx, ky, kz) array; an inverse FFT along the readout splits the volume
into 2D (ky, kz) slices, each with JSENSE maps and a SENSE-combined target.
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
from mri.fft import fftc, ifftc

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


def _span(limit: Any) -> int:
    """Number of indices an ISMRMRD ``limitType`` allows (``maximum + 1``), 1 when unset."""
    if limit is None or limit.maximum is None:
        return 1
    return int(limit.maximum) + 1


#: Partitions stored as 3D k-space, placed by ``idx.kspace_encode_step_2``.
LAYOUT_KZ = "kspace_encode_step_2"
#: Partitions stored in hybrid space (kz already inverse transformed), placed by ``idx.slice``.
LAYOUT_HYBRID = "slice_hybrid"


def _layout(where: str, enc: Any) -> tuple[str, int]:
    """Which of the two mridata.org layouts the header describes, and its partition count.

    A true 3D file encodes partitions as ``kspace_encoding_step_2`` (matrix ``z`` > 1). The
    Stanford 3D FSE knees published on mridata.org instead declare ``matrixSize.z`` 1,
    ``kspace_encoding_step_2`` 0..1 and ``slice`` 0..255: the scanner has already inverse
    transformed along kz, and each partition is one ``idx.slice``.
    """
    limits = enc.encodingLimits
    matrix_z = int(enc.encodedSpace.matrixSize.z or 1)
    num_slice = _span(getattr(limits, "slice", None) if limits is not None else None)
    if num_slice >= 8:
        # matrixSize.z is 1 in the knee files, but a writer may also give the partition count
        # there; the kz encoding limits are what tells the layouts apart.
        num_kz = _span(getattr(limits, "kspace_encoding_step_2", None))
        if num_kz > 2 or matrix_z not in (1, 2, num_slice):
            raise DataFormatError(
                f"{where}: header declares both {max(num_kz, matrix_z)} kz encodes "
                f"(kspace_encoding_step_2 / matrixSize.z) and {num_slice} slices; multi-slab 3D "
                "is not supported (expected either kz encodes or hybrid-space slices, as "
                "mridata.org knees use)"
            )
        return LAYOUT_HYBRID, num_slice
    limit_z = _header_limit(where, limits, "kspace_encoding_step_2")
    return LAYOUT_KZ, max(_span(limit_z), matrix_z)


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
    """Read an ISMRMRD 3D Cartesian file into centered k-space ``(coils, kx, ky, kz)``.

    Both mridata.org layouts are read (see `_layout`); hybrid-space partitions are brought back
    to kz by the centered FFT after undoing their ``(-1)^slice`` modulation.
    """
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
    layout, nz = _layout(where, enc)
    # The knee headers give kspace_encoding_step_1 0..320 with matrixSize.y 320 (an off-by-one
    # of the writer): room is made for the larger, and the grid is trimmed to the lines present.
    ny_room = max(_span(limit_y), int(matrix.y or 0))
    if ny_room < 8 or nz < 8:
        raise DataFormatError(
            f"{where}: ky x kz grid {ny_room} x {nz} from the header is not a 3D acquisition "
            "(need at least 8 x 8 phase encodes, as kspace_encoding_step_1 x _2, or x slice "
            "for hybrid-space files)"
        )
    system = header.acquisitionSystemInformation
    num_coils = system.receiverChannels if system is not None else None
    noise_bit = np.uint64(1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1))
    partition_field = "slice" if layout == LAYOUT_HYBRID else "kspace_encode_step_2"

    kspace = None
    filled = np.zeros((ny_room, nz), dtype=bool)
    hybrid_kz: set[int] = set()
    for first, records in _acquisition_chunks(path):
        head = records["head"]
        for j in range(len(records)):
            # Noise pre-scans carry no image encoding; they would land on ky = kz = 0.
            if head["flags"][j] & noise_bit:
                continue
            shape = (int(head["active_channels"][j]), int(head["number_of_samples"][j]))
            if kspace is None:
                num_coils = num_coils or shape[0]
                kspace = np.zeros((num_coils, shape[1], ny_room, nz), dtype=np.complex64)
            if shape != kspace.shape[:2] or records["data"][j].size != 2 * shape[0] * shape[1]:
                raise DataFormatError(
                    f"{where}: acquisition {first + j} has data shape {shape} (coils, samples), "
                    f"expected {kspace.shape[:2]} like the first acquisition and the header"
                )
            ky = int(head["idx"]["kspace_encode_step_1"][j])
            kz = int(head["idx"][partition_field][j])
            if not (0 <= ky < ny_room and 0 <= kz < nz):
                raise DataFormatError(
                    f"{where}: acquisition {first + j} has (kspace_encode_step_1, "
                    f"{partition_field}) = ({ky}, {kz}) outside the header's grid {ny_room} x {nz}"
                )
            if layout == LAYOUT_HYBRID:
                hybrid_kz.add(int(head["idx"]["kspace_encode_step_2"][j]))
            # Samples are stored as interleaved float32 (re, im), coil-major.
            kspace[:, :, ky, kz] = records["data"][j].view(np.complex64).reshape(shape)
            filled[ky, kz] = True
    if kspace is None:
        raise DataFormatError(f"{where}: file holds no imaging acquisitions")
    if len(hybrid_kz) > 1:
        raise DataFormatError(
            f"{where}: hybrid-space file (partitions by idx.slice) has acquisitions at "
            f"kspace_encode_step_2 {sorted(hybrid_kz)}; expected a single value"
        )
    ny = max(int(matrix.y or 0), int(np.flatnonzero(filled.any(1)).max()) + 1)
    kspace, filled = kspace[:, :, :ny], filled[:ny]
    missing = int((~filled).sum())
    if missing:
        raise DataFormatError(
            f"{where}: {missing} of {ny * nz} (ky, {partition_field}) phase encodes were never "
            "acquired; convert_mridata needs fully sampled data"
        )
    # Masks put their calibration region at index n // 2 (the centered FFT's zero frequency), so
    # k-space is rolled to match when the header says the centre lies elsewhere; a centre of 0
    # is how some writers leave the field unset, and is then ignored.
    shifts = []
    for limit, n in ((limit_y, ny), (enc.encodingLimits.kspace_encoding_step_2, nz)):
        center = int(limit.center or 0) if limit is not None else 0
        shifts.append(n // 2 - center if 0 < center < n and layout == LAYOUT_KZ else 0)
    if layout == LAYOUT_HYBRID:
        # The ky centre is still a k-space index; the slice centre is an image position.
        center = int(limit_y.center or 0)
        shifts[0] = ny // 2 - center if 0 < center < ny else 0
    if any(shifts):
        kspace = np.roll(kspace, shifts, axis=(2, 3))
    if layout == LAYOUT_HYBRID:
        kspace = _hybrid_to_kz(kspace)
    info = {
        "matrix": [int(matrix.x), ny, nz],
        "layout": layout,
        "num_samples": int(kspace.shape[1]),
        "num_coils": int(kspace.shape[0]),
        "roll_ky_kz": shifts,
    }
    return kspace, info


def _hybrid_to_kz(kspace: np.ndarray) -> np.ndarray:
    """Partitions in hybrid space ``(C, kx, ky, z)`` to k-space ``(C, kx, ky, kz)``, in place.

    The scanner's uncentred inverse FFT along kz leaves every partition multiplied by
    ``(-1)^z`` relative to the centered transform this project uses (a shift of the spectrum by
    half its length); removing that factor and applying the centered FFT over ``z`` puts the kz
    zero frequency at index ``nz // 2``, where the masks calibrate. One coil at a time keeps the
    peak memory at one extra coil volume (a knee file is 1.7 GB).
    """
    sign = np.where(np.arange(kspace.shape[-1]) % 2 == 0, 1, -1).astype(np.float32)
    for c in range(kspace.shape[0]):
        coil = torch.from_numpy(kspace[c] * sign)
        kspace[c] = fftc(coil, dims=(-1,)).numpy()
    return kspace


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

    The XML header is parsed with the ``ismrmrd`` package and says which of two layouts the
    file uses. A true 3D file places each readout (noise scans skipped) on a
    ``(coils, kx, ky, kz)`` grid by ``kspace_encode_step_1`` (ky) and ``kspace_encode_step_2``
    (kz). The Stanford 3D FSE knees on mridata.org (the GLEAM paper's knee data) instead declare
    ``matrixSize.z`` 1, ``kspace_encoding_step_2`` 0..1 and ``slice`` 0..255: their partitions are
    indexed by ``idx.slice`` and already inverse transformed along kz, with the ``(-1)^z``
    factor of an uncentred transform; that factor is removed and a centered FFT over the
    partitions restores kz. Either way the readout (x) is then inverse Fourier transformed,
    and every readout position becomes one 2D slice whose k-space spans ``(ky, kz)``: the
    setting of the 3D FSE knees, where undersampling masks are drawn over the two phase-encode
    axes. Coil maps are estimated per slice with JSENSE and the target is the SENSE combination
    of the fully sampled slice. If the readout is oversampled (more samples than
    ``encodedSpace.matrixSize.x``) the central ``matrixSize.x`` slices are kept, which is where
    the object lies.

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
