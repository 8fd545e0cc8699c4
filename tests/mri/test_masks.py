"""Sampling masks reach their acceleration, sample the calibration region and are seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mri.masks import (
    PoissonDiscSampler,
    equispaced_1d_mask,
    kt_mask,
    poisson_disc_mask,
    random_1d_mask,
)


def accel_of(mask: torch.Tensor) -> float:
    return mask.numel() / float(mask.sum())


class TestPoissonDisc:
    @pytest.mark.parametrize("shape, accel, calib", [((64, 64), 4, 16), ((80, 64), 8, (12, 10))])
    def test_acceleration_within_tol_and_calibration_fully_sampled(self, shape, accel, calib):
        mask = poisson_disc_mask(shape, accel, calib=calib, seed=1)
        assert mask.shape == shape and mask.dtype == torch.float32
        assert abs(accel_of(mask) - accel) < 0.1
        ch, cw = (calib, calib) if isinstance(calib, int) else calib
        h0, w0 = shape[0] // 2 - ch // 2, shape[1] // 2 - cw // 2
        assert mask[h0 : h0 + ch, w0 : w0 + cw].all()
        assert set(mask.unique().tolist()) <= {0.0, 1.0}

    def test_deterministic_per_seed(self):
        a = poisson_disc_mask((48, 48), 4, calib=8, seed=3)
        assert torch.equal(a, poisson_disc_mask((48, 48), 4, calib=8, seed=3))
        assert not torch.equal(a, poisson_disc_mask((48, 48), 4, calib=8, seed=4))

    def test_accel_one_is_fully_sampled(self):
        assert poisson_disc_mask((8, 8), 1, calib=2).all()

    def test_impossible_request_names_the_limit(self):
        with pytest.raises(ValueError, match=r"accel=4.0 .*calib=\(24, 24\).*1.78"):
            poisson_disc_mask((32, 32), 4, calib=24)

    @pytest.mark.parametrize(
        "kw, match",
        [
            ({"shape": (8,)}, "shape"),
            ({"accel": 0.5}, "accel"),
            ({"calib": 40}, "calib"),
            ({"tol": 0}, "tol"),
            ({"seed": 1.5}, "seed"),
        ],
    )
    def test_bad_arguments(self, kw, match):
        args = {"shape": (32, 32), "accel": 4, "calib": 8} | kw
        with pytest.raises(ValueError, match=match):
            poisson_disc_mask(**args)


class TestPoissonDiscSampler:
    def test_fresh_masks_meet_accel_keep_the_centre_and_are_reproducible(self):
        sampler = PoissonDiscSampler((64, 64), 6, calib=12)
        drawn = [sampler(seed) for seed in range(10, 16)]
        for mask in drawn:
            assert mask.shape == (64, 64) and mask.dtype == torch.float32
            assert abs(accel_of(mask) - 6) < 0.1
            assert mask[26:38, 26:38].all()
        assert len({m.numpy().tobytes() for m in drawn}) == len(drawn)
        assert torch.equal(PoissonDiscSampler((64, 64), 6, calib=12)(12), drawn[2])
        # Variable density: the ring around the calibration block is sampled more densely
        # than the periphery, averaged over masks.
        mean = torch.stack(drawn).mean(dim=0)
        radius = torch.hypot(*torch.meshgrid(torch.arange(64.0) - 32, torch.arange(64.0) - 32,
                                             indexing="ij"))  # fmt: skip
        ring, edge = mean[(radius > 8) & (radius < 14)], mean[(radius > 24) & (radius < 31)]
        assert ring.mean() > 1.5 * edge.mean() > 0

    def test_no_two_samples_are_neighbours_closer_than_the_disc_allows(self):
        # A Poisson-disc pattern: outside the calibration block, no two samples are adjacent
        # at the lowest densities (radius >= 1 everywhere, growing with distance).
        mask = PoissonDiscSampler((64, 64), 8, calib=8)(3)
        corner = mask[:16, :16]
        assert not bool((corner[:, 1:] * corner[:, :-1]).any())
        assert not bool((corner[1:, :] * corner[:-1, :]).any())

    def test_impossible_requests_and_bad_seeds_are_refused(self):
        with pytest.raises(ValueError, match=r"accel=100.*cannot be met"):
            PoissonDiscSampler((32, 32), 100, calib=8)
        with pytest.raises(ValueError, match=r"seed must be an int >= 0, got -1"):
            PoissonDiscSampler((32, 32), 4, calib=8)(-1)


class TestOneDimensional:
    @pytest.mark.parametrize("fn", [random_1d_mask, equispaced_1d_mask])
    def test_columns_shared_by_rows_centre_sampled_and_seeded(self, fn):
        mask = fn((20, 100), 4, center_fraction=0.08, seed="file1000.h5")
        assert mask.shape == (20, 100) and mask.dtype == torch.float32
        assert torch.equal(mask, mask[:1].expand_as(mask))
        pad = (100 - 8 + 1) // 2
        assert mask[0, pad : pad + 8].all()
        assert torch.equal(mask, fn((20, 100), 4, center_fraction=0.08, seed="file1000.h5"))
        # One seed per volume: every slice of a (slices, H, W) volume gets the same mask.
        vol = fn((3, 20, 100), 4, center_fraction=0.08, seed=7)
        assert torch.equal(vol[0], vol[2])

    def test_random_mask_reaches_accel_on_average(self):
        accels = [accel_of(random_1d_mask((1, 368), 4, 0.08, seed=s)) for s in range(40)]
        lines = [368 / a for a in accels]
        assert abs(sum(lines) / len(lines) - 368 / 4) < 3
        assert (
            len({tuple(random_1d_mask((1, 368), 4, 0.08, seed=s)[0].tolist()) for s in range(5)})
            == 5
        )

    def test_equispaced_mask_is_close_to_accel_and_evenly_spaced(self):
        mask = equispaced_1d_mask((1, 320), 4, 0.08, seed=0)[0]
        assert abs(accel_of(mask) - 4) < 0.3
        cols = torch.nonzero(mask).flatten()
        pad = (320 - 26 + 1) // 2
        outside = cols[(cols < pad) | (cols >= pad + 26)]
        gaps = outside[1:] - outside[:-1]
        # fastMRI's adjusted spacing is 4 * (26 - 320) / (26 * 4 - 320) = 5.44, rounded per line.
        assert set(gaps[gaps < 10].tolist()) <= {5, 6}

    @pytest.mark.parametrize(
        ("fname", "width", "fraction", "accel"),
        [("file1000000.h5", 368, 0.08, 4), ("file_brain_AXT2_200_2000019.h5", 320, 0.04, 8),
         ("x.h5", 396, 0.04, 8)],
    )  # fmt: skip
    def test_equispaced_mask_is_fastmris_fraction_func(self, fname, width, fraction, accel):
        # fastMRI's EquispacedMaskFractionFunc, derived from its definition: seed the legacy
        # RandomState with the file name's code points, draw the (fraction, accel) pair, then
        # an offset below the adjusted spacing a that makes the total W / accel.
        rng = np.random.RandomState(tuple(map(ord, fname)))
        rng.randint(1)
        n_low = round(width * fraction)
        spacing = accel * (n_low - width) / (n_low * accel - width)
        offset = rng.randint(0, round(spacing))
        expected = np.zeros(width, dtype=np.float32)
        pad = (width - n_low + 1) // 2
        expected[pad : pad + n_low] = 1
        expected[np.around(np.arange(offset, width - 1, spacing)).astype(int)] = 1
        got = equispaced_1d_mask((2, width), accel, fraction, seed=fname)[0].numpy()
        assert np.array_equal(got, expected)
        assert abs(got.sum() - width / accel) <= 2
        # The newer EquispacedMaskFunc (every accel-th column, the centre on top) differs.
        newer = np.zeros(width, dtype=np.float32)
        newer[offset::accel] = 1
        newer[pad : pad + n_low] = 1
        assert not np.array_equal(got, newer)

    @pytest.mark.parametrize("fn", [random_1d_mask, equispaced_1d_mask])
    def test_centre_larger_than_budget_is_an_error(self, fn):
        with pytest.raises(ValueError, match="center_fraction=0.5"):
            fn((1, 100), 4, center_fraction=0.5)

    @pytest.mark.parametrize(
        "kw", [{"shape": ()}, {"accel": 0}, {"center_fraction": 1.5}, {"seed": -1}]
    )
    def test_bad_arguments(self, kw):
        args = {"shape": (4, 32), "accel": 4, "center_fraction": 0.08} | kw
        with pytest.raises(ValueError, match=next(iter(kw))):
            random_1d_mask(**args)


class TestKt:
    def test_each_frame_has_the_acceleration_and_the_centre(self):
        mask = kt_mask((6, 10, 64), 8, calib=4, seed=0)
        assert mask.shape == (6, 10, 64) and mask.dtype == torch.float32
        lines = mask[:, 0, :]
        assert torch.equal(mask, lines[:, None, :].expand_as(mask))
        assert torch.all(lines.sum(dim=1) == 8)
        assert lines[:, 30:34].all()

    def test_without_jitter_or_warp_frames_are_golden_ratio_shifted_lattices(self):
        # An independent statement of the lattice: frame t samples s_t, s_t + R, ... with
        # s_t = round(0.618034 t R) mod R, so 20 frames of R = 10 cover every column.
        accel, frames, width = 10, 20, 160
        mask = kt_mask((frames, 1, width), accel, calib=0, perturb=0.0, vd_degree=0.0)
        for t in range(frames):
            shift = round(t * 0.6180339887 * accel) % accel
            expected = torch.zeros(width)
            expected[shift::accel] = 1
            assert torch.equal(mask[t, 0], expected), t
        assert bool(mask[:, 0].any(dim=0).all())

    def test_vd_kt_reaches_the_edge_and_covers_most_lines_over_time(self):
        # The paper's cine setting (VD-kt, R = 10, 160 phase encodes, 20 frames): its sampler
        # reaches |ky| = 80 and samples 125-136 distinct lines; independent random draws per
        # frame with a decaying density reached only 71 and 100-107.
        width, centre = 160, 80
        for seed in range(5):
            lines = kt_mask((20, 1, width), 10, calib=1, seed=seed)[:, 0, :]
            assert torch.all(lines.sum(dim=1) == 16)  # R = 10 in every frame
            ever = lines.any(dim=0)
            assert 120 <= int(ever.sum()) <= 140, seed
            reach = (torch.arange(width) - centre).abs()[ever].max()
            assert int(reach) >= 78, seed
            assert bool(lines[:, centre].all())
            # Dense centre, sparse edge: one column apart at the centre, R at the edges.
            near, far = lines[:, centre - 8 : centre + 8].mean(), lines[:, :40].mean()
            assert near > 3 * far > 0

    def test_frames_differ_and_seed_is_deterministic(self):
        a = kt_mask((4, 2, 48), 4, calib=4, seed=5)
        assert not torch.equal(a[0], a[1])
        assert torch.equal(a, kt_mask((4, 2, 48), 4, calib=4, seed=5))
        assert not torch.equal(a, kt_mask((4, 2, 48), 4, calib=4, seed=6))

    def test_density_is_higher_near_the_centre(self):
        lines = kt_mask((200, 1, 64), 4, calib=0, seed=0)[:, 0, :].mean(dim=0)
        assert lines[24:40].mean() > 2 * torch.cat([lines[:8], lines[-8:]]).mean()

    def test_too_high_acceleration_for_calib(self):
        with pytest.raises(ValueError, match=r"accel=16.*fewer than calib=8"):
            kt_mask((2, 4, 64), 16, calib=8)

    @pytest.mark.parametrize(
        "kw",
        [{"shape": (4, 8)}, {"calib": 65}, {"vd_degree": -1}, {"perturb": 1.5}, {"adhere": -0.1}],
    )
    def test_bad_arguments(self, kw):
        args = {"shape": (2, 4, 64), "accel": 4} | kw
        with pytest.raises(ValueError, match=next(iter(kw))):
            kt_mask(**args)
