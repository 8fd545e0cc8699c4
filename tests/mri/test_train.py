"""The MRI training loop: every method trains, resuming is exact, evaluation writes metrics."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mri.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mri.config import ConfigError, load_config
from mri.evaluate import evaluate
from mri.pipeline import prepare_builtin
from mri.train import default_threads, load_trained, train

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
    with pytest.raises(ConfigError, match=r"model\.features: got 4 on resume.*trained with 8"):
        train(bigger, tiny_root / "other", progress=False, resume=True)
    other_splits = load_config("cpu-tiny", {"train.splits": 4, "train.iterations": 4})
    with pytest.raises(ConfigError, match=r"train\.splits: got 4 on resume"):
        train(other_splits, tiny_root / "other", progress=False, resume=True)


def _comparable(path: Path) -> dict:
    """A checkpoint without the wall-clock seconds in its history."""
    state = load_checkpoint(path)
    state["history"] = [{k: v for k, v in h.items() if k != "seconds"} for h in state["history"]]
    return state


def _assert_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("stopped_after", [1, 3, 5])
def test_resume_equals_an_uninterrupted_run_bit_for_bit_rng_included(tiny_root, stopped_after):
    # 4 training slices: checkpoints at steps 2 and 4 fall mid-epoch and on an epoch boundary.
    cfg = load_config("cpu-tiny", {"train.iterations": 7, "train.val_every": 2})
    straight = tiny_root / "rng-straight"
    if not (straight / "last.pt").exists():
        train(cfg, straight, progress=False)
    run = tiny_root / f"rng-stopped-{stopped_after}"
    # Stopped without a checkpoint after its last validation: the steps since are redone.
    train(cfg, run, progress=False, max_steps=stopped_after)
    train(cfg, run, progress=False, resume=True)
    _assert_equal(_comparable(straight / "last.pt"), _comparable(run / "last.pt"))
    _assert_equal(_comparable(straight / "best.pt"), _comparable(run / "best.pt"))


def test_resume_with_no_checkpoint_starts_the_run(tiny_root, capsys):
    cfg = load_config("cpu-tiny", {"train.iterations": 2, "train.val_every": 2})
    result = train(cfg, tiny_root / "never-checkpointed", progress=False, resume=True)
    assert result.steps == 2
    assert "no checkpoint" in capsys.readouterr().out


def test_resume_overrides_take_effect_and_are_recorded(tiny_root):
    cfg = load_config("cpu-tiny", {"train.iterations": 4, "train.val_every": 2})
    run = tiny_root / "lr-change"
    train(cfg, run, progress=False, max_steps=2)
    faster = load_config("cpu-tiny", {"train.iterations": 4, "train.val_every": 2,
                                      "train.lr": 0.01})  # fmt: skip
    train(faster, run, progress=False, resume=True)
    state = load_checkpoint(run / "last.pt")
    optimizers = state["wrapper"]["_extra_state"]["optimizers"]
    assert [g["lr"] for o in optimizers for g in o["param_groups"]] == [0.01] * len(optimizers)
    assert state["config"]["train"]["lr"] == 0.01
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 0.01
    assert state["resumes"] == [{"step": 2, "changes": {"train.lr": [0.001, 0.01]}}]


def _stage_lrs(path: Path) -> list[float]:
    optimizers = load_checkpoint(path)["wrapper"]["_extra_state"]["optimizers"]
    return [g["lr"] for o in optimizers for g in o["param_groups"]]


def test_cosine_schedule_anneals_every_stage_to_zero_and_resumes_on_its_new_length(tiny_root):
    lr = 1e-3
    cfg = load_config("cpu-tiny", {"train.iterations": 4, "train.val_every": 2,
                                   "train.lr_schedule": "cosine", "train.lr": lr})  # fmt: skip
    run = tiny_root / "cosine"
    train(cfg, run, progress=False, max_steps=2)
    stages = cfg.train.splits
    # Half-way along half a cosine: lr / 2 for every stage.
    assert _stage_lrs(run / "last.pt") == pytest.approx([lr / 2] * stages)
    train(cfg, run, progress=False, resume=True)
    assert _stage_lrs(run / "last.pt") == pytest.approx([0.0] * stages, abs=1e-12)
    # Lengthened on resume: the cosine follows the new length from where the run stands.
    longer = load_config("cpu-tiny", {"train.iterations": 8, "train.val_every": 2,
                                      "train.lr_schedule": "cosine", "train.lr": lr})  # fmt: skip
    train(longer, run, progress=False, max_steps=2, resume=True)
    assert _stage_lrs(run / "last.pt") == pytest.approx([lr * 0.5 * (1 + math.cos(math.pi * 6 / 8))]
                                                        * stages)  # fmt: skip
    constant = tiny_root / "constant"
    train(load_config("cpu-tiny", {"train.iterations": 2, "train.val_every": 2, "train.lr": lr}),
          constant, progress=False)  # fmt: skip
    assert _stage_lrs(constant / "last.pt") == [lr] * stages


def test_a_bad_lr_schedule_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match=r"train\.lr_schedule.*'linear'.*cosine"):
        load_config("cpu-tiny", {"train.lr_schedule": "linear"})


def test_a_folder_that_holds_a_run_is_never_overwritten_silently(tiny_root):
    cfg = load_config("cpu-tiny", {"train.iterations": 2, "train.val_every": 2})
    run = tiny_root / "kept"
    train(cfg, run, progress=False)
    before = (run / "best.pt").read_bytes()
    with pytest.raises(CheckpointError, match="--resume.*--overwrite"):
        train(cfg, run, progress=False)
    with pytest.raises(CheckpointError, match="choose one"):
        train(cfg, run, progress=False, resume=True, overwrite=True)
    assert (run / "best.pt").read_bytes() == before
    (run / "metrics.json").write_text("{}")
    train(cfg, run, progress=False, overwrite=True)
    assert not (run / "metrics.json").exists()


def test_default_threads_leave_cores_free_and_never_exceed_torchs_own():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= default_threads() <= max(1, cores // 2)
    assert default_threads() <= torch.get_num_threads()


def test_checkpoints_get_the_umask_permissions_like_any_file(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint({"format": "x"}, tmp_path / "a.pt")
        os.umask(0o077)
        save_checkpoint({"format": "x"}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.pt").stat().st_mode & 0o777 == 0o600


def test_any_file_that_is_not_a_checkpoint_is_a_checkpoint_error(tmp_path):
    rng = random.Random(0)
    for i in range(40):
        path = tmp_path / f"random{i}.pt"
        path.write_bytes(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 4000))))
        with pytest.raises(CheckpointError, match="cannot be loaded|was not written by"):
            load_checkpoint(path)
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)


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
    assert _parse_override("train.lr=2E-4") == ("train.lr", 0.0002)
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
