"""How a greedy step runs: sequentially (GLEAM) or with per-device workers (P-GLEAM)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from greedywrap.wrapper import GreedyWrapper


class SequentialEngine:
    """Stage after stage on the calling thread: forward, local loss, backward, update."""

    def __init__(self, wrapper: GreedyWrapper) -> None:
        self.wrapper = wrapper

    def step(self, x0: torch.Tensor, target: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        gw = self.wrapper
        from greedywrap.wrapper import _to_device

        moved: dict[torch.device, tuple[tuple, dict, Any]] = {}
        x = x0.detach()
        losses = []
        for m, stage in enumerate(gw.stages):
            device = stage.device
            if device not in moved:
                a, k = gw.move_args(device, args, kwargs)
                moved[device] = (a, k, _to_device(target, device, "target"))
            a, k, tgt = moved[device]
            out, loss = gw._stage_forward(m, _to_device(x, device, "x0"), tgt, a, k)
            gw._stage_update(m, loss)
            losses.append(loss.detach())
            x = out.detach()
            # Dropping the last references frees this stage's graph before the next stage runs.
            del out, loss
        return losses

    def close(self) -> None:
        """Nothing to stop."""


def make_engine(wrapper: GreedyWrapper) -> SequentialEngine:
    """Pick the engine for the wrapper's placement."""
    return SequentialEngine(wrapper)
