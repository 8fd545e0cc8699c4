"""The built-in data: simulated multi-coil k-space from structured phantoms, cached as h5 files.

`simulate_multicoil` turns a magnitude image into what a scanner would measure: a smooth random
phase, birdcage coil maps (normalised to unit root-sum-of-squares, so the SENSE combination of
noise-free k-space gives the image back exactly), the centered orthonormal FFT and complex
Gaussian noise. `simulate_dataset` draws phantoms (`mri.data.phantoms`) for 2D slices, 3D volumes
or 2D+time cine, and writes ``train/``, ``val/`` and ``test/`` folders in the h5 slice format.
Everything is a function of the seed; files whose stored parameters match are reused.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mri.coils import birdcage_maps
from mri.data._backend import sense_expand, spatial_rank
from mri.data.h5format import DataFormatError, inspect_slices, write_slices
from mri.data.phantoms import cine_phantom, random_phantom, smooth_phase

__all__ = ["GENERATOR", "GENERATOR_VERSION", "SPLITS", "simulate_dataset", "simulate_multicoil"]

#: Provenance name of the built-in generator, and its version: bump the version whenever the
#: generated numbers change, so that caches written by an older generator are regenerated.
GENERATOR = "mri.data.simulate"
GENERATOR_VERSION = 2
#: The folders `simulate_dataset` writes, in order.
SPLITS = ("train", "val", "test")

_DEFAULT_SHAPES = {"2d": (128, 128), "3d": (32, 64, 64), "cine": (12, 64, 64)}
_DEFAULT_SLICES_PER_FILE = {"2d": 4, "3d": 1, "cine": 1}


def coil_maps(spatial_shape: tuple[int, ...], num_coils: int, kind: str) -> torch.Tensor:
    """Birdcage maps ``(C, *spatial)`` with unit root-sum-of-squares; static over cine frames.

    Args:
        spatial_shape: ``(H, W)``, ``(D, H, W)`` or ``(T, H, W)``.
        num_coils: coils (>= 1).
        kind: ``"2d"``, ``"3d"`` or ``"cine"``.

    Returns:
        complex64 maps ``(num_coils, *spatial_shape)``.
    """
    if not isinstance(num_coils, int) or num_coils < 1:
        raise ValueError(f"num_coils must be an int >= 1, got {num_coils!r}")
    if len(spatial_shape) != spatial_rank(kind):
        raise ValueError(f"shape {spatial_shape} has the wrong rank for kind {kind!r}")
    if kind == "cine":
        maps = birdcage_maps(tuple(spatial_shape[1:]), num_coils)
        maps = maps.unsqueeze(1).expand(-1, spatial_shape[0], -1, -1)
    else:
        maps = birdcage_maps(tuple(spatial_shape), num_coils)
    return maps.contiguous()  # birdcage_maps already has unit root-sum-of-squares


def simulate_multicoil(
    image: np.ndarray | torch.Tensor,
    maps: torch.Tensor,
    kind: str,
    rng: np.random.Generator,
    noise_std: float = 0.01,
    max_phase: float = math.pi,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Simulate fully sampled multi-coil k-space of one magnitude image.

    The complex image is ``image * exp(i phi)`` with a smooth random phase ``phi`` (static over
    cine frames); k-space is ``F(S x) + n`` with complex Gaussian ``n``, ``E|n|^2 = noise_std^2``.

    Args:
        image: real magnitude ``(*spatial)``, typically with maximum 1.
        maps: ``(C, *spatial)`` complex64 coil maps.
        kind: ``"2d"``, ``"3d"`` or ``"cine"``.
        rng: the random generator (phase and noise).
        noise_std: standard deviation of the complex k-space noise (>= 0).
        max_phase: the largest absolute phase, in radians.

    Returns:
        ``(kspace (C, *spatial), target (*spatial))``, both complex64; the target is the
        noise-free complex image.

    Raises:
        ValueError: if the image is complex or its shape does not match the maps, or
            ``noise_std`` is negative.
    """
    image = torch.as_tensor(image)
    if image.is_complex():
        raise ValueError("image must be a real magnitude image, got a complex tensor")
    if tuple(image.shape) != tuple(maps.shape[1:]) or image.ndim != spatial_rank(kind):
        raise ValueError(
            f"image shape {tuple(image.shape)} does not match maps shape {tuple(maps.shape)}"
        )
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
    phase_shape = image.shape[1:] if kind == "cine" else image.shape
    phase = torch.from_numpy(smooth_phase(tuple(phase_shape), rng, max_phase))
    target = (image.float() * torch.exp(1j * phase)).to(torch.complex64)
    kspace = sense_expand(target, maps, kind)
    noise = rng.standard_normal((2, *kspace.shape), dtype=np.float32) * (noise_std / math.sqrt(2))
    kspace = kspace + torch.complex(torch.from_numpy(noise[0]), torch.from_numpy(noise[1]))
    return kspace.to(torch.complex64), target


def _phantom(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if kind == "cine":
        return cine_phantom(shape[0], tuple(shape[1:]), rng)
    return random_phantom(tuple(shape), rng)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _matches(path: Path, parameters: dict[str, Any]) -> bool:
    try:
        info = inspect_slices(path)
    except DataFormatError:
        return False
    return info.provenance.get("parameters") == parameters


def simulate_dataset(
    out_dir: str | os.PathLike,
    kind: str = "2d",
    num_train: int = 32,
    num_val: int = 8,
    num_test: int = 8,
    shape: tuple[int, ...] | None = None,
    num_coils: int = 8,
    seed: int = 0,
    noise_std: float = 0.01,
    slices_per_file: int | None = None,
) -> dict[str, list[Path]]:
    """Generate (or reuse) the built-in simulated dataset as h5 slice files.

    Each split folder holds files of ``slices_per_file`` entries (a 2D slice, a 3D volume or a
    cine series each); a file is regenerated only if it is missing, unreadable, or was written
    with other parameters. Stale files of this generator that are no longer part of the dataset
    are removed.

    Example:
        >>> files = simulate_dataset("data/sim2d", kind="2d", shape=(128, 128), num_coils=8)
        >>> sorted(files)
        ['test', 'train', 'val']

    Args:
        out_dir: the dataset folder; ``train/``, ``val/`` and ``test/`` are created inside.
        kind: ``"2d"`` (spatial ``(H, W)``), ``"3d"`` (``(D, H, W)``) or ``"cine"``
            (``(T, H, W)``).
        num_train: training entries (slices, volumes or series), >= 0.
        num_val: validation entries, >= 0.
        num_test: test entries, >= 0.
        shape: the spatial shape; defaults to (128, 128), (32, 64, 64) or (12, 64, 64).
        num_coils: coils (>= 1).
        seed: the seed; every number in the dataset is a function of it and the other arguments.
        noise_std: standard deviation of the complex k-space noise (images have maximum 1).
        slices_per_file: entries per file; 4 for 2D, 1 for 3D and cine by default.

    Returns:
        The files of each split, ``{"train": [...], "val": [...], "test": [...]}``.

    Raises:
        ValueError: on a bad argument (the message names it and what is valid).
        DataFormatError: if a split folder holds h5 files that this generator did not write.
    """
    rank = spatial_rank(kind)
    shape = tuple(_DEFAULT_SHAPES[kind] if shape is None else shape)
    if len(shape) != rank or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
        raise ValueError(f"shape must be {rank} ints for kind {kind!r}, got {shape!r}")
    # Cine frames are time points, not pixels: only the image axes need room for a phantom.
    image_axes = shape[1:] if kind == "cine" else shape
    if min(image_axes) < 8:
        raise ValueError(f"shape must have image sides >= 8 for kind {kind!r}, got {shape!r}")
    if kind == "cine" and shape[0] < 2:
        raise ValueError(f"cine shape (T, H, W) needs T >= 2 frames, got {shape!r}")
    for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        _check_int(name, value, 0)
    _check_int("num_coils", num_coils, 1)
    _check_int("seed", seed, 0)
    slices_per_file = _DEFAULT_SLICES_PER_FILE[kind] if slices_per_file is None else slices_per_file
    _check_int("slices_per_file", slices_per_file, 1)
    if not (isinstance(noise_std, (int, float)) and noise_std >= 0):
        raise ValueError(f"noise_std must be a number >= 0, got {noise_std!r}")

    out_dir = Path(out_dir)
    maps = None
    files: dict[str, list[Path]] = {}
    for split_id, (split, count) in enumerate(
        zip(SPLITS, (num_train, num_val, num_test), strict=True)
    ):
        folder = out_dir / split
        folder.mkdir(parents=True, exist_ok=True)
        files[split] = []
        for file_id, start in enumerate(range(0, count, slices_per_file)):
            n = min(slices_per_file, count - start)
            path = folder / f"{kind}_{split}_{file_id:04d}.h5"
            parameters = {
                "kind": kind, "shape": list(shape), "num_coils": num_coils, "seed": seed,
                "noise_std": float(noise_std), "split": split, "file": file_id, "slices": n,
                "generator_version": GENERATOR_VERSION,
            }  # fmt: skip
            files[split].append(path)
            if _matches(path, parameters):
                continue
            if maps is None:
                maps = coil_maps(shape, num_coils, kind)
            # One independent stream per file: a file's content does not depend on how many
            # files come before it, so growing a split keeps the existing files valid.
            rng = np.random.default_rng([seed, split_id, file_id])
            kspace, targets = zip(
                *(
                    simulate_multicoil(_phantom(kind, shape, rng), maps, kind, rng, noise_std)
                    for _ in range(n)
                ),
                strict=True,
            )
            write_slices(
                path,
                torch.stack(kspace),
                maps.unsqueeze(0).expand(n, *maps.shape).contiguous(),
                torch.stack(targets),
                kind=kind,
                provenance={"generator": GENERATOR, "source": None, "parameters": parameters},
            )
        _remove_stale(folder, set(files[split]))
    return files


def _remove_stale(folder: Path, keep: set[Path]) -> None:
    for path in sorted(folder.glob("*.h5")):
        if path in keep:
            continue
        try:
            generator = inspect_slices(path).provenance.get("generator")
        except DataFormatError:
            generator = None
        if generator != GENERATOR:
            raise DataFormatError(
                f"{path}: not written by {GENERATOR}; the simulated dataset folder {folder} "
                "must only hold generated files (move it away or choose another out_dir)"
            )
        path.unlink()
