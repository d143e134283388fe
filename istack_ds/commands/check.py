"""Checks every shard of an index: sha256 and size, every member decoded, and no key in two members, in parallel.

Usage (`python tools/check_shards.py` takes the same arguments):
    istack check data/demo/shards/train/index.json
    istack check /data/ll-shards/train/index.json --jobs 16
    istack check /data/ll-shards/train/index.json --no-decode   # hashes and keys only

Checks each shard's size and sha256 against the index; decodes every member (a tar or
FLAC header declaring more than tario.MAX_MEMBER_BYTES is reported as too_large, not
read); and compares the member keys of all the shards of the index (read from the tar
headers with --no-decode). Prints each bad shard or member with the reason
(BAD <shard>: <key>: <why>; a repeated key as BAD <shard>: <key>: duplicate key, first
in <shard>), then a summary; exits 1 if anything is bad, 2 if the index itself is
unusable, 0 otherwise.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial

from istack_ds.data.index import DataError, read_index
from istack_ds.data.progress import Ticker
from istack_ds.data.shard_check import check_shard, duplicate_keys


def main(argv=None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index", help="index.json written by `istack shard`")
    p.add_argument("--no-decode", action="store_true", help="check sha256, sizes and duplicate keys only (no decoding)")
    p.add_argument(
        "--jobs",
        type=int,
        default=max(1, min(8, multiprocessing.cpu_count())),
        help="shards checked in parallel (processes)",
    )
    args = p.parse_args(argv)
    t0 = time.time()
    try:
        index = read_index(args.index, check_files=False)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    check = partial(check_shard, sample_rate=index.sample_rate, decode=not args.no_decode)
    bad = members = 0
    hashes = []
    if args.jobs > 1:
        pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork"))
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
        f"{args.index}: {len(index.shards)} shards, {members} members checked, {len(duplicates)} duplicate keys, "
        f"{bad} bad "
        f"({time.time() - t0:.1f} s, {args.jobs} jobs)"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
