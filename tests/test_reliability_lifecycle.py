"""Closing, moving, reading counters and failed steps: the wrapper stays consistent."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from greedywrap import GreedyWrapper

from toys import make_blocks, make_data


class _HangingSGD(torch.optim.SGD):
    """SGD whose step blocks until ``release`` is set: a hung worker."""

    release = threading.Event()

    def step(self, closure=None):  # noqa: ANN001, ANN201 - the signature of Optimizer.step
        type(self).release.wait(30)
        return super().step(closure)


def test_close_with_hung_workers_waits_one_timeout_for_all_stages() -> None:
    _HangingSGD.release.clear()
    timeout = 0.5
    gw = GreedyWrapper(
        make_blocks(4),
        splits=4,
        devices=["cpu", "cpu"],
        optimizer=_HangingSGD,
        optimizer_kwargs={"lr": 0.1},
        timeout=timeout,
    )
    gw.train_step(*make_data())
    start = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            gw.close()
        elapsed = time.monotonic() - start
    finally:
        _HangingSGD.release.set()
    # Before: `timeout` per pending stage and again per worker join (3 s here).
    assert elapsed < 2 * timeout, elapsed


def test_close_keeps_the_process_group_of_a_stage_still_running() -> None:
    _HangingSGD.release.clear()
    gw = GreedyWrapper(
        make_blocks(2),
        splits=2,
        devices=["cpu", "cpu"],
        optimizer=_HangingSGD,
        optimizer_kwargs={"lr": 0.1},
        timeout=0.3,
    )
    sentinel = object()  # stands for a DDP process group a hung worker may be using
    for t in gw._trainers:
        t.group = sentinel
    gw.train_step(*make_data())
    try:
        with pytest.warns(RuntimeWarning, match="still running"), pytest.raises(TimeoutError):
            gw.close()
    finally:
        _HangingSGD.release.set()
    assert all(t.group is sentinel for t in gw._trainers)


def test_refused_move_leaves_parameters_and_optimizer_state_as_they_were() -> None:
    gw = GreedyWrapper(make_blocks(4), splits=2, devices=["cpu", "cpu"])
    gw.train_step(*make_data())
    with pytest.raises(RuntimeError, match="owns device placement"):
        gw.to("meta")
    assert {p.device.type for p in gw.parameters()} == {"cpu"}
    states = [v for opt in gw.optimizers for st in opt.state.values() for v in st.values()]
    assert states and {v.device.type for v in states if isinstance(v, torch.Tensor)} == {"cpu"}
    gw.train_step(*make_data())  # still trains
    gw.close()


class _SlowUpdate(nn.Module):
    """A block whose backward sleeps, so its stage's update is still pending for a while."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if y.requires_grad:
            y.register_hook(lambda g: (time.sleep(self.delay), g)[1])
        return y


class _Nan(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * float("nan")


def test_counters_read_right_after_a_step_see_its_pending_updates() -> None:
    # Stages 0 and 2 share worker 0; stage 0's update is slow, so stage 2's skip is pending.
    blocks = [_SlowUpdate(0.3), *make_blocks(1), _Nan()]
    gw = GreedyWrapper(blocks, splits=3, devices=["cpu", "cpu"], nonfinite="skip")
    gw.train_step(*make_data())
    assert gw.skipped_updates == [0, 0, 1]
    gw.close()


class _FailOnCall(nn.Module):
    """Its backward raises on the given calls (a transient failure in a micro-step)."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.calls = 0
        self.bad = bad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.fc(x)
        if self.calls in self.bad and y.requires_grad:

            def fail(g: torch.Tensor) -> torch.Tensor:
                raise RuntimeError("transient failure")

            y.register_hook(fail)
        return y


def test_a_failed_micro_step_drops_its_whole_accumulation_window() -> None:
    block = _FailOnCall({1})
    gw = GreedyWrapper([block], grad_accumulation=2)
    before = [p.detach().clone() for p in gw.parameters()]
    with pytest.raises(RuntimeError, match="transient failure"):
        gw.train_step(*make_data())
    gw.train_step(*make_data())  # closes the window: half of it would be applied before
    after = list(gw.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    gw.train_step(*make_data())
    gw.train_step(*make_data())  # the next whole window is applied
    assert not all(torch.equal(a, b) for a, b in zip(before, gw.parameters(), strict=True))


def test_a_step_that_fails_before_any_update_is_not_counted() -> None:
    gw = GreedyWrapper(make_blocks(2), splits=2, grad_accumulation=2)
    x, y = make_data()
    with pytest.raises(ValueError, match="shapes differ"):
        gw.train_step(x, torch.zeros(3, 3))
    assert gw.step_count == 0
    gw.train_step(x, y)
    assert gw.step_count == 1


def test_out_of_memory_in_the_loss_is_not_turned_into_a_shape_error() -> None:
    def oom_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("out of memory (injected)")

    gw = GreedyWrapper(make_blocks(1), loss=oom_loss)
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        gw.train_step(*make_data())


def test_a_checkpoint_that_does_not_fit_a_later_stage_loads_nothing() -> None:
    src = GreedyWrapper(make_blocks(4), splits=2)
    src.train_step(*make_data())
    state = src.state_dict()
    # Stage 1 of the target has an extra parameter group: only it does not fit.
    dst = GreedyWrapper(
        make_blocks(4, seed=1),
        splits=2,
        optimizer=[torch.optim.Adam, lambda p: torch.optim.Adam([{"params": p}, {"params": []}])],
    )
    before = [opt.state_dict() for opt in dst.optimizers]
    with pytest.raises(ValueError, match="stage 1 optimizer was saved with parameter groups"):
        dst.load_state_dict(state)
    after = [opt.state_dict() for opt in dst.optimizers]
    assert after[0]["state"] == before[0]["state"] == {}
