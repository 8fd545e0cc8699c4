"""Quickstart: train a deep residual denoiser greedily and compare its memory with end-to-end."""

import torch
from torch import nn

from greedywrap import GreedyWrapper, format_bytes, track_memory


class Residual(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


def denoiser(depth: int = 8, width: int = 32) -> nn.Sequential:
    conv = lambda cin, cout: nn.Conv2d(cin, cout, 3, padding=1)  # noqa: E731
    return nn.Sequential(
        *[Residual(conv(1, width), nn.ReLU(), conv(width, width), nn.ReLU(), conv(width, 1))
          for _ in range(depth)])  # fmt: skip


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
