"""The run folder: what it holds, when it holds a run, and what a resumed run may change.

A run of [`train`][mri.train.train] writes ``config.yaml``, ``last.pt``, ``best.pt``,
``log.csv`` and ``history.json``. A folder holding any of them is not trained into again
unless the caller resumes or overwrites. The global random state is saved with every
checkpoint and restored on resume, so a resumed run continues bit for bit. On resume only the
schedule may change (``RESUMABLE``); a change of anything that shaped the checkpoint is refused
naming the key.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mri.config import Config, ConfigError, config_to_dict

__all__ = [
    "RUN_FILES",
    "RESUMABLE",
    "holds_run",
    "run_files",
    "clear_run",
    "resume_changes",
    "rng_state",
    "set_rng_state",
    "truncate_log",
    "append_log_row",
    "tensorboard_writer",
]


def rng_state() -> dict[str, Any]:
    """The state of torch's, numpy's and Python's global generators, as plain data."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": json.dumps(random.getstate()),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what [`rng_state`][mri.runs.rng_state] returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        ("MT19937", np.asarray(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0)
    )
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))


def tensorboard_writer(out: Path, enabled: bool) -> Any:
    """A SummaryWriter into ``out/tensorboard`` when TensorBoard is installed, else None."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def truncate_log(path: Path, step: int) -> None:
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


def append_log_row(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` to the CSV log at ``path`` (with a header when the file is new)."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


# What a resumed run may change, and how each change takes effect. Everything else (data, model,
# method, splits, devices, precision, batch size, seed) shapes the state in the checkpoint, so a
# change there is refused rather than silently half-applied.
RESUMABLE = {
    "name", "description", "train.iterations", "train.val_every", "train.log_every",
    "train.lr", "train.clip_grad_norm", "train.mel_max_error", "train.num_workers",
}  # fmt: skip


def _flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def resume_changes(saved: Config, cfg: Config, where: str | os.PathLike) -> dict[str, tuple]:
    """The config keys a resumed run changes, as ``{key: (old, new)}``.

    Raises:
        ConfigError: a key that cannot change on resume (data, model, method, splits, ...)
            differs; the message names it and both values.
    """
    old, new = _flatten(config_to_dict(saved)), _flatten(config_to_dict(cfg))
    changes = {k: (old.get(k), new.get(k)) for k in new if old.get(k) != new.get(k)}
    for key, (before, after) in changes.items():
        if key not in RESUMABLE and not key.startswith("eval."):
            raise ConfigError(
                f"{key}: got {after!r} on resume, but {where} was trained with {before!r}; a "
                "resumed run keeps its data, model and training setup (it may change "
                f"{', '.join(sorted(RESUMABLE - {'name', 'description'}))}); start a new "
                "--out folder or pass --overwrite"
            )
    return changes


# Files a run writes into its folder; any of them means the folder holds a run.
RUN_FILES = ("config.yaml", "last.pt", "best.pt", "log.csv", "history.json")


def holds_run(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds (part of) a training run."""
    out = Path(out_dir)
    return any((out / name).exists() for name in RUN_FILES)


def clear_run(out_dir: str | os.PathLike, keep: Path | None = None) -> None:
    """Empty ``out_dir`` for a new run: every file and folder in it (except what holds ``keep``,
    the data the new run reads)."""
    out = Path(out_dir)
    keep = keep.resolve() if keep is not None else None
    for entry in out.iterdir():
        if keep is not None and (entry.resolve() == keep or entry.resolve() in keep.parents):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def run_files(out: Path) -> list[str]:
    """The run files present in ``out``."""
    return [name for name in RUN_FILES if (out / name).exists()]
