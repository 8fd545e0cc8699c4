"""Random numbers for activation checkpointing that never touch the process-global generator.

``torch.utils.checkpoint`` replays a block's random numbers in backward by saving the global
generator's state in forward and, during recomputation, setting the global generator to it and
restoring it afterwards. Under P-GLEAM the recomputation runs on a worker thread while the
caller goes on drawing from the same global generator: the two interleave, dropout masks come
out different from the forward's, and the caller's own draws are repeated or skipped.

Here the forward still draws from the global generator (so the numbers are exactly those of a
run without workers), but only its *state* is captured. The recomputation runs under a
thread-local dispatch mode that hands every random operator a private generator started from
that state, so it reproduces the forward's numbers and leaves the global generator alone.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["checkpoint_contexts"]

# Random operators with no overload taking a generator (e.g. CUDA's fused native_dropout)
# must borrow the global generator; this lock at least serialises such borrowings.
_GLOBAL_BORROW = threading.Lock()


def _device_of(args: tuple, kwargs: dict) -> torch.device:
    dev = kwargs.get("device")
    if dev is not None:
        return torch.device(dev)
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


def _global_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


class _Capture:
    """Forward context: remember the global generator state of the stage's device(s)."""

    def __init__(self, box: dict[torch.device, torch.Tensor], device: torch.device) -> None:
        self.box, self.device = box, device

    def __enter__(self) -> None:
        cpu = torch.device("cpu")
        self.box[cpu] = torch.get_rng_state()
        if self.device.type == "cuda":
            self.box[self.device] = _global_state(self.device)

    def __exit__(self, *exc: Any) -> None:
        return None


class _Replay(TorchDispatchMode):
    """Recompute context: random operators draw from private copies of the captured states."""

    def __init__(self, box: dict[torch.device, torch.Tensor]) -> None:
        super().__init__()
        self.box = box
        self.generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        gen = self.generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            state = self.box.get(device)
            if state is None:  # a device the forward did not announce: start where it is now
                state = _global_state(device)
            gen.set_state(state)
            self.generators[device] = gen
        return gen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = dict(kwargs or {})
        if torch.Tag.nondeterministic_seeded not in func.tags or kwargs.get("generator"):
            return func(*args, **kwargs)
        gen = self._generator(_device_of(args, kwargs))
        if any(a.name == "generator" for a in func._schema.arguments):
            return func(*args, **kwargs, generator=gen)
        name = func._overloadname
        for alt in (f"{name}_generator", "generator" if name == "default" else ""):
            overload = getattr(func.overloadpacket, alt, None) if alt else None
            if overload is not None:
                return overload(*args, **kwargs, generator=gen)
        with _GLOBAL_BORROW, _borrow_global(gen):
            return func(*args, **kwargs)


@contextlib.contextmanager
def _borrow_global(gen: torch.Generator) -> Iterator[None]:
    device = gen.device
    saved = _global_state(device)
    _set_global(device, gen.get_state())
    try:
        yield
    finally:
        gen.set_state(_global_state(device))
        _set_global(device, saved)


def _set_global(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def checkpoint_contexts(
    device: torch.device,
) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """The ``context_fn`` of a non-reentrant checkpoint of a block on ``device``.

    Use with ``preserve_rng_state=False``: the first context captures the global generator
    state when the block's forward starts, the second replays it privately in recomputation.
    """
    box: dict[torch.device, torch.Tensor] = {}
    return _Capture(box, device), _Replay(box)
