"""How a greedy step runs: sequentially (GLEAM) or with per-device workers (P-GLEAM).

Both engines run every stage's forward on the calling thread, in order, because stage m+1 needs
stage m's output. They differ in where a stage's backward and optimizer step run: inline
(sequential), or on the worker thread of the stage's device entry (asynchronous), so that the
forward chain goes on while earlier stages update. Stage m's forward for step k+1 waits for its
own update of step k, so both engines compute the same numbers.
"""

from __future__ import annotations

import atexit
import contextlib
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

import torch

from greedywrap import memory
from greedywrap.options import to_device

if TYPE_CHECKING:
    from greedywrap.wrapper import GreedyWrapper

__all__ = ["StageError", "SequentialEngine", "AsyncEngine", "make_engine"]


class StageError(RuntimeError):
    """A stage's backward or update failed on its worker; ``stage`` is its 0-based index."""

    def __init__(self, stage: int, device: torch.device, cause: BaseException) -> None:
        super().__init__(
            f"stage {stage} (on {device}) failed in its backward/update: "
            f"{type(cause).__name__}: {cause}"
        )
        self.stage = stage


class _StepInputs:
    """Block arguments and target moved to each device at most once per step."""

    def __init__(self, gw: GreedyWrapper, target: Any, args: tuple, kwargs: dict) -> None:
        self.gw, self.target, self.args, self.kwargs = gw, target, args, kwargs
        self.moved: dict[torch.device, tuple[tuple, dict, Any]] = {}

    def on(self, device: torch.device) -> tuple[tuple, dict, Any]:
        if device not in self.moved:
            a, k = self.gw.move_args(device, self.args, self.kwargs)
            self.moved[device] = (a, k, to_device(self.target, device, "target"))
        return self.moved[device]


class SequentialEngine:
    """Stage after stage on the calling thread: forward, local loss, backward, update."""

    def __init__(self, wrapper: GreedyWrapper) -> None:
        self.wrapper = wrapper

    def step(
        self, x0: torch.Tensor, target: Any, args: tuple, kwargs: dict, sync: bool = True
    ) -> list[torch.Tensor]:
        gw = self.wrapper
        inputs = _StepInputs(gw, target, args, kwargs)
        x = x0.detach()
        losses = []
        for m, stage in enumerate(gw.stages):
            a, k, tgt = inputs.on(stage.device)
            out, loss = gw._stage_forward(m, to_device(x, stage.device, "x0"), tgt, a, k, sync)
            gw._stage_update(m, loss, sync)
            losses.append(loss.detach())
            x = out.detach()
            # Dropping the last references frees this stage's graph before the next stage runs.
            del out, loss
        return losses

    def synchronize(self) -> None:
        """Nothing runs in the background."""

    def close(self) -> None:
        """Nothing to stop."""


class _Worker:
    """A daemon thread that runs jobs in order; one per device entry.

    A daemon thread (rather than a ThreadPoolExecutor, whose threads are joined at exit) so that
    a hung job can never keep the interpreter from exiting.
    """

    def __init__(self, index: int, device: torch.device) -> None:
        self.index = index
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, name=f"greedywrap-worker-{index}-{device}", daemon=True
        )
        self._thread.start()

    def stream_context(self) -> contextlib.AbstractContextManager:
        return (
            torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        )

    def submit(self, fn: Callable[[], None]) -> Future:
        fut: Future = Future()
        self._jobs.put((fn, fut))
        return fut

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                with memory.worker_scope(), self.stream_context():
                    fn()
            except BaseException as err:  # noqa: BLE001 - handed to the caller via the future
                fut.set_exception(err)
            else:
                fut.set_result(None)

    def stop(self, timeout: float) -> bool:
        self._jobs.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()


_LIVE_ENGINES: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all_engines() -> None:
    for engine in list(_LIVE_ENGINES):
        engine.close(timeout=5.0)


class AsyncEngine:
    """P-GLEAM: forward on the calling thread, each stage's update on its device's worker.

    Stage m's forward at step k+1 waits (at most ``timeout`` seconds) for its own update of step
    k; no other wait happens in the step, so ``train_step`` can return while the last stages
    still update. :meth:`synchronize` waits for everything (the wrapper calls it before
    inference, ``state_dict`` and moves).
    """

    def __init__(self, wrapper: GreedyWrapper) -> None:
        self.wrapper = wrapper
        self.workers = [_Worker(i, d) for i, d in enumerate(wrapper.devices)]
        self.pending: list[Future | None] = [None] * wrapper.num_stages
        self._order: list[int] = []  # stages with an update submitted, oldest first
        self.closed = False
        _LIVE_ENGINES.add(self)

    def _wait(self, m: int) -> None:
        fut = self.pending[m]
        if fut is None:
            return
        gw = self.wrapper
        try:
            fut.result(timeout=gw.timeout)
        except FutureTimeout:
            raise TimeoutError(
                f"stage {m}: its backward/update did not finish within timeout={gw.timeout}s; "
                "the worker may be hung (raise GreedyWrapper(timeout=...) for slow stages)"
            ) from None
        except BaseException as err:
            self.pending[m] = None
            raise StageError(m, gw.stages[m].device, err) from err
        self.pending[m] = None

    def step(
        self, x0: torch.Tensor, target: Any, args: tuple, kwargs: dict, sync: bool = True
    ) -> list[torch.Tensor]:
        if self.closed:
            raise RuntimeError("train_step: the wrapper was closed; build a new one to train")
        gw = self.wrapper
        inputs = _StepInputs(gw, target, args, kwargs)
        x = x0.detach()
        prev_event = None
        losses = []
        for m, stage in enumerate(gw.stages):
            worker = self.workers[gw.stage_entry[m]]
            self._wait(m)
            with worker.stream_context():
                if worker.stream is not None and prev_event is not None:
                    worker.stream.wait_event(prev_event)
                a, k, tgt = inputs.on(stage.device)
                if x.is_cuda and x.device != stage.device:
                    # A cross-device copy runs on the source device's current stream, not on
                    # the stream that produced x: tell the allocator so x's memory is not
                    # reused before that copy has run.
                    x.record_stream(torch.cuda.current_stream(x.device))
                inp = to_device(x, stage.device, "x0")
                if worker.stream is not None and inp.is_cuda:
                    inp.record_stream(worker.stream)
                out, loss = gw._stage_forward(m, inp, tgt, a, k, sync)
                if worker.stream is not None:
                    prev_event = torch.cuda.Event()
                    prev_event.record(worker.stream)
            losses.append(loss.detach())
            self.pending[m] = worker.submit(lambda m=m, loss=loss: gw._stage_update(m, loss, sync))
            if m in self._order:
                self._order.remove(m)
            self._order.append(m)
            x = out.detach()
            del out, loss
            self._bound_in_flight()
        return losses

    def _bound_in_flight(self) -> None:
        """Wait for the oldest updates while more than ``max_in_flight`` are pending.

        Every pending update keeps its stage's graph alive, so this bounds the memory that the
        asynchronous engine adds over the sequential one (at the cost of some overlap).
        """
        limit = self.wrapper.max_in_flight
        if limit is None:
            self._order.clear()
            return
        self._order = [m for m in self._order if self.pending[m] is not None]
        while len([m for m in self._order if not self.pending[m].done()]) > limit:
            self._wait(self._order.pop(0))

    def synchronize(self) -> None:
        """Wait for every stage's pending update; raise the first failure."""
        first: BaseException | None = None
        for m in range(len(self.pending)):
            try:
                self._wait(m)
            except BaseException as err:  # noqa: BLE001 - every stage is waited for first
                first = first or err
        if first is not None:
            raise first

    def close(self, timeout: float | None = None) -> None:
        """Wait for pending updates, then stop the workers. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        try:
            self.synchronize()
        finally:
            limit = self.wrapper.timeout if timeout is None else timeout
            for worker in self.workers:
                worker.stop(limit)
            _LIVE_ENGINES.discard(self)


def make_engine(wrapper: GreedyWrapper) -> SequentialEngine | AsyncEngine:
    """Sequential for one device entry, asynchronous (one worker per entry) for several."""
    if len(wrapper.devices) > 1:
        return AsyncEngine(wrapper)
    return SequentialEngine(wrapper)
