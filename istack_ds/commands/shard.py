"""Shards a LibriLight-layout corpus into plain WebDataset shards with an index per split.

Usage (`python tools/shard_corpus.py` takes the same arguments):
    istack shard --corpus data/demo/corpus --out data/demo/shards
    istack shard --corpus /data/librilight --out /data/ll-shards --jobs 16 --valid-fraction 0.01
    istack shard --corpus /tmp/tiny --out /tmp/tiny-shards --max-seconds 3 --max-per-shard 3

Steps (the first two are `istack prepare`, run here too and skipped when
done): lhotse manifests of every part present (small, medium, large; any subset)
-> one cut per VAD window (adjacent voice_activity intervals merged up to
--max-seconds, windows under --min-seconds dropped) -> split by speaker (the last
--valid-speakers speakers, sorted, or --valid-fraction of them, go to `valid`)
-> OUT/<split>/shard-NNNNNN.tar of about --shard-mb MB each, <key>.flac (16 kHz mono)
+ <key>.json members, written by --jobs processes -> OUT/<split>/index.json (per
shard: path, samples, seconds, bytes, sha256; totals). A progress line on stderr
shows shards, hours written and the ETA. Small splits are spread over at least
--min-shards shards so that nodes x ranks x workers can all be fed. Re-running skips
shards that are already written and still match their index entry (an interrupted
run keeps index.partial.json), so it is also how an interrupted run is resumed.
--layout names the corpus module that reads --corpus (istack_ds/data/corpora/; librilight by default).

Bad input is left out and counted, never a reason to stop: a source file whose json or
voice_activity is unusable (missing, unreadable, NaN, inf, negative, start >= end, not
[start, end] pairs) or whose FLAC header does not decode is left out of the manifests;
a cut whose audio does not decode, is shorter than 400 samples (the teacher CNN's
receptive field, whatever --min-seconds says), whose FLAC exceeds twice the 16-bit PCM
of --max-seconds, or whose key was already written (in this split or an earlier one) is
left out of the shards. The counts by reason, with the first few names, are printed at
the end and recorded in each index.json (settings.skipped_sources,
settings.skipped_members, and per shard `skipped`); a re-run reports the same. A source
file named in the manifests but gone from disk stops the run (exit 2) with its name.
"""

from __future__ import annotations

import argparse
import sys
import time

from istack_ds.data.corpora import DEFAULT_CORPUS, add_preparation_args, available, valid_speakers_arg
from istack_ds.data.index import DataError
from istack_ds.data.writer import shard_corpus


def main(argv=None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preparation_args(p)
    p.add_argument(
        "--layout", choices=available(), default=DEFAULT_CORPUS, help="the corpus module that reads --corpus"
    )
    p.add_argument("--shard-mb", type=float, default=1024.0, help="target shard size (MB, may be fractional)")
    p.add_argument("--max-per-shard", type=int, default=None, help="at most this many cuts per shard")
    p.add_argument("--min-shards", type=int, default=8, help="spread a small split over at least this many shards")
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--jobs", type=int, default=1, help="parallel shard writers (processes)")
    args = p.parse_args(argv)
    t0 = time.time()
    valid_speakers = valid_speakers_arg(args)
    try:
        shard_corpus(
            args.corpus,
            args.out,
            max_seconds=args.max_seconds,
            min_seconds=args.min_seconds,
            shard_mb=args.shard_mb,
            max_per_shard=args.max_per_shard,
            min_shards=args.min_shards,
            valid_speakers=valid_speakers,
            valid_fraction=args.valid_fraction,
            sample_rate=args.sample_rate,
            jobs=args.jobs,
            corpus=args.layout,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
