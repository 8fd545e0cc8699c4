"""The built-in data: simulated multi-coil k-space from structured phantoms, cached as h5 files.

`simulate_multicoil` turns a magnitude image into what a scanner would measure: a smooth random
phase, coil maps (normalised to unit root-sum-of-squares), the centered orthonormal FFT and
complex Gaussian noise. `simulate_dataset` draws phantoms (`mri.data.phantoms`) for 2D slices,
3D volumes or 2D+time cine, places the coils anew for every volume, and by default stores coil
maps estimated from the k-space centre (ESPIRiT), as a reconstruction of scanner data must, not
the maps the data were simulated with. It writes ``train/``, ``val/`` and ``test/`` folders in the
h5 slice format. Everything is a function of the seed; files whose stored parameters match are
reused.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mri.coils import (
    birdcage_maps,
    estimate_maps_espirit,
    estimate_maps_jsense,
    random_birdcage_maps,
)
from mri.data._backend import sense_combine, sense_expand, spatial_rank
from mri.data.h5format import DataFormatError, inspect_slices, write_slices
from mri.data.phantoms import cine_phantom, random_phantom, smooth_phase
from mri.fft import ifftc

__all__ = [
    "GENERATOR",
    "GENERATOR_VERSION",
    "MAP_METHODS",
    "SPLITS",
    "estimate_maps",
    "simulate_dataset",
    "simulate_multicoil",
]

#: Provenance name of the built-in generator, and its version: bump the version whenever the
#: generated numbers change, so that caches written by an older generator are regenerated.
GENERATOR = "mri.data.simulate"
GENERATOR_VERSION = 3
#: The folders `simulate_dataset` writes, in order.
SPLITS = ("train", "val", "test")

_DEFAULT_SHAPES = {"2d": (128, 128), "3d": (32, 64, 64), "cine": (12, 64, 64)}
_DEFAULT_SLICES_PER_FILE = {"2d": 4, "3d": 1, "cine": 1}
#: How the stored (reconstruction) maps are made: estimated from the fully sampled centre by
#: ESPIRiT or JSENSE, or the exact maps of the simulation ("true", the inverse crime).
MAP_METHODS = ("espirit", "jsense", "true")


def coil_maps(
    spatial_shape: tuple[int, ...],
    num_coils: int,
    kind: str,
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """Coil maps ``(C, *spatial)`` with unit root-sum-of-squares; static over cine frames.

    Args:
        spatial_shape: ``(H, W)``, ``(D, H, W)`` or ``(T, H, W)``.
        num_coils: coils (>= 1).
        kind: ``"2d"``, ``"3d"`` or ``"cine"``.
        rng: if given, a random coil placement, one per subject
            ([`random_birdcage_maps`][mri.coils.random_birdcage_maps]); if None, the fixed
            [`birdcage_maps`][mri.coils.birdcage_maps].

    Returns:
        complex64 maps ``(num_coils, *spatial_shape)``.
    """
    if not isinstance(num_coils, int) or num_coils < 1:
        raise ValueError(f"num_coils must be an int >= 1, got {num_coils!r}")
    if len(spatial_shape) != spatial_rank(kind):
        raise ValueError(f"shape {spatial_shape} has the wrong rank for kind {kind!r}")
    plane = tuple(spatial_shape[1:]) if kind == "cine" else tuple(spatial_shape)
    if rng is None:
        maps = birdcage_maps(plane, num_coils)
    else:
        maps = random_birdcage_maps(plane, num_coils, rng)
    if kind == "cine":
        maps = maps.unsqueeze(1).expand(-1, spatial_shape[0], -1, -1)
    return maps.contiguous()  # both generators already have unit root-sum-of-squares


def estimate_maps(kspace: torch.Tensor, kind: str, method: str, calib: int) -> torch.Tensor:
    """Coil maps ``(C, *spatial)`` estimated from the central ``calib`` lines of ``kspace``.

    2D slices are calibrated directly. 3D volumes are inverse transformed along their first
    (readout) axis, which every mask samples fully, and each readout position is calibrated
    on its ``(ky, kz)`` plane, as `mri.data.convert.convert_mridata` does for scanner volumes
    (a 3D ESPIRiT of a 32x64x64 volume takes minutes on one core). Cine maps come from the
    time-averaged k-space and are the same in every frame.

    Args:
        kspace: fully sampled k-space ``(C, *spatial)``.
        kind: ``"2d"``, ``"3d"`` or ``"cine"``.
        method: ``"espirit"`` or ``"jsense"``.
        calib: width of the calibration region (>= 6).

    Returns:
        complex64 maps shaped like ``kspace``.
    """
    if method not in ("espirit", "jsense"):
        raise ValueError(f"method must be 'espirit' or 'jsense', got {method!r}")
    if isinstance(calib, bool) or not isinstance(calib, int) or calib < 6:
        raise ValueError(f"calib must be an int >= 6, got {calib!r}")
    if method == "espirit":
        # A kernel over half the calibration width leaves ESPIRiT too few calibration rows for
        # a clean null space (its maps then vanish inside the object); 6 is SigPy's default.
        kernel = min(6, max(3, calib // 2 - 1))

        def estimate(ksp: torch.Tensor) -> torch.Tensor:
            return estimate_maps_espirit(ksp, calib_width=calib, kernel_width=kernel)

    else:

        def estimate(ksp: torch.Tensor) -> torch.Tensor:
            return estimate_maps_jsense(ksp, ksp_calib_width=calib, mps_ker_width=min(8, calib))

    if kind == "2d":
        return estimate(kspace)
    if kind == "cine":
        return estimate(kspace.mean(dim=1)).unsqueeze(1).expand_as(kspace).contiguous()
    hybrid = ifftc(kspace, dims=(1,)).transpose(0, 1)  # (D, C, ky, kz)
    return estimate(hybrid.contiguous()).transpose(0, 1).contiguous()


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
    maps: str = "espirit",
    calib: int | None = None,
) -> dict[str, list[Path]]:
    """Generate (or reuse) the built-in simulated dataset as h5 slice files.

    Each split folder holds files of ``slices_per_file`` entries (a 2D slice, a 3D volume or a
    cine series each); a file is regenerated only if it is missing, unreadable, or was written
    with other parameters. Stale files of this generator that are no longer part of the dataset
    are removed.

    Every file is one subject: its coils are placed anew
    ([`random_birdcage_maps`][mri.coils.random_birdcage_maps]). The stored ``maps`` are what
    reconstructions use; by default they are estimated by ESPIRiT from the central ``calib``
    lines of each entry's noisy k-space, once here rather than at every training step, so the
    reconstruction operator is not the one that made the data. The stored ``target`` is the
    noise-free image seen through those maps, ``sum_c conj(S_est_c) S_c x``: the image ``x``
    with the phase convention of the estimated maps (ESPIRiT's is relative to one coil), and
    zero where ESPIRiT finds no signal. With ``maps="true"`` the simulation's own maps are
    stored and the target is ``x`` itself (the inverse crime, kept for comparisons).

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
        maps: ``"espirit"``, ``"jsense"`` or ``"true"`` (see above).
        calib: width of the calibration region the maps are estimated from; by default 24,
            or half the smallest image side if that is smaller (at least 6). Give the mask's
            fully sampled centre (``data.calib``) so maps use only what a scan would have.

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
    if maps not in MAP_METHODS:
        raise ValueError(f"maps must be one of {list(MAP_METHODS)}, got {maps!r}")
    # Maps are calibrated on the last two (phase-encode) axes; a 3D readout is fully sampled.
    if calib is None:
        calib = max(6, min(24, min(shape[-2:]) // 2))
    _check_int("calib", calib, 6)
    if calib > min(shape[-2:]):
        raise ValueError(f"calib {calib} is wider than the phase-encode sides of shape {shape!r}")

    out_dir = Path(out_dir)
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
                "maps": maps, "calib": calib if maps != "true" else None,
                "generator_version": GENERATOR_VERSION,
            }  # fmt: skip
            files[split].append(path)
            if _matches(path, parameters):
                continue
            # One independent stream per file: a file's content does not depend on how many
            # files come before it, so growing a split keeps the existing files valid.
            rng = np.random.default_rng([seed, split_id, file_id])
            true_maps = coil_maps(shape, num_coils, kind, rng)
            entries = [
                _simulate_entry(_phantom(kind, shape, rng), true_maps, kind, rng, noise_std,
                                maps, calib)
                for _ in range(n)
            ]  # fmt: skip
            kspace, stored_maps, targets = (torch.stack(t) for t in zip(*entries, strict=True))
            write_slices(
                path,
                kspace,
                stored_maps,
                targets,
                kind=kind,
                provenance={"generator": GENERATOR, "source": None, "parameters": parameters},
            )
        _remove_stale(folder, set(files[split]))
    return files


def _simulate_entry(
    image: np.ndarray,
    true_maps: torch.Tensor,
    kind: str,
    rng: np.random.Generator,
    noise_std: float,
    maps: str,
    calib: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kspace, stored maps, target)`` of one slice, volume or series."""
    kspace, image = simulate_multicoil(image, true_maps, kind, rng, noise_std)
    if maps == "true":
        return kspace, true_maps, image
    estimated = estimate_maps(kspace, kind, maps, calib)
    target = sense_combine(sense_expand(image, true_maps, kind), estimated, kind)
    return kspace, estimated, target.to(torch.complex64)


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
