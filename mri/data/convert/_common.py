"""Helpers shared by the converters: source discovery, argument checks, provenance."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mri.data._backend import sense_combine
from mri.data.h5format import DataFormatError

#: Recorded in every converted file's provenance; bump it when a converter's output changes.
CONVERTER_VERSION = 1


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
