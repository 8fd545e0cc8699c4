"""Peak-memory measurement, and greedy training's memory saving measured with it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from greedywrap import GreedyWrapper, format_bytes, measure_peak_memory, track_memory

MIB = 2**20


def test_cpu_peak_counts_live_tensors_created_in_the_window():
    with track_memory() as report:
        a = torch.empty(MIB, dtype=torch.uint8)
        b = torch.empty(2 * MIB, dtype=torch.uint8)
        del a
        c = torch.empty(MIB, dtype=torch.uint8)
        del b, c
    assert report.peak_bytes["cpu"] == 3 * MIB


def test_views_and_in_place_ops_of_existing_tensors_are_not_counted():
    x = torch.zeros(MIB, dtype=torch.uint8)
    with track_memory() as report:
        y = x[: MIB // 2]
        y.add_(1)
        x.view(2, -1).t_()
    assert report.peak_bytes["cpu"] == 0


def test_out_argument_resized_inside_the_window_is_counted():
    a = torch.randn(512, 512)  # 1 MiB, created before the window: not counted
    with track_memory(rss=False) as report:
        out = torch.empty(0)
        torch.mm(a, a, out=out)  # the kernel grows `out` to 1 MiB in place
    assert out.shape == (512, 512)
    assert report.peak_bytes["cpu"] == MIB


def test_growth_of_a_storage_that_existed_before_counts_until_it_is_freed():
    a = torch.randn(512, 512)
    buf = torch.empty(0)  # exists before the window: only its growth is the window's
    with track_memory(rss=False) as report:
        torch.add(a, 1, out=buf)  # +1 MiB
        buf.resize_(1024, 512)  # +1 MiB more
        del buf  # frees all 2 MiB counted for it
        later = torch.empty(MIB, dtype=torch.uint8)
        del later
    # Counting the growth gives 2 MiB; forgetting to release it would give 3 MiB.
    assert report.peak_bytes["cpu"] == 2 * MIB


def test_scratch_memory_inside_one_kernel_is_not_counted_as_documented():
    # The documented limit: a CPU convolution's kernel-internal scratch (oneDNN buffers or an
    # im2col column buffer) never reaches the dispatcher, so exactly the output is counted.
    conv = nn.Conv2d(2, 32, 3, padding=1)
    x = torch.randn(8, 2, 64, 64)
    with torch.no_grad(), track_memory(rss=False) as report:
        y = conv(x)
    assert report.peak_bytes["cpu"] == y.numel() * y.element_size() == 4 * MIB


def test_tensors_freed_during_backward_are_released():
    w = torch.randn(256, 256, requires_grad=True)
    with track_memory() as report:
        h = torch.randn(64, 256)
        for _ in range(4):
            h = torch.tanh(h @ w)
        h.sum().backward()
        del h
        after = torch.empty(0)
    del after
    # 4 saved activations of 64 KiB each plus the input and a gradient; far below 4 MiB.
    assert 64 * 1024 * 4 <= report.peak_bytes["cpu"] < 4 * MIB
    assert w.grad is not None


def test_nested_windows_are_refused():
    with track_memory(), pytest.raises(RuntimeError, match="already open"):
        with track_memory():
            pass


def test_measure_peak_memory_returns_the_result_and_rss_cross_check():
    result, report = measure_peak_memory(lambda n: torch.ones(n).sum(), 1000)
    assert float(result) == 1000
    assert report.peak_bytes["cpu"] >= 4000
    assert report.rss_peak_bytes is None or report.rss_peak_bytes >= 0
    assert "cpu:" in str(report)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * MIB) == "3.00 MiB"
    assert format_bytes(None) == "n/a"


class UnrolledToyBlock(nn.Module):
    """A block whose stored activations dominate: a 6-layer CNN on a wide feature map, the
    shape of one unroll of the paper's networks (a residual CNN after a physics step)."""

    def __init__(self) -> None:
        super().__init__()
        layers = [nn.Conv2d(2, 16, 3, padding=1), nn.ReLU()]
        for _ in range(4):
            layers += [nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Conv2d(16, 2, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def _peak_of_one_step(splits: int, checkpoint: bool = False) -> int:
    torch.manual_seed(0)
    gw = GreedyWrapper([UnrolledToyBlock() for _ in range(8)], splits=splits, checkpoint=checkpoint)
    x0, target = torch.randn(2, 2, 32, 32), torch.randn(2, 2, 32, 32)
    gw.train_step(x0, target)  # optimizer state is created on the first step; measure the second
    with track_memory(rss=False) as report:
        gw.train_step(x0, target)
    return report.peak_bytes["cpu"]


def test_greedy_splits_8_needs_at_most_a_quarter_of_end_to_end_memory():
    end_to_end = _peak_of_one_step(1)
    greedy = _peak_of_one_step(8)
    assert greedy * 4 <= end_to_end, (format_bytes(greedy), format_bytes(end_to_end))


def test_measurement_is_deterministic():
    assert _peak_of_one_step(2) == _peak_of_one_step(2)


def test_checkpointing_lowers_end_to_end_memory():
    assert _peak_of_one_step(1, checkpoint=True) < _peak_of_one_step(1)
