"""The loader the trainer iterates: a DataLoader over a :class:`ShardStream` that keeps its own resumable state.

The loader (:class:`ShardLoader`) watches the batches it hands out: ``state_dict()`` is each worker's latest
position as the trainer consumed it, not as the workers prefetched (what a checkpoint stores),
``load_state_dict()`` resumes from one before iterating, ``restore()`` is the whole restore of a checkpoint
(the cross-rank agreement included), ``start_at_epoch()`` starts every worker at an epoch's beginning, and
``counters()`` sums the workers' counters.

NOTE: a position counts in one shard order and one split of it, so the loader's state records what it was
taken with: the index's digest, the seed, world size, rank, ranks per node, number of workers and the batching
settings. :meth:`ShardLoader.load_state_dict` uses it only where they all match; otherwise
:attr:`ShardLoader.position_note` names what differs and what is kept (:func:`~istack_ds.data.position.resume_plan`
decides): another index or seed starts at epoch 0; another shard assignment (world size, rank, ranks per node,
workers) starts at the beginning of the saved epoch; other batching settings resume each worker at the start of
its unfinished group.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from istack_ds.batching import BatchPlan
from istack_ds.config import DataConfig
from istack_ds.data.batcher import duration_bins
from istack_ds.data.index import DataError, check_shard_count, read_index
from istack_ds.data.position import (
    WorkerCounters,
    epoch_start,
    resume_plan,
    resume_points,
    state_epoch,
    upgrade_state,
)
from istack_ds.data.stream import MIN_SAMPLES, ShardStream
from istack_ds.dist import gather_all, ranks_per_node
from istack_ds.phase import waiting
from istack_ds.preemption import ignore_in_worker, signals_blocked


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
        with signals_blocked():  # the workers start here: born with SIGTERM / SIGUSR1 blocked (ignore_in_worker)
            batches = super().__iter__()
        return self._noted(batches)

    def _noted(self, batches) -> Iterator[dict]:
        """The DataLoader's batches in the order an uninterrupted iterator would have given them.

        The DataLoader serves its workers in turn from worker 0; a resumed stream must go on from
        the worker after the last one taken, so the batches of workers before it are held back
        (at most one each) until their turn. Finite streams end by handing out what is held.
        """
        n = max(1, self.num_workers)
        expected = self._first_worker
        held: dict[int, deque] | None = {w: deque() for w in range(n)} if expected else None
        for batch in self._waited(batches):
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

    def _waited(self, batches) -> Iterator[dict]:
        """The DataLoader's batches, each waited for in phase ``data`` (:mod:`istack_ds.phase`, which the heartbeat
        reports); the DataLoader's timeout (data.read_timeout_s) becomes a DataError naming this rank, the worker
        and its shards."""
        it = iter(batches)
        while True:
            try:
                with waiting("data"):
                    batch = next(it)
            except StopIteration:
                return
            except RuntimeError as e:
                if "DataLoader timed out" not in str(e):
                    raise
                raise DataError(self.timed_out(it)) from None
            yield batch

    def timed_out(self, it) -> str:
        """The message of a read that outlasted data.read_timeout_s: the worker waited for and its shard group (the
        rank is named by :func:`istack_ds.dist.next_on_all_ranks`)."""
        task = getattr(it, "_task_info", {}).get(getattr(it, "_rcvd_idx", None))  # torch's: whose batch is due
        worker = int(task[0]) if task else self._next_worker
        stream = self.dataset
        position = self._positions.get(str(worker)) or vars(stream.start.get(worker) or WorkerCounters())
        epoch, done = int(position.get("epoch", 0)), int(position.get("shards_done", 0))
        shards = stream.shards_for(epoch, worker, max(1, self.num_workers))
        group = shards[done : done + stream.data.interleave_shards]
        return (
            f"DataLoader worker {worker} gave no batch in {self.timeout:g} s "
            f"(data.read_timeout_s): a shard read hangs or is very slow; its shard group in epoch {epoch}: "
            + (", ".join(path for path, _ in group) or "none left")
        )

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
        start of its unfinished shard group (:func:`~istack_ds.data.position.resume_plan`). `state` may
        be of any format :func:`~istack_ds.data.position.upgrade_state` reads: a state saved before
        positions were bound resumes when the number of workers matches and starts at epoch 0 otherwise.
        """
        plan = resume_plan(state, self.binding())
        if plan.restart_epoch is not None:
            self.start_at_epoch(plan.restart_epoch, plan.note)
            return
        self.resume_from(plan.positions)
        if self.resumed:
            self.position_note = "; ".join(n for n in (plan.note, self.position_note) if n)
            self._first_worker = self._next_worker = plan.next_worker % max(1, self.num_workers)

    def restore(self, rank_state: dict | None, saved_states: list[dict]) -> str:
        """The whole restore of a checkpoint's data position; returns the note the trainer logs.

        `rank_state` is this rank's saved rank file (any format, :func:`~istack_ds.data.position.upgrade_state`),
        None when the checkpoint was saved by another world size (or without this rank's file); then
        `saved_states` (every saving rank's rank file) give the epoch: the stream restarts at the lowest
        epoch any saving worker was in, the shard assignment having changed.

        NOTE: a collective on every rank. A position is used on every rank or on none: if any rank
        restarts its stream, every rank restarts at the lowest epoch the restarting ranks keep.
        """
        if rank_state is not None:
            self.load_state_dict(rank_state)
        else:
            states = [upgrade_state(s) for s in saved_states]
            epoch = min((state_epoch(s) for s in states), default=0)
            saved_world = next((s["world_size"] for s in states if "world_size" in s), len(states))
            self.start_at_epoch(
                epoch,
                f"saved by {saved_world} rank(s), read by {self.dataset.world_size}: each rank's shards differ, "
                f"so the stream restarts at the start of epoch {epoch} (the lowest epoch any saving worker was in)",
            )
        restarts = [e for e in gather_all(self.restart_epoch) if e is not None]
        if restarts and (self.resumed or self.restart_epoch != min(restarts)):
            note = self.position_note or "another rank's data position could not be used"
            self.start_at_epoch(min(restarts), f"{note} (every rank restarts at epoch {min(restarts)})")
        return self.position_note or "resumed at the saved position"

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
        start = epoch_start(epoch, self.num_workers, self.dataset.data.interleave_shards)
        return {str(w): dict(c.position) for w, c in start.items()}

    def start_at_epoch(self, epoch: int, note: str) -> None:
        """Starts every worker at the beginning of `epoch`, with counters at 0; call before iterating.

        `note` (what was not used, why, and what was kept) becomes :attr:`position_note`. For a
        checkpoint from another world size :meth:`restore` passes the lowest :func:`state_epoch`
        of the old ranks' states.
        """
        if epoch < 0:
            raise ValueError(f"start_at_epoch: epoch {epoch} < 0")
        self.dataset.start = epoch_start(epoch, self.num_workers, self.dataset.data.interleave_shards) if epoch else {}
        self._positions = self._epoch_start(epoch)  # a save before the first batch keeps the epoch
        self.resumed, self.position_note, self.restart_epoch = False, note, epoch
        self._first_worker = self._next_worker = 0

    def counters(self) -> DataCounters:
        """Epoch (lowest), shards done and skips (summed) over the workers' latest batches."""
        latest = self._latest.values()
        return DataCounters(
            epoch=min((d.get("epoch", 0) for d in latest), default=0),
            shards_done=sum(d.get("shards_done", 0) for d in latest),
            skipped=sum(d.get("skipped", 0) for d in latest),
        )


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
        worker_init_fn=ignore_in_worker,  # a launcher's SIGTERM to the rank's tree must not end it mid-step
        timeout=data.read_timeout_s if data.num_workers else 0,  # a hung read becomes a DataError (_waited)
    )
    loader.resume_from(position)
    return loader


def build_held_out_loader(
    data: DataConfig, index_path: str, *, rank: int, world_size: int, seed: int, min_samples: int = MIN_SAMPLES
) -> ShardLoader:
    """One pass over a held-out split, whole cuts (no crop, no plan: every cut kept).

    A held-out split is small: with fewer shards than ranks x workers, fewer workers read it
    (``check_shard_count(held_out=True)``; preflight made sure every rank has at least one shard).
    """
    workers = check_shard_count(read_index(index_path), world_size, data.num_workers, held_out=True)
    return build_loader(
        dataclasses.replace(data, num_workers=workers),
        index_path,
        rank=rank,
        world_size=world_size,
        seed=seed,
        epochs=1,
        crop=False,
        min_samples=min_samples,
    )
