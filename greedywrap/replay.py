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
A forward that drew nothing (the generator states are unchanged at its end) is recomputed with
no dispatch mode at all, so blocks without randomness pay nothing for this. Random operators
that take no generator can only be replayed by lending them the global generator; a P-GLEAM
worker refuses that with a clear error instead of racing the caller.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["checkpoint_contexts", "no_global_borrow"]

# Random operators with no overload taking a generator (CUDA's fused native_dropout, fused
# attention and RNN dropout) can only be replayed by lending them the global generator. That is
# safe on the thread that owns the global stream of draws (the caller), never on a P-GLEAM
# worker, where the caller keeps drawing at the same time: there it is refused (see
# `no_global_borrow`). The lock serialises borrowings between threads that may borrow.
_GLOBAL_BORROW = threading.Lock()
_THREAD = threading.local()


@contextlib.contextmanager
def no_global_borrow() -> Iterator[None]:
    """Within this context (a P-GLEAM worker's job) a replay may not borrow the global generator."""
    before = getattr(_THREAD, "no_borrow", False)
    _THREAD.no_borrow = True
    try:
        yield
    finally:
        _THREAD.no_borrow = before


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
    """Forward context: remember the global generator states, and whether the forward drew."""

    def __init__(self, box: dict[Any, Any], device: torch.device) -> None:
        self.box, self.device = box, device

    def _devices(self) -> list[torch.device]:
        cpu = torch.device("cpu")
        return [cpu, self.device] if self.device.type == "cuda" else [cpu]

    def __enter__(self) -> None:
        for dev in self._devices():
            self.box[dev] = _global_state(dev)

    def __exit__(self, *exc: Any) -> None:
        # A forward that drew no random number needs no replay: recomputation then runs with
        # no dispatch mode at all, as cheap as a checkpoint without RNG handling.
        self.box["drew"] = any(
            not torch.equal(_global_state(dev), self.box[dev]) for dev in self._devices()
        )


class _Recompute:
    """Recompute context: a fresh replay of the captured states, or nothing if none was drawn."""

    def __init__(self, box: dict[Any, Any]) -> None:
        self.box = box
        self.mode: _Replay | None = None

    def __enter__(self) -> None:
        # `drew` is unset when the forward raised: replaying is then the safe choice.
        if self.box.get("drew", True):
            # A new replay each time, so a second recomputation starts from the same states.
            self.mode = _Replay(self.box)
            self.mode.__enter__()

    def __exit__(self, *exc: Any) -> None:
        mode, self.mode = self.mode, None
        if mode is not None:
            mode.__exit__(*exc)


class _Replay(TorchDispatchMode):
    """Random operators draw from private copies of the captured states."""

    def __init__(self, box: dict[Any, Any]) -> None:
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
        overload = getattr(func.overloadpacket, _generator_overload(func._overloadname), None)
        if overload is not None:
            return overload(*args, **kwargs, generator=gen)
        if getattr(_THREAD, "no_borrow", False):
            raise RuntimeError(
                f"checkpoint=True: recomputing a block on a P-GLEAM worker met {func}, a random "
                "operator that takes no generator (e.g. CUDA dropout, fused attention or RNN "
                "dropout); replaying it would race the caller's global generator. Use "
                "checkpoint=False for this model, or one device entry (the sequential engine)"
            )
        with _GLOBAL_BORROW, _borrow_global(gen):
            return func(*args, **kwargs)


def _generator_overload(name: str) -> str:
    # aten spells them `generator` (for `default`), `generator_out` (for `out`), `X_generator`.
    if name == "default":
        return "generator"
    if name == "out":
        return "generator_out"
    return f"{name}_generator"


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
    box: dict[Any, Any] = {}
    return _Capture(box, device), _Recompute(box)
