"""Checkpoints that survive growth, crashes, corruption, abandoned timelines and a new world size.

Layout of ``<out_dir>/checkpoints/``::

    step00000100/                  one DeepSpeed checkpoint (every rank's ZeRO partition)
        rank<r>.pt                 per-rank state: RNG states, the data loader's state ("data")
        istack_meta.json           written LAST, by rank 0, after every rank's files are on disk:
                                   marks it complete and lists every file with its size and sha256
                                   (each rank hashes its own files: :mod:`istack_ds.checkpoint_files`)
    step00000100_universal/        a universal conversion (loads on any world size), rank files copied
    set_aside/<when>-resumed-at-step<N>/step00000200/
                                   checkpoints of an abandoned timeline, never resumed by ``auto``

**Complete and verified.** Every rank fsyncs the directory's files before rank 0
writes the marker (itself fsynced, renamed into place, the directory fsynced).
A directory without a readable marker is not a checkpoint; one whose files do not
match the sizes and digests its marker lists fails :func:`verify` (markers written
before digests: sizes only).

**Divergence.** The save made when the losses stop being finite is marked
``"diverged": true``: kept for inspection, never a candidate of ``auto``, never
counted by ``checkpoint.keep`` (:meth:`Checkpointer.save_diverged` names the last
good checkpoint instead).

**Choice and fallback.** Rank 0 lists the candidates (:meth:`Checkpointer.candidates`:
newest first, each verified; a bad one is reported and passed over) and broadcasts
them; the trainer loads the first that loads on every rank and reports each that
did not.

**Timelines.** A resume from anything but the newest checkpoint (a resume by path
from an older one, or a fallback) starts a new timeline:
:meth:`Checkpointer.start_timeline` moves every newer checkpoint to ``set_aside/``
(renamed, with a log line, never deleted) so that ``auto`` cannot go back to it,
and the checkpoint resumed from is never pruned by this run. A save never writes
into an old directory: a leftover of an unfinished save is removed first. Each
rename is followed by an fsync of the directories it changed, and ``checkpoints/``
is fsynced before older checkpoints are pruned.

Saving and loading are collectives: every rank calls them.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from .checkpoint_files import DIGEST, digest, digests, file_sizes, fsync, fsync_tree, own_digests
from .checkpoint_write import CheckpointWriteError, write_share
from .dist import barrier, broadcast_from_main, gather_all, log0, rank, world_size

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


def verify(path: str | Path, content: bool = True) -> dict:
    """Its meta, once every file the marker lists exists with the listed size and digest (`content`; False: the
    sizes only, no file read); else CheckpointError naming the file.

    Checkpoints written before markers listed their files pass on the marker alone, those written before
    markers held digests on their sizes.
    """
    path = Path(path)
    meta = read_meta(path)
    sums = meta.get(DIGEST)
    for name, size in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing (the marker lists it with {size} bytes)")
        if f.stat().st_size != size:
            raise CheckpointError(f"{path}: {name} has {f.stat().st_size} bytes, the marker lists {size}")
        if content and sums is not None and digest(f) != sums.get(name):
            raise CheckpointError(
                f"{path}: {name} does not hold what was saved there (its {DIGEST} differs from the marker's): "
                "a file from another checkpoint or a damaged one"
            )
    return meta


def write_marker(path: Path, meta: dict, known: dict[str, str] | None = None) -> None:
    """Lists every file of `path` with its size and digest (`known`: those the ranks hashed) in the marker,
    written durably and atomically."""
    sizes = file_sizes(path, skip=META_FILE)
    tmp = path / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta | {"files": sizes, DIGEST: digests(path, list(sizes), known or {})}, indent=1))
    fsync(tmp)
    tmp.replace(path / META_FILE)  # atomic: a checkpoint is complete or it is not
    fsync(path)


# ---- the checkpoints of a run ----------------------------------------------------------------


def _good_checkpoint(path: Path) -> bool:
    """`path` is a complete checkpoint not saved at a divergence (its marker read, nothing verified)."""
    try:
        return not read_meta(path).get("diverged")
    except CheckpointError:
        return False


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

    def candidates(self, world: int, content: bool = True, first: bool = False) -> tuple[list[Path], list[str]]:
        """Complete checkpoints that verify and were not saved at a divergence, newest first; a note for each other.

        At one step, the copy that loads on `world` ranks without a conversion comes first:
        the original when it was saved by `world` ranks (it alone has every rank's RNG and data
        position), else the universal conversion. `content`: see :func:`verify`; `first`: stop at the first good one.
        """

        def rank_key(p: Path) -> tuple[int, int]:
            universal = p.name.endswith("_universal")
            same_world = read_meta(p).get("world_size") == world
            return (-(step_of(p) or 0), int(universal == same_world))

        good, notes = [], []
        for p in sorted(self.complete(), key=rank_key):
            if read_meta(p).get("diverged"):
                notes.append(f"passed over {p}: saved when the run diverged (kept for inspection only)")
                continue
            try:
                verify(p, content)
            except CheckpointError as e:
                notes.append(f"passed over {p}: {e}")
                continue
            good.append(p)
            if first:
                break
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
        aside = self.set_aside(abandoned, origin)
        self.log(
            "new timeline from %s: %d newer checkpoint(s) set aside in %s: %s",
            resumed if resumed is not None else "a fresh start",
            len(abandoned),
            aside,
            ", ".join(p.name for p in abandoned),
        )
        return True

    def set_aside(self, paths: list[Path], why: str) -> Path:
        """Moves `paths` into ``set_aside/<now>-<why>/``, durably: every directory the renames changed is fsynced
        before training writes anything new. Returns that directory."""
        aside = self.dir / SET_ASIDE / f"{time.strftime('%Y%m%d-%H%M%S')}-{why}"
        aside.mkdir(parents=True, exist_ok=True)
        for p in paths:
            p.rename(aside / p.name)
        for d in (aside, aside.parent, self.dir):
            fsync(d)
        return aside

    def save(self, engine, meta: dict, rank_state: dict) -> Path:
        """Saves every rank's partition and rank file, syncs them, then (rank 0) the marker. A collective."""
        tag = f"step{meta['step']:08d}"
        path = self.dir / tag
        if rank() == 0:
            self._clear(path)
        barrier()
        share = write_share(engine, self.dir, tag, meta, rank_state | {"rng": rng_state()}, rank())
        if failed := [e for e in gather_all(share and f"rank {rank()}: {share}") if e]:  # every rank stops
            raise CheckpointWriteError(" | ".join(failed) + "; checkpoint.resume=auto resumes the last complete one")
        # NOTE: a collective: every rank hashes the files it wrote (checkpoint_files.owner), rank 0 gathers.
        names = list(file_sizes(path, skip=META_FILE))
        known = {k: v for d in gather_all(own_digests(path, names, rank(), world_size())) for k, v in d.items()}
        if rank() == 0:
            write_marker(path, meta | {"world_size": world_size(), "timeline": self.timeline}, known)
            self.prune()
        barrier()
        return path

    def save_diverged(self, engine, meta: dict, rank_state: dict, what: str) -> str:
        """Saves the state that stopped being finite, marked ``diverged`` (a collective); the message for the
        user: `what` happened, where that state is, and the last good checkpoint to resume from. A good checkpoint
        of this very step (a save just before, e.g. a growth's) holds this state (non-finite micro-batches never
        reach the optimizer): it is kept and named instead."""
        existing = self.dir / f"step{meta['step']:08d}"
        # NOTE: rank 0 decides and every rank follows: either all save (a collective) or none does.
        if broadcast_from_main(rank() == 0 and _good_checkpoint(existing)):
            return (
                f"{what}; the state is the one of {existing}, saved at this step before the losses stopped being "
                "finite. Lower optim.lr or check the data, then resume from it (checkpoint.resume=auto picks it)"
            )
        path = self.save(engine, meta | {"diverged": True}, rank_state)
        good = self.last_good(meta["step"])
        where = (
            f"resume from the last good checkpoint {good} (step {step_of(good)}; checkpoint.resume=auto picks it)"
            if good is not None
            else f"no checkpoint before step {meta['step']}: start over (checkpoint.resume=none)"
        )
        return (
            f"{what}; the diverged state is saved in {path} for inspection only (marked diverged: auto passes "
            f"over it). Lower optim.lr or check the data, then {where}"
        )

    def last_good(self, before: int) -> Path | None:
        """The newest complete checkpoint before step `before` not saved at a divergence (markers only)."""
        good = [p for p in self.complete() if (step_of(p) or 0) < before and not read_meta(p).get("diverged")]
        return good[-1] if good else None

    def _clear(self, path: Path) -> None:
        """A step directory is written fresh: an unfinished save is removed, a complete one set aside."""
        if not path.exists():
            return
        if (path / META_FILE).exists():
            aside = self.set_aside([path], "overwritten")
            self.log("set aside %s: this run saves the same step anew (%s)", path.name, aside)
        else:
            # NOTE: an unfinished directory here is a crashed save of this run directory, never another run's
            # save in progress: the run holds the lock of its out_dir (istack_ds/run_lock.py), so no second
            # run saves the same step into it at the same time.
            shutil.rmtree(path)
            self.log("removed %s: a save that did not finish (no %s)", path, META_FILE)

    def prune(self) -> None:
        """Keeps the newest `keep` steps (a step's universal conversion with it), the checkpoint resumed from, and
        every diverged save newer than the oldest step kept (it does not count towards `keep`)."""
        fsync(self.dir)  # the newest checkpoint's directory entry is durable before older ones go
        complete = self.complete()
        steps = sorted({step_of(p) or 0 for p in complete})
        diverged = {step_of(p) or 0 for p in complete if read_meta(p).get("diverged")}
        good = [s for s in steps if s not in diverged]
        kept = set(good[-self.keep :]) if self.keep > 0 else set(good)
        kept |= {s for s in diverged if not kept or s > min(kept)}
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
    (CheckpointError). The conversion is written in a work directory of its own beside `out`
    (``.<name>.partial-<random>``, renamed into place, then removed with DeepSpeed's ``latest_universal``
    file): nothing else beside `out` is created or removed.
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
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))  # a unique name: ours alone
    try:
        _convert(checkpoint, work / out.name, meta, out)
    finally:  # what is left in it: DeepSpeed's latest_universal, or a failed conversion
        shutil.rmtree(work, ignore_errors=True)
    params = len(list((out / "zero").iterdir()))
    log(
        f"wrote universal checkpoint {out}: step {meta['step']}, depth {meta['depth']}, {params} parameters, "
        f"saved by {meta.get('world_size')} rank(s) x accumulation {meta.get('gradient_accumulation')}"
    )
    return out


def _convert(checkpoint: Path, tmp: Path, meta: dict, out: Path) -> None:
    """`checkpoint` converted into `tmp` (DeepSpeed writes ``latest_universal`` beside it), marked, renamed to
    `out`."""
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
    fsync_tree(tmp)
    meta = {k: v for k, v in meta.items() if k not in ("files", DIGEST)}
    write_marker(tmp, meta | {"universal": True, "converted_from": str(checkpoint)})
    tmp.rename(out)
    fsync(out.parent)  # the rename is durable
