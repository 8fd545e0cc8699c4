"""The training loop shared by the CLI and the examples: e2e, checkpoint, gleam, pgleam, mel.

All five methods go through one [`GreedyWrapper`][greedywrap.GreedyWrapper]; they differ only in
its arguments (``splits=1`` is end-to-end, ``checkpoint=True`` recomputes activations,
``devices`` places stages for P-GLEAM, ``invertible=True`` trains by inversion for MEL). The
loss is the paper's complex L1 loss, the optimizer Adam. Validation runs on a schedule and the
model with the lowest validation nRMSE is kept, as in the paper. Checkpoints are written
atomically; ``resume=True`` continues exactly, and a folder that holds a run is never
overwritten unless asked.

A checkpoint's ``wrapper`` entry is a [`GreedyWrapper`][greedywrap.GreedyWrapper] state, whose
keys depend on ``splits``; for the plain network's weights (deployment, or loading into a
wrapper with other splits) use ``GreedyWrapper.model_state_dict()`` and
``load_model_state_dict()``.
"""

from __future__ import annotations

import dataclasses
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

from greedywrap import GreedyWrapper, NonFiniteLossError
from mri import metrics
from mri.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mri.config import Config, ConfigError, config_from_dict, config_to_dict
from mri.data.h5format import DataFormatError
from mri.models import MoDL, UnrolledPGD, complex_l1_loss
from mri.pipeline import batch_to_inputs, make_loader, prepare_builtin
from mri.runs import (
    append_log_row,
    clear_run,
    holds_run,
    resume_changes,
    rng_state,
    run_files,
    set_rng_state,
    tensorboard_writer,
    truncate_log,
)

__all__ = [
    "NonFiniteLossError",
    "TrainResult",
    "build_model",
    "build_wrapper",
    "train",
    "validate",
    "load_trained",
    "default_threads",
    "check_data",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "greedywrap-mri-v1"


@dataclass
class TrainResult:
    """What [`train`][mri.train.train] produced.

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
    try:
        return _wrapper(model, t, splits, devices, checkpoint, invertible, nonfinite)
    except (ValueError, TypeError) as err:
        # Options this machine cannot run (absent GPUs, fp16 without CUDA) are config errors:
        # the wrapper's message starts with its argument, which is the train.* key.
        message = str(err)
        key = message.split(":", 1)[0]
        if key in {f.name for f in dataclasses.fields(t)}:
            raise ConfigError(f"train.{message}") from err
        raise ConfigError(f"train: {message}") from err


def _wrapper(model, t, splits, devices, checkpoint, invertible, nonfinite) -> GreedyWrapper:
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
        scheduler=_scheduler(t),
    )


def cosine_factor(step: int, iterations: int) -> float:
    """The cosine schedule's multiplier of ``lr`` after ``step`` of ``iterations`` updates."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, iterations) / iterations))


def _scheduler(t: Any) -> Any:
    if t.lr_schedule == "constant":
        return None
    iterations = t.iterations

    # A closure, not an object: LambdaLR saves callable objects in its state and would bring
    # back the old length on resume; a function is rebuilt from the (possibly changed) config.
    def factory(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_factor(s, iterations))

    return factory


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


def default_threads() -> int:
    """The intra-op thread count the CLI and examples use unless ``--threads`` is given.

    Half the cores this process may run on (at least 1, at most torch's own default). On a
    shared machine, threads beyond the idle cores cost far more than missing ones: torch's
    OpenMP threads wait for each other at every operation, so one descheduled thread stalls the
    rest (measured on a 2-core machine with one core busy: 2 threads were 4-6x slower per step
    than 1). Fewer threads than cores cost at most proportionally, and leave a core for the data
    loader, the CS baseline and other users. The count depends only on the machine, so a resumed
    run computes with the same threads as the run it continues.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores // 2))


def check_data(root: str | os.PathLike, cfg: Config, splits: tuple[str, ...]) -> dict[str, Any]:
    """Open every file of ``splits`` under ``root`` now, so a broken one stops the run early.

    Returns:
        The loader of each split (``train`` shuffled, the others in order).

    Raises:
        DataFormatError: a split folder is missing or empty, or a file is invalid; a raw
            fastMRI file gets a hint to convert it with ``python -m mri prepare fastmri``.
        ConfigError: the masks of ``cfg.data`` cannot be drawn on the data's shape.
    """
    loaders = {}
    for split in splits:
        try:
            loaders[split] = make_loader(root, split, cfg, shuffle=split == "train")
        except DataFormatError as err:
            raise DataFormatError(f"{err}{_raw_fastmri_hint(Path(root) / split)}") from err
    return loaders


def _raw_fastmri_hint(folder: Path) -> str:
    """A hint when ``folder`` holds fastMRI's own files rather than prepared slice files."""
    try:
        import h5py

        for path in sorted(folder.glob("*.h5"))[:8]:
            with h5py.File(path, "r") as f:
                if "ismrmrd_header" in f and "kspace" in f and "maps" not in f:
                    return (
                        f" ({path.name} is a raw fastMRI file; convert the folder first with "
                        f"`python -m mri prepare fastmri {folder} --out DIR`)"
                    )
    except Exception:  # the hint is a courtesy; the error above stands on its own
        return ""
    return ""


def train(
    cfg: Config,
    out_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    nonfinite: str = "raise",
    max_steps: int | None = None,
    tensorboard: bool = True,
    check_splits: tuple[str, ...] = (),
) -> TrainResult:
    """Train ``cfg``'s model with ``cfg.train.method`` and keep the best validation model.

    Writes into ``out_dir``: ``config.yaml`` (as run), ``last.pt`` (for resuming; written at
    every validation), ``best.pt`` (lowest validation nRMSE), ``log.csv`` (losses per stage),
    ``history.json`` (validation metrics).

    Args:
        cfg: the experiment.
        out_dir: the run folder. A folder that already holds a run is refused unless
            ``resume`` or ``overwrite`` says what to do with it.
        data_dir: prepared h5 slice data with ``train/`` and ``val/`` folders; ``None`` uses the
            built-in simulated data (generated into ``out_dir/../data-<name>`` once, then cached).
        resume: continue from ``out_dir/last.pt``; the result equals an uninterrupted run, bit
            for bit (parameters, optimizer and RNG state). With no checkpoint yet, the run
            starts from step 0 and says so. ``cfg`` may change the keys in
            ``mri.runs.RESUMABLE`` (e.g. ``train.iterations``, ``train.lr``); they take effect
            and are recorded in ``config.yaml`` and the checkpoint's ``resumes``.
        overwrite: empty a folder that holds a run and start again.
        progress: show a progress bar; without it, print the log lines as they are written.
        nonfinite: ``"raise"`` (stop with [`NonFiniteLossError`][greedywrap.NonFiniteLossError]
            naming the stage and step) or ``"skip"`` (skip that stage's update, count it, go on).
        max_steps: stop after this many steps in this call (for tests of resuming); the
            schedule still follows ``cfg.train.iterations``.
        tensorboard: also log to ``out_dir/tensorboard`` when TensorBoard is installed.
        check_splits: further splits (e.g. ``("test",)``) to open and check before the first
            step, so that a broken file is found now rather than after training.

    Raises:
        NonFiniteLossError: a loss became NaN/Inf and ``nonfinite="raise"``.
        CheckpointError: ``last.pt`` cannot be loaded, or ``out_dir`` holds a run and neither
            ``resume`` nor ``overwrite`` is set (or both are).
        ConfigError: ``resume=True`` with a change ``cfg`` may not make, or options this
            machine cannot run (e.g. absent devices).
        DataFormatError: a split folder is missing or a file in it is invalid.
    """
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"nonfinite: got {nonfinite!r}; expected 'raise' or 'skip'")
    out = Path(out_dir)
    if resume and overwrite:
        raise CheckpointError(
            "resume and overwrite: choose one (--resume continues the run in the folder, "
            "--overwrite deletes it)"
        )
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"out: {out} is a file; expected a run folder")
    last_path = out / "last.pt"
    state = None
    clear = False
    if resume and last_path.exists():
        state = load_checkpoint(last_path)
    elif holds_run(out):
        if not (resume or overwrite):
            raise CheckpointError(
                f"out: {out} already holds a run ({', '.join(run_files(out))}); pass --resume "
                "to continue it or --overwrite to delete it and start again"
            )
        clear = overwrite
    changes: dict[str, tuple] = {}
    if state is not None:
        changes = resume_changes(config_from_dict(state["config"]), cfg, last_path)
    if data_dir is not None:
        data_root = Path(data_dir)
    else:
        data_root = prepare_builtin(cfg, out.parent)
        print(f"data: built-in simulated {cfg.data.kind} data in {data_root}", flush=True)
    extra = tuple(s for s in check_splits if s not in ("train", "val"))
    loaders = check_data(data_root, cfg, ("train", "val", *extra))
    # Seeded after the data exists, so a cached or a freshly generated dataset start alike.
    _seed_everything(cfg.train.seed)
    gw = build_wrapper(build_model(cfg), cfg, nonfinite=nonfinite)
    try:
        # Only now, with the config, the data and the devices checked, is the old run deleted.
        if clear:
            clear_run(out, keep=data_root)
        out.mkdir(parents=True, exist_ok=True)
        return _run(cfg, gw, out, loaders["train"], loaders["val"], state, changes, resume,
                    progress, max_steps, tensorboard)  # fmt: skip
    finally:
        gw.close()


def _run(cfg, gw, out, train_loader, val_loader, state, changes, resume, progress, max_steps,
         tensorboard):  # fmt: skip
    t = cfg.train
    last_path, best_path = out / "last.pt", out / "best.pt"

    step, best_step, best = 0, 0, math.inf
    history: list[dict[str, Any]] = []
    resumes: list[dict[str, Any]] = []
    skipped = 0
    if state is not None:
        try:
            gw.load_state_dict(state["wrapper"])
        except (ValueError, RuntimeError, KeyError) as err:
            raise CheckpointError(
                f"resume: {last_path} does not fit the model of this config "
                f"({(str(err).splitlines() or [''])[0][:200]}); start a new --out folder"
            ) from err
        if "train.lr" in changes or "train.iterations" in changes:
            # The optimizer and scheduler states restore the old learning rate; the new one
            # (and a cosine's new length) must win from the next update on.
            for opt, sched in zip(gw.optimizers, gw.schedulers, strict=True):
                if opt is None:
                    continue
                if sched is not None:
                    sched.base_lrs = [t.lr for _ in opt.param_groups]
                factor = 1.0 if sched is None else cosine_factor(sched.last_epoch, t.iterations)
                for group in opt.param_groups:
                    group["lr"] = t.lr * factor
        step, best_step, best = state["step"], state["best_step"], state["best_val_nrmse"]
        history, skipped = list(state["history"]), state["skipped_updates"]
        resumes = list(state.get("resumes", []))
        set_rng_state(state["rng"])
        truncate_log(out / "log.csv", step)
        if changes:
            resumes.append({"step": step, "changes": {k: list(v) for k, v in changes.items()}})
        said = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
        print(f"resume: from {last_path} at step {step}" + (f"; changed {said}" if said else ""),
              flush=True)  # fmt: skip
    else:
        if resume:
            print(f"resume: no checkpoint in {out} yet; starting from step 0", flush=True)
        for stale in (out / "log.csv", out / "history.json"):
            stale.unlink(missing_ok=True)
    # The config as it is being run, overrides on resume included.
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    def snapshot() -> dict[str, Any]:
        return _state(cfg, gw, step, best_step, best, history, skipped, resumes)

    end = t.iterations if max_steps is None else min(t.iterations, step + max_steps)
    writer = tensorboard_writer(out, tensorboard)
    bar = tqdm(total=t.iterations, initial=step, disable=not progress, desc=f"{t.method}")
    batches = _batches(train_loader, step)
    start_time = time.perf_counter()
    try:
        while step < end:
            batch = next(batches)
            x0, target, meas = batch_to_inputs(batch)
            try:
                losses = gw.train_step(x0, target, meas)
                if (step + 1) % t.val_every == 0 or step + 1 in (end, t.iterations):
                    # P-GLEAM failures surface at the next wait; make it happen here, where they
                    # are translated, rather than inside validation or checkpointing.
                    gw.synchronize()
            except NonFiniteLossError as err:
                # The library raises it with its own type from either engine; add where to
                # restart from.
                good = last_path if last_path.exists() else "none written yet"
                detail = f"training stopped; last good checkpoint: {good}"
                raise NonFiniteLossError(err.stage, err.step, err.value, detail) from err
            step += 1
            if step % t.log_every == 0 or step == end:
                values = [float(v) for v in losses]
                append_log_row(
                    out / "log.csv",
                    {"step": step, **{f"loss_stage{m}": v for m, v in enumerate(values)}},
                )
                bar.set_postfix(loss=f"{values[-1]:.4f}")
                if not progress:
                    shown = " ".join(f"{v:.4f}" for v in values)
                    print(f"step {step}/{t.iterations}: loss per stage {shown}", flush=True)
                if writer is not None:
                    for m, v in enumerate(values):
                        writer.add_scalar(f"loss/stage{m}", v, step)
            bar.update(1)
            if step % t.val_every == 0 or step == t.iterations:
                scores = validate(gw, val_loader)
                record = {"step": step, **{f"val_{k}": v for k, v in scores.items()},
                          "seconds": time.perf_counter() - start_time}  # fmt: skip
                history.append(record)
                if not progress:
                    print(f"step {step}/{t.iterations}: validation PSNR {scores['psnr']:.2f} dB, "
                          f"SSIM {scores['ssim']:.4f}, nRMSE {scores['nrmse']:.4f}",
                          flush=True)  # fmt: skip
                if writer is not None:
                    for k, v in scores.items():
                        writer.add_scalar(f"val/{k}", v, step)
                if scores["nrmse"] < best:
                    best, best_step = scores["nrmse"], step
                    save_checkpoint(snapshot(), best_path)
                save_checkpoint(snapshot(), last_path)
                (out / "history.json").write_text(json.dumps(history, indent=2))
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return TrainResult(out, step, best_step, best, history, skipped + sum(gw.skipped_updates))


def _batches(loader: Any, step: int):
    """Yield batches forever, epoch after epoch, starting at ``step`` (for exact resuming)."""
    per_epoch = len(loader)
    epoch, skip = divmod(step, per_epoch)
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        # Making a DataLoader iterator draws a base seed from torch's global generator. An
        # uninterrupted run makes it at the start of an epoch, a resumed one at the resume
        # step, so that draw would make the saved RNG state depend on where a run was
        # stopped. Forking keeps the global generator untouched by the loader.
        with torch.random.fork_rng(devices=[]):
            iterator = iter(loader)
        for i, batch in enumerate(iterator):
            if i < skip:
                continue
            yield batch
        epoch, skip = epoch + 1, 0


def _state(cfg, gw, step, best_step, best, history, skipped, resumes) -> dict[str, Any]:
    return {
        "resumes": resumes,
        "format": CHECKPOINT_FORMAT,
        "config": config_to_dict(cfg),
        "wrapper": gw.state_dict(),
        "step": step,
        "best_step": best_step,
        "best_val_nrmse": best,
        "history": history,
        "skipped_updates": skipped + sum(gw.skipped_updates),
        "rng": rng_state(),
    }


def load_trained(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[GreedyWrapper, Config]:
    """Rebuild the wrapper and config of a checkpoint written by [`train`][mri.train.train].

    Raises:
        CheckpointError: the file is not a checkpoint of ``mri.train``.
        ConfigError: its config cannot run on this machine (e.g. absent devices).
    """
    state = load_checkpoint(path, map_location=device)
    if state.get("format") != CHECKPOINT_FORMAT or "config" not in state:
        raise CheckpointError(
            f"checkpoint: {path} is not a checkpoint of mri.train (format "
            f"{state.get('format')!r}, expected {CHECKPOINT_FORMAT!r})"
        )
    try:
        cfg = config_from_dict(state["config"])
    except ConfigError as err:
        raise CheckpointError(f"checkpoint: {path} holds an invalid config ({err})") from err
    gw = build_wrapper(build_model(cfg), cfg)
    try:
        gw.load_state_dict(state["wrapper"])
    except (ValueError, RuntimeError, KeyError) as err:
        first = (str(err).splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint: {path} does not fit its own config ({first})") from err
    return gw.eval(), cfg
