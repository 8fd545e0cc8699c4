"""P-GLEAM under concurrency: RNG, reads racing updates, leaks, Ctrl-C, exit, deep copies."""

from __future__ import annotations

import copy
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from greedywrap import GreedyWrapper, NonFiniteLossError

from toys import NanOnCalls, assert_bitwise_equal, make_blocks, make_data, params_of

ROOT = Path(__file__).parent.parent


class DropBlock(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = x + 0.1 * self.drop(torch.tanh(self.fc(x)))
        return x


def _dropout_run(
    devices, checkpoint: bool, steps: int = 8, precision: str = "fp32"
) -> tuple[list, list]:
    torch.manual_seed(0)
    blocks = [DropBlock() for _ in range(4)]
    gw = GreedyWrapper(
        blocks, splits=4, devices=devices, checkpoint=checkpoint, precision=precision
    )
    torch.manual_seed(123)  # the caller's stream: its batches and the dropout masks
    drawn = []
    for _ in range(steps):
        x = torch.randn(16, 32)
        drawn.append(x)
        gw.train_step(x, torch.zeros(16, 32))
    gw.close()
    return params_of(blocks), drawn


def test_checkpointed_dropout_under_pgleam_gives_the_sequential_bits_and_caller_draws():
    ref_params, ref_drawn = _dropout_run(None, False)
    seq_params, _ = _dropout_run(None, True)
    assert_bitwise_equal(seq_params, ref_params)
    for _ in range(3):
        params, drawn = _dropout_run(["cpu", "cpu"], True)
        assert_bitwise_equal(params, ref_params)
        assert_bitwise_equal(drawn, ref_drawn)


def test_bf16_checkpointed_dropout_under_pgleam_gives_the_sequential_bits():
    # Autocast's weight-cast cache is shared between threads; a worker's recomputation must
    # not hand the caller's next forward a cast of weights from before their update.
    ref_params, _ = _dropout_run(None, False, steps=4, precision="bf16")
    for _ in range(6):
        params, _ = _dropout_run(["cpu", "cpu"], True, steps=4, precision="bf16")
        assert_bitwise_equal(params, ref_params)


def test_checkpoint_recomputation_leaves_the_global_generator_alone():
    gw = GreedyWrapper([DropBlock()], checkpoint=True)
    torch.manual_seed(5)
    x = torch.randn(4, 32)
    out = gw.stages[0](x)
    state = torch.get_rng_state()
    out.sum().backward()  # recomputation replays the dropout masks privately
    assert torch.equal(torch.get_rng_state(), state)


class _SlowUpdate(nn.Module):
    """A block whose backward sleeps, so its stage's update is still pending for a while."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.delay = delay

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        y = self.fc(x)
        if y.requires_grad:
            y.register_hook(lambda g: (time.sleep(self.delay), g)[1])
        return y


def test_load_state_dict_waits_for_pending_updates():
    torch.manual_seed(0)
    gw = GreedyWrapper(
        [nn.Identity(), _SlowUpdate(0.3)],
        splits=2,
        devices=["cpu", "cpu"],
        optimizer=torch.optim.SGD,
        optimizer_kwargs={"lr": 0.1},
    )
    x0, t = make_data()
    gw.train_step(x0, t)
    ckpt = copy.deepcopy(gw.state_dict())
    gw.train_step(x0, t)  # stage 1's update is pending on its worker
    gw.load_state_dict(ckpt)
    now = gw.state_dict()
    for key, value in ckpt.items():
        if key != "_extra_state":
            assert torch.equal(now[key], value), key
    gw.close()


def test_parameters_and_deepcopy_see_pending_updates_applied():
    torch.manual_seed(0)
    blocks = [nn.Identity(), _SlowUpdate(0.2)]
    gw = GreedyWrapper(blocks, splits=2, devices=["cpu", "cpu"], optimizer=torch.optim.SGD)
    before = [p.detach().clone() for p in blocks[1].parameters()]
    gw.train_step(*make_data())
    seen = [p.detach().clone() for p in gw.parameters()]
    assert not any(torch.equal(a, b) for a, b in zip(seen, before, strict=True))
    gw.train_step(*make_data())
    twin = copy.deepcopy(gw)  # waits, then copies; the copy has workers of its own
    assert_bitwise_equal(params_of([twin]), params_of([gw]))
    for _ in range(2):
        gw.train_step(*make_data())
        twin.train_step(*make_data())
    assert_bitwise_equal(params_of([twin]), params_of([gw]))
    twin.close()
    gw.close()


def test_dropped_pgleam_wrappers_are_freed_with_their_threads():
    base = threading.active_count()
    refs = []
    for _ in range(5):
        gw = GreedyWrapper(make_blocks(4), splits=4, devices=["cpu", "cpu", "cpu"])
        gw.train_step(*make_data(), 0.5)
        refs.append(weakref.ref(gw))
        del gw
    gc.collect()
    assert [r() for r in refs] == [None] * 5
    deadline = time.monotonic() + 10
    while threading.active_count() > base and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == base


def test_ctrl_c_while_waiting_propagates_and_keeps_the_update_pending():
    log: list[str] = []
    block = _SlowUpdate(1.0)
    block.fc.weight.register_post_accumulate_grad_hook(lambda p: log.append("update0"))
    gw = GreedyWrapper([block, nn.Linear(8, 8)], splits=2, devices=["cpu", "cpu"])
    gw.train_step(*make_data())
    # A shell starts background jobs with SIGINT ignored, and Python then keeps it ignored:
    # install Python's own handler so the test does not depend on how pytest was started.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            gw.synchronize()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "update0" not in log  # the update was still running when Ctrl-C came
    assert gw._engine.pending[0] is not None
    block.delay = 0.0
    gw.train_step(*make_data())  # stage 0's forward waits for its step-1 update first
    gw.synchronize()
    assert log == ["update0", "update0"]
    gw.close()


def test_exit_with_a_hung_worker_does_not_wait_timeout_per_stage():
    child = textwrap.dedent(
        """
        import threading, torch
        from torch import nn
        from greedywrap import GreedyWrapper
        class Hang(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x): return x.clone()
            @staticmethod
            def backward(ctx, g): threading.Event().wait()
        class Block(nn.Module):
            def __init__(self, hang):
                super().__init__(); self.fc, self.hang = nn.Linear(4, 4), hang
            def forward(self, x):
                y = self.fc(x); return Hang.apply(y) if self.hang else y
        gw = GreedyWrapper([Block(False), Block(True), Block(True)], splits=3,
                           devices=["cpu", "cpu", "cpu"], timeout=60)
        gw.train_step(torch.randn(2, 4), torch.randn(2, 4))
        print("main code done", flush=True)
        raise SystemExit(7)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": ""},
    )
    try:
        assert proc.stdout.readline().strip() == "main code done"
        done_at = time.monotonic()  # measured from here: torch's import time does not count
        code = proc.wait(timeout=100)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert code == 7
    # One 5 s grace period in all, not timeout=60 s per hung stage (two of them here).
    assert time.monotonic() - done_at < 30


def test_async_nonfinite_error_names_the_step_of_the_nan_not_a_later_one():
    # Stage 0 and stage 2 share worker 0 and stage 0's backward is slow: stage 2's update of
    # step 1 runs after the caller has started step 2.
    blocks = [_SlowUpdate(0.3), *make_blocks(1), NanOnCalls({1})]
    gw = GreedyWrapper(blocks, splits=3, devices=["cpu", "cpu"], nonfinite="raise")
    gw.train_step(*make_data())
    with pytest.raises(NonFiniteLossError) as info:
        gw.train_step(*make_data())
        gw.synchronize()
    assert (info.value.stage, info.value.step) == (2, 1)
    gw.close()
