"""Reader for fastMRI multicoil h5 files, exactly as they are published.

A fastMRI multicoil file holds ``kspace`` ``(slices, coils, H, W)`` complex64 (H is the
readout, oversampled twice), ``ismrmrd_header`` (the ISMRMRD XML header, as bytes), optionally
``reconstruction_rss`` ``(slices, h, w)`` float32 (absent in test sets), and the attributes
``acquisition``, ``max``, ``norm`` and ``patient_id``.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mri.data.h5format import DataFormatError, _open

__all__ = ["FastMRIVolume", "read_fastmri"]

_NS = "{http://www.ismrm.org/ISMRMRD}"


@dataclass
class FastMRIVolume:
    """A fastMRI multicoil file's contents (see `read_fastmri`).

    Attributes:
        path: the file.
        kspace: ``(slices, coils, H, W)`` complex64 (the selected slices).
        num_slices: slices in the whole file.
        header_xml: the ISMRMRD header as text.
        encoded_shape: encoded matrix ``(x, y, z)`` from the header.
        recon_shape: reconstruction matrix ``(x, y, z)`` from the header.
        reconstruction_rss: ``(slices, h, w)`` float32 for the selected slices, or None.
        attrs: the file attributes (``acquisition``, ``max``, ``norm``, ``patient_id``, ...).
    """

    path: Path
    kspace: np.ndarray
    num_slices: int
    header_xml: str
    encoded_shape: tuple[int, int, int]
    recon_shape: tuple[int, int, int]
    reconstruction_rss: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


def _matrix(root: ET.Element, where: str, space: str) -> tuple[int, int, int]:
    node = root.find(f"{_NS}encoding/{_NS}{space}/{_NS}matrixSize")
    if node is None:
        raise DataFormatError(f"{where}: 'ismrmrd_header' has no encoding/{space}/matrixSize")
    try:
        return tuple(int(node.find(f"{_NS}{a}").text) for a in "xyz")  # type: ignore[union-attr]
    except (AttributeError, TypeError, ValueError) as err:
        raise DataFormatError(f"{where}: 'ismrmrd_header' {space}/matrixSize is malformed") from err


def read_fastmri(path: str | os.PathLike, index: slice | None = None) -> FastMRIVolume:
    """Read a fastMRI multicoil h5 file, validating its layout.

    Example:
        >>> vol = read_fastmri("file1000000.h5")
        >>> vol.kspace.shape, vol.recon_shape
        ((36, 15, 640, 368), (320, 320, 1))

    Args:
        path: the ``.h5`` file.
        index: the slices to load (all if None); ``num_slices`` always counts the whole file.

    Returns:
        A `FastMRIVolume`.

    Raises:
        DataFormatError: if the file is missing or truncated, ``kspace`` or ``ismrmrd_header``
            is missing, ``kspace`` is not complex64 of rank 4 (single-coil files have rank 3 and
            are refused), ``reconstruction_rss`` has a different number of slices, or the
            header is not ISMRMRD XML.
    """
    path, f = _open(path)
    where = str(path)
    sel = slice(None) if index is None else index
    if not isinstance(sel, slice):
        raise TypeError(f"index must be a slice or None, got {type(index)}")
    with f:
        for key in ("kspace", "ismrmrd_header"):
            if key not in f:
                raise DataFormatError(
                    f"{where}: missing key {key!r}; found keys {sorted(f.keys())}"
                )
        kspace = f["kspace"]
        if kspace.dtype != np.complex64 or kspace.ndim != 4:
            raise DataFormatError(
                f"{where}: 'kspace' must be complex64 (slices, coils, H, W) as in fastMRI "
                f"multicoil files, got {kspace.dtype} with shape {kspace.shape}"
            )
        raw = f["ismrmrd_header"][()]
        header_xml = raw.decode() if isinstance(raw, bytes) else str(raw)
        try:
            root = ET.fromstring(header_xml)
        except ET.ParseError as err:
            raise DataFormatError(f"{where}: 'ismrmrd_header' is not XML: {err}") from err
        rss = None
        if "reconstruction_rss" in f:
            rss_dset = f["reconstruction_rss"]
            if rss_dset.ndim != 3 or rss_dset.shape[0] != kspace.shape[0]:
                raise DataFormatError(
                    f"{where}: 'reconstruction_rss' shape {rss_dset.shape} does not match "
                    f"'kspace' shape {kspace.shape}; expected ({kspace.shape[0]}, h, w)"
                )
        try:
            data = np.asarray(kspace[sel])
            if "reconstruction_rss" in f:
                rss = np.asarray(f["reconstruction_rss"][sel])
        except OSError as err:
            raise DataFormatError(
                f"{where}: cannot read 'kspace' {kspace.shape}; truncated? {err}"
            ) from err
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        return FastMRIVolume(
            path=path,
            kspace=data,
            num_slices=int(kspace.shape[0]),
            header_xml=header_xml,
            encoded_shape=_matrix(root, where, "encodedSpace"),
            recon_shape=_matrix(root, where, "reconSpace"),
            reconstruction_rss=rss,
            attrs=attrs,
        )
