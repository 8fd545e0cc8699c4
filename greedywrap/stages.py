"""Read the blocks out of a model, cut them into contiguous stages, and place stages on devices."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint as _checkpoint

from greedywrap.replay import checkpoint_contexts

DeviceLike = int | str | torch.device


def read_blocks(model: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    """Return the blocks of ``model`` in execution order.

    Args:
        model: an ``nn.Sequential``, an ``nn.ModuleList``, or any iterable of ``nn.Module``.

    Raises:
        TypeError: ``model`` is neither iterable nor made of modules.
        ValueError: ``model`` has no blocks.
    """
    if isinstance(model, nn.Module) and not isinstance(model, (nn.Sequential, nn.ModuleList)):
        if not hasattr(model, "__iter__"):
            raise TypeError(
                f"model: got {type(model).__name__}, which is not a sequence of blocks; pass an "
                "nn.Sequential, an nn.ModuleList or a list of nn.Module blocks"
            )
    try:
        blocks = list(model)
    except TypeError as err:
        raise TypeError(
            f"model: got {type(model).__name__}, which is not iterable; pass an nn.Sequential, "
            "an nn.ModuleList or a list of nn.Module blocks"
        ) from err
    for i, block in enumerate(blocks):
        if not isinstance(block, nn.Module):
            raise TypeError(
                f"model: block {i} is a {type(block).__name__}, not an nn.Module; every block "
                "must be an nn.Module called as block(x, *args, **kwargs)"
            )
    if not blocks:
        raise ValueError("model: got an empty model (0 blocks); it needs at least one block")
    return blocks


def even_balance(num_blocks: int, splits: int) -> list[int]:
    """Split ``num_blocks`` into ``splits`` contiguous stages whose sizes differ by at most one.

    Earlier stages get the extra blocks, e.g. ``even_balance(10, 4) == [3, 3, 2, 2]``.

    Raises:
        ValueError: ``splits`` is not between 1 and ``num_blocks``.
    """
    if isinstance(splits, bool) or not isinstance(splits, int):
        raise TypeError(f"splits: got {splits!r}; expected an int or a list of block counts")
    if not 1 <= splits <= num_blocks:
        raise ValueError(
            f"splits: got {splits}, but the model has {num_blocks} blocks; "
            f"splits must be between 1 and {num_blocks}"
        )
    base, extra = divmod(num_blocks, splits)
    return [base + (1 if i < extra else 0) for i in range(splits)]


def check_balance(balance: Sequence[int], num_blocks: int) -> list[int]:
    """Validate a list of block counts per stage and return it as a list of ints.

    Raises:
        ValueError: a count is not a positive int, or the counts do not sum to ``num_blocks``.
    """
    balance = list(balance)
    if not balance:
        raise ValueError("splits: got an empty list; give one positive block count per stage")
    for i, size in enumerate(balance):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(
                f"splits: stage {i} has size {size!r}; every stage needs a positive int number "
                "of blocks (zero-size stages are not allowed)"
            )
    if sum(balance) != num_blocks:
        raise ValueError(
            f"splits: {balance} sums to {sum(balance)}, but the model has {num_blocks} blocks; "
            "the counts must sum to the number of blocks (see greedywrap.balance_by_cost)"
        )
    return balance


def balance_by_cost(costs: Sequence[float], splits: int) -> list[int]:
    """Cut blocks with the given costs into ``splits`` contiguous stages minimising the largest.

    Useful when blocks differ in memory or time: pass per-block costs (e.g. from
    [`balance_by_time`][greedywrap.balance_by_time]) and give the result to
    ``GreedyWrapper(splits=...)``. Exact
    (dynamic programming over cut points), ties broken towards earlier cuts.

    Args:
        costs: one non-negative cost per block, in model order.
        splits: the number of stages, between 1 and ``len(costs)``.

    Returns:
        The number of blocks per stage.
    """
    costs = [float(c) for c in costs]
    if any(c < 0 or c != c for c in costs):
        raise ValueError(f"costs: got {costs}; every cost must be a non-negative number")
    n = len(costs)
    even_balance(n, splits)  # validates splits against n
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: smallest possible max-stage cost cutting the first i blocks into k stages.
    best = [[inf] * (n + 1) for _ in range(splits + 1)]
    cut = [[0] * (n + 1) for _ in range(splits + 1)]
    best[0][0] = 0.0
    for k in range(1, splits + 1):
        for i in range(k, n - (splits - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i] = value
                    cut[k][i] = j
    sizes = []
    i = n
    for k in range(splits, 0, -1):
        j = cut[k][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]


def balance_by_time(
    blocks: nn.Module | Iterable[nn.Module],
    sample: torch.Tensor,
    splits: int,
    *block_args: Any,
    repeats: int = 3,
    **block_kwargs: Any,
) -> list[int]:
    """Time each block's forward and backward on ``sample`` and balance stages by time.

    Runs every block ``repeats`` times on the current device of its parameters, takes the
    median, and returns [`balance_by_cost`][greedywrap.balance_by_cost] of those times.
    """
    blocks = read_blocks(blocks)
    costs = []
    x = sample
    for block in blocks:
        times = []
        for _ in range(max(1, repeats)):
            inp = x.detach().requires_grad_(x.is_floating_point() or x.is_complex())
            start = time.perf_counter()
            out = block(inp, *block_args, **block_kwargs)
            (out.abs() if out.is_complex() else out).sum().backward()
            times.append(time.perf_counter() - start)
        block.zero_grad(set_to_none=True)
        costs.append(sorted(times)[len(times) // 2])
        x = out.detach()
    return balance_by_cost(costs, splits)


def normalize_device(device: DeviceLike) -> torch.device:
    """Turn an int, a string or a ``torch.device`` into a ``torch.device``, checking CUDA ones.

    Raises:
        ValueError: a CUDA device that does not exist, or a string torch cannot parse.
    """
    if isinstance(device, bool):
        raise TypeError(f"devices: got {device!r}; expected an int, 'cpu', 'cuda:i' or a device")
    if isinstance(device, int):
        if device < 0:
            raise ValueError(f"devices: got {device}; a CUDA device index must be >= 0")
        device = torch.device("cuda", device)
    elif isinstance(device, str):
        try:
            device = torch.device(device)
        except RuntimeError as err:
            raise ValueError(
                f"devices: cannot parse {device!r}; expected 'cpu', 'cuda', 'cuda:i' or an int"
            ) from err
    elif not isinstance(device, torch.device):
        raise TypeError(
            f"devices: got {device!r} of type {type(device).__name__}; expected an int, "
            "'cpu', 'cuda:i' or a torch.device"
        )
    if device.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = 0 if device.index is None else device.index
        if index >= available:
            raise ValueError(
                f"devices: {device} does not exist; this machine has {available} CUDA device(s)"
                + ("" if available else " (use 'cpu')")
            )
        device = torch.device("cuda", index)
    elif device.type == "meta":
        raise ValueError("devices: 'meta' holds no data, so nothing can train on it")
    elif device.type != "cpu":
        # Other backends (mps, xpu, ...) fail in their own ways when missing (RuntimeError,
        # AssertionError); one allocation tells at construction whether this one is usable.
        try:
            torch.empty(0, device=device)
        except Exception as err:  # noqa: BLE001 - re-raised with the argument named
            raise ValueError(
                f"devices: {device} is not usable on this machine ({type(err).__name__}: {err})"
            ) from err
    return device


def assign_devices(
    devices: Sequence[DeviceLike], num_stages: int, placement: str = "round_robin"
) -> list[int]:
    """Map each stage to an index into ``devices``.

    ``round_robin`` puts stage m on entry m mod D (the paper's Algorithm 2); ``contiguous``
    gives each entry a contiguous run of stages, as even as possible.
    """
    d = len(devices)
    if d == 0:
        raise ValueError("devices: got an empty list; give at least one device or None")
    if d > num_stages:
        raise ValueError(
            f"devices: {d} devices for {num_stages} stages; give at most as many devices as "
            "stages, or raise splits"
        )
    if placement == "round_robin":
        return [m % d for m in range(num_stages)]
    if placement == "contiguous":
        sizes = even_balance(num_stages, d)
        return [i for i, size in enumerate(sizes) for _ in range(size)]
    raise ValueError(f"placement: got {placement!r}; expected 'round_robin' or 'contiguous'")


class Stage(nn.Module):
    """A contiguous run of blocks trained together with one optimizer and one local loss.

    Args:
        blocks: the blocks of this stage, in order.
        index: the stage's position (0-based).
        device: where the stage's parameters live.
        checkpoint: recompute each block's activations during backward instead of storing them.
        first_block: the model index of the stage's first block (for error messages).
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        index: int,
        device: torch.device,
        checkpoint: bool = False,
        first_block: int = 0,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.index = index
        self.device = device
        self.checkpoint = checkpoint
        self.first_block = first_block

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        for j, block in enumerate(self.blocks):
            if self.checkpoint and torch.is_grad_enabled():
                # The random numbers are replayed from a private generator in recomputation,
                # so a worker's backward never touches the caller's global generator.
                x = _checkpoint(
                    block, x, *args, use_reentrant=False, preserve_rng_state=False,
                    context_fn=functools.partial(checkpoint_contexts, self.device), **kwargs,
                )  # fmt: skip
            else:
                x = block(x, *args, **kwargs)
            check_carriable(x, self.first_block + j)
        return x

    def extra_repr(self) -> str:
        return f"index={self.index}, device={self.device}, checkpoint={self.checkpoint}"


def find_shared_parameters(
    groups: Sequence[Sequence[nn.Module]], heads: Sequence[nn.Module | None] | None = None
) -> list[tuple[str, int, int]]:
    """Find parameters that appear in more than one group of modules (heads included).

    ``heads[g]``, if given, counts as part of group ``g``. Returns ``(parameter name in its
    first group, first group, other group)`` for each one.
    """
    owner: dict[int, tuple[int, str]] = {}
    shared = []
    for g, modules in enumerate(groups):
        seen_here: set[int] = set()
        labelled = [(f"block {b}", module) for b, module in enumerate(modules)]
        head = heads[g] if heads is not None else None
        if head is not None:
            labelled.append(("head", head))
        for label, module in labelled:
            for name, param in module.named_parameters():
                key = id(param)
                if key in seen_here:
                    continue
                seen_here.add(key)
                if key in owner and owner[key][0] != g:
                    shared.append((owner[key][1], owner[key][0], g))
                else:
                    owner.setdefault(key, (g, f"{label}: {name}"))
    return shared


class StageUnit(nn.Module):
    """A stage and its head as one module: what a step runs, and what DDP wraps.

    Returns ``(output, prediction)``: the prediction is the head applied to the selected part
    of the output (``output=`` of the wrapper; the whole output by default).
    """

    def __init__(self, stage: Stage, head: nn.Module, output: Any = None) -> None:
        super().__init__()
        self.stage = stage
        self.head = head
        self.output = output

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        out = self.stage(x, *args, **kwargs)
        return out, self.head(select_output(out, self.output))


def select_output(state: Any, output: Any) -> Any:
    """What the head and the loss see of a stage's output state (see ``output=``)."""
    if output is None:
        return state
    if callable(output):
        return output(state)
    return state[output]


CARRY_RULE = (
    "a block must return a tensor, or a tuple/list/dict (nested as deep as needed) whose leaves "
    "are all tensors; that is the state carried to the next block and, detached leaf by leaf, "
    "to the next stage"
)


def check_carriable(x: Any, block: int) -> None:
    """Raise TypeError naming ``block`` when its output is not a pytree of tensors."""
    if isinstance(x, torch.Tensor):
        return
    leaves, _ = pytree.tree_flatten(x)
    bad = next((leaf for leaf in leaves if not isinstance(leaf, torch.Tensor)), None)
    if not leaves or bad is not None:
        what = type(x).__name__ if not leaves else f"a leaf of type {type(bad).__name__}"
        raise TypeError(f"model: block {block} returned {what}; {CARRY_RULE}")


def detach_state(x: Any) -> Any:
    """Detach every tensor of an inter-stage state (a tensor or a pytree of tensors)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    return pytree.tree_map(lambda t: t.detach(), x)
