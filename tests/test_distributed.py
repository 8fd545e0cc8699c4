"""Data parallelism over 2 processes (gloo on 127.0.0.1) matches single-process training."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from greedywrap import GreedyWrapper

from toys import make_blocks

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, out: Path, timeout: float = 120) -> list[int]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{HERE.parent}", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "dist_train.py"), str(r), "2", str(port), str(out), mode],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    codes = []
    try:
        for p in procs:
            p.wait(timeout=timeout)
            codes.append(p.returncode)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p in procs:
        log = p.stdout.read().decode(errors="replace")
        p.stdout.close()
        if p.returncode not in (0, 3) and mode != "die":
            print(log)
    return codes


def _single_process() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x0, target = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    gw = GreedyWrapper(make_blocks(4, seed=0), splits=2, optimizer_kwargs={"lr": 1e-2})
    for _ in range(4):
        gw.train_step(x0, target, 0.5)
    return [p.detach() for p in gw.parameters()]


@pytest.mark.parametrize("mode", ["seq", "async", "accumulate"])
def test_two_gloo_ranks_match_single_process_training_on_the_whole_batch(tmp_path, mode):
    out = tmp_path / "params.pt"
    assert _launch(mode, out) == [0, 0]
    got = torch.load(out, weights_only=True)
    expected = _single_process()
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_rank_that_dies_makes_the_other_fail_instead_of_hang(tmp_path):
    codes = _launch("die", tmp_path / "never.pt", timeout=90)
    assert codes[1] == 3
    assert codes[0] != 0


def test_ranks_agree_to_skip_when_only_one_sees_a_nonfinite_loss(tmp_path):
    # Rank 1 alone sees NaN in stage 1 at step 2: both ranks must skip that update together
    # (one all-reduced flag) instead of one all-reducing gradients the other never sends.
    out = tmp_path / "params.pt"
    assert _launch("nanskip", out, timeout=90) == [0, 0]
    (p0, skipped0), (p1, skipped1) = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    assert skipped0 == skipped1 == [0, 1]
    for a, b in zip(p0, p1, strict=True):
        assert torch.equal(a, b)


def test_close_releases_each_stage_ddp_and_destroys_its_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        gw = GreedyWrapper(make_blocks(4), splits=2, devices=["cpu", "cpu"], distributed=True)
        gw.train_step(torch.randn(4, 8), torch.randn(4, 8), 0.5)
        groups = [t.group for t in gw._trainers]
        assert all(g is not None and g in dist.distributed_c10d._world.pg_map for g in groups)
        assert all(type(t.runner).__name__ == "DistributedDataParallel" for t in gw._trainers)
        gw.close()
        assert all(t.group is None and t.runner is t.unit for t in gw._trainers)
        live = dist.distributed_c10d._world.pg_map
        assert not any(group in live for group in groups)
        with pytest.raises(RuntimeError, match="closed"):
            gw.train_step(torch.randn(4, 8), torch.randn(4, 8), 0.5)
    finally:
        dist.destroy_process_group()


def test_the_callers_forward_issues_no_buffer_collective(tmp_path, monkeypatch):
    # Under NCCL a collective in the caller's forward could interleave with a worker's
    # all-reduce in a rank-dependent order; every collective of a stage belongs on its worker.
    import torch.distributed as dist
    from torch import nn

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        blocks = [nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)) for _ in range(2)]
        gw = GreedyWrapper(blocks, splits=2, devices=["cpu", "cpu"], distributed=True)
        synced = []
        for t in gw._trainers:
            original = t.runner._sync_buffers
            monkeypatch.setattr(
                t.runner, "_sync_buffers", lambda o=original: (synced.append(1), o())[1]
            )
        gw.train_step(torch.randn(4, 8), torch.randn(4, 8))
        gw.synchronize()
        assert synced == []
        gw.close()
    finally:
        dist.destroy_process_group()
