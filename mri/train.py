"""The training loop shared by the CLI and the examples: e2e, checkpoint, gleam and pgleam.

All four methods go through one :class:`greedywrap.GreedyWrapper`; they differ only in its
arguments (``splits=1`` is end-to-end, ``checkpoint=True`` recomputes activations, ``devices``
places stages for P-GLEAM). The loss is the paper's complex L1 loss, the optimizer Adam.
Validation runs on a schedule and the model with the lowest validation nRMSE is kept, as in
the paper. Checkpoints are written atomically and ``resume=True`` continues exactly.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from greedywrap import GreedyWrapper, InversionError, NonFiniteLossError, StageError
from mri import metrics
from mri.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mri.config import Config, config_from_dict, config_to_dict
from mri.models import MoDL, UnrolledPGD, complex_l1_loss
from mri.pipeline import batch_to_inputs, make_loader, prepare_builtin

__all__ = [
    "NonFiniteLossError",
    "TrainResult",
    "build_model",
    "build_wrapper",
    "train",
    "validate",
    "load_trained",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "greedywrap-mri-v1"


@dataclass
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        out_dir: the run folder.
        steps: training steps taken in total.
        best_step: the step of the best validation nRMSE.
        best_val_nrmse: that nRMSE.
        history: one dict per validation (step, losses per stage, val metrics, time).
        skipped_updates: stage updates skipped for non-finite losses (``nonfinite="skip"``).
    """

    out_dir: Path
    steps: int
    best_step: int
    best_val_nrmse: float
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped_updates: int = 0


def build_model(cfg: Config) -> nn.Sequential:
    """The unrolled network of ``cfg.model`` (initialised from the current RNG state)."""
    m = cfg.model
    if m.type == "pgd":
        return UnrolledPGD(
            m.num_unrolls, m.features, m.num_resblocks, m.conv_dim, m.step_size,
            learnable_step=m.learnable_step,
        )  # fmt: skip
    invertible = cfg.train.method == "mel" or cfg.train.invertible
    return MoDL(
        m.num_unrolls, m.features, m.num_layers, m.cg_iters, m.mu, m.conv_dim,
        invertible=invertible, learnable_mu=m.learnable_mu,
    )  # fmt: skip


def build_wrapper(model: nn.Module, cfg: Config, nonfinite: str | None = None) -> GreedyWrapper:
    """Wrap ``model`` for the training method of ``cfg.train``."""
    t = cfg.train
    splits = 1 if t.method in ("e2e", "checkpoint", "mel") else t.splits
    invertible = t.method == "mel" or t.invertible
    checkpoint = not invertible and (
        t.method == "checkpoint" or (t.method in ("gleam", "pgleam") and t.checkpoint_blocks)
    )
    devices = t.devices if t.method == "pgleam" else None
    return GreedyWrapper(
        model,
        splits=splits,
        devices=devices,
        optimizer=torch.optim.Adam,
        optimizer_kwargs={"lr": t.lr, "weight_decay": t.weight_decay},
        loss=complex_l1_loss,
        checkpoint=checkpoint,
        clip_grad_norm=t.clip_grad_norm,
        precision=t.precision,
        nonfinite=nonfinite,
        invertible=invertible,
        inversion_checkpoints=t.mel_checkpoints,
        max_inversion_error=t.mel_max_error,
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def validate(gw: GreedyWrapper, loader: Any, max_batches: int | None = None) -> dict[str, float]:
    """Mean PSNR, SSIM and nRMSE of the full-depth output over ``loader``."""
    was_training = gw.training
    gw.eval()
    sums = {"psnr": 0.0, "ssim": 0.0, "nrmse": 0.0}
    count = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x0, target, meas = batch_to_inputs(batch)
        pred = gw(x0, meas).to(target.device)  # the wrapper moves inputs to each stage
        sums["psnr"] += float(metrics.psnr(pred, target).sum())
        sums["ssim"] += float(metrics.ssim(pred, target).sum())
        sums["nrmse"] += float(metrics.nrmse(pred, target).sum())
        count += target.shape[0]
    gw.train(was_training)
    if count == 0:
        raise ValueError("validate: the validation loader yielded no samples")
    return {k: v / count for k, v in sums.items()}


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": json.dumps(random.getstate()),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        ("MT19937", np.asarray(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0)
    )
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))


def _tensorboard(out: Path, enabled: bool) -> Any:
    """A SummaryWriter into ``out/tensorboard`` when TensorBoard is installed, else None."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows written after ``step`` (by a run that stopped before its next checkpoint)."""
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    kept = [r for r in rows if int(r["step"]) <= step]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def train(
    cfg: Config,
    out_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    nonfinite: str = "raise",
    max_steps: int | None = None,
    tensorboard: bool = True,
) -> TrainResult:
    """Train ``cfg``'s model with ``cfg.train.method`` and keep the best validation model.

    Writes into ``out_dir``: ``config.yaml`` (as run), ``last.pt`` (for resuming; written at
    every validation), ``best.pt`` (lowest validation nRMSE), ``log.csv`` (losses per stage),
    ``history.json`` (validation metrics).

    Args:
        cfg: the experiment.
        out_dir: the run folder.
        data_dir: prepared h5 slice data with ``train/`` and ``val/`` folders; ``None`` uses the
            built-in simulated data (generated into ``out_dir/../data-<name>`` once, then cached).
        resume: continue from ``out_dir/last.pt``; the result equals an uninterrupted run.
        progress: show a progress bar.
        nonfinite: ``"raise"`` (stop with :class:`NonFiniteLossError` naming the stage and
            step) or ``"skip"`` (skip that stage's update, count it, go on).
        max_steps: stop after this many steps in this call (for tests of resuming); the
            schedule still follows ``cfg.train.iterations``.
        tensorboard: also log to ``out_dir/tensorboard`` when TensorBoard is installed.

    Raises:
        NonFiniteLossError: a loss became NaN/Inf and ``nonfinite="raise"``.
        CheckpointError: ``resume=True`` and ``last.pt`` cannot be loaded.
    """
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"nonfinite: got {nonfinite!r}; expected 'raise' or 'skip'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = cfg.train
    data_root = Path(data_dir) if data_dir is not None else prepare_builtin(cfg, out.parent)

    _seed_everything(t.seed)
    gw = build_wrapper(build_model(cfg), cfg, nonfinite=nonfinite)
    train_loader = make_loader(data_root, "train", cfg, shuffle=True)
    val_loader = make_loader(data_root, "val", cfg, shuffle=False)

    step, best_step, best = 0, 0, math.inf
    history: list[dict[str, Any]] = []
    skipped = 0
    last_path, best_path = out / "last.pt", out / "best.pt"
    if resume:
        state = load_checkpoint(last_path)
        saved_cfg = config_from_dict(state["config"])
        if config_to_dict(saved_cfg)["model"] != config_to_dict(cfg)["model"] or (
            saved_cfg.train.method != t.method
        ):
            raise CheckpointError(
                f"resume: {last_path} was written for another model or method "
                f"({saved_cfg.model.type}/{saved_cfg.train.method}); use a new --out folder"
            )
        gw.load_state_dict(state["wrapper"])
        step, best_step, best = state["step"], state["best_step"], state["best_val_nrmse"]
        history, skipped = list(state["history"]), state["skipped_updates"]
        _set_rng_state(state["rng"])
        _truncate_log(out / "log.csv", step)
    else:
        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        for stale in (out / "log.csv", out / "history.json"):
            stale.unlink(missing_ok=True)

    end = t.iterations if max_steps is None else min(t.iterations, step + max_steps)
    writer = _tensorboard(out, tensorboard)
    bar = tqdm(total=t.iterations, initial=step, disable=not progress, desc=f"{t.method}")
    batches = _batches(train_loader, step)
    start_time = time.perf_counter()
    while step < end:
        batch = next(batches)
        x0, target, meas = batch_to_inputs(batch)
        try:
            losses = gw.train_step(x0, target, meas)
            if (step + 1) % t.val_every == 0 or step + 1 in (end, t.iterations):
                # P-GLEAM failures surface at the next wait; make it happen here, where they are
                # translated, rather than inside validation or checkpointing.
                gw.synchronize()
        except (NonFiniteLossError, StageError) as err:
            cause = err if isinstance(err, NonFiniteLossError) else err.__cause__
            if isinstance(cause, NonFiniteLossError):
                good = last_path if last_path.exists() else "none written yet"
                detail = f"training stopped; last good checkpoint: {good}"
                raise NonFiniteLossError(cause.stage, cause.step, cause.value, detail) from err
            if isinstance(cause, InversionError):
                raise cause from err
            raise
        step += 1
        if step % t.log_every == 0 or step == end:
            values = [float(v) for v in losses]
            _append_csv(
                out / "log.csv",
                {"step": step, **{f"loss_stage{m}": v for m, v in enumerate(values)}},
            )
            bar.set_postfix(loss=f"{values[-1]:.4f}")
            if writer is not None:
                for m, v in enumerate(values):
                    writer.add_scalar(f"loss/stage{m}", v, step)
        bar.update(1)
        if step % t.val_every == 0 or step == t.iterations:
            scores = validate(gw, val_loader)
            record = {"step": step, **{f"val_{k}": v for k, v in scores.items()},
                      "seconds": time.perf_counter() - start_time}  # fmt: skip
            history.append(record)
            if writer is not None:
                for k, v in scores.items():
                    writer.add_scalar(f"val/{k}", v, step)
            if scores["nrmse"] < best:
                best, best_step = scores["nrmse"], step
                save_checkpoint(_state(cfg, gw, step, best_step, best, history, skipped), best_path)
            save_checkpoint(_state(cfg, gw, step, best_step, best, history, skipped), last_path)
            (out / "history.json").write_text(json.dumps(history, indent=2))
    bar.close()
    if writer is not None:
        writer.close()
    gw.close()
    return TrainResult(out, step, best_step, best, history, skipped + sum(gw.skipped_updates))


def _batches(loader: Any, step: int):
    """Yield batches forever, epoch after epoch, starting at ``step`` (for exact resuming)."""
    per_epoch = len(loader)
    epoch, skip = divmod(step, per_epoch)
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i < skip:
                continue
            yield batch
        epoch, skip = epoch + 1, 0


def _state(cfg, gw, step, best_step, best, history, skipped) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "config": config_to_dict(cfg),
        "wrapper": gw.state_dict(),
        "step": step,
        "best_step": best_step,
        "best_val_nrmse": best,
        "history": history,
        "skipped_updates": skipped + sum(gw.skipped_updates),
        "rng": _rng_state(),
    }


def load_trained(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[GreedyWrapper, Config]:
    """Rebuild the wrapper and config of a checkpoint written by :func:`train`."""
    state = load_checkpoint(path, map_location=device)
    cfg = config_from_dict(state["config"])
    gw = build_wrapper(build_model(cfg), cfg)
    gw.load_state_dict(state["wrapper"])
    return gw.eval(), cfg
