"""Planning a sharding run: shard sizes and names, the keys met across splits, what a split's first pass finds.

Everything here is decided before any shard is written, the same way by every job of a run split over
machines (``--part``), so that every job plans the same shards (:mod:`istack_ds.data.writer` writes them,
:mod:`istack_ds.data.parts` names which job writes which and merges their indexes).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from istack_ds.data.index import HISTOGRAM_BIN_SECONDS, DataError

SHARD_PATTERN = "shard-%06d.tar"


def plan_shards(
    durations: Iterable[float], *, sample_rate: int, shard_mb: float, max_per_shard: int | None, min_shards: int
) -> list[int]:
    """Sizes (cut counts) of consecutive shards, in one pass over the durations.

    Greedy: a shard closes before it would exceed `shard_mb` (estimated as 16-bit
    PCM, an upper bound of the FLAC size) or `max_per_shard` cuts. If that gives
    fewer than `min_shards` shards (small splits), the cuts are spread evenly over
    min(min_shards, cuts) shards instead, so that ranks x workers can be fed.
    """
    limit = shard_mb * 1e6
    sizes, count, size, n = [], 0, 0.0, 0
    for d in durations:
        n += 1
        est = d * sample_rate * 2 + 1536  # samples + tar/json overhead
        if count and (size + est > limit or (max_per_shard and count >= max_per_shard)):
            sizes.append(count)
            count, size = 0, 0.0
        count += 1
        size += est
    if count:
        sizes.append(count)
    want = min(min_shards, n)
    if len(sizes) < want:
        sizes = [n // want + (1 if i < n % want else 0) for i in range(want)]
    return sizes


def keys_digest(cuts: list[dict], dropped: list[dict]) -> str:
    """The sha256 of a shard's planned cut keys and windows (and the cuts left out): its ``keys_sha256``."""
    lines = "".join(f"{c['id']} {c['start']:.4f} {c['duration']:.4f}\n" for c in cuts)
    lines += "".join(f"{d['reason']} {d['name']}\n" for d in dropped)  # none dropped: the digest it always had
    return hashlib.sha256(lines.encode()).hexdigest()


def key_hashes(keys: Iterable[str]) -> array:
    """A stable 64-bit hash per key (blake2b), 8 bytes each: what duplicate detection keeps of every key."""
    return array("Q", (int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys))


def repeated_hashes(hashes: Iterable[array]) -> set[int]:
    """The hashes found more than once over all `hashes` (the keys that may be duplicates; compare the keys)."""
    import numpy as np

    parts = [np.frombuffer(h, dtype=np.uint64) for h in hashes if len(h)]
    if not parts:
        return set()
    a = np.sort(np.concatenate(parts))
    return {int(x) for x in np.unique(a[1:][a[1:] == a[:-1]])}


class KeyRegistry:
    """Which member keys were met before, over the splits of one sharding run: exact, 8 bytes per key.

    Built from every split's key hashes (:func:`key_hashes`) before any is written; only keys
    whose hash repeats are then kept, with where they were first met.
    """

    def __init__(self, hashes: Iterable[array] = ()):
        self._repeated = repeated_hashes(hashes)
        self._first: dict[str, str] = {}

    def first_seen(self, key: str, where: str) -> str | None:
        """Where `key` was met before (None the first time); records `where` for a first meeting."""
        if not self._repeated:
            return None
        (h,) = key_hashes([key])
        if h not in self._repeated:
            return None
        if key in self._first:
            return self._first[key]
        self._first[key] = where
        return None


@dataclass
class SplitPlan:
    """What the first pass over a split's cuts found: shard sizes, duration histogram, total, key hashes."""

    split: str
    cuts_path: Path
    sizes: list[int]
    histogram: list[int]
    seconds: float
    keys: array
    """:func:`key_hashes` of the cut ids, for duplicate detection across splits."""
    shard_seconds: list[float] = field(default_factory=list)
    """Planned seconds of audio per shard."""


def plan_split(
    split: str, cuts_path: Path, *, sample_rate: int, shard_mb: float, max_per_shard: int | None, min_shards: int
) -> SplitPlan:
    """The first pass over a split's cuts manifest (lazily): :func:`plan_shards` and what the index needs."""
    from lhotse import CutSet

    histogram: list[int] = []
    total = [0.0]
    keys = array("Q")
    seen = array("f")  # 4 bytes a cut: the per-shard seconds a job of a --part run shows progress against

    def durations():
        for c in CutSet.from_jsonl_lazy(cuts_path):
            b = int(c.duration / HISTOGRAM_BIN_SECONDS)
            histogram.extend([0] * (b + 1 - len(histogram)))
            histogram[b] += 1
            total[0] += c.duration
            keys.extend(key_hashes([c.id]))
            seen.append(c.duration)
            yield c.duration

    sizes = plan_shards(
        durations(), sample_rate=sample_rate, shard_mb=shard_mb, max_per_shard=max_per_shard, min_shards=min_shards
    )
    if not sizes:
        raise DataError(f"split {split!r} has no cuts ({cuts_path}); lower --min-seconds or check the corpus")
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    shard_seconds = [float(sum(seen[a:b])) for a, b in zip(bounds, bounds[1:])]
    return SplitPlan(split, Path(cuts_path), sizes, histogram, total[0], keys, shard_seconds)
