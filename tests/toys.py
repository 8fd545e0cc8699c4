"""Small deterministic block networks shared by the greedywrap tests."""

from __future__ import annotations

import torch
from torch import nn


class ResBlock(nn.Module):
    """A residual MLP block called as block(x, scale) like an unrolled block with physics."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        return x + scale * self.fc2(torch.tanh(self.fc1(x)))


def make_blocks(n: int, width: int = 8, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [ResBlock(width) for _ in range(n)]


def make_data(batch: int = 4, width: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, width, generator=g), torch.randn(batch, width, generator=g)


def params_of(modules) -> list[torch.Tensor]:
    return [p.detach().clone() for m in modules for p in m.parameters()]


def assert_bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(x, y), f"tensor {i} differs: max |diff| {float((x - y).abs().max())}"


class NanOnCalls(nn.Module):
    """A linear block whose output turns NaN on the calls numbered in ``bad`` (1-based)."""

    def __init__(self, bad: set[int], width: int = 8, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.fc = nn.Linear(width, width)
        self.calls = 0
        self.bad = bad

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        self.calls += 1
        y = self.fc(x)
        return y * float("nan") if self.calls in self.bad else y
