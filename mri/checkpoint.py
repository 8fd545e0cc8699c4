"""Atomic, safely loaded training checkpoints.

A checkpoint is written to a temporary file in the same folder, flushed and fsync'ed, then
renamed over the old one, so a crash during a write never leaves a half-written checkpoint
under the real name. The file gets the permissions of any file the user creates (``0666`` less
the umask), not the private ``0600`` of a temporary file. Loading uses
``torch.load(weights_only=True)``: a checkpoint file can hold tensors and plain containers, never
code, and any file that is not a checkpoint is reported as a
[`CheckpointError`][mri.checkpoint.CheckpointError].
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint"]


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated, corrupt or not ours."""


_DIGEST_KEY = "_sha256"


def _digest(obj: Any, h: Any = None) -> str:
    """A SHA-256 over every tensor's bytes and every plain value, in a fixed order.

    ``torch.load`` does not verify the zip checksums, so a flipped bit on disk would load as
    silently wrong numbers; this digest, stored in the checkpoint, catches it.
    """
    top = h is None
    h = hashlib.sha256() if top else h
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"D")
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _digest(obj[key], h)
    elif isinstance(obj, (list, tuple)):
        h.update(b"L" if isinstance(obj, list) else b"U")
        for item in obj:
            _digest(item, h)
    else:
        h.update(repr(obj).encode())
    return h.hexdigest() if top else ""


_UMASK_LOCK = threading.Lock()


def _file_mode() -> int:
    """The mode ``open()`` would give a new file: ``0666`` less the process umask."""
    # The umask can only be read by setting it; the lock keeps two savers from racing.
    with _UMASK_LOCK:
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename, fsync folder).

    A SHA-256 digest of the content is stored with it and checked by
    [`load_checkpoint`][mri.checkpoint.load_checkpoint]. The file's mode follows the umask, like
    any other file the run writes.
    """
    path = Path(path)
    state = {**state, _DIGEST_KEY: _digest(state)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; a checkpoint is shared like the rest of the run folder.
        os.chmod(tmp, _file_mode())
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
    """Load a checkpoint written by [`save_checkpoint`][mri.checkpoint.save_checkpoint].

    The file is read with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: the file is missing, a folder, truncated, corrupt, or holds something
            else.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint: {path} is a folder; give a checkpoint file in it, e.g. {path / 'best.pt'}"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        # Any file that is not a checkpoint fails somewhere inside the unpickler, with whatever
        # error that spot raises (IndexError, KeyError, UnicodeDecodeError, ...); all of them
        # mean the same to the user. KeyboardInterrupt is not an Exception and passes through.
        first_line = (str(err).splitlines() or ["no message"])[0][:200]
        raise CheckpointError(
            f"checkpoint: {path} cannot be loaded safely: it is truncated, corrupt, or holds "
            f"more than tensors and plain containers ({type(err).__name__}: {first_line}); "
            "use an earlier checkpoint or start again"
        ) from err
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(
            f"checkpoint: {path} was not written by mri.train (no 'format' key); cannot resume"
        )
    stored = state.pop(_DIGEST_KEY, None)
    if stored is not None and stored != _digest(state):
        raise CheckpointError(
            f"checkpoint: {path} is corrupt: its content does not match the SHA-256 digest "
            "stored when it was written (a damaged disk or copy); use an earlier checkpoint"
        )
    return state
