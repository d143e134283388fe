"""Sharding throughput per job: shards/s and audio s/s of one unsplit job, and of --part 1/2 + 2/2 then --merge.

Usage:
    python tools/bench/bench_shard.py                       # a synthetic LibriSpeech tree in data/bench-shard (once)
    python tools/bench/bench_shard.py --corpus /data/LibriSpeech --out /scratch/bench --jobs 16 --shard-mb 256

Runs, each into a fresh output directory under --out (nothing of an earlier run is reused):
  1 job      istack shard over the whole corpus
  part 1/2   istack shard --part 1/2, then part 2/2 into the same directory, one after another
  merge      istack shard --merge
and prints the preparation alone (manifests + cuts from scratch: headers only), then per job: wall
seconds, shards written, shards/s and audio s/s (audio seconds written per wall second, the job's
preparation included: part 2 finds part 1's manifests), and whether the merged index.json equals the
unsplit one. The parts run one after another here; on N machines each takes about its own line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[2]


def bench_corpus(root: Path, speakers: int, chapters: int, utterances: int, seconds: float) -> Path:
    """A LibriSpeech-shaped tree of synthesized speech-like FLAC (harmonics + noise, 10-16 s); made once, reused."""
    import numpy as np
    import soundfile as sf

    done = root / ".complete"
    if done.is_file():
        return root
    rng = np.random.default_rng(0)
    for s in range(speakers):
        part = "dev-clean" if s == speakers - 1 else "train-clean-100"
        for c in range(chapters):
            spk, chap = str(100 + s), str(1000 + c)
            d = root / "LibriSpeech" / part / spk / chap
            d.mkdir(parents=True, exist_ok=True)
            lines = []
            for u in range(utterances):
                utt = f"{spk}-{chap}-{u:04d}"
                n = int(16000 * rng.uniform(seconds - 3, seconds + 3))
                t = np.arange(n) / 16000
                f0 = rng.uniform(90, 220) * (1 + 0.1 * np.sin(2 * np.pi * 0.5 * t))
                phase = 2 * np.pi * np.cumsum(f0) / 16000
                audio = sum(np.sin(k * phase) / k for k in range(1, 6)) * 0.1 * (1 + np.sin(2 * np.pi * 3 * t))
                audio += 0.01 * rng.standard_normal(n)
                sf.write(d / f"{utt}.flac", audio.astype(np.float32), 16000)
                lines.append(f"{utt} SYNTHETIC UTTERANCE {u}")
            (d / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    done.write_text("")
    return root


def run(fn) -> tuple[dict, float]:
    t0 = time.perf_counter()
    reports = fn()
    return reports, time.perf_counter() - t0


def line(label: str, reports: dict, wall: float) -> str:
    """Shards and audio seconds written by one job, per wall second of the job (its preparation included)."""
    written = sum(r.written for r in reports.values())
    audio = sum(r.seconds for r in reports.values())
    return (
        f"{label:<10} {written:4d} shards, {audio:8.1f} audio s in {wall:6.2f} s: "
        f"{written / wall:6.2f} shards/s, {audio / wall:7.1f} audio s/s"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=None, help="any corpus istack shard reads (default: a synthetic LibriSpeech)")
    p.add_argument("--out", default=str(ROOT / "data" / "bench-shard" / "out"), help="scratch output directory")
    p.add_argument("--jobs", type=int, default=1, help="writer processes per job (istack shard --jobs)")
    p.add_argument("--shard-mb", type=float, default=4.0)
    p.add_argument("--speakers", type=int, default=5, help="synthetic corpus: speakers (the last one is dev-clean)")
    p.add_argument("--utterances", type=int, default=12, help="synthetic corpus: utterances per chapter (2 chapters)")
    p.add_argument("--seconds", type=float, default=13.0, help="synthetic corpus: mean utterance length")
    args = p.parse_args(argv)

    import lhotse  # noqa: F401 -- imported before any timing (it imports torch)

    from istack_ds.data.parts import merge_parts
    from istack_ds.data.writer import shard_corpus

    corpus = (
        Path(args.corpus)
        if args.corpus
        else bench_corpus(ROOT / "data" / "bench-shard" / "corpus", args.speakers, 2, args.utterances, args.seconds)
    )
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    settings = dict(shard_mb=args.shard_mb, min_shards=2, jobs=args.jobs, progress_stream=open(os.devnull, "w"))

    def prepare_seconds(out_dir: Path) -> float:
        """Preparation alone, timed on a fresh directory (the same work the job does before writing shards)."""
        from istack_ds.data.corpora import default_max_seconds, detect_layout, get_corpus

        layout = detect_layout(corpus)
        t0 = time.perf_counter()
        get_corpus(layout).prepare(
            corpus,
            out_dir / ".prepare-probe",
            max_seconds=default_max_seconds(layout),
            min_seconds=1.0,
            valid_speakers=1,
            valid_fraction=None,
            jobs=max(4, args.jobs),
            log=lambda *_: None,
        )
        seconds = time.perf_counter() - t0
        shutil.rmtree(out_dir / ".prepare-probe")
        return seconds

    quiet = lambda *_: None  # noqa: E731
    print(f"corpus {corpus}, --jobs {args.jobs}, --shard-mb {args.shard_mb}, {os.cpu_count()} CPUs")
    print(f"{'prepare':<10} {prepare_seconds(out):6.2f} s from scratch (manifests + cuts: headers only, no audio)")
    whole, wall = run(lambda: shard_corpus(corpus, out / "whole", log=quiet, **settings))
    print(line("1 job", whole, wall))
    total = 0.0
    for i in (1, 2):
        reports, wall = run(lambda i=i: shard_corpus(corpus, out / "parts", part=(i, 2), log=quiet, **settings))
        print(line(f"part {i}/2", reports, wall))
        total += wall
    _, wall = run(lambda: merge_parts(out / "parts", log=quiet))
    total += wall
    print(f"{'merge':<10} {wall:6.3f} s; parts + merge {total:.2f} s")
    same = all(
        (out / "parts" / s / "index.json").read_text() == (out / "whole" / s / "index.json").read_text() for s in whole
    )
    print(f"merged index.json equals the unsplit one: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
