"""Data parallelism over processes and nodes: one DistributedDataParallel per stage.

When ``torch.distributed`` is initialised (``torchrun``, or HF Accelerate under ``torchrun``),
every rank builds the same stages and each stage is wrapped in its own DDP with its own process
group, so collectives of different stages never interleave on one group. Separate groups are
not enough under P-GLEAM with NCCL: collectives of different communicators on one GPU, issued
from several threads in an order that differs between ranks, can deadlock. So every collective
of a stage runs on its worker, in the order the stages were submitted (the same on every rank):
DDP is built with ``forward_sync_buffers=False`` (no collective in the caller's forward;
buffers such as batch-norm running statistics are synced when DDP is built, then stay per
rank), and the nonfinite flag is all-reduced in the update. Two worker entries on one GPU
(``devices=[0, 0]``) still issue collectives from two threads: avoid that combination with
NCCL. Within a stage the order is fixed (one backward per step).
Each stage's DDP wrapper and group belong to its ``StageTrainer`` (``greedywrap.trainer``);
``GreedyWrapper.close()`` releases them and destroys the groups, so call it before
``torch.distributed.destroy_process_group()``.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["is_distributed", "use_distributed", "from_accelerator"]


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def use_distributed(requested: bool | None) -> bool:
    """Resolve the wrapper's ``distributed`` argument: ``None`` means 'when initialised'."""
    if requested is None:
        return is_distributed()
    if not isinstance(requested, bool):
        raise TypeError(f"distributed: got {requested!r}; expected True, False or None")
    if requested and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed: True, but torch.distributed is not initialised; launch with torchrun "
            "(or accelerate launch) and call torch.distributed.init_process_group() first"
        )
    return requested


def from_accelerator(model: Any, accelerator: Any, **kwargs: Any) -> Any:
    """Build a ``GreedyWrapper`` that follows an ``accelerate.Accelerator``.

    The wrapper keeps placement for itself (do not pass it to ``accelerator.prepare``): its
    stages go on ``accelerator.device``, mixed precision follows
    ``accelerator.mixed_precision`` (``"bf16"``/``"fp16"``/``"no"``), gradient accumulation
    follows ``accelerator.gradient_accumulation_steps``, and data parallelism over the
    accelerator's processes is one DDP per stage. Prepare only the data loader with the
    accelerator, so that each process sees its own shard of every batch.

    Example:
        >>> accelerator = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=2)
        >>> gw = from_accelerator(blocks, accelerator, splits=4, loss=my_loss)
        >>> loader = accelerator.prepare(loader)
        >>> for x0, target in loader:
        ...     gw.train_step(x0, target)

    Args:
        model: the blocks, as for ``GreedyWrapper``.
        accelerator: an ``accelerate.Accelerator``.
        **kwargs: any other ``GreedyWrapper`` argument (``splits``, ``loss``, ...).
    """
    from greedywrap.wrapper import GreedyWrapper

    for key in ("devices", "precision", "grad_accumulation"):
        if key in kwargs:
            raise ValueError(
                f"{key}: set by the accelerator in from_accelerator; configure the Accelerator "
                "instead or build GreedyWrapper directly"
            )
    precision = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}.get(
        str(getattr(accelerator, "mixed_precision", "no")), None
    )
    if precision is None:
        raise ValueError(
            f"accelerator.mixed_precision: {accelerator.mixed_precision!r} is not supported; "
            "use 'no', 'bf16' or 'fp16'"
        )
    return GreedyWrapper(
        model,
        devices=[accelerator.device],
        precision=precision,
        grad_accumulation=int(getattr(accelerator, "gradient_accumulation_steps", 1)),
        **kwargs,
    )
