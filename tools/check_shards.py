"""Checks every shard of an index: sha256 and size against the index, then decodes every member, in parallel.

Usage:
    python tools/check_shards.py data/demo/shards/train/index.json
    python tools/check_shards.py /data/ll-shards/train/index.json --jobs 16
    python tools/check_shards.py /data/ll-shards/train/index.json --no-decode   # hashes only

Prints each bad shard or member with the reason (BAD <shard>: <key>: <why>), then a
summary; exits 1 if anything is bad, 2 if the index itself is unusable, 0 otherwise.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial

from istack_ds.data.index import DataError, read_index
from istack_ds.data.writer import check_shard


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("index", help="index.json written by tools/shard_corpus.py")
    p.add_argument("--no-decode", action="store_true", help="check sha256 and sizes only")
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
    if args.jobs > 1:
        pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork"))
        results = pool.map(check, index.shards, chunksize=1)  # in index order, computed in parallel
    else:
        pool, results = None, map(check, index.shards)
    try:
        for problems, n in results:
            members += n
            for where, why in problems:
                print(f"BAD {where}: {why}", flush=True)
            bad += len(problems)
    finally:
        if pool is not None:
            pool.shutdown()
    print(
        f"{args.index}: {len(index.shards)} shards, {members} members checked, {bad} bad "
        f"({time.time() - t0:.1f} s, {args.jobs} jobs)"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
