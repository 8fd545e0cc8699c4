"""P-GLEAM: per-device workers give the same bits as the sequential step, and fail loudly."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from greedywrap import GreedyWrapper, track_memory
from greedywrap.engines import AsyncEngine, SequentialEngine, StageError

from toys import assert_bitwise_equal, make_blocks, make_data, params_of


@settings(max_examples=10, deadline=None)
@given(
    num_blocks=st.integers(2, 6),
    data=st.data(),
    workers=st.sampled_from([2, 3]),
    placement=st.sampled_from(["round_robin", "contiguous"]),
    seed=st.integers(0, 2**16),
)
def test_async_backward_matches_sequential_bitwise(num_blocks, data, workers, placement, seed):
    splits = data.draw(st.integers(max(2, workers), max(num_blocks, workers)))
    if splits > num_blocks:
        num_blocks = splits
    seq_blocks, async_blocks = (
        make_blocks(num_blocks, seed=seed),
        make_blocks(num_blocks, seed=seed),
    )
    x0, target = make_data(seed=seed)
    seq = GreedyWrapper(seq_blocks, splits=splits, optimizer_kwargs={"lr": 1e-2})
    with GreedyWrapper(
        async_blocks,
        splits=splits,
        devices=["cpu"] * workers,
        placement=placement,
        optimizer_kwargs={"lr": 1e-2},
    ) as par:
        assert isinstance(par._engine, AsyncEngine)
        for step in range(4):
            scale = 0.5 + 0.1 * step
            ls = seq.train_step(x0 + step, target, scale)
            lp = par.train_step(x0 + step, target, scale)
            assert_bitwise_equal(ls, lp)
        par.synchronize()
        assert_bitwise_equal(params_of(seq_blocks), params_of(async_blocks))
        with torch.no_grad():
            assert torch.equal(seq(x0, 0.5), par(x0, 0.5))


def test_single_device_entry_uses_the_sequential_engine():
    assert isinstance(GreedyWrapper(make_blocks(2), splits=2)._engine, SequentialEngine)
    gw = GreedyWrapper(make_blocks(2), splits=2, devices=["cpu"])
    assert isinstance(gw._engine, SequentialEngine)


class Slow(nn.Module):
    """Records on which thread backward ran; sleeps in backward (releasing the GIL)."""

    def __init__(self, log: list, delay: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.log = log
        self.delay = delay

    def forward(self, x):
        y = self.fc(x)
        if y.requires_grad:
            y.register_hook(self._hook)
        return y

    def _hook(self, grad):
        self.log.append(threading.current_thread().name)
        time.sleep(self.delay)
        return grad


def test_backward_runs_on_the_stage_workers_thread():
    log: list = []
    gw = GreedyWrapper([Slow(log), Slow(log)], splits=2, devices=["cpu", "cpu"])
    gw.train_step(torch.randn(2, 4), torch.randn(2, 4))
    gw.close()
    assert sorted(log) == sorted(
        [t for t in log if t.startswith("greedywrap-worker-0")]
        + [t for t in log if t.startswith("greedywrap-worker-1")]
    )
    assert any("worker-0" in t for t in log) and any("worker-1" in t for t in log)


def test_a_stage_never_runs_the_next_forward_before_its_own_update():
    log: list = []
    blocks = [Slow(log, delay=0.05), Slow(log, delay=0.05)]
    order = []
    blocks[0].register_forward_pre_hook(lambda *a: order.append("fwd0"))
    blocks[0].fc.weight.register_post_accumulate_grad_hook(lambda p: order.append("upd0"))
    with GreedyWrapper(blocks, splits=2, devices=["cpu", "cpu"]) as gw:
        for _ in range(3):
            gw.train_step(torch.randn(2, 4), torch.randn(2, 4))
    assert order == ["fwd0", "upd0"] * 3


class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        y.register_hook(self._boom)
        return y

    @staticmethod
    def _boom(grad):
        raise ValueError("injected failure in backward")


def test_worker_exception_reaches_the_caller_with_the_stage_index():
    blocks = [*make_blocks(1, width=4), Exploding()]
    gw = GreedyWrapper(blocks, splits=2, devices=["cpu", "cpu"])
    x0, target = torch.randn(2, 4), torch.randn(2, 4)
    with pytest.raises(StageError, match=r"stage 1 \(on cpu\).*injected failure") as info:
        gw.train_step(x0, target)
        gw.synchronize()
    assert info.value.stage == 1
    gw.close()
    assert all(not w._thread.is_alive() for w in gw._engine.workers)


def test_hung_worker_times_out_instead_of_hanging():
    release = threading.Event()

    class Hang(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            y.register_hook(lambda g: (release.wait(30), g)[1])
            return y

    gw = GreedyWrapper([Hang(), Hang()], splits=2, devices=["cpu", "cpu"], timeout=0.3)
    x0, target = torch.randn(2, 4), torch.randn(2, 4)
    gw.train_step(x0, target)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"stage 0: .*timeout=0.3s"):
        gw.train_step(x0, target)
    assert time.monotonic() - start < 5
    release.set()
    gw.close()


def test_close_is_idempotent_and_training_after_close_is_refused():
    gw = GreedyWrapper(make_blocks(2), splits=2, devices=["cpu", "cpu"])
    gw.train_step(*make_data(), 0.5)
    gw.close()
    gw.close()
    with pytest.raises(RuntimeError, match="closed"):
        gw.train_step(*make_data(), 0.5)


def test_state_dict_waits_for_pending_updates():
    log: list = []
    blocks = [Slow(log, delay=0.2), Slow(log, delay=0.2)]
    with GreedyWrapper(
        blocks,
        splits=2,
        devices=["cpu", "cpu"],
        optimizer=torch.optim.SGD,
        optimizer_kwargs={"lr": 0.1},
    ) as gw:
        before = blocks[1].fc.weight.detach().clone()
        gw.train_step(torch.randn(2, 4), torch.randn(2, 4))
        state = gw.state_dict()
    assert not torch.equal(state["stages.1.blocks.0.fc.weight"], before)


def test_arguments_are_moved_once_per_step_per_device():
    moves = []

    class Meas:
        def to(self, device):
            moves.append(device)
            return self

    class UsesMeas(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, meas):
            assert isinstance(meas, Meas)
            return self.fc(x)

    with GreedyWrapper([UsesMeas() for _ in range(4)], splits=4, devices=["cpu", "cpu"]) as gw:
        gw.train_step(torch.randn(2, 4), torch.randn(2, 4), Meas())
    assert len(moves) == 1  # both entries are the same device, "cpu"


class _Wide(nn.Module):
    """A block whose stored activations are large, to make pending graphs visible in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return x + torch.tanh(self.fc(torch.relu(self.fc(x))))


def _async_peak(max_in_flight, seed=0):
    torch.manual_seed(seed)
    blocks = [_Wide() for _ in range(8)]
    x0, target = torch.randn(512, 64), torch.randn(512, 64)
    with GreedyWrapper(blocks, splits=8, devices=["cpu", "cpu"],
                       max_in_flight=max_in_flight) as gw:  # fmt: skip
        losses = gw.train_step(x0, target)
        gw.synchronize()
        with track_memory(rss=False) as report:
            losses = gw.train_step(x0, target)
            gw.synchronize()
        return report.peak_bytes["cpu"], [p.detach().clone() for p in gw.parameters()], losses


def test_max_in_flight_bounds_pending_graphs_without_changing_the_numbers():
    _, free_params, free_losses = _async_peak(None)
    bounded_peak, bounded_params, bounded_losses = _async_peak(1)
    assert_bitwise_equal(free_params, bounded_params)
    assert_bitwise_equal(free_losses, bounded_losses)
    torch.manual_seed(0)
    seq = GreedyWrapper([_Wide() for _ in range(8)], splits=8)
    x0, target = torch.randn(512, 64), torch.randn(512, 64)
    seq.train_step(x0, target)
    with track_memory(rss=False) as report:
        seq.train_step(x0, target)
    # With one update in flight, at most two stages' graphs are alive: about twice sequential.
    assert bounded_peak <= 2.5 * report.peak_bytes["cpu"]


def test_max_in_flight_must_be_positive():
    with pytest.raises(ValueError, match="max_in_flight: got 0"):
        GreedyWrapper(make_blocks(2), splits=2, devices=["cpu", "cpu"], max_in_flight=0)
