"""Atomic, safely loaded training checkpoints.

A checkpoint is written to a temporary file in the same folder, flushed and fsync'ed, then
renamed over the old one, so a crash during a write never leaves a half-written checkpoint
under the real name. Loading uses ``torch.load(weights_only=True)``: a checkpoint file can hold
tensors and plain containers, never code.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint"]


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated, corrupt or not ours."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename, fsync folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, or holds something else.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint: {path} cannot be loaded safely: it is truncated, corrupt, or holds "
            f"more than tensors and plain containers ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}); use an earlier checkpoint or start again"
        ) from err
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(
            f"checkpoint: {path} was not written by mri.train (no 'format' key); cannot resume"
        )
    return state
