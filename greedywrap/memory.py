"""Peak-memory measurement of a piece of work, per device.

On CUDA the numbers come from the caching allocator's statistics. On CPU, where PyTorch keeps
no such statistics, they come from tracking every tensor storage created (or grown) inside the
window and its release, which gives the CPU analogue of ``torch.cuda.max_memory_allocated``
short of the scratch memory a kernel frees before it returns. The process
RSS peak, sampled by a background thread, is reported beside it as a cross-check.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["MemoryReport", "track_memory", "measure_peak_memory", "format_bytes"]


def format_bytes(n: float | None) -> str:
    """Format a byte count with a binary unit, e.g. ``format_bytes(3 * 2**20) == '3.00 MiB'``."""
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class MemoryReport:
    """What [`track_memory`][greedywrap.memory.track_memory] measured.

    Attributes:
        peak_bytes: per device (``"cpu"``, ``"cuda:0"``, ...), the peak bytes of tensor memory
            allocated inside the window above what was allocated when it opened. On CPU this
            counts the storages of tensors created inside the window and the growth of
            storages resized inside it (tensors that existed before, such as parameters, are
            not counted; nor are workspaces a kernel frees before it returns, see
            [`track_memory`][greedywrap.memory.track_memory]); on CUDA it is
            ``max_memory_allocated - memory_allocated`` at the start.
        rss_peak_bytes: the growth of the process resident set size at its sampled peak, or
            ``None`` where ``/proc`` is not available.
    """

    peak_bytes: dict[str, int] = field(default_factory=dict)
    rss_peak_bytes: int | None = None

    @property
    def max_peak(self) -> int:
        """The largest per-device peak (0 when nothing was measured)."""
        return max(self.peak_bytes.values(), default=0)

    def __str__(self) -> str:
        parts = [f"{dev}: {format_bytes(b)}" for dev, b in self.peak_bytes.items()]
        parts.append(f"RSS growth: {format_bytes(self.rss_peak_bytes)}")
        return ", ".join(parts)


def _writes_an_argument(func: Any) -> bool:
    """Whether an operator may write (and so resize) one of its tensor arguments (``out=``,
    ``resize_``, in-place ops): the only way a storage that already exists can grow."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return True  # unknown operator: check its arguments rather than miss a resize
    return any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _cpu_storages(tree: Any) -> dict[int, torch.UntypedStorage]:
    """The plain CPU storages of the tensors in ``tree``, by identity."""
    found: dict[int, torch.UntypedStorage] = {}
    for t in tree_leaves(tree):
        if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.layout == torch.strided:
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue  # tensors without a plain storage (nested, functional wrappers)
            found[id(storage)] = storage
    return found


class _LiveStorageTracker(TorchDispatchMode):
    """Counts bytes of CPU tensor storages allocated while active, until each is freed.

    Two events allocate storage that the dispatcher shows: an operator returns a tensor on a
    new storage, or an operator that writes an argument (``out=``, ``resize_``) grows that
    argument's storage. Both are counted, the second by the growth only (a storage that
    existed before the window counts from its size then). What a kernel allocates and frees
    inside itself never reaches the dispatcher and is not counted (see ``track_memory``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        # storage id -> [bytes counted for it, its finalizer]; a list so a resize can update it
        self._live: dict[int, list[Any]] = {}
        self._writes: dict[Any, bool] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        with self._lock:
            entry = self._live.pop(key, None)
            if entry is not None:
                self.current -= entry[0]

    def _count(self, key: int, storage: torch.UntypedStorage, nbytes: int) -> None:
        """Add ``nbytes`` to the storage's entry (opening one, freed with it, if needed)."""
        with self._lock:
            entry = self._live.get(key)
            if entry is None:
                fin = weakref.finalize(storage, self._release, key)
                self._live[key] = [nbytes, fin]
            else:
                entry[0] += nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        writes = self._writes.get(func)
        if writes is None:
            writes = self._writes[func] = _writes_an_argument(func)
        inputs = _cpu_storages((args, kwargs))
        # Sizes before the call, for operators that may resize an argument in place.
        before = {k: s.nbytes() for k, s in inputs.items()} if writes else {}
        out = func(*args, **kwargs)
        for key, nbytes in before.items():
            grown = inputs[key].nbytes() - nbytes
            if grown > 0:
                self._count(key, inputs[key], grown)
        for key, storage in _cpu_storages(out).items():
            if key in inputs or key in self._live:
                continue  # a view or an in-place result of a tensor that already existed
            self._count(key, storage, storage.nbytes())
        return out

    def detach_all(self) -> None:
        with self._lock:
            for _, fin in self._live.values():
                fin.detach()
            self._live.clear()


_ACTIVE_TRACKERS: list[_LiveStorageTracker] = []
_ACTIVE_LOCK = threading.Lock()


@contextmanager
def worker_scope() -> Iterator[None]:
    """Extend an active [`track_memory`][greedywrap.memory.track_memory] window to this thread.

    Dispatch modes are thread-local, so worker threads that run tensor work on behalf of a
    measured step (greedywrap's asynchronous engine) enter this scope around that work.
    """
    with _ACTIVE_LOCK:
        trackers = list(_ACTIVE_TRACKERS)
    if not trackers:
        yield
        return
    tracker = trackers[-1]
    with tracker:
        yield


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _RssSampler(threading.Thread):
    def __init__(self, interval: float) -> None:
        super().__init__(name="greedywrap-rss-sampler", daemon=True)
        self.interval = interval
        self.start_rss = _rss_bytes()
        self.peak = self.start_rss
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            rss = _rss_bytes()
            if rss is not None and self.peak is not None:
                self.peak = max(self.peak, rss)

    def stop(self) -> int | None:
        self._stop_event.set()
        self.join(timeout=5)
        rss = _rss_bytes()
        if rss is not None and self.peak is not None:
            self.peak = max(self.peak, rss)
        if self.start_rss is None or self.peak is None:
            return None
        return self.peak - self.start_rss


def _cuda_devices(devices: Sequence[torch.device | str | int] | None) -> list[torch.device]:
    if devices is None:
        if not torch.cuda.is_available():
            return []
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    out = []
    for d in devices:
        d = torch.device("cuda", d) if isinstance(d, int) else torch.device(d)
        if d.type == "cuda":
            out.append(torch.device("cuda", d.index or 0))
    return list(dict.fromkeys(out))


@contextmanager
def track_memory(
    devices: Sequence[torch.device | str | int] | None = None,
    *,
    cpu: bool = True,
    rss: bool = True,
    rss_interval: float = 0.002,
) -> Iterator[MemoryReport]:
    """Measure the peak memory of the work inside the ``with`` block, per device.

    Example:
        >>> with track_memory() as report:
        ...     y = torch.randn(1024, 1024) @ torch.randn(1024, 1024)
        >>> report.peak_bytes["cpu"] >= 3 * 4 * 1024 * 1024
        True

    What the CPU number counts, and what it cannot: every storage that an operator returns
    and every growth of an existing storage by an operator that writes an argument
    (``torch.mm(a, b, out=buf)`` with a too-small ``buf``, ``resize_``), from the moment it is
    allocated until it is freed. Memory that a kernel allocates and frees inside one operator
    call, without handing it back as a tensor, is invisible to PyTorch's dispatcher and so is
    **not** counted: the scratch buffers of oneDNN convolutions (as large as the output for a
    small-channel input), the im2col column buffers of the slow convolution path, and the
    like. The peak then reads low by that workspace when it falls inside such a call; a CPU
    conv + GroupNorm training step reads about 2 MiB (5-12%) low.
    ``torch.profiler.profile(profile_memory=True)`` sees those allocations, at a much higher
    cost; on CUDA the allocator's statistics include workspaces, so the CUDA numbers have no
    such gap.

    Args:
        devices: CUDA devices to measure (all visible ones by default). Their allocator peak
            statistics are reset when the window opens.
        cpu: track CPU tensor storages (adds a small per-operation overhead).
        rss: sample the process RSS in a background thread.
        rss_interval: seconds between RSS samples.

    Yields:
        A [`MemoryReport`][greedywrap.memory.MemoryReport], filled in when the block exits.

    Raises:
        RuntimeError: a CPU window is opened inside another one.
    """
    report = MemoryReport()
    cuda = _cuda_devices(devices)
    starts = {}
    for d in cuda:
        torch.cuda.synchronize(d)
        torch.cuda.reset_peak_memory_stats(d)
        starts[d] = torch.cuda.memory_allocated(d)
    tracker = None
    if cpu:
        with _ACTIVE_LOCK:
            if _ACTIVE_TRACKERS:
                raise RuntimeError(
                    "track_memory: a CPU memory window is already open; nested windows are not "
                    "supported (pass cpu=False to the inner one)"
                )
            tracker = _LiveStorageTracker()
            _ACTIVE_TRACKERS.append(tracker)
    sampler = _RssSampler(rss_interval) if rss else None
    if sampler is not None:
        sampler.start()
    try:
        if tracker is not None:
            with tracker:
                yield report
        else:
            yield report
    finally:
        if sampler is not None:
            report.rss_peak_bytes = sampler.stop()
        if tracker is not None:
            with _ACTIVE_LOCK:
                _ACTIVE_TRACKERS.remove(tracker)
            report.peak_bytes["cpu"] = tracker.peak
            tracker.detach_all()
        for d in cuda:
            torch.cuda.synchronize(d)
            report.peak_bytes[str(d)] = torch.cuda.max_memory_allocated(d) - starts[d]


def measure_peak_memory(
    fn: Callable[..., Any], *args: Any, devices: Sequence[Any] | None = None, **kwargs: Any
) -> tuple[Any, MemoryReport]:
    """Run ``fn(*args, **kwargs)`` in [`track_memory`][greedywrap.memory.track_memory].

    Returns its result and the [`MemoryReport`][greedywrap.memory.MemoryReport].
    """
    with track_memory(devices) as report:
        result = fn(*args, **kwargs)
    return result, report
