"""Faults are survived: kills, torn and hostile checkpoints, NaN losses, failing workers.

Every child process runs with a timeout and is killed in a ``finally``, so a regression shows up
as a failure, never as a hung test session.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import mri.train
from greedywrap import NonFiniteLossError
from mri.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mri.config import load_config
from mri.pipeline import prepare_builtin
from mri.train import train

ROOT = Path(__file__).parents[1]
# One thread per child: two children then run side by side on the two shared cores, and every
# run uses the same reduction order (bitwise comparisons between processes need that).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
CHILD_TIMEOUT = 240


@contextlib.contextmanager
def _child(cmd: list[str], **kwargs):
    """A child process that is always gone when the block ends."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def _run_child(cmd: list[str], timeout: float = CHILD_TIMEOUT) -> subprocess.CompletedProcess:
    with _child(cmd) as proc:
        out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _assert_same(a, b, where: str = "state") -> None:
    """Bitwise equality of nested checkpoint contents (tensors, containers, numbers)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    # Generated once, before any child starts: children that are killed never write data, and
    # two children never generate the same files at once.
    root = tmp_path_factory.mktemp("reliability")
    prepare_builtin(load_config("cpu-tiny"), root)
    return root


# ------------------------------------------------------------------------ kill -9 and resume

ITERATIONS = 6


def _train_cmd(out: Path, resume: bool) -> list[str]:
    cmd = [
        sys.executable, "-m", "mri", "train", "--config", "cpu-tiny", "--out", str(out),
        "--set", f"train.iterations={ITERATIONS}", "--set", "train.val_every=1", "--no-progress",
    ]  # fmt: skip
    return cmd + (["--resume"] if resume else [])


def _logged_step(out: Path) -> int:
    """The last step in log.csv (written right after a step, before its checkpoint)."""
    try:
        lines = (out / "log.csv").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines[1:]):
        with contextlib.suppress(ValueError):
            return int(line.split(",")[0])
    return 0


def _checkpoint_step(out: Path) -> int:
    return load_checkpoint(out / "last.pt")["step"] if (out / "last.pt").exists() else 0


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run_bitwise(data_root):
    straight, killed = data_root / "straight", data_root / "killed"
    rng = random.Random(7)
    resumed_from = []
    with _child(_train_cmd(straight, resume=False)) as reference:
        for kill in range(3):
            start_step = _checkpoint_step(killed)
            # Every restart passes --resume, as a job script on preemptible machines does; a
            # kill before the first checkpoint leaves nothing to resume, and the run starts over.
            if (killed / "last.pt").exists():
                resumed_from.append(start_step)
            with _child(_train_cmd(killed, resume=True)) as proc:
                if kill == 0:
                    # Anywhere from interpreter start-up to a few steps in.
                    deadline = time.monotonic() + rng.uniform(0.5, 4.0)
                    while time.monotonic() < deadline and proc.poll() is None:
                        time.sleep(0.02)
                else:
                    # Two or three steps on (so every restart makes progress), then a random
                    # moment inside the step, validation or checkpoint write that follows.
                    target = start_step + rng.randint(2, 3)
                    deadline = time.monotonic() + CHILD_TIMEOUT
                    while _logged_step(killed) < target and proc.poll() is None:
                        assert time.monotonic() < deadline, "the run stopped making progress"
                        time.sleep(0.01)
                    time.sleep(rng.uniform(0.0, 0.4))
                if proc.poll() is not None:
                    _, err = proc.communicate()
                    assert proc.returncode == 0, err
                    break
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
            assert proc.returncode == -signal.SIGKILL
            # Whatever the kill interrupted, the checkpoint under the real name loads.
            if (killed / "last.pt").exists():
                assert load_checkpoint(killed / "last.pt")["step"] >= start_step
        if (killed / "last.pt").exists():
            resumed_from.append(_checkpoint_step(killed))
        done = _run_child(_train_cmd(killed, resume=True))
        assert done.returncode == 0, done.stderr
        out, err = reference.communicate(timeout=CHILD_TIMEOUT)
        assert reference.returncode == 0, err

    assert resumed_from, "no run was resumed: the kills all landed before the first checkpoint"
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(straight / name), load_checkpoint(killed / name)
        assert a["step"] == b["step"] and a["best_step"] == b["best_step"]
        _assert_same(a["wrapper"], b["wrapper"], f"{name} wrapper")  # parameters and Adam state
    assert load_checkpoint(killed / "last.pt")["step"] == ITERATIONS
    # A kill mid-write may leave a temporary file; it is hidden and never named like a checkpoint.
    assert sorted(killed.glob("*.pt")) == [killed / "best.pt", killed / "last.pt"]
    for leftover in killed.glob(".*.pt.*"):
        assert leftover.name.endswith(".tmp"), leftover


# ------------------------------------------------------------------------ checkpoint writes

_WRITER = textwrap.dedent(
    """
    import sys, torch
    from mri.checkpoint import save_checkpoint
    path = sys.argv[1]
    i = 0
    while True:
        # Every tensor of version i holds i, so a checkpoint mixing two versions is detectable.
        save_checkpoint({"format": "test", "i": i, "a": torch.full((2_000_000,), float(i)),
                         "b": torch.full((2_000_000,), float(i))}, path)
        i += 1
    """
)


@pytest.mark.parametrize("moment", ["while a temporary file is open", "at a random time"])
def test_a_kill_during_checkpoint_writes_never_leaves_a_torn_checkpoint(tmp_path, moment):
    path = tmp_path / "last.pt"
    rng = random.Random(moment)
    for _ in range(2):
        with _child([sys.executable, "-c", _WRITER, str(path)]) as proc:
            deadline = time.monotonic() + CHILD_TIMEOUT
            while not path.exists():
                assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint"
                time.sleep(0.01)
            if moment == "at a random time":
                time.sleep(rng.uniform(0.0, 0.5))
            else:
                while not any(p.suffix == ".tmp" for p in tmp_path.iterdir()):
                    assert proc.poll() is None and time.monotonic() < deadline
                    time.sleep(0.001)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        state = load_checkpoint(path)
        assert torch.equal(state["a"], torch.full((2_000_000,), float(state["i"])))
        assert torch.equal(state["b"], state["a"])
    # Leftovers are hidden temporaries, never matched as checkpoints.
    assert sorted(tmp_path.glob("*.pt")) == [path]
    assert all(p.name.startswith(".last.pt.") for p in tmp_path.iterdir() if p != path)


def test_a_checkpoint_write_that_fails_keeps_the_previous_one_and_no_temporary(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"format": "test", "value": torch.ones(3)}, path)
    with pytest.raises(Exception, match="(?i)pickle|lambda"):
        save_checkpoint({"format": "test", "value": lambda: 0}, path)  # cannot be pickled
    assert torch.equal(load_checkpoint(path)["value"], torch.ones(3))
    assert list(tmp_path.iterdir()) == [path]


class Payload:
    """A custom class: plain ``torch.load`` would rebuild it by calling ``__reduce__``'s code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


class Plain:
    """A harmless custom class; weights_only refuses it all the same."""

    def __init__(self) -> None:
        self.value = 1


def _good_state() -> dict:
    return {"format": "test", "w": torch.arange(1000, dtype=torch.float32)}


def _corrupt(kind: str, good: bytes, path: Path) -> None:
    rng = random.Random(kind)
    if kind == "cut in half":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "last byte cut":
        path.write_bytes(good[:-1])
    elif kind == "last 100 bytes cut":
        path.write_bytes(good[:-100])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random bytes":
        path.write_bytes(bytes(rng.randrange(256) for _ in range(len(good))))
    elif kind == "random bytes in the zip directory":
        data = bytearray(good)
        for i in range(len(data) - 200, len(data) - 20):
            data[i] = rng.randrange(256)
        path.write_bytes(bytes(data))
    elif kind == "a list, not a dict":
        torch.save([torch.ones(2)], path)
    elif kind == "a dict without format":
        torch.save({"w": torch.ones(2)}, path)
    elif kind == "an object of a custom class":
        torch.save({"format": "test", "obj": Plain()}, path)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "cut in half",
        "last byte cut",
        "last 100 bytes cut",
        "empty",
        "random bytes",
        "random bytes in the zip directory",
        "a list, not a dict",
        "a dict without format",
        "an object of a custom class",
    ],
)
def test_a_corrupt_checkpoint_is_a_clear_error_and_the_good_one_survives(tmp_path, kind):
    good_path, bad_path = tmp_path / "best.pt", tmp_path / "last.pt"
    save_checkpoint(_good_state(), good_path)
    _corrupt(kind, good_path.read_bytes(), bad_path)
    with pytest.raises(CheckpointError, match=r"checkpoint: .*last\.pt"):
        load_checkpoint(bad_path)
    _assert_same(load_checkpoint(good_path), _good_state())


def test_a_flipped_bit_in_tensor_data_is_detected(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(_good_state(), path)
    data = bytearray(path.read_bytes())
    data[data.find(struct.pack("<f", 500.0))] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)


def test_resume_from_a_corrupt_last_checkpoint_is_refused_and_best_survives(data_root):
    cfg = load_config("cpu-tiny", {"train.iterations": 2, "train.val_every": 1})
    out = data_root / "corrupt-resume"
    train(cfg, out, progress=False)
    best = load_checkpoint(out / "best.pt")
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"last\.pt cannot be loaded safely"):
        train(cfg, out, progress=False, resume=True)
    _assert_same(load_checkpoint(out / "best.pt")["wrapper"], best["wrapper"])


def test_loading_never_runs_code_from_a_checkpoint(tmp_path):
    marker = tmp_path / "touched"
    path = tmp_path / "last.pt"
    torch.save({"format": "test", "w": torch.ones(2), "payload": Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="more than tensors and plain containers"):
        load_checkpoint(path)
    assert not marker.exists()
    # The payload is real: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


# ------------------------------------------------------------------------ NaN / Inf losses


def _nan_on_calls(monkeypatch, bad_calls: set[int]) -> None:
    """Make the MRI loss NaN on the given calls (counted from 1; two stages: 2 calls a step)."""
    real = mri.train.complex_l1_loss
    calls = [0]

    def loss(pred, target):
        calls[0] += 1
        value = real(pred, target)
        return value * float("nan") if calls[0] in bad_calls else value

    # build_wrapper reads the loss from mri.train's namespace when the wrapper is built.
    monkeypatch.setattr(mri.train, "complex_l1_loss", loss)


def test_nan_loss_stops_training_naming_stage_and_step_and_keeps_the_last_good_checkpoint(
    data_root, monkeypatch
):
    cfg = load_config("cpu-tiny", {"train.iterations": 5, "train.val_every": 1})
    train(cfg, data_root / "two-steps", progress=False, max_steps=2)
    _nan_on_calls(monkeypatch, {6})  # step 3, stage 1
    out = data_root / "nan-raise"
    with pytest.raises(NonFiniteLossError, match=r"stage 1: loss is nan at step 3") as info:
        train(cfg, out, progress=False)
    assert (info.value.stage, info.value.step) == (1, 3)
    assert f"last good checkpoint: {out / 'last.pt'}" in str(info.value)
    last = load_checkpoint(out / "last.pt")
    assert last["step"] == 2
    _assert_same(last["wrapper"], load_checkpoint(data_root / "two-steps" / "last.pt")["wrapper"])


def test_nan_loss_with_skip_goes_on_and_counts_the_skipped_updates(data_root, monkeypatch):
    cfg = load_config("cpu-tiny", {"train.iterations": 5, "train.val_every": 1})
    _nan_on_calls(monkeypatch, {3, 6, 8})  # step 2 stage 0, step 3 stage 1, step 4 stage 1
    out = data_root / "nan-skip"
    result = train(cfg, out, progress=False, nonfinite="skip")
    assert result.steps == 5 and result.skipped_updates == 3
    last = load_checkpoint(out / "last.pt")
    assert last["skipped_updates"] == 3
    assert all(torch.isfinite(v).all() for k, v in last["wrapper"].items() if k != "_extra_state")


def test_cli_exits_with_a_one_line_error_when_the_loss_diverges(data_root):
    # A learning rate of 1e9 makes step 2's loss NaN, deterministically, without any patching.
    out = data_root / "cli-nan"
    cmd = _train_cmd(out, resume=False) + ["--set", "train.lr=1000000000.0"]
    done = _run_child(cmd)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("error: stage 0: loss is nan at step 2")
    assert load_checkpoint(out / "last.pt")["step"] == 1


def test_nan_loss_with_pgleam_stops_with_nonfinite_loss_error(data_root, monkeypatch):
    cfg = load_config(
        "cpu-tiny",
        {"train.method": "pgleam", "train.devices": ["cpu", "cpu"], "train.iterations": 4,
         "train.val_every": 1},
    )  # fmt: skip
    _nan_on_calls(monkeypatch, {5})
    with pytest.raises(NonFiniteLossError, match=r"stage 0: loss is nan at step 3"):
        train(cfg, data_root / "nan-pgleam", progress=False)


# ------------------------------------------------------------------------ failing workers

_ASYNC_FAILURE = textwrap.dedent(
    """
    import sys, threading, torch
    from torch import nn
    from greedywrap import GreedyWrapper

    class Failing(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            if sys.argv[1] == "raise":
                raise ValueError("injected failure in a worker's backward")
            threading.Event().wait()  # hangs for ever

    class Block(nn.Module):
        def __init__(self, fail):
            super().__init__()
            self.fc, self.fail = nn.Linear(4, 4), fail

        def forward(self, x):
            y = self.fc(x)
            return Failing.apply(y) if self.fail else y

    gw = GreedyWrapper([Block(False), Block(True)], splits=2, devices=["cpu", "cpu"], timeout=0.5)
    for _ in range(3):
        gw.train_step(torch.randn(2, 4), torch.randn(2, 4))
    gw.synchronize()
    print("finished without an error")
    """
)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("raise", r"StageError: stage 1 \(on cpu\) .*injected failure"),
        ("hang", r"TimeoutError: stage 1: .*timeout=0.5s"),
    ],
)
def test_a_failing_async_worker_reaches_the_caller_and_the_process_exits(mode, expected):
    done = _run_child([sys.executable, "-c", _ASYNC_FAILURE, mode], timeout=120)
    assert done.returncode != 0
    assert "finished without an error" not in done.stdout
    assert re.search(expected, done.stderr), done.stderr[-2000:]


_LOADER_FAILURE = textwrap.dedent(
    """
    import os, signal, sys
    from mri.config import load_config
    from mri.pipeline import SliceDataset
    from mri.train import train

    real = SliceDataset.__getitem__
    parent = os.getpid()

    def getitem(self, i):
        # Only inside a worker (workers are forked, so they see this patch).
        if os.getpid() != parent and i == 1:
            if sys.argv[2] == "raise":
                raise OSError("injected failure reading item 1")
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
        return real(self, i)

    SliceDataset.__getitem__ = getitem
    cfg = load_config("cpu-tiny", {"train.num_workers": 2, "train.iterations": 8,
                                   "train.val_every": 8})
    train(cfg, sys.argv[1], progress=False)
    print("finished without an error")
    """
)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("raise", r"OSError: Caught OSError in DataLoader worker.*injected failure"),
        ("sigkill", r"DataLoader worker \(pid \d+\) is killed by signal"),
    ],
)
def test_a_failing_dataloader_worker_reaches_the_caller_of_train(data_root, mode, expected):
    out = data_root / f"loader-{mode}"
    done = _run_child([sys.executable, "-c", _LOADER_FAILURE, str(out), mode], timeout=180)
    assert done.returncode != 0
    assert "finished without an error" not in done.stdout
    assert re.search(expected, done.stderr, flags=re.S), done.stderr[-2000:]
