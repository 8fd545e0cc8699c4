"""Greedy training with HF Accelerate: data parallel over processes, one DDP per stage.

Run on one process:            python examples/accelerate_greedy.py
Run on 2 processes (CPU/gloo): torchrun --nproc_per_node 2 --master_addr 127.0.0.1 \\
                                   examples/accelerate_greedy.py
(or `accelerate launch --num_processes 2 examples/accelerate_greedy.py`)

The Accelerator prepares the data loader (each process gets its shard of every batch); the
GreedyWrapper keeps placement, mixed precision and gradient accumulation for itself.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from greedywrap.distributed import from_accelerator


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per stage")
    parser.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16", "fp16"])
    parser.add_argument("--accumulate", type=int, default=2, help="gradient accumulation steps")
    parser.add_argument("--save", default=None, help="rank 0 saves the wrapper's state here")
    args = parser.parse_args()

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.accumulate,
        cpu=not torch.cuda.is_available(),
    )
    torch.manual_seed(0)  # the same data on every process; DDP broadcasts rank 0's weights
    width = 16
    x = torch.randn(256, width)
    y = torch.sin(x)
    loader = accelerator.prepare(DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False))

    gw = from_accelerator(
        [Block(width) for _ in range(6)], accelerator, splits=3, optimizer_kwargs={"lr": 3e-3}
    )
    step = 0
    while step < args.steps * args.accumulate:
        for xb, yb in loader:
            losses = gw.train_step(xb, yb)
            step += 1
            if step % (5 * args.accumulate) == 0:
                accelerator.print(
                    f"micro-step {step:4d}  loss per stage: "
                    + "  ".join(f"{float(v):.4f}" for v in losses)
                )
            if step == args.steps * args.accumulate:
                break
    gw.synchronize()
    if args.save and accelerator.is_main_process:
        torch.save(gw.state_dict(), args.save)
    accelerator.print(
        f"processes: {accelerator.num_processes}, distributed: {gw.distributed}, "
        f"precision: {gw.precision}, grad_accumulation: {gw.grad_accumulation}"
    )
    gw.close()
    accelerator.end_training()


if __name__ == "__main__":
    main()
