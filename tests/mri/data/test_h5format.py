"""The h5 slice format: round trip, and an error naming file, key and shapes for every defect."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mri.data import DataFormatError, inspect_slices, read_slices, write_slices
from mri.data.h5format import FORMAT_VERSION

PROVENANCE = {"generator": "test", "source": None, "parameters": {"n": 1}}


def _arrays(slices: int = 3, coils: int = 2, spatial: tuple[int, ...] = (8, 6), seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def randc(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.complex64)

    return randc(slices, coils, *spatial), randc(slices, coils, *spatial), randc(slices, *spatial)


def _write_raw(path: Path, **datasets: np.ndarray) -> Path:
    """An h5 file with the given datasets and valid attributes, bypassing `write_slices`."""
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f.create_dataset(key, data=value)
        f.attrs["kind"] = "2d"
        f.attrs["provenance"] = json.dumps(PROVENANCE)
        f.attrs["format_version"] = FORMAT_VERSION
    return path


@pytest.mark.parametrize(
    ("kind", "spatial"), [("2d", (8, 6)), ("3d", (4, 8, 6)), ("cine", (5, 8, 6))]
)
def test_write_then_read_round_trips_arrays_and_attributes(tmp_path, kind, spatial):
    kspace, maps, target = _arrays(spatial=spatial)
    path = write_slices(
        tmp_path / "sub" / "vol.h5", kspace, maps, target, kind=kind, provenance=PROVENANCE,
        acceleration=4,
    )  # fmt: skip
    data = read_slices(path)
    assert torch.equal(data.kspace, kspace)
    assert torch.equal(data.maps, maps)
    assert torch.equal(data.target, target)
    info = data.info
    assert (info.kind, info.num_slices, info.num_coils) == (kind, 3, 2)
    assert info.spatial_shape == spatial
    assert info.acceleration == 4.0
    assert info.provenance == PROVENANCE
    assert inspect_slices(path) == info
    assert not path.with_name("vol.h5.tmp").exists()


def test_read_one_slice_keeps_the_slice_axis_and_numpy_inputs_are_accepted(tmp_path):
    kspace, maps, target = (a.numpy() for a in _arrays())
    path = write_slices(tmp_path / "v.h5", kspace, maps, target, kind="2d", provenance={})
    one = read_slices(path, -1)
    assert tuple(one.kspace.shape) == (1, 2, 8, 6)
    assert np.array_equal(one.target[0].numpy(), target[2])
    assert read_slices(path).info.acceleration is None
    with pytest.raises(IndexError, match=r"v\.h5: slice 3 out of range for 3 slices"):
        read_slices(path, 3)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataFormatError, match=r"nothing\.h5: file does not exist"):
        read_slices(tmp_path / "nothing.h5")
    with pytest.raises(DataFormatError, match=r"nothing\.h5: file does not exist"):
        inspect_slices(tmp_path / "nothing.h5")


def test_missing_key_names_the_file_the_key_and_the_keys_found(tmp_path):
    kspace, maps, _ = (a.numpy() for a in _arrays())
    path = _write_raw(tmp_path / "nomaps.h5", kspace=kspace, maps=maps)
    with pytest.raises(
        DataFormatError, match=r"nomaps\.h5: missing key 'target'; found keys \['kspace', 'maps'\]"
    ):
        read_slices(path)


def test_wrong_dtype_names_the_key_dtype_and_shape(tmp_path):
    kspace, maps, target = (a.numpy() for a in _arrays())
    path = _write_raw(tmp_path / "f64.h5", kspace=kspace.astype(np.complex128), maps=maps,
                      target=target)  # fmt: skip
    with pytest.raises(
        DataFormatError,
        match=r"f64\.h5: 'kspace' must be complex64, got complex128 \(shape \(3, 2, 8, 6\)\)",
    ):
        inspect_slices(path)
    with pytest.raises(DataFormatError, match=r"maps must be complex64, got torch torch.float32"):
        write_slices(tmp_path / "w.h5", torch.from_numpy(kspace), torch.zeros(3, 2, 8, 6),
                     torch.from_numpy(target), kind="2d", provenance={})  # fmt: skip


def test_wrong_rank_names_the_kind_and_shape(tmp_path):
    kspace, maps, target = (a.numpy() for a in _arrays())
    path = _write_raw(tmp_path / "rank.h5", kspace=kspace[:, 0], maps=maps[:, 0], target=target)
    with pytest.raises(
        DataFormatError,
        match=r"rank\.h5: 'kspace' must have rank 4 .* kind '2d', got shape \(3, 8, 6\)",
    ):
        read_slices(path)
    with pytest.raises(DataFormatError, match=r"'kspace' must have rank 5 .* kind '3d'"):
        write_slices(tmp_path / "w.h5", kspace, maps, target, kind="3d", provenance={})


def test_mismatched_shapes_name_both_keys_and_shapes(tmp_path):
    kspace, maps, target = (a.numpy() for a in _arrays())
    path = _write_raw(tmp_path / "maps.h5", kspace=kspace, maps=maps[:, :1], target=target)
    with pytest.raises(
        DataFormatError,
        match=r"maps\.h5: 'maps' shape \(3, 1, 8, 6\) does not match 'kspace' shape \(3, 2, 8, 6\)",
    ):
        read_slices(path)
    path = _write_raw(tmp_path / "target.h5", kspace=kspace, maps=maps, target=target[:2])
    with pytest.raises(
        DataFormatError,
        match=r"target\.h5: 'target' shape \(2, 8, 6\) does not match 'kspace' shape "
        r"\(3, 2, 8, 6\); expected \(3, 8, 6\)",
    ):
        read_slices(path)
    with pytest.raises(DataFormatError, match=r"w\.h5: 'target' shape \(3, 8, 5\)"):
        write_slices(tmp_path / "w.h5", kspace, maps, target[..., :5], kind="2d", provenance={})


def test_truncated_file_is_reported_not_crashed(tmp_path):
    kspace, maps, target = _arrays(slices=4, spatial=(32, 32))
    path = write_slices(tmp_path / "cut.h5", kspace, maps, target, kind="2d", provenance={})
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataFormatError, match=r"cut\.h5: cannot"):
        read_slices(path)


def test_bad_attributes_and_arguments_are_named(tmp_path):
    kspace, maps, target = _arrays()
    with pytest.raises(DataFormatError, match=r"kind must be one of \['2d', '3d', 'cine'\]"):
        write_slices(tmp_path / "k.h5", kspace, maps, target, kind="4d", provenance={})
    with pytest.raises(DataFormatError, match=r"acceleration must be None or a number > 1, got 1"):
        write_slices(tmp_path / "a.h5", kspace, maps, target, kind="2d", provenance={},
                     acceleration=1)  # fmt: skip
    with pytest.raises(DataFormatError, match=r"provenance is not JSON-serialisable"):
        write_slices(tmp_path / "p.h5", kspace, maps, target, kind="2d",
                     provenance={"x": object()})  # fmt: skip
    path = _write_raw(
        tmp_path / "nokind.h5", kspace=kspace.numpy(), maps=maps.numpy(), target=target.numpy()
    )
    with h5py.File(path, "r+") as f:
        del f.attrs["kind"]
    with pytest.raises(DataFormatError, match=r"nokind\.h5: missing attribute 'kind'"):
        inspect_slices(path)
