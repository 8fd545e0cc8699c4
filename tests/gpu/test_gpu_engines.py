"""P-GLEAM on CUDA: the same bits as the sequential engine, fp16 with GradScaler, stream rules.

Skipped without CUDA. Run on a machine with a GPU with ``python -m pytest tests/gpu -q``. Two
GPUs of the same model give ``devices=[0, 1]``; one GPU gives ``devices=[0, 0]`` (two workers,
two streams on one device), which exercises the same ordering rules.
"""

from __future__ import annotations

import pytest
import torch
from gpu_toys import (
    SLEEP_CYCLES,
    SlowAdam,
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

WIDTH, BATCH, BLOCKS, SPLITS, STEPS = 64, 32, 8, 4, 6
ADAM = {"optimizer": torch.optim.Adam, "optimizer_kwargs": {"lr": 1e-2}}


def _train(gw: GreedyWrapper, x0, target, steps: int = STEPS) -> list[list[torch.Tensor]]:
    losses = [gw.train_step(x0, target) for _ in range(steps)]
    gw.synchronize()
    return losses


def _flat(losses: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return host_copy([loss for step in losses for loss in step])


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_pgleam_on_two_entries_matches_sequential_bitwise(precision: str) -> None:
    blocks = make_blocks(BLOCKS, WIDTH)
    initial = host_copy(p for b in blocks for p in b.parameters())
    x0, target = make_data(BATCH, WIDTH, "cuda:0")
    kwargs = {"splits": SPLITS, "precision": precision, **ADAM}
    with GreedyWrapper(clones(blocks), devices=[0], **kwargs) as seq:
        seq_losses = _flat(_train(seq, x0, target))
        seq_params = host_copy(seq.parameters())
    with GreedyWrapper(clones(blocks), devices=pair_of_devices(), **kwargs) as par:
        par_losses = _flat(_train(par, x0, target))
        par_params = host_copy(par.parameters())
    assert all(torch.isfinite(v) for v in seq_losses), seq_losses
    assert_bitwise_equal(par_losses, seq_losses, "loss")
    assert_bitwise_equal(par_params, seq_params, "parameter")
    # The steps did train: every weight moved from its initial value.
    assert not any(torch.equal(a, b) for a, b in zip(seq_params, initial, strict=True))


def test_fp16_trains_with_a_grad_scaler_per_stage() -> None:
    blocks = make_blocks(BLOCKS, WIDTH)
    x0, target = make_data(BATCH, WIDTH, "cuda:0")
    with GreedyWrapper(
        clones(blocks), splits=SPLITS, devices=pair_of_devices(), precision="fp16", **ADAM
    ) as gw:
        losses = _train(gw, x0, target, steps=20)
        first, last = _flat([losses[0]]), _flat([losses[-1]])
        # Parameters stay float32 (autocast computes in fp16; the scaler unscales fp32 grads).
        assert all(p.dtype == torch.float32 for p in gw.parameters())
    assert all(torch.isfinite(v) for v in first + last)
    assert sum(last) < sum(first), (first, last)


def test_first_stage_waits_for_inputs_made_on_the_callers_stream() -> None:
    blocks = make_blocks(BLOCKS, WIDTH)
    x_ready, t_ready = make_data(BATCH, WIDTH, "cuda:0")
    with GreedyWrapper(clones(blocks), devices=[0], splits=SPLITS, **ADAM) as seq:
        seq_losses = _flat(_train(seq, x_ready, t_ready, steps=1))
        seq_params = host_copy(seq.parameters())

    with GreedyWrapper(clones(blocks), devices=pair_of_devices(), splits=SPLITS, **ADAM) as par:
        caller = torch.cuda.Stream(0)
        with torch.cuda.stream(caller):
            # Input and target are written on the caller's stream, after ~50 ms of other work:
            # a first stage that does not wait for this stream reads zeros.
            x0, target = torch.zeros_like(x_ready), torch.zeros_like(t_ready)
            torch.cuda._sleep(SLEEP_CYCLES)
            x0.copy_(x_ready)
            target.copy_(t_ready)
            losses = par.train_step(x0, target)
        par.synchronize()
        par_losses = _flat([losses])
        par_params = host_copy(par.parameters())
    assert_bitwise_equal(par_losses, seq_losses, "loss")
    assert_bitwise_equal(par_params, seq_params, "parameter")


def test_synchronize_waits_for_the_kernels_of_worker_streams() -> None:
    blocks = make_blocks(BLOCKS, WIDTH)
    x0, target = make_data(BATCH, WIDTH, "cuda:0")
    kwargs = {"splits": SPLITS, "optimizer": SlowAdam, "optimizer_kwargs": {"lr": 1e-2}}
    with GreedyWrapper(clones(blocks), devices=[0], **kwargs) as seq:
        _train(seq, x0, target, steps=2)
        expected = host_copy(seq.parameters())
    with GreedyWrapper(clones(blocks), devices=pair_of_devices(), **kwargs) as par:
        for _ in range(2):
            par.train_step(x0, target)
        par.synchronize()
        # Read on the caller's current stream right away, with no device-wide synchronisation:
        # each worker's last Adam step is queued behind a ~50 ms sleep on that worker's stream,
        # so these copies see the updated weights only if synchronize() waited for the streams.
        snapshot = [p.detach().clone() for p in par.parameters()]
        got = host_copy(snapshot)
    assert_bitwise_equal(got, expected, "parameter")


def test_cuda_to_cpu_hand_off_is_complete_before_the_cpu_stage_reads_it() -> None:
    # Stage 0 on the GPU (its forward sleeps before writing its output), stage 1 on the CPU:
    # the copy of stage 0's output to the host must be finished before stage 1 computes.
    blocks = make_blocks(2, WIDTH, block=SlowBlock)
    x0, target = make_data(BATCH, WIDTH, "cuda:0")
    steps = 3
    with GreedyWrapper(clones(blocks), splits=2, devices=[0, "cpu"], **ADAM) as gw:
        got_losses = _flat(_train(gw, x0, target, steps=steps))
        got_params = host_copy(gw.parameters())

    # The same GLEAM step written out by hand, with blocking copies, on the same devices.
    ref = clones(blocks)
    ref[0].to("cuda:0")
    opts = [torch.optim.Adam(b.parameters(), lr=1e-2) for b in ref]
    targets = [target, target.to("cpu")]
    ref_losses = []
    for _ in range(steps):
        x = x0
        for block, opt, tgt in zip(ref, opts, targets, strict=True):
            x = x.detach().to(tgt.device)
            out = block(x)
            loss = torch.nn.functional.mse_loss(out, tgt)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ref_losses.append(loss.detach())
            x = out.detach()
    assert_bitwise_equal(got_losses, host_copy(ref_losses), "loss")
    assert_bitwise_equal(got_params, host_copy(p for b in ref for p in b.parameters()), "param")
