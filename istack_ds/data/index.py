"""The shard index: ``OUT/<split>/index.json``, its format, how it is read, and how many readers it feeds.

    {"format": INDEX_FORMAT, "split", "sample_rate",
     "totals": {"shards", "samples", "seconds", "bytes"},
     "duration_histogram": {"bin_seconds", "counts"},   cuts per duration bin (the loader's bucket bins)
     "settings": {...},                                   how the split was prepared and sharded, with
                                                          "skipped_sources" (the corpus's source files left out)
                                                          and "skipped_members" (this split's windows left out)
     "shards": [{"path", "samples", "seconds", "bytes", "sha256", "keys_sha256",
                 "skipped"?: {"count", "by_reason", "first"}}, ...]}   paths relative to the index

``duration_histogram`` counts the planned cuts, those left out at write time included.

:func:`read_index` is what the loader and the tools use to open an index; it
raises :class:`DataError` naming the path for every way an index can be unusable.
:attr:`ShardIndex.digest` identifies the shard list a data position counts in (it
does not change when the split's directory moves).
:func:`check_shard_count` is the one rule about how many shards a split needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

INDEX_FORMAT = "istack_ds.shards/1"
HISTOGRAM_BIN_SECONDS = 0.25


class DataError(ValueError):
    """Unusable data (index, shards, corpus); the message names the path."""


@dataclass
class ShardInfo:
    path: str
    """Absolute path of the shard (the index stores it relative to itself)."""
    samples: int
    seconds: float
    bytes: int
    sha256: str
    keys_sha256: str = ""
    """Digest of the (key, offset, duration) lines the shard was planned with: a changed plan rewrites it."""
    name: str = ""
    """The shard's path as written in index.json (relative to the index): the same wherever the split lives."""


@dataclass
class ShardIndex:
    path: str
    """Where index.json lives."""
    split: str
    sample_rate: int
    shards: list[ShardInfo]
    duration_histogram: list[int] = field(default_factory=list)
    """Cuts per HISTOGRAM_BIN_SECONDS-wide duration bin (lets the loader place bucket bins without reading audio)."""
    bin_seconds: float = HISTOGRAM_BIN_SECONDS
    settings: dict = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def digest(self) -> str:
        """sha256 of the ordered shard list (each shard's name and sample count): what a data position counts in.

        Names are the paths as written in index.json, so a split moved elsewhere keeps its digest.
        """
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s.name}\t{s.samples}\n".encode())
        return h.hexdigest()


def read_index(path: str | os.PathLike, check_files: bool = True) -> ShardIndex:
    """Opens an index.json; with `check_files`, every shard it names must exist on disk."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shard index {path} does not exist (write it with `istack shard`)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"shard index {path} is not readable JSON: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("shards"), list):
        raise DataError(f"shard index {path} has no `shards` list; is it an index written by `istack shard`?")
    if not raw["shards"]:
        raise DataError(f"shard index {path} lists no shards (empty split?)")
    shards = []
    for i, s in enumerate(raw["shards"]):
        try:
            info = ShardInfo(
                path=str((path.parent / s["path"]).resolve()),
                samples=int(s["samples"]),
                seconds=float(s["seconds"]),
                bytes=int(s["bytes"]),
                sha256=str(s["sha256"]),
                keys_sha256=str(s.get("keys_sha256", "")),
                name=str(s["path"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"shard index {path}: entry {i} is malformed ({e!r})") from None
        if check_files and not Path(info.path).is_file():
            raise DataError(f"shard index {path}: shard {info.path} (entry {i}) is missing on disk")
        shards.append(info)
    hist = raw.get("duration_histogram") or {}
    return ShardIndex(
        path=str(path),
        split=str(raw.get("split", "")),
        sample_rate=int(raw.get("sample_rate", 16000)),
        shards=shards,
        duration_histogram=list(hist.get("counts", [])),
        bin_seconds=float(hist.get("bin_seconds", HISTOGRAM_BIN_SECONDS)),
        settings=dict(raw.get("settings", {})),
    )


def check_shard_count(
    index: ShardIndex, world_size: int, workers: int, *, local_world_size: int | None = None, held_out: bool = False
) -> int:
    """The DataLoader workers per rank that `index` can feed; raises DataError naming the index when too few.

    NOTE: the one rule of the split: every worker of every rank (on every node) reads its own
    shards, so an index feeds ``shards // world_size`` workers per rank. A training split must
    feed all `workers`; a held-out split (`held_out`) is small, so fewer workers read it, but
    every rank needs at least one shard.
    """
    shards = len(index.shards)
    fed = shards // world_size
    if held_out and fed < 1:
        raise DataError(
            f"data.valid_index {index.path} has {shards} shards for {world_size} ranks: every rank "
            f"validates on its own shards; re-shard the held-out split with `istack shard` "
            f"--min-shards {world_size} or set data.valid_index=null"
        )
    readers = max(1, workers)
    if not held_out and fed < readers:
        local_world_size = local_world_size or world_size
        needed = world_size * readers
        raise DataError(
            f"shard index {index.path} has {shards} shards but {needed} are needed "
            f"({world_size // local_world_size} node(s) x {local_world_size} ranks x {readers} workers each read "
            f"their own shards); re-shard with more, smaller shards (`istack shard --min-shards {needed}`) "
            "or use fewer workers"
        )
    return min(workers, fed)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: dict) -> None:
    """Writes `obj` as indented JSON under a temporary name, then renames it: a reader sees all of it or none.

    NOTE: the temporary name is this process's own (host, pid): jobs of a sharding split over
    machines may write the same record (a corpus part's skipped files) at once.
    """
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def index_dict(split: str, sample_rate: int, entries: list[dict], histogram: list[int], settings: dict) -> dict:
    """The JSON object of an index.json: `entries` are the shards' {path, samples, seconds, bytes, sha256, ...}."""
    return {
        "format": INDEX_FORMAT,
        "split": split,
        "sample_rate": sample_rate,
        "totals": {
            "shards": len(entries),
            "samples": sum(e["samples"] for e in entries),
            "seconds": round(sum(e["seconds"] for e in entries), 3),
            "bytes": sum(e["bytes"] for e in entries),
        },
        "duration_histogram": {"bin_seconds": HISTOGRAM_BIN_SECONDS, "counts": histogram},
        "settings": settings,
        "shards": entries,
    }
