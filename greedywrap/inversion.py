"""Memory-efficient learning by inversion (MEL) inside a stage.

Blocks that can be inverted need not store activations for backprop: the stage runs forward
without a graph, keeping only its output and a few checkpoints; backward then walks the blocks
in reverse, recovering each block's input from its output with ``block.inverse``, re-running
the block with gradients on the recovered input, and passing the input gradient on. Parameter
gradients equal backprop's up to the inversion error, which is measured for every block by
comparing the re-run output with the one it should reproduce (Kellman et al.; Wang et al.,
"Memory-efficient Learning for High-Dimensional MRI Reconstruction").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["InversionError", "check_invertible", "checkpoint_positions", "InvertedStage"]


class InversionError(ArithmeticError):
    """A block's input could not be recovered from its output accurately enough."""

    def __init__(self, stage: int, block: int, error: float, limit: float) -> None:
        super().__init__(
            f"stage {stage}, block {block}: inversion error {error:.3g} exceeds "
            f"max_inversion_error={limit:g}; gradients would be wrong. Add inversion "
            "checkpoints (inversion_checkpoints=...), make the block more contractive, or "
            "train without invertible=True"
        )
        self.stage = stage
        self.block = block
        self.error = error


def check_invertible(blocks: Sequence[nn.Module]) -> None:
    """Raise TypeError naming the first block without a callable ``inverse``."""
    for i, block in enumerate(blocks):
        if not callable(getattr(block, "inverse", None)):
            raise TypeError(
                f"invertible: block {i} ({type(block).__name__}) has no inverse(y, *args, "
                "**kwargs) method; MEL recovers each block's input from its output, so every "
                "block must implement it (or train with invertible=False)"
            )


def checkpoint_positions(num_blocks: int, count: int) -> set[int]:
    """Which block inputs (1..num_blocks-1) to keep, as evenly spaced as possible.

    The stage input (position 0) is always kept; ``count`` more inputs are kept so that
    inversion errors cannot accumulate over long runs of blocks.
    """
    inner = num_blocks - 1
    count = min(max(count, 0), inner)
    if count == 0:
        return set()
    return {round((i + 1) * num_blocks / (count + 1)) for i in range(count)} - {0, num_blocks}


@dataclass
class InvertedStage:
    """What a stage's forward left for its backward: checkpoints and the output leaf."""

    blocks: Sequence[nn.Module]
    saved: dict[int, torch.Tensor]
    output: torch.Tensor
    args: tuple
    kwargs: dict

    @classmethod
    def forward(
        cls,
        blocks: Sequence[nn.Module],
        inp: torch.Tensor,
        args: tuple,
        kwargs: dict,
        checkpoints: int,
        autocast: Callable[[], contextlib.AbstractContextManager],
    ) -> InvertedStage:
        """Run the blocks without a graph, keeping the input and ``checkpoints`` more."""
        keep = checkpoint_positions(len(blocks), checkpoints)
        saved = {0: inp}
        x = inp
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"invertible: the stage input is a {type(x).__name__}; MEL inverts blocks "
                "that map one tensor to one tensor"
            )
        with torch.no_grad(), autocast():
            for j, block in enumerate(blocks, start=1):
                x = block(x, *args, **kwargs)
                if not isinstance(x, torch.Tensor):
                    raise TypeError(
                        f"invertible: block {j - 1} of the stage returned a "
                        f"{type(x).__name__}; MEL inverts blocks that map one tensor to one "
                        "tensor (train states of several tensors with invertible=False)"
                    )
                if j in keep:
                    saved[j] = x
        return cls(blocks, saved, x.detach().requires_grad_(True), args, kwargs)

    def backward(
        self,
        grad: torch.Tensor | None,
        autocast: Callable[[], contextlib.AbstractContextManager],
    ) -> list[float]:
        """Accumulate parameter gradients block by block in reverse; return inversion errors.

        The error of block j is ``||block_j(x_hat) - y|| / ||y||``, where ``x_hat`` is the
        recovered input and ``y`` the output it must reproduce (0 where the input was kept).
        """
        errors = [0.0] * len(self.blocks)
        y = self.output.detach()
        for j in range(len(self.blocks), 0, -1):
            block = self.blocks[j - 1]
            if j - 1 in self.saved:
                x_prev = self.saved[j - 1]
            else:
                with torch.no_grad(), autocast():
                    x_prev = block.inverse(y, *self.args, **self.kwargs)
            x_in = x_prev.detach().requires_grad_(j > 1)
            with torch.enable_grad(), autocast():
                y_again = block(x_in, *self.args, **self.kwargs)
            if j - 1 not in self.saved:
                scale = torch.linalg.vector_norm(y).clamp_min(1e-12)
                errors[j - 1] = float(torch.linalg.vector_norm(y_again.detach() - y) / scale)
            if grad is not None and y_again.requires_grad:
                torch.autograd.backward(y_again, grad)
                grad = x_in.grad if j > 1 else None
            y = x_prev.detach()
            del y_again
        return errors

    @staticmethod
    def first_violation(errors: Sequence[float], limit: float | None) -> tuple[int, float] | None:
        """The first block whose error exceeds ``limit``, or None."""
        if limit is None:
            return None
        for i, err in enumerate(errors):
            if not err <= limit:
                return i, err
        return None
