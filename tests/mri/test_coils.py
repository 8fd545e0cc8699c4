"""Coil maps: birdcage simulation is normalised; ESPIRiT and JSENSE recover simulated maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mri import fftc
from mri.coils import (
    birdcage_maps,
    estimate_maps_espirit,
    estimate_maps_jsense,
    random_birdcage_maps,
)


def relative_map_error(est: torch.Tensor, true: torch.Tensor, support: torch.Tensor) -> float:
    """Error inside ``support`` after removing each map set's per-pixel common phase.

    Both sets are rotated so that coil 0 is real and positive, which removes the phase that
    no calibration method can recover; what remains must match.
    """

    def align(m: torch.Tensor) -> torch.Tensor:
        return m * (m[0].conj() / m[0].abs().clamp_min(1e-12))

    a, b = align(est), align(true)
    err = ((a - b).abs() ** 2).sum(dim=0)[support].sum()
    return float((err / (b.abs() ** 2).sum(dim=0)[support].sum()).sqrt())


@pytest.fixture
def simulated(phantom_2d):
    maps = birdcage_maps((32, 32), 4)
    image = phantom_2d(32)
    return maps, image, fftc(maps * image), image.abs() > 0.05


def test_birdcage_maps_are_normalised_complex64():
    maps = birdcage_maps((12, 10), 5)
    assert maps.shape == (5, 12, 10) and maps.dtype == torch.complex64
    torch.testing.assert_close((maps.abs() ** 2).sum(0), torch.ones(12, 10))
    maps3 = birdcage_maps((4, 6, 6), 8)
    assert maps3.shape == (8, 4, 6, 6)
    torch.testing.assert_close((maps3.abs() ** 2).sum(0), torch.ones(4, 6, 6))
    # Coils differ from each other: the maps carry spatial encoding.
    assert (maps[0] - maps[1]).abs().max() > 0.1


def test_random_birdcage_maps_are_normalised_seeded_and_vary_per_draw():
    rng = np.random.default_rng(3)
    first, second = random_birdcage_maps((24, 20), 6, rng), random_birdcage_maps((24, 20), 6, rng)
    assert first.shape == (6, 24, 20) and first.dtype == torch.complex64
    torch.testing.assert_close((first.abs() ** 2).sum(0), torch.ones(24, 20))
    assert (first - second).norm() / first.norm() > 0.2
    again = random_birdcage_maps((24, 20), 6, np.random.default_rng(3))
    assert torch.equal(again, first)
    maps3 = random_birdcage_maps((4, 8, 8), 10, np.random.default_rng(0))
    torch.testing.assert_close((maps3.abs() ** 2).sum(0), torch.ones(4, 8, 8))
    # Coils in the second ring see the far end of the volume better than the first ring.
    ring_ratio = maps3[8:].abs().square().sum(0) / maps3[:8].abs().square().sum(0)
    assert float(ring_ratio[-1].mean()) > float(ring_ratio[0].mean())
    with pytest.raises(ValueError, match=r"random_birdcage_maps: num_coils must be an int >= 1"):
        random_birdcage_maps((8, 8), 0, np.random.default_rng(0))
    with pytest.raises(TypeError, match=r"rng must be a numpy Generator"):
        random_birdcage_maps((8, 8), 2, 0)


def test_espirit_recovers_simulated_maps_where_there_is_signal(simulated):
    maps, _, kspace, support = simulated
    est = estimate_maps_espirit(kspace, calib_width=16, max_iter=30)
    assert est.shape == maps.shape and est.dtype == torch.complex64
    assert relative_map_error(est, maps, support) < 0.05


def test_jsense_recovers_simulated_maps_where_there_is_signal(simulated):
    maps, _, kspace, support = simulated
    est = estimate_maps_jsense(kspace, mps_ker_width=8, ksp_calib_width=16)
    assert est.shape == maps.shape and est.dtype == torch.complex64
    assert relative_map_error(est, maps, support) < 0.15


def test_batched_input_is_estimated_slice_by_slice(simulated):
    maps, image, kspace, _ = simulated
    second = fftc(maps * image.flip(-1))
    batch = torch.stack([kspace, second])
    est = estimate_maps_espirit(batch, calib_width=16, max_iter=30)
    assert est.shape == (2, *maps.shape)
    torch.testing.assert_close(est[1], estimate_maps_espirit(second, calib_width=16, max_iter=30))


def test_3d_needs_spatial_ndim():
    kspace = torch.zeros(4, 6, 8, 8, dtype=torch.complex64)
    with pytest.raises(ValueError, match="spatial_ndim"):
        estimate_maps_jsense(kspace[None, None], spatial_ndim=2)


class TestErrors:
    @pytest.mark.parametrize("shape", [(8,), (2, 2, 2, 2), (0, 4), (4.0, 4)])
    def test_birdcage_shape(self, shape):
        with pytest.raises(ValueError, match="shape"):
            birdcage_maps(shape, 4)

    def test_birdcage_num_coils(self):
        with pytest.raises(ValueError, match="num_coils"):
            birdcage_maps((8, 8), 0)

    @pytest.mark.parametrize("fn", [estimate_maps_espirit, estimate_maps_jsense])
    def test_real_kspace_is_a_type_error(self, fn):
        with pytest.raises(TypeError, match="kspace must be a complex"):
            fn(torch.zeros(4, 8, 8))
