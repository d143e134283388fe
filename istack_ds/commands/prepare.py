"""A corpus -> lhotse manifests -> cuts per split (no audio is decoded): the first step of `istack shard`.

Usage (`python tools/prepare_librilight.py` takes the same arguments):
    istack prepare --corpus /data/librilight --out /data/ll-shards --jobs 16
    istack prepare --corpus data/demo/corpus --out data/demo/shards \\
        --max-seconds 3 --valid-speakers 1
    istack prepare --corpus /data/LibriSpeech --out /data/ls-shards --jobs 16
    istack prepare --corpus /data/lhotse-manifests --out /data/shards --layout lhotse_manifest

The layout of --corpus is recognised as `istack shard` recognises it (--layout names one). For
LibriSpeech (OUT/manifests/librispeech_{recordings,supervisions}_<part>.jsonl.gz as lhotse's recipe
names them, one cut per whole utterance: train-* -> train, dev-* -> valid) and lhotse manifests (one
cut per supervision), see `istack shard --help`. For LibriLight:

Reads CORPUS/{small,medium,large}/<speaker>/<book>/<name>.flac + <name>.json (any
subset of the parts) and writes, lazily (file by file, never a whole part in memory):
  OUT/manifests/librilight_recordings_<part>.jsonl.gz     one Recording per file (headers read by --jobs threads)
  OUT/manifests/librilight_supervisions_<part>.jsonl.gz   one supervision per voice_activity interval
  OUT/train/cuts.jsonl.gz, OUT/valid/cuts.jsonl.gz        one cut per VAD window: adjacent intervals merged
                                                          up to --max-seconds, shorter than --min-seconds dropped
The manifests match lhotse.recipes.prepare_librilight (names, ids, fields). A part whose
manifests exist is not read again. `istack shard` runs this step itself; run it
alone to inspect the windows before writing shards.

A file whose json is missing or unreadable (missing_json, bad_json), whose
voice_activity is not a list of [start, end] pairs of finite numbers with
0 <= start < end (bad_vad), or whose FLAC header does not decode (undecodable_flac) is
left out and counted, not a reason to stop. The summary's `skipped` holds the counts by
reason and the first few files, recorded per part in
OUT/manifests/librilight_skipped_<part>.json, so a re-run prints the same; the last line
before `done` says it in words.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from istack_ds.commands import HelpFormatter
from istack_ds.data.corpora import (
    add_preparation_args,
    default_max_seconds,
    detect_layout,
    get_corpus,
    valid_speakers_arg,
)
from istack_ds.data.index import DataError


def main(argv=None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    add_preparation_args(p)
    p.add_argument("--jobs", type=int, default=8, help="threads reading FLAC headers and VAD json")
    args = p.parse_args(argv)
    t0 = time.time()
    valid_speakers = valid_speakers_arg(args)
    try:
        layout = args.layout or detect_layout(args.corpus)
        max_seconds = args.max_seconds if args.max_seconds is not None else default_max_seconds(layout)
        prepared = get_corpus(layout).prepare(
            args.corpus,
            args.out,
            max_seconds=max_seconds,
            min_seconds=args.min_seconds,
            valid_speakers=valid_speakers,
            valid_fraction=args.valid_fraction,
            jobs=args.jobs,
            log=print,
        )
        print(prepared.skipped.line("source files"))
        summary = {
            "layout": layout,
            "splits": {s: str(path) for s, path in prepared.splits.items()},
            "settings": prepared.settings,
            "skipped": prepared.skipped.to_dict(),
        }
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    print(f"done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
