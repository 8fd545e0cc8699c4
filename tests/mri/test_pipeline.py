"""The slice pipeline: masks per split, normalisation, batches, workers and data errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from mri.config import load_config
from mri.data import DataFormatError
from mri.data._backend import sense_combine, sense_expand
from mri.data.h5format import read_slices, write_slices
from mri.data.simulate import coil_maps
from mri.pipeline import SliceDataset, batch_to_inputs, make_loader, prepare_builtin

OVERRIDES = {"data.num_train": 6, "data.num_val": 5, "data.num_test": 2}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory):
    """(cfg, root) of the cpu-tiny built-in data: 32x32, 4 coils, Poisson disc R=4."""
    cfg = load_config("cpu-tiny", OVERRIDES)
    return cfg, prepare_builtin(cfg, tmp_path_factory.mktemp("pipeline"))


def test_training_masks_are_random_across_items_and_epochs_but_reproducible(data_root):
    cfg, root = data_root
    ds = SliceDataset(root / "train", cfg, train=True, seed=7)
    seen = {}
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            seen[epoch, i] = ds.mask_for(i)
    distinct = {m.numpy().tobytes() for m in seen.values()}
    assert len(distinct) >= 10, f"only {len(distinct)} distinct masks over 18 draws"
    assert any(not torch.equal(seen[0, i], seen[1, i]) for i in range(len(ds)))
    again = SliceDataset(root / "train", cfg, train=True, seed=7)
    again.set_epoch(2)
    assert torch.equal(again[3]["mask"], seen[2, 3])
    other = SliceDataset(root / "train", cfg, train=True, seed=8)
    assert any(not torch.equal(other.mask_for(i), seen[0, i]) for i in range(len(ds)))


def test_validation_masks_are_fixed_per_file_and_shared_by_its_slices(data_root):
    cfg, root = data_root
    ds = SliceDataset(root / "val", cfg, train=False)
    by_file: dict[str, list[torch.Tensor]] = {}
    for epoch in (0, 5):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            by_file.setdefault(item["fname"], []).append(item["mask"])
    assert len(by_file) == 2  # 5 validation slices: files of 4 and 1
    for masks in by_file.values():
        assert all(torch.equal(m, masks[0]) for m in masks)
    first, second = (masks[0] for masks in by_file.values())
    assert not torch.equal(first, second)
    fresh = SliceDataset(root / "val", cfg, train=False)
    assert torch.equal(fresh[0]["mask"], ds[0]["mask"])


def test_achieved_acceleration_is_close_to_the_config(data_root):
    cfg, root = data_root
    ds = SliceDataset(root / "train", cfg, train=True)
    for i in range(len(ds)):
        mask = ds.mask_for(i)
        achieved = mask.numel() / float(mask.sum())
        assert achieved == pytest.approx(cfg.data.accel, rel=0.2)


def test_kspace_and_target_share_one_scale_that_puts_the_zero_filled_p95_at_one(data_root):
    cfg, root = data_root
    ds = SliceDataset(root / "val", cfg, train=False)
    item = ds[1]
    raw = read_slices(root / "val" / item["fname"], item["slice"])
    scale = item["scale"]
    assert torch.allclose(item["kspace"] * scale, raw.kspace[0] * item["mask"], atol=1e-6)
    assert torch.allclose(item["target"] * scale, raw.target[0], atol=1e-6)
    zero_filled = sense_combine(item["kspace"], item["maps"], "2d")
    assert float(torch.quantile(zero_filled.abs().flatten(), 0.95)) == pytest.approx(1.0, rel=1e-4)


def test_batch_to_inputs_gives_the_adjoint_of_the_masked_kspace(data_root):
    cfg, root = data_root
    loader = make_loader(root, "val", cfg, shuffle=False, batch_size=2)
    batch = next(iter(loader))
    x0, target, meas = batch_to_inputs(batch)
    masked = batch["kspace"] * batch["mask"].unsqueeze(1)
    expected = sense_combine(masked, batch["maps"], "2d")
    assert x0.shape == target.shape == (2, 32, 32)
    assert torch.allclose(x0, expected, atol=1e-5)
    assert torch.equal(meas.kspace, batch["kspace"])


def test_loader_with_two_workers_gives_the_same_batches_as_without(data_root):
    cfg, root = data_root
    batches = {}
    for workers in (0, 2):
        wcfg = load_config("cpu-tiny", {**OVERRIDES, "train.num_workers": workers})
        loader = make_loader(root, "train", wcfg, shuffle=True, batch_size=2)
        loader.set_epoch(1)
        batches[workers] = list(loader)
    assert len(batches[2]) == 3
    for a, b in zip(batches[0], batches[2], strict=True):
        assert a["fname"] == b["fname"] and torch.equal(a["slice"], b["slice"])
        assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["kspace"], b["kspace"])


def test_missing_empty_and_mismatched_folders_raise_data_format_errors(data_root, tmp_path):
    cfg, root = data_root
    with pytest.raises(DataFormatError, match=r"folder .*nowhere does not exist"):
        SliceDataset(tmp_path / "nowhere", cfg, train=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match=r"no \.h5 files in .*empty"):
        make_loader(tmp_path, "empty", cfg, shuffle=False)
    cine = load_config(
        "cpu-tiny",
        {"data.kind": "cine", "data.shape": [8, 32, 32], "data.mask": "kt", "model.conv_dim": 3},
    )
    with pytest.raises(DataFormatError, match=r"holds \['2d'\] data but the config says .*'cine'"):
        SliceDataset(root / "val", cine, train=False)
    bad = tmp_path / "bad"
    shutil.copytree(root / "test", bad)
    next(bad.glob("*.h5")).write_bytes(b"broken")
    with pytest.raises(DataFormatError, match=r"cannot be opened as HDF5"):
        SliceDataset(bad, cfg, train=False)


def _write_group(folder, name: str, coils: int, shape: tuple[int, int], slices: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(slices, *shape, dtype=torch.complex64, generator=gen)
    maps = coil_maps(shape, coils, "2d")[None].expand(slices, -1, -1, -1).contiguous()
    kspace = sense_expand(image, maps, "2d")
    write_slices(folder / name, kspace, maps, image, kind="2d", provenance={"test": "mixed"})


@pytest.fixture
def mixed_root(tmp_path):
    """fastMRI-brain-like training data: 4 and 6 coils, two widths (items: 4, 3, 2)."""
    train = tmp_path / "train"
    train.mkdir()
    _write_group(train, "a.h5", 4, (32, 32), 4, seed=0)
    _write_group(train, "b.h5", 6, (32, 32), 3, seed=1)
    _write_group(train, "c.h5", 4, (32, 24), 2, seed=2)
    return tmp_path


def test_mixed_coil_counts_and_widths_batch_by_group_and_cover_each_epoch(mixed_root):
    cfg = load_config("cpu-tiny", {"train.batch_size": 2})
    loader = make_loader(mixed_root, "train", cfg, shuffle=True)
    orders = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = list(loader)
        # drop_last per group: 4 -> 2 batches, 3 -> 1, 2 -> 1.
        assert len(batches) == len(loader) == 4
        seen = []
        for batch in batches:
            assert batch["kspace"].shape[0] == 2
            seen += list(zip(batch["fname"], batch["slice"].tolist(), strict=True))
        assert len(set(seen)) == 8
        orders.append(seen)
    assert orders[0] != orders[1]
    loader.set_epoch(1)
    assert [
        (f, s) for b in loader for f, s in zip(b["fname"], b["slice"].tolist(), strict=True)
    ] == orders[1]
    # Without shuffling nothing is dropped, and the order is the files' order within groups.
    shutil.copytree(mixed_root / "train", mixed_root / "val")
    val = make_loader(mixed_root, "val", cfg, shuffle=False, batch_size=2)
    names = [list(b["fname"]) for b in val.loader]
    assert names == [["a.h5"] * 2, ["a.h5"] * 2, ["b.h5"] * 2, ["b.h5"], ["c.h5"] * 2]


def test_a_batch_size_no_group_can_fill_is_refused_naming_the_groups(mixed_root):
    cfg = load_config("cpu-tiny", {"train.batch_size": 5})
    with pytest.raises(
        DataFormatError, match=r"no group of train.batch_size=5 .*4 coils x \[32, 32\]"
    ):
        make_loader(mixed_root, "train", cfg, shuffle=True)


def test_training_masks_are_fresh_per_sample_by_default_and_a_bank_on_request(data_root):
    cfg, root = data_root
    assert cfg.data.mask_bank == 0
    ds = SliceDataset(root / "train", cfg, train=True)
    fresh = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        fresh |= {ds.mask_for(i).numpy().tobytes() for i in range(len(ds))}
    assert len(fresh) == 3 * len(ds)  # a new mask for every (epoch, item)
    bank_cfg = load_config("cpu-tiny", {**OVERRIDES, "data.mask_bank": 2})
    banked = SliceDataset(root / "train", bank_cfg, train=True)
    drawn = set()
    for epoch in range(3):
        banked.set_epoch(epoch)
        drawn |= {banked.mask_for(i).numpy().tobytes() for i in range(len(banked))}
    assert len(drawn) <= 2
