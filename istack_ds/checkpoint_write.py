"""Writing one rank's share of a checkpoint (DeepSpeed's files and the rank file, synced), and a failed write
told in one line that names the file or directory and why: "no space left on device" instead of torch's
``inline_container`` error.

NOTE: DeepSpeed's files are written by torch's C++ writer, whose error carries no errno ("unexpected pos ...");
such an error counts as a full disk when the file system has less than FULL_BYTES free after it. The rank file is
written through a Python file object, so its OSError carries the errno itself.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import torch

from . import faults
from .checkpoint_files import fsync_tree

FULL_BYTES = 256 * 1024**2
"""Free bytes under which a write error without an errno is taken for a full disk."""
_TORCH_WRITER = ("inline_container", "PytorchStreamWriter", "file write failed")
_REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


class CheckpointWriteError(OSError):
    """A rank could not write its files of a checkpoint (every rank raises it together); the message names the
    file or directory and the reason."""


def _free(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 1024**2:.0f} MiB free there"
    except OSError:
        return "free space unknown"


def write_failure(path: Path, error: BaseException) -> str:
    """One line for `error`, raised while writing checkpoint `path`; `error` itself again when it is no write
    error (a failed collective inside DeepSpeed's save stays what it is)."""
    if isinstance(error, OSError):
        where = error.filename or path
        reason = _REASONS.get(error.errno or 0, error.strerror or str(error))
    elif isinstance(error, RuntimeError) and any(s in str(error) for s in _TORCH_WRITER):
        where = path
        try:
            full = shutil.disk_usage(path).free < FULL_BYTES
        except OSError:
            full = False
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        reason = _REASONS[errno.ENOSPC] if full else f"torch's writer failed ({first})"
    else:
        raise error
    return f"writing checkpoint file {where} failed: {reason} ({_free(path)})"


def write_share(engine, ckpt_dir: Path, tag: str, meta: dict, rank_state: dict, rank: int) -> str:
    """This rank's files of checkpoint ``ckpt_dir/tag`` written and synced (DeepSpeed's save is a collective:
    every rank calls it); "" when they are, else :func:`write_failure`'s line."""
    path = ckpt_dir / tag
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"istack": meta}, save_latest=False)
        faults.maybe("crash_in_save", meta["step"])
        rank_file = path / f"rank{rank}.pt"
        faults.disk_full(rank_file, meta["step"])
        try:
            with open(rank_file, "wb") as f:
                torch.save(rank_state, f)
        except OSError as e:  # a write on an open file names no file
            raise OSError(e.errno, e.strerror, str(rank_file)) from e
        fsync_tree(path)
    except (OSError, RuntimeError) as e:
        return write_failure(path, e)
    return ""
