"""Quickstart: train a deep residual denoiser greedily and compare its memory with end-to-end."""

import torch
from torch import nn

from greedywrap import GreedyWrapper, format_bytes, track_memory


def denoiser(depth: int = 8, width: int = 32) -> nn.Sequential:
    block = lambda: nn.Sequential(  # noqa: E731 - one residual block of the denoiser
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 1, 3, padding=1),
    )
    return nn.Sequential(*[Residual(block()) for _ in range(depth)])


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


torch.manual_seed(0)
clean = torch.rand(16, 1, 1, 1) * torch.linspace(0, 1, 32).outer(torch.linspace(1, 0, 32))
noisy = clean + 0.1 * torch.randn_like(clean)

gw = GreedyWrapper(denoiser(), splits=4, optimizer_kwargs={"lr": 1e-3})
for step in range(1, 61):
    losses = gw.train_step(noisy, clean)
    if step % 20 == 0:
        print(f"step {step:3d}  loss per stage: " + "  ".join(f"{float(v):.5f}" for v in losses))

for splits in (1, 4, 8):
    probe = GreedyWrapper(denoiser(), splits=splits)
    probe.train_step(noisy, clean)  # the first step creates optimizer state; measure the next
    with track_memory(rss=False) as report:
        probe.train_step(noisy, clean)
    print(f"splits={splits}: peak training memory {format_bytes(report.peak_bytes['cpu'])}")
