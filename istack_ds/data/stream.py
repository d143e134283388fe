"""Shards -> batches: the streaming loader the trainer iterates, which keeps its own resumable state.

    index.json -> shard list, shuffled per epoch from (seed, epoch), the same on every rank
      -> this node's shards (every num_nodes-th) -> this rank's (every local_world_size-th)
         -> this worker's (every num_workers-th)
      -> groups of data.interleave_shards shards in turn, each read member by member from all
         its shards: tar members -> header check (flac + json, rate, channels, length)
         -> random crop plan (data.crop_seconds) -> at least `min_samples` samples at
         data.sample_rate after the crop -> shuffle buffer (data.shuffle_buffer cuts)
         -> duration buckets (bins from the index's histogram) -> batches of <= data.batch_seconds,
            or the micro-batch of istack_ds.batching.plan_batches (seconds, or exactly N cuts)
      -> decode only the cropped frames (soundfile), resample / downmix when needed
      -> batch dict of raw samples, zero-padded, with the batch's padded fraction

The batching is this module's own :class:`Batcher` (not lhotse's sampler: its docstring says
why); lhotse is used upstream, for the corpus manifests and cuts the writer shards.

NOTE: shards are written in corpus order, so one shard holds a few consecutive
speakers; reading several at once into one shuffle buffer is what gives a batch
several speakers. Mixing also happens through the per-epoch shard order and across
ranks and workers.

NOTE: a worker emits its shard groups one after another: at the end of a group the
shuffle buffer and the buckets are drained (leftovers packed together by length)
before the next group is read. The batching randomness (crops, shuffle buffer) is
seeded per (seed, epoch, the group's first shard as index.json names it), so a
re-read group gives the same batches as the first time, wherever the split's
directory lives. A batch's ``position`` says how many of the worker's shards are
fully emitted and how many batches of its unfinished group were handed out before
it and with it. A resumed worker skips the finished shards, re-reads the unfinished
group and drops that many batches (decoding them, so that its skip counters stay
those of an unbroken run): the batches after a resume are the unbroken run's, batch
for batch. A position without ``batches_in_group`` resumes at the group's start.

NOTE: a position counts in one shard order and one split of it, so the loader's
state (:meth:`ShardLoader.state_dict`) records what it was taken with: the index's
digest, the seed, world size, rank, ranks per node, number of workers and the
batching settings. :meth:`ShardLoader.load_state_dict` uses it only where they all
match; otherwise :attr:`ShardLoader.position_note` names what differs and what is
kept: another index or seed starts at epoch 0; another shard assignment (world size,
rank, ranks per node, workers) starts at the beginning of the saved epoch; other
batching settings resume each worker at the start of its unfinished group.

NOTE: a worker that reads as many shards in a row as it has in an epoch (at least
one) without producing a batch raises DataError naming the rank, the worker, the
shards and the skip counts; an endless stream would otherwise loop over them without
a word. From a DataLoader worker, torch re-raises it in the iterating process.

NOTE: ranks get unequal numbers of batches. Training uses ``epochs=None``, an endless
stream driven by the step count, so no rank runs dry while another waits in a
collective. Finite ``epochs`` are for validation and tests.

The loader (:class:`ShardLoader`) watches the batches it hands out: ``state_dict()``
is each worker's latest position as the trainer consumed it, not as the workers
prefetched (what a checkpoint stores), ``load_state_dict()`` resumes from one before
iterating, ``start_at_epoch()`` starts every worker at an epoch's beginning, and
``counters()`` sums the workers' counters.

Batch keys:
    audio        FloatTensor [B, T], zero-padded
    audio_lens   LongTensor [B], samples
    cut_ids      list[str], the shard keys
    seconds      float, unpadded audio seconds in the batch
    pad_frac     float, padded samples / all samples of ``audio`` (B x T): 1 - sum(audio_lens) / (B x T)
    worker       int, the DataLoader worker id (0 with num_workers=0): per-worker counters add up across ids
    epoch        int, that worker's current epoch over its shards
    shards_done  int, shards of that epoch the worker has fully emitted, this batch included
    position     {"worker", "epoch", "shards_done", "batches_in_group", "interleave_shards",
                 "skipped_by_reason", "repaired_by_reason"}: where that worker resumes (the
                 loader's state_dict() keeps the latest per worker), counters as of the start
                 of its unfinished group
    skipped      int, members (or shards) skipped by that worker so far (a resumed worker goes on counting)
    skipped_by_reason   {reason: count}, reasons from istack_ds.data.tario.SKIP_REASONS
    repaired_by_reason  {reason: count}: resampled, downmixed, too_long (cropped to data.crop_seconds)
"""

from __future__ import annotations

import bisect
import copy
import io
import math
import random
import warnings
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from istack_ds.batching import BatchPlan
from istack_ds.config import DataConfig
from istack_ds.data.index import DataError, ShardIndex, check_shard_count, read_index
from istack_ds.data.tario import MIN_MEMBER_SAMPLES, BadMember, iter_tar_samples, member_meta, to_mono_rate
from istack_ds.dist import ranks_per_node

#: Shortest cut, in samples at data.sample_rate, handed out by default (the trainer passes its teacher's
#: receptive field): the writer's minimum, the receptive field of the default SFM CNN front end.
MIN_SAMPLES = MIN_MEMBER_SAMPLES

#: What a saved position counts in, as :meth:`ShardLoader.state_dict` records it (key -> how a note names it).
#: Another index or seed is another shard order: the position means nothing in it.
ORDER_KEYS = {"index": "index digest", "seed": "run.seed"}
#: The same order split otherwise: this rank's workers read other shards; the epoch still means the same.
ASSIGNMENT_KEYS = {
    "world_size": "world size",
    "rank": "rank",
    "ranks_per_node": "ranks per node",
    "num_workers": "data.num_workers",
}


@dataclass(frozen=True)
class DataCounters:
    """The loader's counters over the batches it handed out, all workers together (for the training log)."""

    epoch: int = 0
    """The lowest current epoch of the workers (0 before any batch)."""
    shards_done: int = 0
    """Shards of their current epochs the workers have fully emitted, summed."""
    skipped: int = 0
    """Members (or shards) skipped, summed over the workers."""


class ShardLoader(torch.utils.data.DataLoader):
    """A DataLoader over a ShardStream that keeps each worker's latest position and counters.

    Every batch it yields is noted (per worker: each counts separately), so that
    :meth:`state_dict` is what a checkpoint saves and :meth:`load_state_dict`, called
    before iterating, resumes from it.
    """

    dataset: ShardStream
    resumed: bool = False
    """True when the workers resume at loaded positions; False: they start at the beginning of an epoch."""
    position_note: str = ""
    """What of a loaded position was not used, why, and what was kept (empty when all of it was, or none given)."""
    restart_epoch: int | None = 0
    """The epoch whose beginning every worker starts at (0 fresh); None when they resume at loaded positions."""

    def __init__(self, dataset: ShardStream, **kwargs):
        super().__init__(dataset, **kwargs)
        self._positions: dict[str, dict] = {}  # str(worker) -> its latest batch["position"]
        self._latest: dict[int, dict] = {}  # worker -> its latest epoch / shards_done / skipped
        self._next_worker = 0  # whose batch the caller takes next (the DataLoader serves workers in turn)
        self._first_worker = 0  # whose batch comes first from this iterator (a resume goes on where it was)

    def __iter__(self) -> Iterator[dict]:  # type: ignore[override]  # batches, noted on the way
        # NOTE: the DataLoader draws its base seed from the loader's own generator (build_loader), never
        # from the global torch RNG, so iterating does not move a training run's RNG stream.
        return self._noted(super().__iter__())

    def _noted(self, batches) -> Iterator[dict]:
        """The DataLoader's batches in the order an uninterrupted iterator would have given them.

        The DataLoader serves its workers in turn from worker 0; a resumed stream must go on from
        the worker after the last one taken, so the batches of workers before it are held back
        (at most one each) until their turn. Finite streams end by handing out what is held.
        """
        n = max(1, self.num_workers)
        expected = self._first_worker
        held: dict[int, deque] | None = {w: deque() for w in range(n)} if expected else None
        for batch in batches:
            if held is None:
                yield self._note(batch)
                continue
            held[int(batch.get("worker", 0))].append(batch)
            while held[expected]:
                yield self._note(held[expected].popleft())
                expected = (expected + 1) % n
        while held is not None and any(held.values()):
            if held[expected]:
                yield self._note(held[expected].popleft())
            expected = (expected + 1) % n

    def _note(self, batch: dict) -> dict:
        # NOTE: noted as the caller takes them, so the state is what the trainer consumed, never what
        # the workers prefetched.
        worker = int(batch.get("worker", 0))
        self._latest[worker] = {k: batch[k] for k in ("epoch", "shards_done", "skipped") if k in batch}
        if "position" in batch:
            self._positions[str(worker)] = dict(batch["position"])
        self._next_worker = (worker + 1) % max(1, self.num_workers)
        return batch

    def binding(self) -> dict:
        """What a position counts in: index digest, seed, world size, rank, ranks per node, workers, batching."""
        stream = self.dataset
        return {
            "index": stream.index_digest,
            "seed": stream.seed,
            "world_size": stream.world_size,
            "rank": stream.rank,
            "ranks_per_node": stream.local_world_size,
            "num_workers": self.num_workers,
            "batching": stream.batching(),
        }

    def state_dict(self) -> dict:
        """What a checkpoint stores (JSON-safe): :meth:`binding`, each worker's latest position (a worker that
        has handed out nothing yet: where it starts) and the worker whose batch comes next."""
        return {**self.binding(), "positions": copy.deepcopy(self._positions), "next_worker": self._next_worker}

    def load_state_dict(self, state: dict) -> None:
        """Resumes each worker from `state` (a :meth:`state_dict`) where it fits; call before iterating.

        Every field of :meth:`binding` is compared; on a difference :attr:`position_note` names
        it and what is kept: another index or seed starts the stream at epoch 0; another world
        size, rank, ranks per node or number of workers starts at the beginning of the saved
        epoch (the lowest of the workers'); other batching settings resume each worker at the
        start of its unfinished shard group. A rank file written before positions were bound,
        ``{"num_workers": n, "positions": {...}}`` or ``{"data_position": {...}, "num_workers": n}``,
        resumes when the number of workers matches and starts at epoch 0 otherwise.
        """
        positions = state["positions"] if "positions" in state else state.get("data_position")
        if "index" not in state:
            saved = state.get("num_workers")
            if saved == self.num_workers:
                self.resume_from(positions)
            else:
                self.start_at_epoch(
                    0,
                    f"data.num_workers {saved} -> {self.num_workers} (a position saved without its index "
                    "binding): the stream starts at epoch 0",
                )
            return
        now = self.binding()
        order = [
            f"{name} {_short(state.get(k))} -> {_short(now[k])}"
            for k, name in ORDER_KEYS.items()
            if state.get(k) != now[k]
        ]
        split = [f"{name} {state.get(k)} -> {now[k]}" for k, name in ASSIGNMENT_KEYS.items() if state.get(k) != now[k]]
        saved_batching = state.get("batching") or {}
        batching = [
            f"{_setting(k)} {saved_batching.get(k)} -> {v}"
            for k, v in now["batching"].items()
            if saved_batching.get(k) != v
        ]
        changed = ", ".join(order + split + batching)
        if order:
            self.start_at_epoch(
                0, f"{changed}: the saved position counts in another shard order; the stream starts at epoch 0"
            )
        elif split:
            epoch = state_epoch(state)
            self.start_at_epoch(
                epoch,
                f"{changed}: this rank's workers read other shards; the stream starts at the beginning of the saved "
                f"epoch {epoch} (epoch kept, position in it reset)",
            )
        elif batching:
            # The shard counts still hold; the batches of a re-read group do not, so none is dropped.
            regrouped = {w: {**p, "batches_in_group": 0} for w, p in (positions or {}).items() if isinstance(p, dict)}
            self.resume_from(regrouped or positions)
            if self.resumed:
                self.position_note = "; ".join(
                    n
                    for n in (
                        f"{changed}: each worker resumes at the start of its unfinished shard group (epoch and "
                        "shards kept; that group's batches differ from an uninterrupted run's)",
                        self.position_note,
                    )
                    if n
                )
        else:
            self.resume_from(positions)
            if self.resumed:
                self._first_worker = self._next_worker = int(state.get("next_worker", 0)) % max(1, self.num_workers)

    def resume_from(self, position: dict | None) -> None:
        """Starts each worker at `position` (str(worker) -> its latest ``batch["position"]``) when it fits.

        A position for other workers (or a malformed one) is not used: a warning and
        :attr:`position_note` say why, and the stream starts from epoch 0.
        """
        start, note = resume_points(position, max(1, self.num_workers))
        if note:
            warnings.warn(f"data position not used, starting from epoch 0: {note}", stacklevel=3)
        interleave = self.dataset.data.interleave_shards
        regrouped = sorted({c.interleave_shards for c in start.values()} - {interleave})
        if regrouped:
            # Groups are formed from each worker's resume point on, so no cut is lost or repeated
            # beyond the unfinished group; only the batches differ from an uninterrupted run's.
            note = (
                f"data position saved with data.interleave_shards={regrouped}, this run reads "
                f"{interleave} shards at once: resuming at the saved shard counts, "
                "with batches that differ from an uninterrupted run's"
            )
            warnings.warn(note, stacklevel=3)
            for c in start.values():
                if c.interleave_shards != interleave:
                    c.batches_in_group = 0  # counted in other groups
        self.dataset.start = start
        # Every worker has a position from the start, so a save before some worker handed out a batch
        # still holds them all.
        self._positions = {str(int(w)): dict(p) for w, p in (position or {}).items()} if start else self._epoch_start(0)
        self.resumed, self.position_note = bool(start), note
        self.restart_epoch = None if start else 0
        self._first_worker = self._next_worker = 0

    def _epoch_start(self, epoch: int) -> dict[str, dict]:
        """Each worker's position at the beginning of `epoch`."""
        positions = {}
        for w in range(max(1, self.num_workers)):
            counters = WorkerCounters(worker=w, interleave_shards=self.dataset.data.interleave_shards)
            counters.reached(epoch, 0)
            positions[str(w)] = dict(counters.position)
        return positions

    def start_at_epoch(self, epoch: int, note: str) -> None:
        """Starts every worker at the beginning of `epoch`, with counters at 0; call before iterating.

        `note` (what was not used, why, and what was kept) becomes :attr:`position_note`. For a
        checkpoint from another world size the trainer passes the lowest :func:`state_epoch`
        of the old ranks' states.
        """
        if epoch < 0:
            raise ValueError(f"start_at_epoch: epoch {epoch} < 0")
        start = {}
        if epoch:
            for w in range(max(1, self.num_workers)):
                start[w] = WorkerCounters(worker=w, interleave_shards=self.dataset.data.interleave_shards)
                start[w].reached(epoch, 0)
        self.dataset.start = start
        self._positions = self._epoch_start(epoch)  # a save before the first batch keeps the epoch
        self.resumed, self.position_note, self.restart_epoch = False, note, epoch
        self._first_worker = self._next_worker = 0

    def restore(self, rank_state: dict | None, saved_states: list[dict]) -> str:  # TEMPORARY until the merge
        from istack_ds.dist import gather_all, world_size

        if rank_state is not None:
            self.load_state_dict(rank_state.get("data", rank_state))
            restarts = [e for e in gather_all(self.restart_epoch) if e is not None]
            if restarts and (self.resumed or self.restart_epoch != min(restarts)):
                note = self.position_note or "another rank's data position could not be used"
                self.start_at_epoch(min(restarts), f"{note} (every rank restarts at epoch {min(restarts)})")
            return self.position_note or "resumed at the saved position"
        epoch = min((state_epoch(s.get("data", s)) for s in saved_states), default=0)
        note = (
            f"saved by {len(saved_states)} rank(s), read by {world_size()}: each rank's shards differ, "
            f"so the stream restarts at the start of epoch {epoch} (the lowest epoch any saving worker was in)"
        )
        self.start_at_epoch(epoch, note)
        return note

    def counters(self) -> DataCounters:
        """Epoch (lowest), shards done and skips (summed) over the workers' latest batches."""
        latest = self._latest.values()
        return DataCounters(
            epoch=min((d.get("epoch", 0) for d in latest), default=0),
            shards_done=sum(d.get("shards_done", 0) for d in latest),
            skipped=sum(d.get("skipped", 0) for d in latest),
        )


def _short(value) -> str:
    """A digest cut to its first 12 characters for a note; other values as they are."""
    return f"{value[:12]}.." if isinstance(value, str) and len(value) > 12 else str(value)


def _setting(key: str) -> str:
    """How a note names a batching setting: the config key where there is one."""
    return {"crop": "crop", "min_samples": "min_samples", "micro_batch": "micro-batch"}.get(key, f"data.{key}")


def state_epoch(state: dict) -> int:
    """The lowest epoch of the workers in a saved loader state, any format (0 when it holds no position)."""
    positions = state.get("positions", state.get("data_position")) or {}
    try:
        return max(0, min((int(p["epoch"]) for p in positions.values()), default=0))
    except (KeyError, TypeError, ValueError, AttributeError):
        return 0


def build_loader(
    data: DataConfig,
    index_path: str,
    *,
    rank: int,
    world_size: int,
    seed: int,
    epochs: int | None = None,
    crop: bool = True,
    position: dict | None = None,
    local_world_size: int | None = None,
    min_samples: int = MIN_SAMPLES,
    plan: BatchPlan | None = None,
) -> ShardLoader:
    """The DataLoader of this rank over the shards of `index_path`.

    `epochs=None` streams forever (each epoch reshuffles the shard order from
    (seed, epoch)); an int stops after that many passes. `position` maps
    str(worker) -> the latest ``batch["position"]`` of that worker (JSON round
    trip is fine; see :meth:`ShardLoader.resume_from`); a checkpoint's state goes
    through :meth:`ShardLoader.load_state_dict` instead. `local_world_size` (ranks per
    node; default $LOCAL_WORLD_SIZE, else all ranks on one node) splits the shards
    by node first. Cuts shorter than `min_samples` samples at data.sample_rate (after
    the crop) are skipped and counted as ``too_short``. `plan` (istack_ds.batching.plan_batches) sets the
    micro-batch: `plan.micro` seconds, or exactly `plan.micro` cuts with a shard group's remainder left out
    (``batch_remainder``); default `data.batch_seconds` seconds. Raises DataError when the index
    is unusable, a shard is missing on disk, or there are fewer shards than nodes x
    ranks x workers.
    """
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    if local_world_size is None:
        local_world_size = ranks_per_node(world_size)
    if local_world_size <= 0 or world_size % local_world_size:
        raise DataError(f"local_world_size {local_world_size} does not divide world_size {world_size}")
    index = read_index(index_path)
    check_shard_count(index, world_size, data.num_workers, local_world_size=local_world_size)
    dataset = ShardStream(
        shards=[(s.path, s.samples) for s in index.shards],
        names=[s.name for s in index.shards],
        index_digest=index.digest,
        data=data,
        rank=rank,
        world_size=world_size,
        local_world_size=local_world_size,
        seed=seed,
        epochs=epochs,
        crop=crop,
        duration_bins=duration_bins(index, data.num_buckets, data.crop_seconds if crop else None),
        min_samples=min_samples,
        plan=plan,
    )
    # Workers prefetch batches while the trainer computes; on a GPU, pinned batches copy asynchronously.
    loader = ShardLoader(
        dataset,
        batch_size=None,
        num_workers=data.num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        # its own generator: the workers' base seed (unused by the stream) must not draw from the global RNG
        generator=torch.Generator().manual_seed(seed),
    )
    loader.resume_from(position)
    return loader


def resume_points(position: dict | None, workers: int) -> tuple[dict[int, WorkerCounters], str]:
    """{worker: counters to start from} from a saved position, or ({}, why not) when it does not fit.

    A position saved before the counters were part of it starts them at 0; one saved
    before ``batches_in_group`` resumes at the start of its unfinished group.
    """
    if not position:
        return {}, ""

    def counts(saved: dict) -> Counter:
        return Counter({reason: int(n) for reason, n in saved.items()})

    try:
        points = {
            int(w): WorkerCounters(
                worker=int(w),
                epoch=int(p["epoch"]),
                shards_done=int(p["shards_done"]),
                batches_in_group=int(p.get("batches_in_group", 0)),
                # positions saved before shard groups existed read one shard at a time
                interleave_shards=int(p.get("interleave_shards", 1)),
                skipped=counts(p.get("skipped_by_reason", {})),
                repaired=counts(p.get("repaired_by_reason", {})),
            )
            for w, p in position.items()
        }
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return {}, f"malformed position {position!r} ({e!r})"
    if sorted(points) != list(range(workers)):
        return {}, f"it is for workers {sorted(points)}, this loader has {workers} (data.num_workers)"
    if any(c.epoch < 0 or c.shards_done < 0 or c.batches_in_group < 0 for c in points.values()):
        return {}, f"negative epoch, shards_done or batches_in_group in {position!r}"
    return points, ""


def duration_bins(index: ShardIndex, num_buckets: int, crop_seconds: float | None) -> list[float]:
    """Bucket boundaries that split the audio seconds evenly, from the index's duration histogram."""
    counts = np.asarray(index.duration_histogram, dtype=np.float64)
    centers = (np.arange(len(counts)) + 0.5) * index.bin_seconds
    if crop_seconds is not None:
        centers = np.minimum(centers, crop_seconds)
    if num_buckets <= 1 or counts.sum() == 0:
        return [float(centers.max())] if len(centers) else [1.0]
    mass = np.cumsum(counts * centers)
    targets = mass[-1] * np.arange(1, num_buckets) / num_buckets
    picks = np.searchsorted(mass, targets)
    return sorted({round(float(centers[min(i + 1, len(centers) - 1)]), 3) for i in picks})


@dataclass
class WorkerCounters:
    """One worker's place in its stream and its counters; `position` is where it resumes."""

    worker: int = 0
    epoch: int = 0
    shards_done: int = 0
    batches_in_group: int = 0
    """Batches of the unfinished group handed out (a resume drops that many of the re-read group)."""
    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    position: dict = field(default_factory=dict)
    interleave_shards: int = 1

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def reached(self, epoch: int, shards_done: int) -> None:
        """`shards_done` whole shards of `epoch` emitted: the resume point, with the counters as of then.

        NOTE: the counters are snapshotted here, not at each batch, so that they are not
        counted twice: a resumed worker re-reads its unfinished group and counts its skips again.
        """
        self.epoch, self.shards_done, self.batches_in_group = epoch, shards_done, 0
        self.position = {
            "worker": self.worker,
            "epoch": epoch,
            "shards_done": shards_done,
            "batches_in_group": 0,
            "interleave_shards": self.interleave_shards,
            "skipped_by_reason": dict(self.skipped),
            "repaired_by_reason": dict(self.repaired),
        }

    def handed_out(self) -> None:
        """One more batch of the unfinished group emitted: a worker resumed here drops it."""
        self.batches_in_group += 1
        self.position["batches_in_group"] = self.batches_in_group

    def stamp(self, batch: dict) -> dict:
        batch.update(
            worker=self.worker,
            epoch=self.epoch,
            shards_done=self.shards_done,
            position=dict(self.position),
            skipped=sum(self.skipped.values()),
            skipped_by_reason=dict(self.skipped),
            repaired_by_reason=dict(self.repaired),
        )
        return batch


def round_robin(iterators: list[Iterator]) -> Iterator:
    """One item from each iterator in turn, dropping each as it ends (deterministic)."""
    active = list(iterators)
    while active:
        for it in list(active):
            try:
                yield next(it)
            except StopIteration:
                active.remove(it)


@dataclass
class Item:
    """A planned cut: the member's FLAC bytes and which source frames to decode."""

    key: str
    flac: bytes
    start: int
    frames: int
    seconds: float


class Batcher:
    """Shuffle buffer -> duration buckets -> batches of at most `limit` seconds, or of `limit` cuts with
    `count` (one shard group at a time).

    A cut leaves the shuffle buffer (`buffer_size` cuts, a random one out once it is full) into
    the bucket of its duration (`bins`: upper bounds in seconds); a bucket that would overflow
    `limit` is emitted first. :meth:`drain` empties it all at the group's end: the buffer's cuts
    through their buckets, then every bucket's leftovers sorted by duration and packed together.
    Every cut added is in exactly one batch, except with `count` and `drop_remainder`: there every
    batch holds exactly `limit` cuts, and the leftovers that fill none (fewer than `limit`) are
    drawn at random, not by length, and put in :attr:`dropped`. The batches depend only on the
    cuts' order and `rng`.

    NOTE: why not lhotse's ``DynamicBucketingSampler`` (lhotse 1.33; measured by
    tools/bench/bench_sampler.py on the same cuts, 2 ranks, one sampler per shard group as
    the exact resume needs; synthetic LibriSpeech-shaped cuts, 2-20 s, default data settings):

    - ``sync_buckets=False`` loses cuts: when no bucket holds a full batch it picks among
      "non-empty" buckets tested with ``if bucket``, and an empty ``queue.Queue`` is truthy, so
      an empty bucket can be picked and the iteration ends with cuts left (739 of 8000 cuts in
      no batch; this Batcher: 0).
    - ``sync_buckets=True`` restarts its bucket RNG (``Random(1234 + worker id)``, whatever the
      seed) with every sampler, and ranks' groups yield different numbers of batches, so per
      group it does not keep ranks in step: rank idle share per step 0.103 against this
      Batcher's 0.045 (cost ~ frames + frames^2 / 1500), 607 batches per epoch against 533
      (fill 0.84 of batch_seconds against 0.955), for a padding fraction of 0.025 against
      0.029. ``quadratic_duration=30`` shrinks long batches: 865 batches. On the demo shards'
      uncropped cuts (3-11 s, 16 s batches) lhotse pads less (0.036 against 0.072) with more
      batches (42 against 37).
    - One sampler over a rank's whole epoch (idle share 0.031) has no resume point inside it
      but lhotse's ``_fast_forward``, which re-reads the epoch from its first shard; the stream's
      position (epoch, shards_done, batches_in_group) re-reads one group.
    - ``collate_audio(fault_tolerant=True)`` drops a cut that fails to load without its reason
      (the skip counters need one, SKIP_REASONS) and does not check non-finite or short bodies;
      ``CutSet.truncate`` adds nothing to :class:`Item`, which already decodes only the
      cropped frames (``start``, ``frames``).
    """

    def __init__(
        self,
        bins: list[float],
        limit: float,
        buffer_size: int,
        rng: random.Random,
        count: bool = False,
        drop_remainder: bool = False,
    ):
        self.bins, self.limit, self.buffer_size, self.rng = bins, limit, max(1, buffer_size), rng
        self.count, self.drop_remainder = count, drop_remainder
        self.dropped: list[Item] = []
        self.buffer: list[Item] = []
        self.buckets: list[list[Item]] = [[] for _ in range(len(bins) + 1)]
        self.filled = [0.0] * (len(bins) + 1)

    def add(self, item: Item) -> list[list[Item]]:
        self.buffer.append(item)
        if len(self.buffer) < self.buffer_size:
            return []
        i = self.rng.randrange(len(self.buffer))
        self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        return self._place(self.buffer.pop())

    def _place(self, item: Item) -> list[list[Item]]:
        b = bisect.bisect_left(self.bins, item.seconds)
        out = []
        if self.buckets[b] and self.filled[b] + self._cost(item) > self.limit:
            out.append(self.buckets[b])
            self.buckets[b], self.filled[b] = [], 0.0
        self.buckets[b].append(item)
        self.filled[b] += self._cost(item)
        return out

    def _cost(self, item: Item) -> float:
        return 1.0 if self.count else item.seconds

    def drain(self) -> list[list[Item]]:
        """Everything held: full buckets as they fill, then the leftovers of all buckets packed by length."""
        self.rng.shuffle(self.buffer)
        out = [batch for item in self.buffer for batch in self._place(item)]
        self.buffer = []
        rest = sorted((it for bucket in self.buckets for it in bucket), key=lambda it: it.seconds)
        self.buckets = [[] for _ in self.buckets]
        self.filled = [0.0] * len(self.buckets)
        if self.count and self.drop_remainder:
            # NOTE: drawn at random: the last of the sorted leftovers would always be the group's longest cuts
            left_out = set(self.rng.sample(range(len(rest)), len(rest) % int(self.limit)))
            self.dropped = [it for i, it in enumerate(rest) if i in left_out]
            rest = [it for i, it in enumerate(rest) if i not in left_out]
        batch: list[Item] = []
        filled = 0.0
        for it in rest:
            if batch and filled + self._cost(it) > self.limit:
                out.append(batch)
                batch, filled = [], 0.0
            batch.append(it)
            filled += self._cost(it)
        if batch:
            out.append(batch)
        return out


class ShardStream(torch.utils.data.IterableDataset):
    """Batches of one rank; each DataLoader worker reads its own subset of that rank's shards."""

    def __init__(
        self,
        *,
        shards: list[tuple[str, int]],
        data: DataConfig,
        rank: int,
        world_size: int,
        local_world_size: int,
        seed: int,
        epochs: int | None,
        crop: bool,
        duration_bins: list[float],
        names: list[str] | None = None,
        index_digest: str = "",
        min_samples: int = MIN_SAMPLES,
        plan: BatchPlan | None = None,
    ):
        super().__init__()
        # What a micro-batch counts and holds at most: seconds of audio, or exactly `limit` cuts.
        self.unit = plan.unit if plan is not None else "seconds"
        self.limit = plan.micro if plan is not None else data.batch_seconds
        self.shards, self.data, self.rank, self.world_size = list(shards), data, rank, world_size
        self.local_world_size = local_world_size
        self.seed, self.epochs, self.crop, self.duration_bins = seed, epochs, crop, duration_bins
        # path -> the shard's name in the index (default: its path), which seeds its group's batching
        self.names = dict(zip((p for p, _ in self.shards), names or (p for p, _ in self.shards)))
        self.index_digest, self.min_samples = index_digest, min_samples
        self.start: dict[int, WorkerCounters] = {}  # worker -> where it resumes (ShardLoader.resume_from sets it)

    def batching(self) -> dict:
        """The settings that, with the shard order, fix a group's batches: an exact resume needs them unchanged."""
        return {
            "crop": self.crop,
            "crop_seconds": self.data.crop_seconds,
            # data.batch_seconds, or the micro-batch data.global_batch gives this world size
            "micro_batch": f"{self.limit:g} {self.unit}",
            "long_cuts": self.data.long_cuts,
            "shuffle_buffer": self.data.shuffle_buffer,
            "num_buckets": self.data.num_buckets,
            "sample_rate": self.data.sample_rate,
            "min_samples": self.min_samples,
        }

    def shards_for(self, epoch: int, worker: int, num_workers: int) -> list[tuple[str, int]]:
        """This worker's shards in `epoch`: one global shuffle, then split by node, rank in node, worker."""
        order = list(self.shards)
        random.Random(f"shards:{self.seed}:{epoch}").shuffle(order)
        nodes = self.world_size // self.local_world_size
        node, local_rank = divmod(self.rank, self.local_world_size)
        return order[node::nodes][local_rank :: self.local_world_size][worker::num_workers]

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counters = copy.deepcopy(self.start.get(worker)) or WorkerCounters(worker=worker)
        counters.interleave_shards = self.data.interleave_shards
        epoch, skip, drop = counters.epoch, counters.shards_done, counters.batches_in_group
        dry: list[str] = []  # shards read in a row (across groups and epochs) without a batch
        while self.epochs is None or epoch < self.epochs:
            shards = self.shards_for(epoch, worker, num_workers)
            if not shards:
                raise DataError(
                    f"rank {self.rank} worker {worker}: no shards in epoch {epoch} (world size "
                    f"{self.world_size}, {num_workers} workers, {len(self.shards)} shards)"
                )
            counters.reached(epoch, min(skip, len(shards)))
            # Groups of `interleave_shards` from the resume point on: a group is read member by member
            # into one shuffle buffer and is the unit of resume (its shards are done together).
            for k in range(counters.shards_done, len(shards), self.data.interleave_shards):
                group = shards[k : k + self.data.interleave_shards]
                end = k + len(group)
                produced = False
                for items, completes in self.planned(epoch, group, counters):
                    decoded = self.decode_all(items, counters)  # decoding may count skips: before `reached`
                    if completes:
                        counters.reached(epoch, end)  # NOTE: the last batch of a group completes it
                    if not decoded:
                        continue
                    produced = True
                    if not completes:
                        counters.handed_out()
                    if drop:
                        # handed out before the resume; decoded all the same, so that skips count as then
                        drop -= 1
                        continue
                    yield counters.stamp(self.collate(decoded))
                drop = 0  # only the group a worker resumes in was partly handed out
                counters.reached(epoch, end)
                dry = [] if produced else dry + [p for p, _ in group]
                if len(dry) >= len(shards):
                    raise DataError(self.stalled(worker, epoch, len(shards), dry, counters))
            drop = 0
            epoch, skip = epoch + 1, 0

    def stalled(self, worker: int, epoch: int, per_epoch: int, dry: list[str], counters: WorkerCounters) -> str:
        """The DataError message of a worker that read `dry` shards in a row without a batch."""
        names = list(dict.fromkeys(dry))
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        return (
            f"rank {self.rank} worker {worker}: no batch from the last {len(dry)} shards read "
            f"({per_epoch} a worker epoch; now in epoch {epoch}): {shown}; skipped so far by reason: "
            f"{dict(counters.skipped)}; check them with tools/check_shards.py"
        )

    def planned(
        self, epoch: int, group: list[tuple[str, int]], counters: WorkerCounters
    ) -> Iterator[tuple[list[Item], bool]]:
        """The batches of one shard group as planned cuts, each with whether it is the group's last."""
        # NOTE: seeded by the shard's name in the index, not its path on disk: moved data, same batches.
        rng = random.Random(f"batches:{self.seed}:{epoch}:{self.names[group[0][0]]}")
        batcher = Batcher(
            self.duration_bins,
            self.limit,
            self.data.shuffle_buffer,
            rng,
            count=self.unit == "utterances",
            # NOTE: training batches hold exactly `limit` cuts (the global batch a step holds); held-out
            # batches keep every cut
            drop_remainder=self.crop,
        )
        for item in round_robin([self.read_shard(path, samples, rng, counters) for path, samples in group]):
            for cuts in batcher.add(item):
                yield cuts, False
        ready = batcher.drain()
        for _ in batcher.dropped:
            counters.skip("batch_remainder")
        for i, cuts in enumerate(ready):
            yield cuts, i == len(ready) - 1

    def read_shard(self, path: str, samples: int, rng: random.Random, counters: WorkerCounters) -> Iterator[Item]:
        """Planned cuts of one shard; bad members and broken tars are counted, never raised."""
        import soundfile as sf

        problems: list[str] = []
        on_error = lambda reason, _msg: problems.append(reason)  # noqa: E731
        target = self.data.sample_rate
        read = 0
        for sample in iter_tar_samples(path, on_error):
            read += 1
            try:
                member_meta(sample)
                try:
                    info = sf.info(io.BytesIO(sample["flac"]))
                except Exception as e:  # noqa: BLE001 -- soundfile raises several types on junk
                    raise BadMember("undecodable_flac", f"{sample['__key__']}: {e}") from None
                if info.frames <= 0 or info.samplerate <= 0:
                    raise BadMember("empty_audio", f"{sample['__key__']}: empty audio")
            except BadMember as e:
                counters.skip(e.reason)
                continue
            sr, frames = info.samplerate, info.frames
            seconds = frames / sr
            if self.crop and self.data.long_cuts == "skip" and seconds > self.data.crop_seconds:
                counters.skip("longer_than_crop")
                continue
            # could never fit a batch of seconds: cut back like a crop
            too_long = self.unit == "seconds" and seconds > self.limit
            start = 0
            if (self.crop or too_long) and seconds > self.data.crop_seconds:
                if self.crop:
                    start = math.floor(rng.uniform(0.0, seconds - self.data.crop_seconds) * sr)
                frames = math.floor(self.data.crop_seconds * sr)
            if -(-frames * target // sr) < self.min_samples:  # its length at `target` (resample_poly rounds up)
                counters.skip("too_short")
                continue
            if sr != target:
                counters.repaired["resampled"] += 1
            if info.channels != 1:
                counters.repaired["downmixed"] += 1
            if too_long:
                counters.repaired["too_long"] += 1
            yield Item(sample["__key__"], sample["flac"], start, frames, frames / sr)
        if not problems and read < samples:
            problems.append("truncated_tar")  # the tar ended cleanly on a header boundary, short of the index
        for reason in problems:
            counters.skip(reason)

    def decode(self, item: Item, counters: WorkerCounters):
        import soundfile as sf

        try:
            with sf.SoundFile(io.BytesIO(item.flac)) as f:
                if item.start:
                    f.seek(item.start)
                audio = f.read(item.frames, dtype="float32", always_2d=True)
                sr = f.samplerate
        except Exception:  # noqa: BLE001 -- a body that does not decode is a counted skip
            counters.skip("undecodable_flac")
            return None
        if audio.shape[0] == 0:
            counters.skip("empty_audio")
            return None
        audio = to_mono_rate(audio, sr, self.data.sample_rate)
        if len(audio) < self.min_samples:  # the body held fewer frames than its header said
            counters.skip("too_short")
            return None
        if not np.isfinite(audio).all():
            counters.skip("non_finite")
            return None
        return audio

    def decode_all(self, items: list[Item], counters: WorkerCounters) -> list[tuple[str, np.ndarray]]:
        """(key, audio) of the items that decode; the others are counted skips."""
        return [(it.key, a) for it in items if (a := self.decode(it, counters)) is not None]

    def collate(self, decoded: list[tuple[str, np.ndarray]]) -> dict:
        """The batch dict of decoded cuts: audio zero-padded to the longest, lengths, keys, seconds, pad_frac."""
        lens = [len(a) for _, a in decoded]
        audio = torch.zeros(len(decoded), max(lens), dtype=torch.float32)
        for row, (_, a) in zip(audio, decoded):
            row[: len(a)] = torch.from_numpy(a)
        batch = {
            "audio": audio,
            "audio_lens": torch.tensor(lens, dtype=torch.long),
            "cut_ids": [k for k, _ in decoded],
            "seconds": sum(lens) / self.data.sample_rate,
            "pad_frac": 1.0 - sum(lens) / audio.numel(),
        }
        return batch
