"""Checks every shard of an index: sha256 and size, every member decoded, and no key in two members, in parallel.

Usage (`python tools/check_shards.py` takes the same arguments):
    istack check data/demo/shards/train/index.json
    istack check data/demo/shards                               # every split: train/index.json, valid/index.json
    istack check /data/ll-shards/train --jobs 16                # a directory: its index.json
    istack check /data/ll-shards/train/index.json --no-decode   # hashes and keys only

INDEX is an index.json, a directory holding one, or a shard tree (what `istack shard --out` wrote) whose
subdirectories hold one each: then each is checked in turn.

Checks each shard's size and sha256 against the index; decodes every member (a tar or
FLAC header declaring more than tario.MAX_MEMBER_BYTES is reported as too_large, not
read); and compares the member keys of all the shards of the index (read from the tar
headers with --no-decode). Prints each bad shard or member with the reason
(BAD <shard>: <key>: <why>; a repeated key as BAD <shard>: <key>: duplicate key, first
in <shard>), then a summary; exits 1 if anything is bad, 2 if the index itself is
unusable (or no index is found), 0 otherwise.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

from istack_ds.commands import HelpFormatter
from istack_ds.data.index import DataError, read_index
from istack_ds.data.progress import Ticker
from istack_ds.data.shard_check import check_shard, duplicate_keys


def index_paths(given: str) -> list[Path]:
    """The index.json files that `given` names: itself (a file), DIR/index.json, else DIR/<split>/index.json of
    each subdirectory holding one (a shard tree); raises DataError naming what was looked for when none is there."""
    path = Path(given)
    if path.is_file() or (path.suffix == ".json" and not path.is_dir()):
        return [path]  # read_index names a missing or unreadable file
    if (path / "index.json").is_file():
        return [path / "index.json"]
    splits = sorted(d / "index.json" for d in path.iterdir() if (d / "index.json").is_file()) if path.is_dir() else []
    if not splits:
        raise DataError(
            f"no shard index at {given}: looked for {path / 'index.json'} and {path / '*' / 'index.json'} "
            "(e.g. train/index.json; write them with `istack shard`)"
        )
    return splits


def main(argv=None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("index", help="index.json written by `istack shard`, its directory, or the shard tree above")
    p.add_argument("--no-decode", action="store_true", help="check sha256, sizes and duplicate keys only (no decoding)")
    p.add_argument(
        "--jobs",
        type=int,
        default=max(1, min(8, multiprocessing.cpu_count())),
        help="shards checked in parallel (processes)",
    )
    args = p.parse_args(argv)
    try:
        paths = index_paths(args.index)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return max(check_index(path, jobs=args.jobs, decode=not args.no_decode) for path in paths)


def check_index(path: Path, *, jobs: int, decode: bool) -> int:
    """Checks one index's shards, printing each problem and a summary line; the exit code (0, 1 or 2)."""
    t0 = time.time()
    try:
        index = read_index(path, check_files=False)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    check = partial(check_shard, sample_rate=index.sample_rate, decode=decode)
    bad = members = 0
    hashes = []
    if jobs > 1:
        pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"))
        results = pool.map(check, index.shards, chunksize=1)  # in index order, computed in parallel
    else:
        pool, results = None, map(check, index.shards)
    ticker = Ticker("check", "shards", total=len(index.shards))
    try:
        for result in results:
            ticker.tick(f"{bad} bad" if bad else "")
            members += result.samples
            hashes.append(result.keys)
            for where, why in result.problems:
                print(f"BAD {where}: {why}", flush=True)
            bad += len(result.problems)
    finally:
        if pool is not None:
            pool.shutdown()
    duplicates = duplicate_keys([s.path for s in index.shards], hashes)
    for where, key, first in duplicates:
        print(f"BAD {where}: {key}: duplicate key, first in {first}", flush=True)
    bad += len(duplicates)
    print(
        f"{path}: {len(index.shards)} shards, {members} members checked, {len(duplicates)} duplicate keys, "
        f"{bad} bad "
        f"({time.time() - t0:.1f} s, {jobs} jobs)"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
