"""A rank of the 2-process data-parallel test (launched by test_distributed.py, not by pytest).

Usage: python dist_train.py RANK WORLD PORT OUT MODE
MODE: seq | async | die | accumulate | nanskip (rank 1 alone sees a NaN loss in stage 1 at step 2;
every rank saves its parameters and skipped_updates to OUT.RANK)
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from toys import make_blocks


class NanOnce(torch.nn.Module):
    """Wraps a block; multiplies its output by NaN on the given call (on this rank only)."""

    def __init__(self, block: torch.nn.Module, bad_call: int | None) -> None:
        super().__init__()
        self.block, self.bad_call, self.calls = block, bad_call, 0

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        self.calls += 1
        y = self.block(x, scale)
        return y * float("nan") if self.calls == self.bad_call else y


STEPS = 4


def main() -> None:
    rank, world, port, out, mode = sys.argv[1:6]
    rank, world = int(rank), int(world)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=20),
    )
    from greedywrap import GreedyWrapper

    # Rank 1 starts from other weights on purpose: DDP must broadcast rank 0's.
    blocks = make_blocks(4, seed=0 if rank == 0 else 99)
    if mode == "nanskip":
        blocks[3] = NanOnce(blocks[3], 2 if rank == 1 else None)
    g = torch.Generator().manual_seed(7)
    x0, target = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    shard = slice(rank * 8 // world, (rank + 1) * 8 // world)
    devices = ["cpu", "cpu"] if mode in ("async", "nanskip") else None
    accumulate = 2 if mode == "accumulate" else 1
    gw = GreedyWrapper(
        blocks,
        splits=2,
        devices=devices,
        optimizer_kwargs={"lr": 1e-2},
        grad_accumulation=accumulate,
        timeout=30,
        nonfinite="skip" if mode == "nanskip" else None,
    )
    assert gw.distributed
    xs, ts = x0[shard].chunk(accumulate), target[shard].chunk(accumulate)
    for step in range(STEPS):
        if mode == "die" and rank == 1 and step == 1:
            os._exit(3)  # a rank dies without a word
        for x, t in zip(xs, ts, strict=True):
            gw.train_step(x, t, 0.5)
    gw.synchronize()
    if mode == "nanskip":
        torch.save(([p.detach() for p in gw.parameters()], gw.skipped_updates), f"{out}.{rank}")
    elif rank == 0:
        torch.save([p.detach() for p in gw.parameters()], out)
    gw.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
