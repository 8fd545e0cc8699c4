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
import functools
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch
from torch.utils import _pytree as pytree

from greedywrap import memory
from greedywrap.inversion import InversionError
from greedywrap.options import move_args, to_device
from greedywrap.replay import no_global_borrow
from greedywrap.stages import detach_state
from greedywrap.trainer import NonFiniteLossError, StageTrainer

# The library's own errors raised in an update keep their type under P-GLEAM.
_OWN_ERRORS = (NonFiniteLossError, InversionError)

__all__ = ["StageError", "SequentialEngine", "AsyncEngine", "make_engine"]


class StageError(RuntimeError):
    """A stage's backward or update failed on its worker; ``stage`` is its 0-based index.

    The library's own errors (``NonFiniteLossError``, ``InversionError``) are raised as
    themselves instead, with the same type as in the sequential engine.
    """

    def __init__(self, stage: int, device: torch.device, cause: BaseException) -> None:
        super().__init__(
            f"stage {stage} (on {device}) failed in its backward/update: "
            f"{type(cause).__name__}: {cause}"
        )
        self.stage = stage


class _StepInputs:
    """Block arguments and target moved to each device at most once per step.

    Every worker stream that reads them is recorded on their CUDA tensors (the caller's own
    included), so the allocator does not hand that memory out again (the graph saves the
    target and the arguments) before the worker's backward is done with it. Two workers on one
    GPU share the copies: the first reader made them, and the second is ordered after the first
    through the chain of stage events.
    """

    def __init__(self, target: Any, args: tuple, kwargs: dict) -> None:
        self.target, self.args, self.kwargs = target, args, kwargs
        self.moved: dict[torch.device, tuple[tuple, dict, Any]] = {}

    def on(self, device: torch.device, worker: _Worker | None = None) -> tuple[tuple, dict, Any]:
        if device not in self.moved:
            a, k = move_args(device, self.args, self.kwargs)
            self.moved[device] = (a, k, to_device(self.target, device, "target"))
        moved = self.moved[device]
        if worker is not None and worker.stream is not None:
            _record_on(moved, worker.stream)
        return moved


def _record_on(tree: Any, stream: Any) -> None:
    """Tell the allocator that ``stream`` reads every CUDA tensor of ``tree``."""
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor) and leaf.is_cuda:
            leaf.record_stream(stream)


def _fresh_loss(loss: torch.Tensor) -> torch.Tensor:
    # Some losses (mse_loss on CPU) return a 0-dim view of their whole elementwise buffer; a
    # clone keeps one number alive instead of an activation-sized buffer per stage.
    return loss.detach().clone()


class SequentialEngine:
    """Stage after stage on the calling thread: forward, local loss, backward, update."""

    def __init__(self, stages: Sequence[StageTrainer]) -> None:
        self.stages = list(stages)

    def step(
        self, x0: Any, target: Any, args: tuple, kwargs: dict, sync: bool, step: int
    ) -> list[torch.Tensor]:
        """One greedy step: every stage's forward, loss, backward and update, in order.

        Returns each stage's loss as a detached 0-dim tensor of its own.
        """
        inputs = _StepInputs(target, args, kwargs)
        x = detach_state(x0)
        losses = []
        for st in self.stages:
            a, k, tgt = inputs.on(st.device)
            out, loss, inverted = st.forward(to_device(x, st.device, "x0"), tgt, a, k, sync)
            st.update(loss, sync, step, inverted)
            losses.append(_fresh_loss(loss))
            x = detach_state(out)
            # Dropping the last references frees this stage's graph before the next stage runs.
            del out, loss, inverted
        return losses

    def synchronize(self, timeout: float | None = None) -> None:
        """Nothing runs in the background."""

    def close(self, timeout: float | None = None) -> None:
        """Nothing to stop."""

    def still_running(self) -> list[int]:
        """Nothing runs in the background."""
        return []


_ON_WORKER = threading.local()


def on_worker_thread() -> bool:
    """True inside a job of a P-GLEAM worker (where waiting for workers would deadlock)."""
    return getattr(_ON_WORKER, "active", False)


class _Worker:
    """A daemon thread that runs jobs in order; one per device entry.

    A daemon thread (rather than a ThreadPoolExecutor, whose threads are joined at exit) so that
    a hung job can never keep the interpreter from exiting. It refers to nothing but its queue
    and device: a job keeps its stage alive only while it runs.
    """

    def __init__(self, index: int, device: torch.device) -> None:
        self.index = index
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=_run_jobs,
            args=(self._jobs, self.stream),
            name=f"greedywrap-worker-{index}-{device}",
            daemon=True,
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

    def request_stop(self) -> None:
        self._jobs.put(None)

    def stop(self, timeout: float) -> bool:
        self.request_stop()
        self._thread.join(max(timeout, 0.0))
        return not self._thread.is_alive()


def _run_jobs(jobs: queue.SimpleQueue, stream: Any) -> None:
    _ON_WORKER.active = True
    while True:
        item = jobs.get()
        if item is None:
            return
        fn, fut = item
        del item
        if fut.set_running_or_notify_cancel():
            try:
                ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
                with memory.worker_scope(), no_global_borrow(), ctx:
                    fn()
            except BaseException as err:  # noqa: BLE001 - handed to the caller via the future
                fut.set_exception(err)
            else:
                fut.set_result(None)
        # An idle worker must not keep the last job (and through it a stage) alive.
        del fn, fut


_LIVE_ENGINES: weakref.WeakSet = weakref.WeakSet()
_EXIT_GRACE_S = 5.0


@atexit.register
def _close_all_engines() -> None:
    # One grace period for all engines together: a hung worker must not hold the exit for
    # `timeout` per stage (worker threads are daemons and are abandoned after it).
    deadline = time.monotonic() + _EXIT_GRACE_S
    for engine in list(_LIVE_ENGINES):
        with contextlib.suppress(Exception):
            engine.close(timeout=max(deadline - time.monotonic(), 0.0))


def _stop_workers(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.request_stop()


class AsyncEngine:
    """P-GLEAM: forward on the calling thread, each stage's update on its device's worker.

    Stage m's forward at step k+1 waits (at most ``timeout`` seconds) for its own update of step
    k; no other wait happens in the step, so ``train_step`` can return while the last stages
    still update. ``synchronize`` waits for everything (the wrapper calls it before
    every read or write of its weights).

    The engine sees only the stages (never the wrapper); jobs are bound methods of a stage, so
    a dropped wrapper is collected and its workers stopped (a finalizer asks them to end).
    """

    def __init__(
        self,
        stages: Sequence[StageTrainer],
        devices: Sequence[torch.device],
        stage_entry: Sequence[int],
        timeout: float,
        max_in_flight: int | None,
    ) -> None:
        self.stages = list(stages)
        self.stage_entry = list(stage_entry)
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.workers = [_Worker(i, d) for i, d in enumerate(devices)]
        self.pending: list[Future | None] = [None] * len(self.stages)
        self._order: list[int] = []  # stages with an update submitted, oldest first
        self.closed = False
        self._finalizer = weakref.finalize(self, _stop_workers, list(self.workers))
        _LIVE_ENGINES.add(self)

    def _wait(self, m: int, timeout: float | None = None) -> None:
        fut = self.pending[m]
        if fut is None:
            return
        limit = self.timeout if timeout is None else timeout
        try:
            fut.result(timeout=limit)
        except FutureTimeout:
            # The update may still land: it stays pending, so nothing races it.
            raise TimeoutError(
                f"stage {m}: its backward/update did not finish within timeout={limit}s; "
                "the worker may be hung (raise GreedyWrapper(timeout=...) for slow stages)"
            ) from None
        except BaseException as err:
            if fut.done() and not fut.cancelled() and fut.exception(0) is err:
                self.pending[m] = None
                if isinstance(err, _OWN_ERRORS):
                    # They already name their stage (and step): the same type as sequentially.
                    raise err
                raise StageError(m, self.stages[m].device, err) from err
            # Raised in the caller while waiting (Ctrl-C): unchanged, and the update is kept
            # pending so that the next forward of this stage still waits for it.
            raise
        self.pending[m] = None

    def step(
        self, x0: Any, target: Any, args: tuple, kwargs: dict, sync: bool, step: int
    ) -> list[torch.Tensor]:
        """One greedy step: forwards here, in order; each update submitted to its worker.

        Returns each stage's loss (detached, 0-dim) without waiting for the updates.
        """
        if self.closed:
            raise RuntimeError("train_step: the wrapper was closed; build a new one to train")
        inputs = _StepInputs(target, args, kwargs)
        x = detach_state(x0)
        prev_event = None
        if isinstance(x0, torch.Tensor) and x0.is_cuda:
            # Stage 0 reads what the caller's stream produced (x0, target, block arguments).
            prev_event = torch.cuda.Event()
            prev_event.record(torch.cuda.current_stream(x0.device))
        losses = []
        # The caller's current streams, taken outside any worker's stream context.
        caller = {w.index: torch.cuda.current_stream(w.device) for w in self.workers if w.stream}
        used_streams: list[Any] = []
        for m, st in enumerate(self.stages):
            worker = self.workers[self.stage_entry[m]]
            self._wait(m)
            with worker.stream_context():
                if worker.stream is not None:
                    if worker.stream not in used_streams:
                        # Everything the caller queued on this device so far (target, block
                        # arguments) comes before the stage reads it.
                        worker.stream.wait_stream(caller[worker.index])
                        used_streams.append(worker.stream)
                    if prev_event is not None:
                        worker.stream.wait_event(prev_event)
                a, k, tgt = inputs.on(st.device, worker)
                inp = self._to_stage(x, st.device, worker, prev_event)
                out, loss, inverted = st.forward(inp, tgt, a, k, sync)
                # Cloned on the worker stream that computed the loss (on the caller's stream
                # the clone could read it before it is written); the caller, which reads and
                # frees the clone, is recorded on it.
                fresh = _fresh_loss(loss)
                if worker.stream is not None and fresh.is_cuda:
                    fresh.record_stream(caller[worker.index])
                losses.append(fresh)
                if worker.stream is not None:
                    prev_event = torch.cuda.Event()
                    prev_event.record(worker.stream)
            # A bound method of the stage, with what this step's forward made and the step
            # number taken now, not at run time.
            self.pending[m] = worker.submit(
                functools.partial(st.update, loss, sync, step, inverted)
            )
            if m in self._order:
                self._order.remove(m)
            self._order.append(m)
            x = detach_state(out)
            del out, loss, inverted
            self._bound_in_flight()
        for w in self.workers:
            if w.stream is not None and w.stream in used_streams:
                # The returned losses were computed on worker streams: order the caller after them.
                caller[w.index].wait_stream(w.stream)
        return losses

    @staticmethod
    def _to_stage(x: Any, device: torch.device, worker: _Worker, prev_event: Any) -> Any:
        waited: set[torch.device] = set()
        for leaf in pytree.tree_leaves(x):
            if isinstance(leaf, torch.Tensor) and leaf.is_cuda and leaf.device != device:
                # A cross-device copy runs on the source device's current stream (the
                # caller's), not on the worker stream that produced the leaf: order it after
                # that stream's work, and tell the allocator that stream reads the leaf.
                src = torch.cuda.current_stream(leaf.device)
                if prev_event is not None and leaf.device not in waited:
                    src.wait_event(prev_event)
                    waited.add(leaf.device)
                leaf.record_stream(src)
        inp = to_device(x, device, "x0")
        if worker.stream is not None:
            _record_on(inp, worker.stream)
        return inp

    def _bound_in_flight(self) -> None:
        """Wait for the oldest updates while more than ``max_in_flight`` are pending.

        Every pending update keeps its stage's graph alive, so this bounds the memory that the
        asynchronous engine adds over the sequential one (at the cost of some overlap).
        """
        limit = self.max_in_flight
        if limit is None:
            self._order.clear()
            return
        self._order = [m for m in self._order if self.pending[m] is not None]
        while len([m for m in self._order if not self.pending[m].done()]) > limit:
            self._wait(self._order.pop(0))

    def synchronize(self, timeout: float | None = None) -> None:
        """Wait for every stage's pending update and the workers' kernels; raise the first failure.

        ``timeout`` bounds the whole wait (default: ``timeout`` of the wrapper per stage).
        """
        if on_worker_thread():
            return  # called from inside a job (e.g. a hook): waiting for itself would deadlock
        deadline = None if timeout is None else time.monotonic() + timeout
        first: BaseException | None = None
        for m in range(len(self.pending)):
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                self._wait(m, left)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as err:  # noqa: BLE001 - every stage is waited for first
                first = first or err
        try:
            if first is not None:
                raise first
        finally:
            # Even when a stage failed, the kernels the workers queued are waited for, so the
            # caller never reads memory those streams are still writing.
            for worker in self.workers:
                if worker.stream is not None:
                    worker.stream.synchronize()

    def still_running(self) -> list[int]:
        """The stages whose update has not finished (after a close that timed out)."""
        return [m for m, fut in enumerate(self.pending) if fut is not None and not fut.done()]

    def close(self, timeout: float | None = None) -> None:
        """Wait for pending updates, then stop the workers. Safe to call twice.

        ``timeout`` bounds the whole close, waits and joins together (default: the wrapper's
        ``timeout``, once, not once per stage), so a hung worker delays it by that at most.
        """
        if self.closed:
            return
        self.closed = True
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            self.synchronize(max(deadline - time.monotonic(), 0.0))
        finally:
            for worker in self.workers:
                worker.stop(deadline - time.monotonic())
            self._finalizer.detach()
            _LIVE_ENGINES.discard(self)


def make_engine(
    stages: Sequence[StageTrainer],
    devices: Sequence[torch.device],
    stage_entry: Sequence[int],
    timeout: float,
    max_in_flight: int | None,
) -> SequentialEngine | AsyncEngine:
    """Sequential for one device entry, asynchronous (one worker per entry) for several."""
    if len(devices) > 1:
        return AsyncEngine(stages, devices, stage_entry, timeout, max_in_flight)
    return SequentialEngine(stages)
