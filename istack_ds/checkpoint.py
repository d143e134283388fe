"""Checkpoints that survive growth, crashes and a new world size.

Layout of ``<out_dir>/checkpoints/``::

    step00000100/                  one DeepSpeed checkpoint (every rank's ZeRO partition)
        istack_meta.json           written LAST, by rank 0, after every rank finished: marks it complete
        rank<r>.pt                 per-rank state: RNG states, the data loader's state ("data")
    step00000100_universal/        made by tools/convert_checkpoint.py: loads on any world size

A crash in the middle of a save leaves a directory without ``istack_meta.json``;
:meth:`Checkpointer.latest` never picks it, so a resume uses the previous
complete checkpoint. Saving and loading are collectives: every rank calls them.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from . import faults
from .dist import barrier, rank, world_size

META_FILE = "istack_meta.json"

#: Config fields that fix the shapes of the student's parameters: a checkpoint made with other values
#: cannot be loaded into the model this config builds.
SHAPE_FIELDS = (
    ("student", "hidden_size"),
    ("student", "intermediate_size"),
    ("student", "num_attention_heads"),
    ("student", "conv_dim"),
    ("loss", "kind"),
    ("loss", "teacher_layers"),
)


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, or does not fit this run; the message says which field."""


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device: dropout on the GPU draws from it
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.exists():
        raise CheckpointError(f"{path} is not a complete istack_ds checkpoint ({META_FILE} missing)")
    return json.loads(meta_file.read_text())


def check_compatible(meta: dict, config: dict, path: str | Path) -> None:
    """Refuses a checkpoint whose model shape differs from what `config` builds, naming the field."""
    saved = meta.get("config", {})
    for section, key in SHAPE_FIELDS:
        old, new = saved.get(section, {}).get(key), config[section][key]
        if old != new:
            raise CheckpointError(
                f"checkpoint {path} was made with {section}.{key}={old!r} but this run has {section}.{key}={new!r}: "
                "the student's shapes differ; resume with the checkpoint's value or set checkpoint.resume=none"
            )


class Checkpointer:
    def __init__(self, ckpt_dir: str | Path, keep: int):
        self.dir = Path(ckpt_dir)
        self.keep = keep

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (universal conversions included)."""
        found = [p for p in self.dir.glob("step*") if (p / META_FILE).exists()]
        return sorted(found, key=lambda p: (read_meta(p)["step"], p.name.endswith("_universal")))

    def latest(self) -> Path | None:
        complete = self.complete()
        return complete[-1] if complete else None

    def resolve(self, resume: str) -> Path | None:
        """`auto`: the latest complete checkpoint (None on a fresh run); `none`: None; else a path."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        read_meta(resume)  # raises, naming the path, when it is not a complete checkpoint
        return Path(resume)

    def save(self, engine, meta: dict, rank_state: dict) -> Path:
        """Saves every rank's partition, then (rank 0, after a barrier) the meta file that marks it complete."""
        tag = f"step{meta['step']:08d}"
        path = self.dir / tag
        # A checkpoint of the same step from an abandoned timeline (a resume from an older
        # checkpoint) is incomplete from here on until this save finishes.
        if rank() == 0 and (path / META_FILE).exists():
            (path / META_FILE).unlink()
        barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state={"istack": meta}, save_latest=False)
        torch.save(rank_state | {"rng": rng_state()}, path / f"rank{rank()}.pt")
        faults.maybe("crash_in_save", meta["step"])
        barrier()
        if rank() == 0:
            tmp = path / (META_FILE + ".tmp")
            tmp.write_text(json.dumps(meta | {"world_size": world_size()}, indent=1))
            tmp.replace(path / META_FILE)  # atomic: a checkpoint is complete or it is not
            self.prune()
        barrier()
        return path

    def prune(self) -> None:
        complete = self.complete()
        for old in complete[: max(0, len(complete) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        # Directories left by a crash in the middle of a save, older than the newest complete one.
        newest = complete[-1].name if complete else ""
        for partial in self.dir.glob("step*"):
            if not (partial / META_FILE).exists() and partial.name < newest:
                shutil.rmtree(partial, ignore_errors=True)

    def load(self, engine, path: Path) -> dict | None:
        """Loads model, optimizer, LR scheduler and counters; returns this rank's state (None on a new world size)."""
        meta = read_meta(path)
        load_path, client = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {path}")
        rank_file = path / f"rank{rank()}.pt"
        if meta.get("world_size") != world_size() or not rank_file.exists():
            return None
        state = torch.load(rank_file, weights_only=False)
        set_rng_state(state.pop("rng"))
        return state


def gradient_accumulation_for(meta: dict, world_size: int, configured: int) -> int:
    """Gradient accumulation that keeps the checkpoint's global batch on `world_size` ranks."""
    old_world = meta.get("world_size", world_size)
    old_accum = meta.get("gradient_accumulation", configured)
    if old_world == world_size:
        return configured
    global_micro = old_world * old_accum
    if global_micro % world_size:
        raise CheckpointError(
            f"the checkpoint ran {old_world} rank(s) x {old_accum} accumulation = {global_micro} micro-batches a step; "
            f"{world_size} rank(s) cannot keep that global batch (not a divisor)"
        )
    return global_micro // world_size
