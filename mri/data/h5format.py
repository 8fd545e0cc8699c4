"""The h5 slice format: multi-coil k-space, coil maps and target, one file per volume.

A file holds three datasets (DESIGN.md section 4), all ``complex64``:

- ``kspace`` ``(slices, coils, *spatial)``: the measured k-space (zeros where not sampled);
- ``maps`` ``(slices, coils, *spatial)``: coil sensitivity maps;
- ``target`` ``(slices, *spatial)``: the reference image (for converted scanner data the SENSE
  combination of the fully sampled k-space with ``maps``; for the built-in simulation the
  noise-free image seen through ``maps``, see `mri.data.simulate`);

and attributes: ``kind`` (``"2d"``, ``"3d"`` or ``"cine"``; spatial is ``(H, W)``,
``(D, H, W)`` or ``(T, H, W)``), ``acceleration`` (only if ``kspace`` is already undersampled),
``provenance`` (JSON: the generator or converter, its source file, parameters and version) and
``format_version``. Every reader validates the file and raises `DataFormatError` naming the file,
the key and the shapes at fault.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from mri.data._backend import KINDS

__all__ = [
    "FORMAT_VERSION",
    "DataFormatError",
    "SliceData",
    "SliceFileInfo",
    "inspect_slices",
    "read_slices",
    "write_slices",
]

#: Written to every file's ``format_version`` attribute.
FORMAT_VERSION = 1


class DataFormatError(ValueError):
    """A data file is missing, unreadable, or not in the format it claims to be."""


@dataclass(frozen=True)
class SliceFileInfo:
    """What `inspect_slices` learns about an h5 slice file without loading its arrays.

    Attributes:
        path: the file.
        kind: ``"2d"``, ``"3d"`` or ``"cine"``.
        num_slices: entries along the first axis.
        num_coils: coils.
        spatial_shape: ``(H, W)``, ``(D, H, W)`` or ``(T, H, W)``.
        acceleration: the acceleration of pre-masked k-space, or None if fully sampled.
        provenance: the generator or converter's record (decoded JSON).
    """

    path: Path
    kind: str
    num_slices: int
    num_coils: int
    spatial_shape: tuple[int, ...]
    acceleration: float | None
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class SliceData:
    """Arrays read from an h5 slice file (see `read_slices`).

    Attributes:
        kspace: ``(slices, coils, *spatial)`` complex64.
        maps: ``(slices, coils, *spatial)`` complex64.
        target: ``(slices, *spatial)`` complex64.
        info: the file's `SliceFileInfo`.
    """

    kspace: torch.Tensor
    maps: torch.Tensor
    target: torch.Tensor
    info: SliceFileInfo


def _as_complex64(name: str, value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.complex64:
            raise DataFormatError(f"{name} must be complex64, got torch {value.dtype}")
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.dtype != np.complex64:
            raise DataFormatError(f"{name} must be complex64, got numpy {value.dtype}")
        return value
    raise DataFormatError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value)}")


def _check_shapes(where: str, kind: str, kspace: tuple, maps: tuple, target: tuple) -> None:
    rank = KINDS[kind]
    if len(kspace) != rank + 2:
        raise DataFormatError(
            f"{where}: 'kspace' must have rank {rank + 2} (slices, coils, *spatial) for kind "
            f"{kind!r}, got shape {kspace}"
        )
    if tuple(maps) != tuple(kspace):
        raise DataFormatError(
            f"{where}: 'maps' shape {maps} does not match 'kspace' shape {kspace}"
        )
    expected = (kspace[0], *kspace[2:])
    if tuple(target) != expected:
        raise DataFormatError(
            f"{where}: 'target' shape {target} does not match 'kspace' shape {kspace}; "
            f"expected {expected} (slices, *spatial)"
        )
    if kspace[0] < 1 or kspace[1] < 1:
        raise DataFormatError(f"{where}: 'kspace' has no slices or no coils: shape {kspace}")


def _check_kind(where: str, kind: Any) -> str:
    if kind not in KINDS:
        raise DataFormatError(f"{where}: kind must be one of {sorted(KINDS)}, got {kind!r}")
    return kind


def write_slices(
    path: str | os.PathLike,
    kspace: torch.Tensor | np.ndarray,
    maps: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    *,
    kind: str,
    provenance: dict[str, Any],
    acceleration: float | None = None,
) -> Path:
    """Write an h5 slice file; the arrays are validated first, nothing is coerced.

    Example:
        >>> write_slices("vol.h5", kspace, maps, target, kind="2d",
        ...              provenance={"generator": "mine", "version": "1"})

    Args:
        path: the file to write (overwritten if it exists; parents are created).
        kspace: ``(slices, coils, *spatial)`` complex64.
        maps: the same shape, complex64.
        target: ``(slices, *spatial)`` complex64.
        kind: ``"2d"``, ``"3d"`` or ``"cine"``.
        provenance: JSON-serialisable record of where the data came from.
        acceleration: set only if ``kspace`` is already undersampled (> 1).

    Returns:
        The path written.

    Raises:
        DataFormatError: on a wrong dtype, rank, mismatched shapes, a bad ``kind`` or
            ``acceleration``, or a provenance that is not JSON-serialisable.
    """
    path = Path(path)
    where = str(path)
    kind = _check_kind(where, kind)
    arrays = {
        n: _as_complex64(n, v) for n, v in (("kspace", kspace), ("maps", maps), ("target", target))
    }
    _check_shapes(where, kind, arrays["kspace"].shape, arrays["maps"].shape, arrays["target"].shape)
    if acceleration is not None and not (
        isinstance(acceleration, (int, float)) and acceleration > 1
    ):
        raise DataFormatError(
            f"{where}: acceleration must be None or a number > 1, got {acceleration!r}"
        )
    if not isinstance(provenance, dict):
        raise DataFormatError(f"{where}: provenance must be a dict, got {type(provenance)}")
    try:
        provenance_json = json.dumps(provenance, sort_keys=True)
    except TypeError as err:
        raise DataFormatError(f"{where}: provenance is not JSON-serialisable: {err}") from err
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary name first so an interrupted run never leaves a half file that
    # looks finished (the simulated-data cache trusts files that exist).
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for name, array in arrays.items():
            f.create_dataset(name, data=array)
        f.attrs["kind"] = kind
        f.attrs["provenance"] = provenance_json
        f.attrs["format_version"] = FORMAT_VERSION
        if acceleration is not None:
            f.attrs["acceleration"] = float(acceleration)
    os.replace(tmp, path)
    return path


def _open(path: str | os.PathLike) -> tuple[Path, h5py.File]:
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path}: file does not exist")
    if not path.is_file():
        raise DataFormatError(f"{path}: not a file")
    try:
        return path, h5py.File(path, "r")
    except OSError as err:
        raise DataFormatError(
            f"{path}: cannot be opened as HDF5 (truncated or corrupt?): {err}"
        ) from err


def _dataset(f: h5py.File, where: str, key: str) -> h5py.Dataset:
    if key not in f:
        raise DataFormatError(f"{where}: missing key {key!r}; found keys {sorted(f.keys())}")
    dset = f[key]
    if not isinstance(dset, h5py.Dataset):
        raise DataFormatError(f"{where}: {key!r} is a group, expected a dataset")
    if dset.dtype != np.complex64:
        raise DataFormatError(
            f"{where}: {key!r} must be complex64, got {dset.dtype} (shape {dset.shape})"
        )
    return dset


def _info(f: h5py.File, path: Path) -> SliceFileInfo:
    where = str(path)
    kspace, maps, target = (_dataset(f, where, k) for k in ("kspace", "maps", "target"))
    if "kind" not in f.attrs:
        raise DataFormatError(
            f"{where}: missing attribute 'kind'; found attributes {sorted(f.attrs)}"
        )
    kind = f.attrs["kind"]
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    _check_kind(where, kind)
    _check_shapes(where, kind, kspace.shape, maps.shape, target.shape)
    acceleration = f.attrs.get("acceleration")
    if acceleration is not None:
        acceleration = float(acceleration)
        if not acceleration > 1:
            raise DataFormatError(
                f"{where}: attribute 'acceleration' must be > 1, got {acceleration}"
            )
    try:
        provenance = json.loads(f.attrs.get("provenance", "{}"))
    except (TypeError, json.JSONDecodeError) as err:
        raise DataFormatError(f"{where}: attribute 'provenance' is not valid JSON: {err}") from err
    return SliceFileInfo(
        path=path,
        kind=kind,
        num_slices=int(kspace.shape[0]),
        num_coils=int(kspace.shape[1]),
        spatial_shape=tuple(int(n) for n in kspace.shape[2:]),
        acceleration=acceleration,
        provenance=provenance,
    )


def inspect_slices(path: str | os.PathLike) -> SliceFileInfo:
    """Validate an h5 slice file's keys, dtypes, shapes and attributes without loading arrays.

    Args:
        path: the file.

    Returns:
        Its `SliceFileInfo`.

    Raises:
        DataFormatError: if the file is missing, truncated, lacks a key or attribute, or has a
            wrong dtype, rank or mismatched shapes. The message names the file and the key.
    """
    path, f = _open(path)
    with f:
        return _info(f, path)


def read_slices(path: str | os.PathLike, index: int | slice | None = None) -> SliceData:
    """Read (part of) an h5 slice file into torch tensors, after validating it.

    Args:
        path: the file.
        index: one slice (an int; the slice axis is kept, length 1), a `slice` of them, or None
            for all.

    Returns:
        A `SliceData`.

    Raises:
        DataFormatError: as `inspect_slices`, or if the data cannot be read (truncated file).
        IndexError: if an int ``index`` is out of range.
    """
    path, f = _open(path)
    with f:
        info = _info(f, path)
        if index is None:
            sel = slice(None)
        elif isinstance(index, slice):
            sel = index
        elif isinstance(index, (int, np.integer)) and not isinstance(index, bool):
            if not -info.num_slices <= index < info.num_slices:
                raise IndexError(f"{path}: slice {index} out of range for {info.num_slices} slices")
            i = int(index) % info.num_slices
            sel = slice(i, i + 1)
        else:
            raise TypeError(f"index must be an int, a slice or None, got {type(index)}")
        arrays = {}
        for key in ("kspace", "maps", "target"):
            try:
                arrays[key] = torch.from_numpy(np.ascontiguousarray(f[key][sel]))
            except OSError as err:
                raise DataFormatError(
                    f"{path}: cannot read {key!r} (shape {f[key].shape}); truncated file? {err}"
                ) from err
    return SliceData(info=info, **arrays)
