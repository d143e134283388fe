"""Writes a small, deterministic speech corpus in LibriLight layout (for the demo and tests).

Usage (`python tools/make_demo_corpus.py` takes the same arguments):
    istack make-demo-corpus --out data/demo/corpus
    istack make-demo-corpus --out /tmp/tiny --speakers 3 --books 1 --files 4 --seconds 6 --seed 1

Writes OUT/small/<speaker>/<book>/<name>.flac (16 kHz mono) and <name>.json with
`voice_activity` [[start, end], ...] seconds. Speech comes from espeak-ng when it is
installed, otherwise from a speech-like synthesizer (--engine picks). Re-running
reuses files already there; the same --seed always gives the same bytes.

Exit codes: 0 done, 2 --engine espeak without espeak-ng (nothing written).
"""

from __future__ import annotations

import argparse
import sys
import time

from istack_ds.commands import HelpFormatter
from istack_ds.data.demo_corpus import EngineMissing, make_corpus


def main(argv=None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="corpus directory (LibriLight layout is written under OUT/small)")
    p.add_argument("--speakers", type=int, default=6, help="speakers (directories under OUT/small)")
    p.add_argument("--books", type=int, default=2, help="books per speaker")
    p.add_argument("--files", type=int, default=6, help="files per book")
    p.add_argument("--seconds", type=float, default=12.0, help="longest file; lengths are uniform in [S/3, S]")
    p.add_argument("--seed", type=int, default=0, help="the same seed always gives the same bytes")
    p.add_argument(
        "--engine",
        choices=("auto", "espeak", "synth"),
        default="auto",
        help="speech from espeak-ng, from the built-in synthesizer, or auto: espeak-ng when it is on PATH",
    )
    args = p.parse_args(argv)
    t0 = time.time()
    settings = {name: getattr(args, name) for name in ("speakers", "books", "files", "seconds", "seed", "engine")}
    try:
        make_corpus(args.out, **settings)
    except EngineMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
