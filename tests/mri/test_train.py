"""The MRI training loop: every method trains, resuming is exact, evaluation writes metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mri.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mri.config import load_config
from mri.evaluate import evaluate
from mri.pipeline import prepare_builtin
from mri.train import load_trained, train

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    prepare_builtin(load_config("cpu-tiny"), root)
    return root


def _params(path: Path) -> list[torch.Tensor]:
    state = load_checkpoint(path)["wrapper"]
    return [v for k, v in state.items() if k != "_extra_state"]


@pytest.mark.parametrize("method", ["e2e", "checkpoint", "gleam", "pgleam"])
def test_every_method_trains_and_keeps_the_best_model(tiny_root, method):
    overrides = {"train.method": method, "train.iterations": 4, "train.val_every": 2}
    if method == "pgleam":
        overrides["train.devices"] = ["cpu", "cpu"]
    cfg = load_config("cpu-tiny", overrides)
    result = train(cfg, tiny_root / method, progress=False)
    assert result.steps == 4 and len(result.history) == 2
    assert result.best_val_nrmse == min(h["val_nrmse"] for h in result.history)
    gw, saved_cfg = load_trained(tiny_root / method / "best.pt")
    assert saved_cfg.train.method == method
    assert gw.num_stages == (1 if method in ("e2e", "checkpoint") else cfg.train.splits)
    assert (tiny_root / method / "log.csv").read_text().startswith("step,loss_stage0")


def test_losses_and_validation_metrics_reach_tensorboard(tiny_root):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    cfg = load_config("cpu-tiny", {"train.iterations": 2, "train.val_every": 2,
                                   "train.log_every": 1})  # fmt: skip
    train(cfg, tiny_root / "tb", progress=False)
    events = accumulator.EventAccumulator(str(tiny_root / "tb" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss/stage0", "loss/stage1", "val/psnr", "val/nrmse"} <= set(tags)
    assert [e.step for e in events.Scalars("loss/stage1")] == [1, 2]


def test_resume_continues_exactly_as_an_uninterrupted_run(tiny_root):
    cfg = load_config("cpu-tiny", {"train.iterations": 6, "train.val_every": 2})
    train(cfg, tiny_root / "straight", progress=False)
    train(cfg, tiny_root / "stopped", progress=False, max_steps=4)
    assert load_checkpoint(tiny_root / "stopped" / "last.pt")["step"] == 4
    # Rows logged after the checkpoint by the stopped run must not appear twice.
    cfg_log = tiny_root / "stopped" / "log.csv"
    with cfg_log.open("a") as f:
        f.write("5,0.1,0.1\n")
    result = train(cfg, tiny_root / "stopped", progress=False, resume=True)
    assert result.steps == 6
    steps = [int(line.split(",")[0]) for line in cfg_log.read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    for a, b in zip(
        _params(tiny_root / "straight" / "last.pt"),
        _params(tiny_root / "stopped" / "last.pt"),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_resume_refuses_another_model(tiny_root):
    cfg = load_config("cpu-tiny", {"train.iterations": 2, "train.val_every": 2})
    train(cfg, tiny_root / "other", progress=False)
    bigger = load_config("cpu-tiny", {"model.features": 4, "train.iterations": 4})
    with pytest.raises(CheckpointError, match="another model or method"):
        train(bigger, tiny_root / "other", progress=False, resume=True)


def test_evaluation_scores_every_method_and_every_depth(tiny_root):
    cfg = load_config("cpu-tiny", {"train.iterations": 2, "train.val_every": 2})
    train(cfg, tiny_root / "evald", progress=False)
    gw, cfg = load_trained(tiny_root / "evald" / "best.pt")
    result = evaluate(gw, cfg, prepare_builtin(cfg, tiny_root), tiny_root / "evald", progress=False)
    for method in ("zero_filled", "cs", "gleam"):
        assert set(result[method]) == {"psnr", "ssim", "nrmse"}
    assert len(result["depth_psnr"]) == cfg.model.num_unrolls
    assert result["num_items"] == cfg.data.num_test
    assert json.loads((tiny_root / "evald" / "metrics.json").read_text())["num_items"] == 2
    assert (tiny_root / "evald" / "comparison.png").stat().st_size > 0
    assert (tiny_root / "evald" / "depth.png").stat().st_size > 0


def test_cli_overrides_read_numbers_the_way_users_write_them():
    from mri.cli import _parse_override

    assert _parse_override("train.lr=1e-3") == ("train.lr", 0.001)
    assert _parse_override("train.devices=[0, 1]") == ("train.devices", [0, 1])
    assert _parse_override("eval.cs=tv") == ("eval.cs", "tv")


def test_checkpoints_are_atomic_and_corruption_is_reported(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"format": "x", "value": torch.ones(3)}, path)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_cli_trains_evaluates_and_refuses_bad_configs(tmp_path):
    run = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "mri",
        "train",
        "--config",
        "cpu-tiny",
        "--out",
        str(run),
        "--iterations",
        "2",
        "--set",
        "train.val_every=2",
        "--evaluate",
        "--no-progress",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "metrics.json").read_text())["gleam"]["psnr"] > 0
    bad = subprocess.run(
        [sys.executable, "-m", "mri", "train", "--config", "cpu-tiny", "--out", str(run),
         "--set", "train.lr=-1"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "train.lr" in bad.stderr and "Traceback" not in bad.stderr
