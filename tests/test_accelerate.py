"""The Accelerate integration: 2 processes under torchrun equal one process on the full batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from greedywrap import GreedyWrapper
from greedywrap.distributed import from_accelerator

accelerate = pytest.importorskip("accelerate")
ROOT = Path(__file__).parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_under_torchrun_matches_single_process_training(tmp_path):
    saved = tmp_path / "state.pt"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(ROOT / "examples" / "accelerate_greedy.py"),
        "--steps", "6", "--mixed-precision", "no", "--accumulate", "1", "--save", str(saved),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "processes: 2, distributed: True" in done.stdout

    # The same run in one process: each step sees the two batches the two ranks saw.
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from accelerate_greedy import Block
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = torch.sin(x)
    gw = GreedyWrapper([Block(16) for _ in range(6)], splits=3, optimizer_kwargs={"lr": 3e-3})
    for step in range(6):
        i = step % 4
        gw.train_step(x[64 * i : 64 * (i + 1)], y[64 * i : 64 * (i + 1)])
    state = torch.load(saved, weights_only=True)
    for name, value in gw.state_dict().items():
        if name != "_extra_state":
            torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6)


def test_from_accelerator_follows_precision_and_accumulation():
    acc = accelerate.Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=3)
    gw = from_accelerator([torch.nn.Linear(4, 4) for _ in range(2)], acc, splits=2)
    assert gw.precision == "bf16" and gw.grad_accumulation == 3
    assert gw.stage_devices == [torch.device("cpu")] * 2
    with pytest.raises(ValueError, match="precision: set by the accelerator"):
        from_accelerator([torch.nn.Linear(4, 4)], acc, precision="fp32")
