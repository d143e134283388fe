"""Checkpoints that survive growth, crashes, corruption, abandoned timelines and a new world size.

Layout of ``<out_dir>/checkpoints/``::

    step00000100/                  one DeepSpeed checkpoint (every rank's ZeRO partition)
        rank<r>.pt                 per-rank state: RNG states, the data loader's state ("data")
        istack_meta.json           written LAST, by rank 0, after every rank's files are on disk:
                                   marks it complete and lists every file with its size
    step00000100_universal/        a universal conversion (loads on any world size), rank files copied
    set_aside/<when>-resumed-at-step<N>/step00000200/
                                   checkpoints of an abandoned timeline, never resumed by ``auto``

**Complete and verified.** Every rank fsyncs the directory's files before rank 0
writes the marker (itself fsynced, renamed into place, the directory fsynced).
A directory without a readable marker is not a checkpoint; one whose files do not
match the sizes its marker lists fails :func:`verify`.

**Choice and fallback.** Rank 0 lists the candidates (:meth:`Checkpointer.candidates`:
newest first, each verified; a bad one is reported and passed over) and broadcasts
them; the trainer loads the first that loads on every rank and reports each that
did not.

**Timelines.** A resume from anything but the newest checkpoint (a resume by path
from an older one, or a fallback) starts a new timeline:
:meth:`Checkpointer.start_timeline` moves every newer checkpoint to ``set_aside/``
(renamed, with a log line, never deleted) so that ``auto`` cannot go back to it,
and the checkpoint resumed from is never pruned by this run. A save never writes
into an old directory: a leftover of an unfinished save is removed first.

Saving and loading are collectives: every rank calls them.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from . import faults
from .dist import barrier, log0, rank, world_size

META_FILE = "istack_meta.json"
SET_ASIDE = "set_aside"
_NAME = re.compile(r"^step(\d{8})(_universal)?$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt, or does not fit this run; the message names it."""


# ---- per-rank state ---------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seeds every RNG this rank draws from (Python, numpy, torch)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG this rank draws from, as plain values and tensors (loads with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": [kind, np.asarray(keys).tolist(), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device: dropout on the GPU draws from it
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_rank_state(path: Path) -> dict:
    """A rank file: plain values and RNG tensors only, so nothing in it is unpickled as an object."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch raises several types on a bad or foreign file
        raise CheckpointError(f"rank file {path} does not load as plain values ({type(e).__name__}: {e})") from e


# ---- meta, verification ------------------------------------------------------------------


def step_of(path: Path) -> int | None:
    """The step in a checkpoint directory's name (``step00000100[_universal]``), None for other names."""
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def read_meta(path: str | Path) -> dict:
    """The marker of a complete checkpoint; CheckpointError naming the path when it is missing or unreadable."""
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a complete istack_ds checkpoint ({META_FILE} missing)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_file} is unreadable ({e}): the checkpoint cannot be trusted") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{meta_file} holds no step: the checkpoint cannot be trusted")
    return meta


def verify(path: str | Path) -> dict:
    """Its meta, once every file the marker lists exists with the listed size; else CheckpointError naming it.

    Checkpoints written before markers listed their files pass on the marker alone.
    """
    path = Path(path)
    meta = read_meta(path)
    for name, size in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing (the marker lists it with {size} bytes)")
        if f.stat().st_size != size:
            raise CheckpointError(f"{path}: {name} has {f.stat().st_size} bytes, the marker lists {size}")
    return meta


def _files(path: Path) -> dict[str, int]:
    return {
        str(f.relative_to(path)): f.stat().st_size
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != META_FILE and not f.name.endswith(".tmp")
    }


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    # NOTE: fsync flushes the node's page cache whoever wrote the file, so every rank syncing the
    # whole directory covers the files of every node; syncing a clean file costs nothing.
    for f in sorted(path.rglob("*")):
        if f.is_file():
            _fsync(f)
    _fsync(path)


def write_marker(path: Path, meta: dict) -> None:
    """Lists every file of `path` with its size in the marker, written durably and atomically."""
    tmp = path / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta | {"files": _files(path)}, indent=1))
    _fsync(tmp)
    tmp.replace(path / META_FILE)  # atomic: a checkpoint is complete or it is not
    _fsync(path)


# ---- the checkpoints of a run ----------------------------------------------------------------


class Checkpointer:
    def __init__(self, ckpt_dir: str | Path, keep: int, log=log0):
        self.dir = Path(ckpt_dir)
        self.keep = keep
        self.log = log
        self.timeline = uuid.uuid4().hex[:8]
        """Written into every meta this run saves (rank 0's value counts: rank 0 writes the marker)."""
        self.protected: Path | None = None
        """The checkpoint this run resumed from: never pruned by it."""

    def _dirs(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("step*") if p.is_dir() and step_of(p) is not None)

    def complete(self) -> list[Path]:
        """Checkpoints with a readable marker, oldest first (a step's universal conversion after it)."""
        found = []
        for p in self._dirs():
            try:
                read_meta(p)
            except CheckpointError:
                continue
            found.append(p)
        return sorted(found, key=lambda p: (step_of(p), p.name.endswith("_universal")))

    def candidates(self, world: int) -> tuple[list[Path], list[str]]:
        """Complete checkpoints that verify, newest first, and a note for each that did not.

        At one step, the copy that loads on `world` ranks without a conversion comes first:
        the original when it was saved by `world` ranks (it alone has every rank's RNG and data
        position), else the universal conversion.
        """

        def rank_key(p: Path) -> tuple[int, int]:
            universal = p.name.endswith("_universal")
            same_world = read_meta(p).get("world_size") == world
            return (-(step_of(p) or 0), int(universal == same_world))

        good, notes = [], []
        for p in sorted(self.complete(), key=rank_key):
            try:
                verify(p)
            except CheckpointError as e:
                notes.append(f"passed over {p}: {e}")
                continue
            good.append(p)
        return good, notes

    def latest(self, world: int | None = None) -> Path | None:
        """The newest checkpoint that verifies, preferring the copy that loads on `world` ranks as it is."""
        good, _ = self.candidates(world if world is not None else world_size())
        return good[0] if good else None

    def start_timeline(self, resumed: Path | None, meta: dict | None) -> bool:
        """Rank 0, before training on from `resumed` (None: a fresh run): sets aside every newer checkpoint.

        Continuing from the newest checkpoint keeps its timeline; otherwise the newer ones form an
        abandoned timeline: moved (never deleted) to ``set_aside/``, so ``auto`` cannot resume them
        and no save of this run lands on their directories. True when something was set aside.
        """
        self.protected = resumed
        step = meta["step"] if meta is not None else -1
        newer = [p for p in self._dirs() if (step_of(p) or 0) > step]
        incomplete = [p for p in newer if not (p / META_FILE).exists()]
        for p in incomplete:  # the leftovers of a save that never finished: not a checkpoint
            shutil.rmtree(p, ignore_errors=True)
            self.log("removed %s: a save that did not finish (no %s)", p, META_FILE)
        abandoned = [p for p in newer if p not in incomplete]
        if not abandoned:
            if meta is not None:
                self.timeline = meta.get("timeline", self.timeline)
            return False
        self.timeline = uuid.uuid4().hex[:8]
        origin = f"resumed-at-step{step}" if resumed is not None else "fresh-run"
        aside = self.dir / SET_ASIDE / f"{time.strftime('%Y%m%d-%H%M%S')}-{origin}"
        aside.mkdir(parents=True, exist_ok=True)
        for p in abandoned:
            p.rename(aside / p.name)
        self.log(
            "new timeline from %s: %d newer checkpoint(s) set aside in %s: %s",
            resumed if resumed is not None else "a fresh start",
            len(abandoned),
            aside,
            ", ".join(p.name for p in abandoned),
        )
        return True

    def save(self, engine, meta: dict, rank_state: dict) -> Path:
        """Saves every rank's partition and rank file, syncs them, then (rank 0) the marker. A collective."""
        tag = f"step{meta['step']:08d}"
        path = self.dir / tag
        if rank() == 0:
            self._clear(path)
        barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state={"istack": meta}, save_latest=False)
        faults.maybe("crash_in_save", meta["step"])
        torch.save(rank_state | {"rng": rng_state()}, path / f"rank{rank()}.pt")
        _fsync_tree(path)
        barrier()
        if rank() == 0:
            write_marker(path, meta | {"world_size": world_size(), "timeline": self.timeline})
            self.prune()
        barrier()
        return path

    def _clear(self, path: Path) -> None:
        """A step directory is written fresh: an unfinished save is removed, a complete one set aside."""
        if not path.exists():
            return
        if (path / META_FILE).exists():
            aside = self.dir / SET_ASIDE / f"{time.strftime('%Y%m%d-%H%M%S')}-overwritten"
            aside.mkdir(parents=True, exist_ok=True)
            path.rename(aside / path.name)
            self.log("set aside %s: this run saves the same step anew (%s)", path.name, aside)
        else:
            # NOTE: an unfinished directory here is a crashed save of this run directory, never another run's
            # save in progress: the run holds the lock of its out_dir (istack_ds/run_lock.py), so no second
            # run saves the same step into it at the same time.
            shutil.rmtree(path)
            self.log("removed %s: a save that did not finish (no %s)", path, META_FILE)

    def prune(self) -> None:
        """Keeps the newest `keep` steps (a step's universal conversion with it) and the checkpoint resumed from."""
        complete = self.complete()
        steps = sorted({step_of(p) or 0 for p in complete})
        kept = set(steps[-self.keep :]) if self.keep > 0 else set(steps)
        for old in complete:
            if step_of(old) not in kept and old != self.protected:
                shutil.rmtree(old, ignore_errors=True)
        # Directories left by a crash in the middle of a save, older than the newest complete one.
        newest = steps[-1] if steps else -1
        for p in self._dirs():
            if not (p / META_FILE).exists() and (step_of(p) or 0) < newest:
                shutil.rmtree(p, ignore_errors=True)

    def load(self, engine, path: Path) -> dict | None:
        """Loads model, optimizer, LR scheduler and counters; returns this rank's state (None: saved by another
        world size, or a universal copy without rank files)."""
        meta = read_meta(path)
        load_path, _ = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {path}")
        rank_file = path / f"rank{rank()}.pt"
        if meta.get("world_size") != world_size() or not rank_file.exists():
            return None
        state = load_rank_state(rank_file)
        set_rng_state(state.pop("rng"))
        return state


def saved_rank_states(path: Path) -> list[dict]:
    """The state of every rank that saved `path` (its rank files; [] when it has none)."""
    return [load_rank_state(f) for f in sorted(path.glob("rank*.pt"))]


def universal_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + "_universal")


def convert_to_universal(checkpoint: Path, out: Path | None = None, log=print) -> Path:
    """DeepSpeed's ``ds_to_universal`` on a complete checkpoint, plus its rank files and a marker of its own.

    Idempotent: an existing complete conversion is returned as it is. `out` defaults to
    ``<checkpoint>_universal``; a directory there that is not a conversion made here is never touched
    (CheckpointError); only this function's own ``<out>.partial`` is ever removed.
    """
    checkpoint = Path(checkpoint)
    out = Path(out) if out is not None else universal_path(checkpoint)
    meta = verify(checkpoint)
    if meta.get("universal"):
        return checkpoint
    if (out / META_FILE).exists():
        verify(out)
        log(f"universal checkpoint already at {out}")
        return out
    if out.exists():
        raise CheckpointError(
            f"{out} exists and is not a universal checkpoint made from {checkpoint} (no {META_FILE}): "
            "it is left as it is; remove it or choose another --out"
        )
    tmp = out.with_name(out.name + ".partial")  # ours: left by an interrupted conversion
    shutil.rmtree(tmp, ignore_errors=True)
    # --inject_missing_state: 0.19.8 asserts on checkpoints saved without the universal info otherwise.
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(checkpoint),
        "--output_folder",
        str(tmp),
        "--inject_missing_state",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckpointError(f"ds_to_universal failed on {checkpoint}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    for f in sorted(checkpoint.glob("rank*.pt")):  # the saving ranks' RNG and data positions travel along
        shutil.copy2(f, tmp / f.name)
    _fsync_tree(tmp)
    meta = {k: v for k, v in meta.items() if k != "files"}
    write_marker(tmp, meta | {"universal": True, "converted_from": str(checkpoint)})
    tmp.rename(out)
    params = len(list((out / "zero").iterdir()))
    log(
        f"wrote universal checkpoint {out}: step {meta['step']}, depth {meta['depth']}, {params} parameters, "
        f"saved by {meta.get('world_size')} rank(s) x accumulation {meta.get('gradient_accumulation')}"
    )
    return out
