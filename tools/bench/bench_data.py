"""Data throughput: audio seconds delivered per second by one loader worker against a bare decode.

Usage:
    python tools/bench/bench_data.py                                   # builds a bench corpus in data/bench-data (once)
    python tools/bench/bench_data.py --index /data/ll-shards/train/index.json --shards 4
    python tools/bench/bench_data.py --trainer-rate 100 --workers 2    # the goal: >= 5x what a rank's trainer consumes

Two loops over the same shards, each in this one process (= one DataLoader worker):
  bare     read the tars with tarfile and decode every FLAC with soundfile, nothing else
  raw      istack_ds.data.build_loader(num_workers=0): header checks, crop plan,
           shuffle buffer, buckets, decode of the cropped frames, padding into a batch tensor
and prints audio seconds per wall second for each, the ratio to `bare` (goal >= 0.7), and
per rank (x --workers) against --trainer-rate, the audio seconds per second a rank's
trainer consumes (goal >= 5x). Each loop runs --repeats times; the best run counts
(the machine may be shared). Nothing is written except the bench corpus.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import sys
import tarfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # a DataLoader worker runs torch with one thread

ROOT = Path(__file__).resolve().parents[2]


def bench_corpus(out: Path) -> Path:
    """A corpus of long-ish files (12-36 s) sharded into ~24 shards of 20 s windows; made once, reused."""
    from istack_ds.data.demo_corpus import make_corpus
    from istack_ds.data.writer import shard_corpus

    index = out / "shards" / "train" / "index.json"
    if not index.is_file():
        make_corpus(out / "corpus", speakers=4, books=2, files=6, seconds=36.0, seed=5, engine="synth")
        shard_corpus(
            out / "corpus",
            out / "shards",
            max_seconds=20.0,
            min_seconds=1.0,
            shard_mb=2.0,
            min_shards=8,
            valid_speakers=0,
            jobs=2,
        )
    return index


def bare(paths: list[str]) -> float:
    """Audio seconds decoded by reading the tars and decoding every FLAC with soundfile."""
    import soundfile as sf

    seconds = 0.0
    for path in paths:
        with tarfile.open(path, mode="r|") as tf:
            for m in tf:
                if m.name.endswith(".flac"):
                    audio, sr = sf.read(io.BytesIO(tf.extractfile(m).read()), dtype="float32")
                    seconds += len(audio) / sr
    return seconds


def pipeline(index: str, crop_seconds: float, batch_seconds: float) -> float:
    from istack_ds.config import DataConfig
    from istack_ds.data.loader import build_loader

    data = DataConfig(
        train_index=index,
        num_workers=0,
        crop_seconds=crop_seconds,
        batch_seconds=batch_seconds,
        shuffle_buffer=1000,
    )
    return sum(b["seconds"] for b in build_loader(data, index, rank=0, world_size=1, seed=0, epochs=1))


def timed(fn, repeats: int) -> tuple[float, float]:
    """(best audio s per wall s, audio s of one run)."""
    best, seconds = 0.0, 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        seconds = fn()
        best = max(best, seconds / (time.perf_counter() - t0))
    return best, seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--index", default=None, help="index.json to read (default: a bench corpus under --bench-dir)")
    # not data/bench: that is benchlib.py's cache
    p.add_argument("--bench-dir", default=str(ROOT / "data" / "bench-data"))
    p.add_argument("--shards", type=int, default=0, help="use only the first N shards (0: all)")
    p.add_argument("--crop-seconds", type=float, default=15.6)
    p.add_argument("--batch-seconds", type=float, default=200.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="loader workers per rank, for the per-rank figure")
    p.add_argument(
        "--trainer-rate",
        type=float,
        default=100.0,
        help="audio s/s one rank's trainer consumes (the CPU demo: ~35-100)",
    )
    args = p.parse_args(argv)

    import json
    import tempfile

    from istack_ds.data.index import read_index

    index_path = args.index or str(bench_corpus(Path(args.bench_dir)))
    index = read_index(index_path)
    shards = index.shards[: args.shards] if args.shards else index.shards
    if args.shards:  # a trimmed copy of the index, so that all three loops read the same shards
        raw = json.loads(Path(index_path).read_text())
        raw["shards"] = [dict(e, path=str(s.path)) for e, s in zip(raw["shards"], shards)]
        tmp = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        json.dump(raw, tmp)
        tmp.close()
        index_path = tmp.name
    paths = [s.path for s in shards]
    print(
        f"{len(paths)} shards, {sum(s.samples for s in shards)} members, "
        f"{sum(s.seconds for s in shards) / 60:.1f} min audio, {sum(s.bytes for s in shards) / 1e6:.1f} MB; "
        f"crop {args.crop_seconds} s, batch {args.batch_seconds} s, best of {args.repeats}"
    )
    bare(paths)  # warm the page cache
    rows = [("bare", *timed(lambda: bare(paths), args.repeats))]
    run = functools.partial(pipeline, index_path, args.crop_seconds, args.batch_seconds)
    rows.append(("raw", *timed(run, args.repeats)))
    base = rows[0][1]
    print(
        f"{'loop':6} {'audio s/s':>10} {'x bare':>7} {'per rank (x' + str(args.workers) + ')':>16} "
        f"{'x trainer':>10}  audio s delivered"
    )
    for name, rate, seconds in rows:
        per_rank = rate * args.workers
        print(
            f"{name:6} {rate:10.0f} {rate / base:7.2f} {per_rank:16.0f} {per_rank / args.trainer_rate:10.1f}  "
            f"{seconds:.0f}"
        )
    raw_rate = rows[1][1]
    ok = raw_rate >= 0.7 * base and raw_rate * args.workers >= 5 * args.trainer_rate
    print(
        f"goal (raw >= 0.7x bare and >= 5x the trainer's {args.trainer_rate:.0f} s/s per rank): "
        f"{'met' if ok else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
