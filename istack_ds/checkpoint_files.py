"""The files of a checkpoint directory: their sizes and sha256 digests (which rank hashes which), and the fsyncs
that make a write, a rename or a removal durable.

**Who hashes.** After a save's barrier every rank hashes the files it wrote (:func:`owner`: the rank named in
the file name, DeepSpeed's ``zero_pp_rank_<r>_...`` and our ``rank<r>.pt``; any other file is rank 0's), so on
a shared file system each file is read back from the page cache of the node that wrote it, in parallel, and
rank 0 gathers the digests for the marker instead of reading the whole checkpoint over the network.
:func:`digests` hashes whatever no rank reported (a file named otherwise): correct whoever wrote it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

#: The digest recorded per file in the marker (hashlib name; its key in the marker).
DIGEST = "sha256"
_RANK = re.compile(r"rank_?(\d+)")


def fsync(path: Path) -> None:
    """Flushes a file, or a directory's entries (a rename or removal in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    # NOTE: fsync flushes the node's page cache whoever wrote the file, so every rank syncing the
    # whole directory covers the files of every node; syncing a clean file costs nothing.
    for f in sorted(path.rglob("*")):
        if f.is_file():
            fsync(f)
    fsync(path)


def file_sizes(path: Path, skip: str) -> dict[str, int]:
    """Every file under `path` (relative name -> bytes) but `skip` (the marker) and ``*.tmp`` files."""
    return {
        str(f.relative_to(path)): f.stat().st_size
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != skip and not f.name.endswith(".tmp")
    }


def digest(path: Path) -> str:
    h = hashlib.new(DIGEST)
    with open(path, "rb") as f:  # hashlib.file_digest is 3.11+; this reads the same 1 MiB at a time
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def owner(name: str, world: int) -> int:
    """The rank that hashes file `name`: the rank its name carries (the one that wrote it), else rank 0."""
    match = _RANK.search(Path(name).name)
    r = int(match.group(1)) if match else 0
    return r if r < world else 0


def own_digests(path: Path, names: list[str], rank: int, world: int) -> dict[str, str]:
    """The digests of the files of `names` that `rank` hashes (:func:`owner`)."""
    return {n: digest(path / n) for n in names if owner(n, world) == rank}


def digests(path: Path, names: list[str], known: dict[str, str]) -> dict[str, str]:
    """A digest for each of `names`: from `known` (the ranks' own), the others hashed here."""
    return {n: known[n] if n in known else digest(path / n) for n in names}
