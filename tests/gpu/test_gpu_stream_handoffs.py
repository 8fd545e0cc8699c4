"""P-GLEAM stream hand-offs on CUDA: returned losses and cross-device copies are ordered after
the worker stream that produced them. Skipped without CUDA (the second test needs two GPUs)."""

from __future__ import annotations

import pytest
import torch
from gpu_toys import (
    SLEEP_CYCLES,
    SlowBlock,
    assert_bitwise_equal,
    clones,
    host_copy,
    make_blocks,
    make_data,
    pair_of_devices,
)

from greedywrap import GreedyWrapper

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

WIDTH, BATCH = 64, 32


def _slow_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # The loss is written only after the sleep on the stream that computes it.
    torch.cuda._sleep(SLEEP_CYCLES)
    return torch.nn.functional.mse_loss(pred, target)


def test_returned_losses_are_copied_after_the_worker_stream_wrote_them() -> None:
    blocks = make_blocks(4, WIDTH)
    x0, target = make_data(BATCH, WIDTH, "cuda:0")
    ref = GreedyWrapper(clones(blocks), splits=4, devices=[0], loss=_slow_loss)
    pg = GreedyWrapper(clones(blocks), splits=4, devices=pair_of_devices(), loss=_slow_loss)
    want = host_copy(ref.train_step(x0, target))
    got = pg.train_step(x0, target)
    pg.close()
    assert_bitwise_equal(host_copy(got), want, "loss")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cross_device_copy_waits_for_the_stage_that_produced_its_source() -> None:
    blocks = make_blocks(4, WIDTH, block=SlowBlock)
    x0, target = make_data(BATCH, WIDTH, "cuda:0")
    ref = GreedyWrapper(clones(blocks), splits=2, devices=[0])
    pg = GreedyWrapper(clones(blocks), splits=2, devices=[0, 1])
    for _ in range(3):
        ref.train_step(x0, target)
        pg.train_step(x0, target)
    pg.synchronize()
    assert_bitwise_equal(
        host_copy(list(pg.parameters())), host_copy(list(ref.parameters())), "parameter"
    )
    pg.close()


class _FailingBackward(torch.nn.Module):
    """A block whose backward raises: its stage's update fails on the worker."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)

        def fail(g: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("injected failure")

        y.register_hook(fail)
        return y


def test_synchronize_that_raises_still_waits_for_the_other_worker_streams() -> None:
    from gpu_toys import SlowAdam

    from greedywrap import StageError

    blocks = [*make_blocks(2, WIDTH), _FailingBackward(WIDTH)]
    x0, target = make_data(BATCH, WIDTH, "cuda:0")
    kwargs = {"splits": [2, 1], "optimizer": SlowAdam, "optimizer_kwargs": {"lr": 1e-2}}
    ref = GreedyWrapper(clones(blocks[:2]), splits=1, devices=[0], optimizer=SlowAdam,
                        optimizer_kwargs={"lr": 1e-2})  # fmt: skip
    ref.train_step(x0, target)
    expected = host_copy(list(ref.parameters()))
    pg = GreedyWrapper(clones(blocks), devices=pair_of_devices(), **kwargs)
    pg.train_step(x0, target)
    with pytest.raises(StageError, match="injected failure"):
        pg.synchronize()
    # Read right away on the caller's stream: stage 0's Adam step is queued behind a sleep on
    # its worker stream, so this sees it only if the failed synchronize waited for the streams.
    snapshot = [p.detach().clone() for p in pg.stages[0].parameters()]
    assert_bitwise_equal(host_copy(snapshot), expected, "stage 0 parameter")
    pg.close()
