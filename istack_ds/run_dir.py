"""The run directory before the run: writable, with room for a checkpoint (checked before any process group).

A read-only `checkpoints/` or a full disk would otherwise surface hours in, at the first save, as a torch
serialization traceback; here they stop the run at start with one line naming the directory
(:func:`istack_ds.preflight.preflight` calls :func:`check_run_dir`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .config import Config, ConfigError

#: Bytes per student parameter in one checkpoint: fp32 weights, fp32 master copy and two Adam moments.
CHECKPOINT_BYTES_PER_PARAM = 16
#: Margin on that estimate for the rank files, the marker and DeepSpeed's bookkeeping.
CHECKPOINT_MARGIN = 1.2


def _existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (what a run creates its directories in)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, what: str) -> None:
    """ConfigError naming `path` unless a file can be created in it (or, where it does not exist yet, in the
    directory it would be created in). A real write, not permission bits: a read-only mount shows neither."""
    where = _existing(path)
    if not where.is_dir():
        raise ConfigError(f"{what} {path}: {where} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".istack-write-check-", dir=where)
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot write in {where} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def newest_checkpoint_bytes(ckpt_dir: Path) -> int | None:
    """Size of the newest complete checkpoint in `ckpt_dir` (None when it has none)."""
    from .checkpoint import Checkpointer

    complete = Checkpointer(ckpt_dir, keep=0).complete() if ckpt_dir.is_dir() else []
    if not complete:
        return None
    return sum(f.stat().st_size for f in complete[-1].rglob("*") if f.is_file())


def checkpoint_bytes(cfg: Config) -> tuple[int, str]:
    """The bytes one checkpoint of this run needs, and how that was found."""
    newest = newest_checkpoint_bytes(Path(cfg.run.out_dir) / "checkpoints")
    if newest is not None:
        return newest, "the size of the newest checkpoint"
    from .commands.train import student_parameters

    depth = cfg.growth.stage_depths[-1]
    params = student_parameters(cfg, [depth])[depth]
    estimate = int(CHECKPOINT_BYTES_PER_PARAM * params * CHECKPOINT_MARGIN)
    return estimate, f"{CHECKPOINT_BYTES_PER_PARAM} B x {params:,} student parameters at depth {depth} x 1.2"


def check_run_dir(cfg: Config, student_known: bool = True) -> None:
    """`run.out_dir` and its `checkpoints/` are writable and their file system has room for one checkpoint;
    else ConfigError naming the directory. `student_known`: the teacher and student checks passed, so the
    student's size can be estimated (without it and without an earlier checkpoint, room is not checked: the
    problem that stops the run is already reported)."""
    out = Path(cfg.run.out_dir)
    check_writable(out, "run.out_dir")
    ckpt_dir = out / "checkpoints"
    check_writable(ckpt_dir, "checkpoint directory")
    if not student_known and newest_checkpoint_bytes(ckpt_dir) is None:
        return
    need, how = checkpoint_bytes(cfg)
    free = shutil.disk_usage(_existing(ckpt_dir)).free
    if free < need:
        raise ConfigError(
            f"run.out_dir {out}: {free / 2**30:.2f} GiB free on its file system, one checkpoint needs "
            f"{need / 2**30:.2f} GiB ({how}): free space or choose another run.out_dir"
        )
