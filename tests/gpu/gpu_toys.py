"""Blocks, data and helpers shared by the CUDA suite (no CUDA call at import time)."""

from __future__ import annotations

import copy

import torch
from torch import nn

# About 50 ms of GPU time on current GPUs (1-2 GHz): long enough that work queued behind it on
# one stream is certainly not finished when another stream, or the host, looks too early.
SLEEP_CYCLES = 100_000_000


class MLPBlock(nn.Module):
    """A residual MLP block, ``x + fc2(tanh(fc1(x)))``: activations dominate its memory."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.tanh(self.fc1(x)))


class SlowBlock(MLPBlock):
    """An ``MLPBlock`` whose CUDA forward first keeps the current stream busy.

    Its output is written only after the sleep, so a reader that is not ordered after this
    stream (another stream, or the host through a non-blocking copy) sees memory not yet
    written.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            torch.cuda._sleep(SLEEP_CYCLES)
        return super().forward(x)


class SlowAdam(torch.optim.Adam):
    """Adam whose CUDA step first keeps the current stream busy, so the update kernels are
    still queued when the Python call (and a P-GLEAM worker's job) has returned."""

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - the signature of Optimizer.step
        if any(p.is_cuda for g in self.param_groups for p in g["params"]):
            torch.cuda._sleep(SLEEP_CYCLES)
        return super().step(closure)


def make_blocks(n: int, width: int, seed: int = 0, block: type[MLPBlock] = MLPBlock) -> list:
    torch.manual_seed(seed)
    return [block(width) for _ in range(n)]


def make_data(batch: int, width: int, device: torch.device | str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x0, target = torch.randn(batch, width, generator=g), torch.randn(batch, width, generator=g)
    return x0.to(device), target.to(device)


def pair_of_devices() -> list[int]:
    """Two device entries for P-GLEAM: ``[0, 1]`` on two GPUs of the same model (so each
    stage runs the same kernels as on GPU 0 and bitwise comparisons hold), else ``[0, 0]``
    (two workers, two streams on one GPU)."""
    if torch.cuda.device_count() >= 2 and (
        torch.cuda.get_device_name(0) == torch.cuda.get_device_name(1)
    ):
        return [0, 1]
    return [0, 0]


def host_copy(tensors) -> list[torch.Tensor]:  # noqa: ANN001
    """Blocking host copies, after every device has finished all its work."""
    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)
    return [t.detach().to("cpu") for t in tensors]


def clones(blocks: list) -> list:
    return [copy.deepcopy(b) for b in blocks]


def assert_bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    assert len(a) == len(b), (what, len(a), len(b))
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        x, y = x.cpu(), y.cpu()
        assert torch.equal(x, y), f"{what} {i} differs: max |diff| {float((x - y).abs().max())}"
