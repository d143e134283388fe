"""Shards a corpus (LibriLight, LibriSpeech or any lhotse manifest directory) into plain WebDataset shards with an
index per split, on one machine or split over many.

Usage (`python tools/shard_corpus.py` takes the same arguments):
    istack shard --corpus data/demo/corpus --out data/demo/shards
    istack shard --corpus /data/librilight --out /data/ll-shards --jobs 16 --valid-fraction 0.01
    istack shard --corpus /data/LibriSpeech --out /data/ls-shards --jobs 16
    istack shard --corpus /data/gigaspeech-manifests --out /data/gs-shards --jobs 16
    istack shard --corpus /tmp/tiny --out /tmp/tiny-shards --max-seconds 3 --max-per-shard 3
  over machines (one Slurm array task each; all see OUT), then once:
    istack prepare --corpus /data/LibriSpeech --out /data/ls-shards        # optional: headers read once
    istack shard --corpus /data/LibriSpeech --out /data/ls-shards --jobs 16 --part $SLURM_ARRAY_TASK_ID/8
    istack shard --merge --out /data/ls-shards

The layout of --corpus is recognised (`--layout` names one; istack_ds/data/corpora/):
  librilight       CORPUS/{small,medium,large}/<speaker>/<book>/<name>.flac + <name>.json (VAD): one cut per
                   VAD window (adjacent voice_activity intervals merged up to --max-seconds, default 20;
                   windows under --min-seconds dropped); the last --valid-speakers speakers (sorted), or
                   --valid-fraction of them, go to `valid`.
  librispeech      CORPUS[/LibriSpeech]/<part>/<speaker>/<chapter>/*.flac + <speaker>-<chapter>.trans.txt:
                   one cut per utterance, whole; train-* parts -> train, dev-* -> valid, test-* left out;
                   member json: text, speaker, language, chapter.
  lhotse_manifest  CORPUS/*cuts*.jsonl.gz, or *recordings*.jsonl.gz + *supervisions*.jsonl.gz, as any lhotse
                   recipe writes them: one cut per supervision; a part named dev/valid -> valid, test/eval left
                   out, the rest -> train (no held-out part: held out by speaker); member json: text, speaker,
                   language and every key of supervision.custom (e.g. phonemes).
An utterance (librispeech, lhotse_manifest) longer than --max-seconds (default 36) is left out and counted
as too_long, never cut: a batch holds whole utterances.

Steps (the first two are `istack prepare`, run here too and skipped when done): lhotse manifests
-> cuts per split -> OUT/<split>/shard-NNNNNN.tar of about --shard-mb MB each, <key>.flac (16 kHz mono)
+ <key>.json members, written by --jobs processes -> OUT/<split>/index.json (per shard: path, samples,
seconds, bytes, sha256; totals). A progress line on stderr shows shards, hours written and the ETA.
Small splits are spread over at least --min-shards shards so that nodes x ranks x workers can all be
fed. Re-running skips shards that are already written and still match their index entry (an
interrupted run keeps index.partial.json), so it is also how an interrupted run is resumed.

--part I/N writes only part I of N of every split's shards (shard k is part k mod N + 1: the same on
every machine given the same corpus and settings) and OUT/<split>/index.part-I-of-N.json; a rerun keeps
its finished shards. --merge checks that all N parts are there, made with the same settings and shard
plan, each shard present once with the size and keys planned, and writes OUT/<split>/index.json (the
index one unsplit run writes); a missing part or other settings is an error naming the part file.

Bad input is left out and counted, never a reason to stop: a source file whose json or
voice_activity is unusable (missing, unreadable, NaN, inf, negative, start >= end, not
[start, end] pairs), whose FLAC header does not decode, a FLAC without a transcript line or a
line without its FLAC, a recording that is not one file, an utterance out of the length limits
is left out of the manifests; a cut whose audio does not decode, is shorter than 400 samples
(the teacher CNN's receptive field, whatever --min-seconds says), whose FLAC exceeds twice the
16-bit PCM of --max-seconds, or whose key was already written (in this split or an earlier one)
is left out of the shards. The counts by reason, with the first few names, are printed at the
end and recorded in each index.json (settings.skipped_sources, settings.skipped_members, and per
shard `skipped`); a re-run reports the same. A source file named in the manifests but gone from
disk stops the run (exit 2) with its name.
"""

from __future__ import annotations

import argparse
import sys
import time

from istack_ds.commands import HelpFormatter
from istack_ds.data.corpora import add_preparation_args, valid_speakers_arg
from istack_ds.data.index import DataError
from istack_ds.data.parts import merge_parts, parse_part
from istack_ds.data.writer import shard_corpus


def main(argv=None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    add_preparation_args(p, corpus_required=False)
    p.add_argument("--shard-mb", type=float, default=1024.0, help="target shard size (MB, may be fractional)")
    p.add_argument("--max-per-shard", type=int, default=None, help="at most this many cuts per shard")
    p.add_argument("--min-shards", type=int, default=8, help="spread a small split over at least this many shards")
    p.add_argument("--sample-rate", type=int, default=16000, help="sample rate of the audio in the shards, in Hz")
    p.add_argument("--jobs", type=int, default=1, help="parallel shard writers (processes)")
    p.add_argument("--part", default=None, metavar="I/N", help="write only part I of N of every split's shards")
    p.add_argument("--merge", action="store_true", help="merge the parts' indexes under --out into index.json")
    args = p.parse_args(argv)
    if args.merge and (args.part or args.corpus):
        p.error("--merge takes --out only (it merges what the --part runs wrote)")
    if not args.merge and not args.corpus:
        p.error("the following arguments are required: --corpus")
    t0 = time.time()
    valid_speakers = valid_speakers_arg(args)
    try:
        if args.merge:
            merge_parts(args.out)
            print(f"done in {time.time() - t0:.1f} s")
            return 0
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
            part=parse_part(args.part) if args.part else None,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
