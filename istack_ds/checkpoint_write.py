"""Writing one rank's share of a checkpoint (DeepSpeed's files and the rank file, synced), and a failed write
told in one line that names the file or directory and why: "no space left on device" instead of torch's
``inline_container`` error.

NOTE: DeepSpeed's files are written by torch's C++ writer, whose error carries no errno ("unexpected pos ...");
such an error counts as a full disk when the file system has less than FULL_BYTES free after it. The rank file is
written through a Python file object, so its OSError carries the errno itself.

NOTE: DeepSpeed's ``save_checkpoint`` is a collective that ends in a barrier. A write failing inside it must not
raise there: that rank would leave early for our gather of errors while the others wait in DeepSpeed's barrier
(mismatched collectives: a hang until the timeout). Its writes (``checkpoint_engine.save``: the model states on
data-parallel rank 0, every rank's optimizer states, under ZeRO-1/2 and ZeRO-3 alike, each after that file's state
was gathered) and rank 0's copy of the recovery scripts are therefore recorded instead, so every rank runs the same
collectives; the first failure goes into the same gather as a failed rank file.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def write_failure(path: Path, error: BaseException, file: Path | None = None) -> str:
    """One line for `error`, raised while writing checkpoint `path` (its `file` when known); `error` itself again
    when it is no write error (a failed collective inside DeepSpeed's save stays what it is)."""
    if isinstance(error, OSError):
        where = error.filename or file or path
        reason = _REASONS.get(error.errno or 0, error.strerror or str(error))
    elif isinstance(error, RuntimeError) and any(s in str(error) for s in _TORCH_WRITER):
        where = file or path
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
        with _deepspeed_writes_recorded(engine, path, meta["step"]) as failed:
            engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"istack": meta}, save_latest=False)
        if failed:  # NOTE: the rank file is not written: the checkpoint is incomplete anyway
            return failed[0]
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


@contextmanager
def _deepspeed_writes_recorded(engine, path: Path, step: int) -> Iterator[list[str]]:
    """While it is open, a write of DeepSpeed's that fails returns (its :func:`write_failure` line goes into the
    list yielded) instead of raising; any other error still raises."""
    failed: list[str] = []

    def recorded(write: Callable, name: Callable[..., str]) -> Callable:
        def guarded(*args, **kwargs):
            file = Path(name(*args, **kwargs))
            try:
                faults.disk_full_deepspeed(file, step)
                return write(*args, **kwargs)
            except (OSError, RuntimeError) as e:
                failed.append(write_failure(path, e, file))  # raises e again when it is no write error

        return guarded

    # NOTE: instance attributes shadow the methods only while the save runs (then what was there before again).
    writes: list[tuple[object, str, Callable[..., str]]] = [
        (getattr(engine, "checkpoint_engine", None), "save", lambda state_dict, path: path),
        (engine, "_copy_recovery_script", lambda save_path: save_path),
    ]
    patched = [(o, a, vars(o).get(a)) for o, a, _ in writes if hasattr(o, a)]
    for obj, attr, name in writes:
        if hasattr(obj, attr):
            setattr(obj, attr, recorded(getattr(obj, attr), name))
    try:
        yield failed
    finally:
        for obj, attr, before in patched:
            if before is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, before)
