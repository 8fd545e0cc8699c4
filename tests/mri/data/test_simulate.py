"""The built-in simulated data: deterministic per seed, cached, varied, physically consistent."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mri.data import DataFormatError, inspect_slices, read_slices, simulate_dataset
from mri.data._backend import sense_combine, sense_expand
from mri.data.simulate import GENERATOR, coil_maps, simulate_multicoil

SMALL = {"num_train": 3, "num_val": 1, "num_test": 1, "num_coils": 2}


def _all(files: dict) -> list:
    return [p for split in ("train", "val", "test") for p in files[split]]


def test_same_seed_gives_identical_data_and_another_seed_differs(tmp_path):
    a = simulate_dataset(tmp_path / "a", shape=(16, 16), seed=1, **SMALL)
    b = simulate_dataset(tmp_path / "b", shape=(16, 16), seed=1, **SMALL)
    c = simulate_dataset(tmp_path / "c", shape=(16, 16), seed=2, **SMALL)
    for pa, pb in zip(_all(a), _all(b), strict=True):
        da, db = read_slices(pa), read_slices(pb)
        assert torch.equal(da.kspace, db.kspace) and torch.equal(da.target, db.target)
    assert not torch.equal(read_slices(a["train"][0]).kspace, read_slices(c["train"][0]).kspace)


def test_second_call_reuses_the_files_without_rewriting(tmp_path):
    first = simulate_dataset(tmp_path, shape=(16, 16), **SMALL)
    mtimes = {p: p.stat().st_mtime_ns for p in _all(first)}
    second = simulate_dataset(tmp_path, shape=(16, 16), **SMALL)
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in _all(second)} == mtimes


def test_changed_parameters_regenerate_the_files(tmp_path):
    first = simulate_dataset(tmp_path, shape=(16, 16), noise_std=0.01, **SMALL)
    before = read_slices(first["train"][0]).kspace
    second = simulate_dataset(tmp_path, shape=(16, 16), noise_std=0.05, **SMALL)
    info = inspect_slices(second["train"][0])
    assert info.provenance["parameters"]["noise_std"] == 0.05
    assert not torch.equal(read_slices(second["train"][0]).kspace, before)
    # A smaller split removes the files that are no longer part of it.
    third = simulate_dataset(tmp_path, shape=(16, 16), **{**SMALL, "num_train": 1})
    assert sorted((tmp_path / "train").glob("*.h5")) == third["train"]


def test_a_foreign_file_in_a_split_folder_is_refused(tmp_path):
    simulate_dataset(tmp_path, shape=(16, 16), **SMALL)
    (tmp_path / "train" / "mine.h5").write_bytes(b"not ours")
    with pytest.raises(DataFormatError, match=rf"mine\.h5: not written by {GENERATOR}"):
        simulate_dataset(tmp_path, shape=(16, 16), **SMALL)


@pytest.mark.parametrize(
    ("kind", "shape", "per_file"),
    [("2d", (16, 12), 4), ("3d", (8, 12, 10), 1), ("cine", (4, 12, 10), 1)],
)
def test_kinds_have_the_documented_shapes(tmp_path, kind, shape, per_file):
    files = simulate_dataset(tmp_path, kind=kind, shape=shape, **SMALL)
    assert [len(files[s]) for s in ("train", "val", "test")] == [math.ceil(3 / per_file), 1, 1]
    info = inspect_slices(files["train"][0])
    assert (info.kind, info.num_coils, info.spatial_shape) == (kind, 2, shape)
    assert info.num_slices == min(per_file, 3)
    assert info.provenance["generator"] == GENERATOR


@pytest.mark.parametrize(
    ("kind", "shape"), [("2d", (16, 12)), ("3d", (8, 12, 10)), ("cine", (4, 12, 10))]
)
def test_sense_combination_of_noise_free_kspace_is_the_target(kind, shape):
    rng = np.random.default_rng(0)
    image = rng.random(shape).astype(np.float32)
    maps = coil_maps(shape, 3, kind)
    kspace, target = simulate_multicoil(image, maps, kind, rng, noise_std=0.0)
    assert torch.allclose(sense_combine(kspace, maps, kind), target, atol=1e-5)
    assert torch.allclose(target.abs(), torch.from_numpy(image), atol=1e-5)
    assert not torch.allclose(target.imag, torch.zeros(shape), atol=1e-3)  # the phase is there


def test_noise_has_the_requested_level():
    rng = np.random.default_rng(0)
    image = np.zeros((32, 32), np.float32)
    kspace, _ = simulate_multicoil(image, coil_maps((32, 32), 4, "2d"), "2d", rng, noise_std=0.1)
    assert float(kspace.abs().square().mean().sqrt()) == pytest.approx(0.1, rel=0.05)


def test_phantoms_are_varied(tmp_path):
    files = simulate_dataset(tmp_path, shape=(32, 32), **{**SMALL, "num_train": 4})
    targets = read_slices(files["train"][0]).target.abs()
    for i in range(4):
        for j in range(i + 1, 4):
            # Different scenes, not the same one rescaled: a clear relative difference.
            diff = (targets[i] - targets[j]).norm() / targets[i].norm()
            assert diff > 0.2, (i, j, float(diff))


def test_cine_frames_move_over_time(tmp_path):
    files = simulate_dataset(tmp_path, kind="cine", shape=(6, 32, 32), **SMALL)
    movie = read_slices(files["train"][0]).target[0].abs()  # (T, H, W)
    change = [(movie[t] - movie[0]).abs().max() for t in range(1, 6)]
    assert max(change) > 0.1
    maps = read_slices(files["train"][0]).maps[0]
    assert torch.equal(maps[:, 0], maps[:, -1])  # coils are static; only the anatomy moves


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"image sides >= 8 for kind '2d', got \(4, 16\)"):
        simulate_dataset("unused", shape=(4, 16))
    with pytest.raises(ValueError, match=r"needs T >= 2 frames, got \(1, 16, 16\)"):
        simulate_dataset("unused", kind="cine", shape=(1, 16, 16))
    with pytest.raises(ValueError, match=r"shape must be 3 ints for kind '3d', got \(16, 16\)"):
        simulate_dataset("unused", kind="3d", shape=(16, 16))
    with pytest.raises(ValueError, match=r"num_coils must be an int >= 1, got 0"):
        simulate_dataset("unused", shape=(16, 16), num_coils=0)
    with pytest.raises(ValueError, match=r"kind must be one of"):
        simulate_dataset("unused", kind="4d")


def test_coils_are_placed_anew_for_every_volume(tmp_path):
    files = simulate_dataset(tmp_path, shape=(32, 32), maps="true", **{**SMALL, "num_train": 8})
    first, second = (read_slices(p).maps for p in files["train"])
    # One placement per volume (file): its slices share it, the next volume differs clearly.
    assert all(torch.equal(first[0], m) for m in first)
    assert (first[0] - second[0]).norm() / first[0].norm() > 0.2
    assert torch.allclose(first[0].abs().square().sum(0), torch.ones(32, 32), atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "shape"), [("2d", (32, 32)), ("3d", (8, 32, 32)), ("cine", (4, 32, 32))]
)
def test_stored_maps_are_estimated_so_the_data_are_not_in_the_operators_range(
    tmp_path, kind, shape
):
    # The inverse crime: with the simulation's own maps the noise-free data are exactly
    # A(target). With ESPIRiT maps from the calibration region they are not, while the target
    # still is the phantom's magnitude where ESPIRiT finds signal.
    common = {"kind": kind, "shape": shape, "noise_std": 0.0, "num_train": 1,
              "num_val": 1, "num_test": 1, "num_coils": 6}  # fmt: skip
    exact = read_slices(simulate_dataset(tmp_path / "true", maps="true", **common)["train"][0])
    est = read_slices(simulate_dataset(tmp_path / "esp", calib=12, **common)["train"][0])
    assert torch.equal(exact.kspace, est.kspace)  # the same scan, only the stored maps differ
    assert not torch.allclose(est.maps, exact.maps, atol=1e-2)

    def mismatch(d):
        resynth = sense_expand(d.target[0], d.maps[0], kind)
        return float((resynth - d.kspace[0]).norm() / d.kspace[0].norm())

    assert mismatch(exact) < 1e-5
    assert mismatch(est) > 1e-3
    truth = exact.target[0].abs()
    support = est.maps[0].abs().square().sum(0) > 0.5
    assert float(support.float().mean()) > 0.4
    err = (est.target[0].abs() - truth)[support].norm() / truth[support].norm()
    assert float(err) < 0.05
    # The maps follow the calibration width they are told, recorded for the cache.
    assert inspect_slices(simulate_dataset(tmp_path / "esp", calib=12, **common)["train"][0]
                          ).provenance["parameters"]["calib"] == 12  # fmt: skip


def test_bad_map_arguments_are_named():
    with pytest.raises(ValueError, match=r"maps must be one of \['espirit', 'jsense', 'true'\]"):
        simulate_dataset("unused", shape=(16, 16), maps="exact")
    with pytest.raises(ValueError, match=r"calib must be an int >= 6, got 4"):
        simulate_dataset("unused", shape=(16, 16), calib=4)
    with pytest.raises(ValueError, match=r"calib 20 is wider than the phase-encode sides"):
        simulate_dataset("unused", shape=(16, 16), calib=20)
