"""Peak memory per CUDA device, read from the allocator through ``greedywrap.track_memory``.

Skipped without CUDA. Greedy training holds one stage's graph at a time, so its step peak on
the device must be far below end-to-end's on the same network; with P-GLEAM on two GPUs each
device holds only its own stages.
"""

from __future__ import annotations

import pytest
import torch
from gpu_toys import make_blocks, make_data

from greedywrap import GreedyWrapper, format_bytes, track_memory

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# 8 MiB per activation (2048 x 1024 float32): activations dominate parameters (4 MiB a layer).
WIDTH, BATCH, BLOCKS = 1024, 2048, 8


def _step_peaks(splits: int, devices: list[int]) -> dict[str, int]:
    """Per-device peak of the second step (the first creates the Adam state)."""
    x0, target = make_data(BATCH, WIDTH, "cuda:0")
    with GreedyWrapper(make_blocks(BLOCKS, WIDTH), splits=splits, devices=devices) as gw:
        gw.train_step(x0, target)
        gw.synchronize()
        with track_memory(sorted(set(devices)), cpu=False, rss=False) as report:
            gw.train_step(x0, target)
            gw.synchronize()
    return report.peak_bytes


def test_greedy_step_peak_on_the_device_is_far_below_end_to_end() -> None:
    end_to_end = _step_peaks(1, [0])["cuda:0"]
    greedy = _step_peaks(4, [0])["cuda:0"]
    assert greedy > 0
    # Ideal is 4x (2 of 8 blocks alive); gradients, Adam temporaries and the stage input that
    # every stage holds anyway keep it above that, but never near end-to-end.
    assert 2 * greedy <= end_to_end, (format_bytes(greedy), format_bytes(end_to_end))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_pgleam_on_two_gpus_holds_only_its_own_stages_per_device() -> None:
    end_to_end = _step_peaks(1, [0])["cuda:0"]
    peaks = _step_peaks(4, [0, 1])
    assert set(peaks) == {"cuda:0", "cuda:1"}
    for device, peak in peaks.items():
        # Each device trains 2 of the 4 stages (4 of 8 blocks), one or two graphs at a time.
        assert 0 < peak < end_to_end, (device, format_bytes(peak), format_bytes(end_to_end))
