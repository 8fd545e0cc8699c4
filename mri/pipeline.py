"""From h5 slice files to network inputs: masked samples, batches, and ``(x0, target, meas)``.

`SliceDataset` indexes every slice (volume, cine series) of the h5 files in a folder and
undersamples it on the fly. Training masks are drawn fresh for every sample and epoch, as in the
paper (`mri.masks.PoissonDiscSampler` makes Poisson-disc masks cheap enough for that), or
taken from a bank of ``data.mask_bank`` seeded masks; validation and test masks are fixed per
file, seeded from the file name, so every slice of a volume shares
one mask and every run sees the same ones. k-space and target are scaled so that the 95th
percentile of the zero-filled magnitude is 1 (a top-magnitude normalisation, as in the meddlr
pipeline GLEAM was trained with), which keeps learning rates independent of scanner units.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mri import masks
from mri.config import Config, ConfigError
from mri.data._backend import fft_ndim
from mri.data.h5format import DataFormatError, inspect_slices, read_slices
from mri.data.simulate import simulate_dataset
from mri.physics import Measurement, SenseOp

__all__ = [
    "SliceDataset",
    "GroupedBatchSampler",
    "prepare_builtin",
    "make_loader",
    "batch_to_inputs",
]


def _stable_seed(*parts: Any) -> int:
    """A seed from strings/ints that is the same in every process and Python run."""
    return zlib.crc32(json.dumps(parts).encode()) & 0x7FFFFFFF


def _maps_calib(cfg: Config) -> int:
    """The calibration width the built-in data's maps are estimated from: the mask's fully
    sampled centre, so maps use only what an undersampled scan would hold.

    1D masks sample a band of ``center_fraction`` of the columns. A k-t lattice samples a
    small centre per frame but nearly every central line over the series, and cine maps are
    estimated from the time average (as cine reconstructions do), so a wider region is used.
    At least 6 lines, the least ESPIRiT calibrates on, at most the image side.
    """
    d = cfg.data
    side = min(d.shape[-2:])
    if d.mask in ("random1d", "equispaced1d"):
        width = round(d.center_fraction * d.shape[-1])
    elif d.mask == "kt":
        width = min(24, side // 2)
    else:
        width = d.calib
    return min(side, max(6, width))


def prepare_builtin(cfg: Config, root: str | os.PathLike) -> Path:
    """Generate (or reuse) the built-in simulated data that ``cfg.data`` describes.

    The folder ``root/data-<kind>-<hash>`` is named by a hash of the data settings, so configs
    that describe the same data share it and a change of settings never mixes datasets.
    """
    d = cfg.data
    params = {
        "kind": d.kind, "shape": list(d.shape), "num_coils": d.num_coils,
        "num_train": d.num_train, "num_val": d.num_val, "num_test": d.num_test,
        "noise": d.noise, "seed": d.seed, "maps": d.maps, "calib": _maps_calib(cfg),
    }  # fmt: skip
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(root) / f"data-{d.kind}-{digest}"
    simulate_dataset(
        folder,
        kind=d.kind,
        num_train=d.num_train,
        num_val=d.num_val,
        num_test=d.num_test,
        shape=tuple(d.shape),
        num_coils=d.num_coils,
        seed=d.seed,
        noise_std=d.noise,
        maps=d.maps,
        calib=_maps_calib(cfg),
    )
    return folder


class SliceDataset(Dataset):
    """Every slice of the h5 slice files in ``folder``, undersampled on the fly.

    Args:
        folder: a folder of h5 slice files (``mri.data.h5format``).
        cfg: the config; ``cfg.data`` gives the mask type, acceleration and calibration.
        train: random masks per sample and epoch (else one fixed mask per file): fresh ones,
            or from a bank of ``cfg.data.mask_bank`` masks if that is > 0.
        seed: the seed of the training masks.

    Each item is a dict: ``kspace`` (C, *spatial) undersampled, ``maps`` (C, *spatial),
    ``mask`` (broadcastable to *spatial), ``target`` (*spatial), ``scale`` (the normalisation
    divisor), ``zero_filled`` (``A^H y``, normalised), ``fft_dims`` (2 or 3), ``fname`` and
    ``slice``.

    Raises:
        DataFormatError: the folder is missing, holds no h5 files, or a file is invalid.
    """

    def __init__(self, folder: str | os.PathLike, cfg: Config, train: bool, seed: int = 0) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataFormatError(f"data: folder {self.folder} does not exist")
        self.files = sorted(self.folder.glob("*.h5"))
        if not self.files:
            raise DataFormatError(f"data: no .h5 files in {self.folder}")
        self.cfg = cfg
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.index: list[tuple[Path, int]] = []
        self.shapes: dict[Path, tuple[int, ...]] = {}
        #: Per item, ``(coils, spatial shape)``: items batch together only within a group.
        self.groups: list[tuple[int, tuple[int, ...]]] = []
        kinds = set()
        for path in self.files:
            info = inspect_slices(path)
            kinds.add(info.kind)
            # Real data mixes matrix sizes (fastMRI widths vary), so masks follow each file.
            self.shapes[path] = tuple(info.spatial_shape)
            self.index += [(path, j) for j in range(info.num_slices)]
            self.groups += [(info.num_coils, self.shapes[path])] * info.num_slices
        if kinds != {cfg.data.kind}:
            raise DataFormatError(
                f"data: {self.folder} holds {sorted(kinds)} data but the config says "
                f"data.kind={cfg.data.kind!r}"
            )
        self._bank: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        self._fixed: dict[str, torch.Tensor] = {}
        self._samplers: dict[tuple[int, ...], masks.PoissonDiscSampler] = {}
        fresh_poisson = train and cfg.data.mask_bank == 0 and cfg.data.mask == "poisson"
        for shape in sorted(set(self.shapes.values())):
            try:
                # One draw per shape up front, so an impossible acceleration is refused before
                # training starts, naming the keys (the sampler draws its calibration masks).
                if fresh_poisson:
                    self._samplers[shape] = masks.PoissonDiscSampler(
                        shape[-2:], cfg.data.accel, calib=cfg.data.calib
                    )
                else:
                    self._bank_mask(0, shape)
            except ValueError as err:
                raise ConfigError(
                    f"data.accel: {cfg.data.accel} with data.mask={cfg.data.mask!r} cannot be "
                    f"met on data of shape {shape}: {err}"
                ) from err

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch, so that training masks are reproducible (and resumable)."""
        self.epoch = epoch

    def _draw_mask(self, spatial: tuple[int, ...], seed: int) -> torch.Tensor:
        d = self.cfg.data
        plane = spatial[-2:]
        if d.mask == "kt":
            return masks.kt_mask(tuple(spatial), d.accel, calib=d.calib, seed=seed)
        if d.mask == "poisson" and spatial in self._samplers:
            m = self._samplers[spatial](seed)
        elif d.mask == "poisson":
            m = masks.poisson_disc_mask(plane, d.accel, calib=d.calib, seed=seed)
        elif d.mask == "random1d":
            m = masks.random_1d_mask(plane, d.accel, d.center_fraction, seed=seed)
        else:
            m = masks.equispaced_1d_mask(plane, d.accel, d.center_fraction, seed=seed)
        # 3D volumes: the first axis is the readout, always fully sampled.
        return m if len(spatial) == 2 else m.unsqueeze(0)

    def _bank_mask(self, k: int, spatial: tuple[int, ...]) -> torch.Tensor:
        if (k, spatial) not in self._bank:
            seed = _stable_seed("bank", self.seed, k, list(spatial))
            self._bank[(k, spatial)] = self._draw_mask(spatial, seed)
        return self._bank[(k, spatial)]

    def mask_for(self, i: int) -> torch.Tensor:
        """The mask of item ``i`` in the current epoch."""
        path, j = self.index[i]
        spatial = self.shapes[path]
        if self.train and self.cfg.data.mask_bank == 0:
            return self._draw_mask(spatial, _stable_seed("fresh", self.seed, self.epoch, i))
        if self.train:
            pick = _stable_seed("pick", self.seed, self.epoch, i) % self.cfg.data.mask_bank
            return self._bank_mask(pick, spatial)
        if path.name not in self._fixed:
            self._fixed[path.name] = self._draw_mask(spatial, _stable_seed("file", path.name))
        return self._fixed[path.name]

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, j = self.index[i]
        data = read_slices(path, j)
        kspace, maps, target = data.kspace[0], data.maps[0], data.target[0]
        mask = self.mask_for(i)
        fft_dims = fft_ndim(self.cfg.data.kind)
        kspace = kspace * mask
        op = SenseOp(maps[None], mask[None, None], fft_dims=fft_dims)
        zero_filled = op.adjoint(kspace[None])[0]
        scale = float(torch.quantile(zero_filled.abs().flatten(), 0.95))
        if not scale > 0:
            scale = float(zero_filled.abs().max()) or 1.0
        return {
            "kspace": kspace / scale,
            "maps": maps,
            "mask": mask,
            "target": target / scale,
            "zero_filled": zero_filled / scale,
            "scale": torch.tensor(scale),
            "fft_dims": fft_dims,
            "fname": path.name,
            "slice": j,
        }


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of items that share a coil count and spatial shape; the order is a function of
    (seed, epoch), so a resumed run sees the same batches.

    Real data mixes both (fastMRI brain has 4 to 20 coils at 3T and several matrix widths), and
    items of different shapes cannot be stacked into one tensor. Items are grouped by
    ``(coils, spatial shape)``; with ``shuffle`` each group is permuted and cut into batches and
    the batches of all groups are then permuted together, so every item is seen once per epoch
    and a batch never mixes groups. Without ``shuffle`` items keep their order within a group,
    and groups come in the order their first item appears.

    Args:
        dataset: the `SliceDataset` whose ``groups`` give each item's key.
        batch_size: items per batch (>= 1).
        seed: the seed of the order.
        shuffle: permute items and batches every epoch.
        drop_last: drop each group's last, incomplete batch (training keeps batch sizes equal).
    """

    def __init__(
        self,
        dataset: SliceDataset,
        batch_size: int,
        seed: int,
        shuffle: bool,
        drop_last: bool,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.groups: dict[tuple, list[int]] = {}
        for i, key in enumerate(dataset.groups):
            self.groups.setdefault(key, []).append(i)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def _count(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        return sum(self._count(len(items)) for items in self.groups.values())

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(_stable_seed("order", self.seed, self.epoch))
        batches = []
        for items in self.groups.values():
            if self.shuffle:
                items = [items[k] for k in torch.randperm(len(items), generator=g).tolist()]
            bs = self.batch_size
            batches += [items[k : k + bs] for k in range(0, bs * self._count(len(items)), bs)]
        if self.shuffle:
            batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]
        return iter(batches)


class _EpochLoader:
    """A DataLoader with ``set_epoch`` forwarded to its sampler and dataset."""

    def __init__(self, loader: DataLoader, sampler: GroupedBatchSampler) -> None:
        self.loader = loader
        self.sampler = sampler
        self.dataset = loader.dataset

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)


def make_loader(
    root: str | os.PathLike,
    split: str,
    cfg: Config,
    *,
    shuffle: bool,
    batch_size: int | None = None,
) -> _EpochLoader:
    """A loader over ``root/split``: training masks if ``split == "train"``, fixed otherwise.

    Raises:
        DataFormatError: the folder is missing or empty, or a file is invalid.
    """
    train = split == "train"
    dataset = SliceDataset(Path(root) / split, cfg, train=train, seed=cfg.train.seed)
    bs = cfg.train.batch_size if batch_size is None else batch_size
    sampler = GroupedBatchSampler(dataset, bs, cfg.train.seed, shuffle, drop_last=train)
    if train and len(sampler) == 0:
        sizes = {f"{k[0]} coils x {list(k[1])}": len(v) for k, v in sampler.groups.items()}
        raise DataFormatError(
            f"data: {Path(root) / split} has no group of train.batch_size={bs} items with equal "
            f"coil count and shape (items per group: {sizes}); lower train.batch_size"
        )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.train.num_workers,
        persistent_workers=False,
        timeout=600 if cfg.train.num_workers > 0 else 0,
    )
    return _EpochLoader(loader, sampler)


def batch_to_inputs(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Measurement]:
    """Turn a batch into what an unrolled network takes: ``(x0, target, meas)``.

    ``x0`` is the zero-filled SENSE reconstruction ``A^H y``, already computed by the dataset for
    its normalisation (so not again on the training thread); ``meas`` bundles the operator and
    the measured k-space, as every block's second argument.
    """
    fft_dims = int(batch["fft_dims"][0])
    mask = batch["mask"].unsqueeze(1)  # (B, 1, ...) broadcasts over coils
    op = SenseOp(batch["maps"], mask, fft_dims=fft_dims)
    meas = Measurement(op, batch["kspace"])
    return batch["zero_filled"], batch["target"], meas
