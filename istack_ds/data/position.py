"""Where each worker reads and where it resumes: the pure position bookkeeping of the stream and its loader.

No I/O and no torch, so that ``istack train --dry-run`` can import it:

- :func:`assigned_shards` is THE shard-assignment rule (which shards a node, a rank in it and a DataLoader
  worker of that rank read, from one shuffled order); the stream reads by it and :func:`shards_per_worker`
  (the dry run's count) counts by it, so they cannot disagree.
- :class:`WorkerCounters` is one worker's place (epoch, shards done, batches of its unfinished group) and its
  skip / repair counters; ``position`` is what a batch carries and a checkpoint stores.
- :func:`upgrade_state` reads a saved loader state of any format (a rank file, today's state, the legacy ones);
  :func:`resume_plan` decides, from it and what the loader counts in now, whether the workers resume at the
  saved positions, regrouped, or restart at an epoch, with the note that says why;
  :func:`resume_points` turns saved positions into the workers' counters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

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


def assigned_shards(
    order: Sequence[T], *, rank: int, world_size: int, ranks_per_node: int, worker: int, num_workers: int
) -> list[T]:
    """The shards of `order` (one epoch's shuffled shard list) that `worker` of `rank` reads.

    Every nodes-th shard to a node, every ranks_per_node-th of those to a rank in the node, every
    num_workers-th of those to a worker. NOTE: the one rule: the stream reads by it, the dry run counts by it.
    """
    nodes = world_size // ranks_per_node
    node, local_rank = divmod(rank, ranks_per_node)
    return list(order[node::nodes][local_rank::ranks_per_node][worker::num_workers])


def shards_per_worker(shards: int, world_size: int, ranks_per_node: int, workers: int) -> list[int]:
    """How many of `shards` each worker of each rank reads per epoch (rank-major), by :func:`assigned_shards`."""
    order = range(shards)
    return [
        len(
            assigned_shards(
                order, rank=r, world_size=world_size, ranks_per_node=ranks_per_node, worker=w, num_workers=workers
            )
        )
        for r in range(world_size)
        for w in range(workers)
    ]


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


def epoch_start(epoch: int, workers: int, interleave_shards: int) -> dict[int, WorkerCounters]:
    """Each of `workers` workers' counters at the beginning of `epoch` (counts at 0)."""
    start = {}
    for w in range(max(1, workers)):
        start[w] = WorkerCounters(worker=w, interleave_shards=interleave_shards)
        start[w].reached(epoch, 0)
    return start


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


def upgrade_state(saved: dict) -> dict:
    """A saved loader state of any format in today's: what :meth:`ShardLoader.state_dict` returns, or, for a state
    saved before positions were bound to an index, ``{"num_workers": n, "positions": {...}}``.

    Reads a whole rank file (the loader's state under ``"data"``), a rank file written before the loader kept its
    own state (the loader's keys at the top), and a position saved as ``"data_position"`` instead of
    ``"positions"``.
    """
    state = saved.get("data", saved)
    if "positions" not in state and "data_position" in state:
        state = {k: v for k, v in state.items() if k != "data_position"} | {"positions": state["data_position"]}
    return state


def state_epoch(state: dict) -> int:
    """The lowest epoch of the workers in a saved loader state, any format (0 when it holds no position)."""
    positions = upgrade_state(state).get("positions") or {}
    try:
        return max(0, min((int(p["epoch"]) for p in positions.values()), default=0))
    except (KeyError, TypeError, ValueError, AttributeError):
        return 0


@dataclass(frozen=True)
class ResumePlan:
    """What a loader does with a saved state (:func:`resume_plan`)."""

    restart_epoch: int | None
    """Every worker starts at this epoch's beginning; None: the workers resume at `positions`."""
    positions: dict | None = None
    """str(worker) -> its saved position, to resume from (when `restart_epoch` is None)."""
    note: str = ""
    """What of the saved state is not used, why, and what is kept ("" when all of it is)."""
    next_worker: int = 0
    """The worker whose batch comes first after the resume."""


def resume_plan(state: dict, now: dict) -> ResumePlan:
    """How to use a saved loader state (any format) given `now`, what the loader counts in today (its binding).

    Every field of the binding is compared: another index or seed restarts at epoch 0; another world
    size, rank, ranks per node or number of workers restarts at the beginning of the saved epoch (the
    lowest of the workers'); other batching settings resume each worker at the start of its unfinished
    shard group. A state saved without its binding resumes when the number of workers matches and
    restarts at epoch 0 otherwise.
    """
    state = upgrade_state(state)
    positions = state.get("positions")
    if "index" not in state:
        saved = state.get("num_workers")
        if saved == now["num_workers"]:
            return ResumePlan(None, positions)
        return ResumePlan(
            0,
            note=f"data.num_workers {saved} -> {now['num_workers']} (a position saved without its index "
            "binding): the stream starts at epoch 0",
        )
    order = [
        f"{name} {_short(state.get(k))} -> {_short(now[k])}" for k, name in ORDER_KEYS.items() if state.get(k) != now[k]
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
        return ResumePlan(
            0, note=f"{changed}: the saved position counts in another shard order; the stream starts at epoch 0"
        )
    if split:
        epoch = state_epoch(state)
        return ResumePlan(
            epoch,
            note=f"{changed}: this rank's workers read other shards; the stream starts at the beginning of the saved "
            f"epoch {epoch} (epoch kept, position in it reset)",
        )
    if batching:
        # The shard counts still hold; the batches of a re-read group do not, so none is dropped.
        regrouped = {w: {**p, "batches_in_group": 0} for w, p in (positions or {}).items() if isinstance(p, dict)}
        return ResumePlan(
            None,
            regrouped or positions,
            note=f"{changed}: each worker resumes at the start of its unfinished shard group (epoch and "
            "shards kept; that group's batches differ from an uninterrupted run's)",
        )
    return ResumePlan(None, positions, next_worker=int(state.get("next_worker", 0)))


def _short(value) -> str:
    """A digest cut to its first 12 characters for a note; other values as they are."""
    return f"{value[:12]}.." if isinstance(value, str) and len(value) > 12 else str(value)


def _setting(key: str) -> str:
    """How a note names a batching setting: the config key where there is one."""
    return {"crop": "crop", "min_samples": "min_samples", "micro_batch": "micro-batch"}.get(key, f"data.{key}")
