"""Cut manifests -> plain WebDataset shards + index.json per split, written in parallel, and checked back.

The pipeline (``tools/shard_corpus.py`` drives it; the first step is the corpus's,
:mod:`istack_ds.data.corpora`)::

    CORPUS (any layout a corpus module reads)
      -> OUT/<split>/cuts.jsonl.gz       one lhotse cut per window, its metadata in cut.custom
      -> OUT/<split>/shard-000000.tar    members <key>.flac (16 kHz mono) + <key>.json (no pickles)
      -> OUT/<split>/index.json          per shard {path, samples, seconds, bytes, sha256} + totals

Everything streams from lazily opened manifests: a first pass plans the shard
sizes (one int per shard) and a duration histogram, a second pass hands each
shard's cut list to one of ``jobs`` writer processes. Each writer opens a source
file once per shard and seeks to each window, so a long recording is never
decoded whole. Re-running skips shards whose file still matches the index
(checked by the writers, in parallel); an interrupted run leaves
``index.partial.json`` so the next run keeps what was finished.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING

from istack_ds.data.corpora import DEFAULT_CORPUS, Corpus, get_corpus
from istack_ds.data.index import HISTOGRAM_BIN_SECONDS, DataError, ShardInfo, file_sha256, index_dict, write_json_atomic
from istack_ds.data.progress import Progress
from istack_ds.data.tario import BadMember, MemberWriter, decode_member, iter_tar_samples, to_mono_rate

if TYPE_CHECKING:
    import numpy as np

SHARD_PATTERN = "shard-%06d.tar"
#: Keys of a member's json that the writer sets; a cut's custom metadata cannot use them.
MEMBER_KEYS = ("id", "offset", "duration", "sample_rate")


# ---- cuts -> shards ----------------------------------------------------------------


def plan_shards(
    durations: Iterable[float], *, sample_rate: int, shard_mb: float, max_per_shard: int | None, min_shards: int
) -> list[int]:
    """Sizes (cut counts) of consecutive shards, in one pass over the durations.

    Greedy: a shard closes before it would exceed `shard_mb` (estimated as 16-bit
    PCM, an upper bound of the FLAC size) or `max_per_shard` cuts. If that gives
    fewer than `min_shards` shards (small splits), the cuts are spread evenly over
    min(min_shards, cuts) shards instead, so that ranks x workers can be fed.
    """
    limit = shard_mb * 1e6
    sizes, count, size, n = [], 0, 0.0, 0
    for d in durations:
        n += 1
        est = d * sample_rate * 2 + 1536  # samples + tar/json overhead
        if count and (size + est > limit or (max_per_shard and count >= max_per_shard)):
            sizes.append(count)
            count, size = 0, 0.0
        count += 1
        size += est
    if count:
        sizes.append(count)
    want = min(min_shards, n)
    if len(sizes) < want:
        sizes = [n // want + (1 if i < n % want else 0) for i in range(want)]
    return sizes


def _keys_digest(cuts: list[dict]) -> str:
    lines = "".join(f"{c['id']} {c['start']:.4f} {c['duration']:.4f}\n" for c in cuts)
    return hashlib.sha256(lines.encode()).hexdigest()


def cut_spec(cut) -> dict:
    """What a writer process needs of a cut: small, picklable; `custom` is the metadata its member keeps."""
    sources = cut.recording.sources
    if len(sources) != 1 or sources[0].type != "file":
        raise DataError(f"cut {cut.id}: recording {cut.recording.id} is not a single audio file")
    custom = dict(cut.custom or {})
    clash = [k for k in MEMBER_KEYS if k in custom]
    if clash:
        raise DataError(
            f"cut {cut.id}: custom metadata {clash} would overwrite the keys the writer sets "
            f"{list(MEMBER_KEYS)}; rename them in the corpus module"
        )
    return {
        "id": cut.id,
        "path": sources[0].source,
        "start": float(cut.start),
        "duration": float(cut.duration),
        "custom": custom,
    }


def read_windows(cuts: list[dict], sample_rate: int) -> Iterator[tuple[dict, np.ndarray]]:
    """(cut, float32 mono audio at `sample_rate`) per cut; each source file opened once, windows read by seeking."""
    import numpy as np
    import soundfile as sf

    for path, group in groupby(cuts, key=lambda c: c["path"]):
        with sf.SoundFile(path) as f:
            for c in group:
                f.seek(int(round(c["start"] * f.samplerate)))
                audio = f.read(int(round(c["duration"] * f.samplerate)), dtype="float32", always_2d=True)
                yield c, np.clip(to_mono_rate(audio, f.samplerate, sample_rate), -1.0, 1.0)


def write_shard(path: Path, cuts: list[dict], sample_rate: int) -> dict:
    """Writes one shard, member by member (to a temp name, renamed when complete); returns its index entry."""
    tmp = path.with_name(path.name + ".tmp")
    samples, seconds = 0, 0.0
    with open(tmp, "wb") as f, MemberWriter(f, sample_rate) as members:
        for cut, audio in read_windows(cuts, sample_rate):
            # NOTE: the key order is part of the shard's bytes (and of its sha256 in the index)
            meta = {
                "id": cut["id"],
                **cut["custom"],
                "offset": cut["start"],
                "duration": round(len(audio) / sample_rate, 4),
                "sample_rate": sample_rate,
            }
            members.write(cut["id"], audio, meta)
            samples += 1
            seconds += len(audio) / sample_rate
    os.replace(tmp, path)
    return {
        "path": path.name,
        "samples": samples,
        "seconds": round(seconds, 4),
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
    }


def ensure_shard(path: str, cuts: list[dict], digest: str, old: dict | None, sample_rate: int) -> tuple[dict, bool]:
    """(index entry, written?): keeps a shard that matches its old entry byte for byte, else (re)writes it."""
    p = Path(path)
    if (
        old
        and old.get("keys_sha256") == digest
        and p.is_file()
        and p.stat().st_size == old.get("bytes")
        and file_sha256(p) == old.get("sha256")
    ):
        return old, False
    entry = write_shard(p, cuts, sample_rate)
    entry["keys_sha256"] = digest
    return entry, True


@dataclass
class SplitReport:
    split: str
    shards: int = 0
    written: int = 0
    skipped: int = 0
    samples: int = 0
    seconds: float = 0.0
    bytes: int = 0
    index: str = ""


def _previous_entries(split_dir: Path) -> dict[str, dict]:
    entries: dict[str, dict] = {}
    for name in ("index.json", "index.partial.json"):  # the partial one (newer) wins
        p = split_dir / name
        if p.is_file():
            try:
                entries.update({e["path"]: e for e in json.loads(p.read_text()).get("shards", [])})
            except (OSError, ValueError, TypeError, KeyError):
                pass
    return entries


class _Inline:
    """A stand-in for a process pool with jobs=1: runs the call at submit time."""

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        fut.set_result(fn(*args))
        return fut

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def shard_split(
    split: str,
    cuts_path: Path,
    split_dir: Path,
    *,
    sample_rate: int,
    shard_mb: float,
    max_per_shard: int | None,
    min_shards: int,
    settings: dict,
    jobs: int = 1,
    log=print,
    progress_stream=None,
) -> SplitReport:
    """Writes the shards of one split from its cuts manifest with `jobs` writer processes; keeps matching shards."""
    import multiprocessing

    from lhotse import CutSet

    report = SplitReport(split=split, index=str(split_dir / "index.json"))
    histogram: list[int] = []
    total = [0.0]

    def durations():
        for c in CutSet.from_jsonl_lazy(cuts_path):
            b = int(c.duration / HISTOGRAM_BIN_SECONDS)
            histogram.extend([0] * (b + 1 - len(histogram)))
            histogram[b] += 1
            total[0] += c.duration
            yield c.duration

    sizes = plan_shards(
        durations(), sample_rate=sample_rate, shard_mb=shard_mb, max_per_shard=max_per_shard, min_shards=min_shards
    )
    if not sizes:
        raise DataError(f"split {split!r} has no cuts ({cuts_path}); lower --min-seconds or check the corpus")
    previous = _previous_entries(split_dir)
    entries: dict[int, dict] = {}
    progress = Progress(split, len(sizes), total[0], stream=progress_stream)
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) if jobs > 1 else _Inline()
    pending: deque[tuple[int, Future]] = deque()

    def collect(limit: int) -> None:
        while len(pending) > limit:
            number, fut = pending.popleft()
            entry, written = fut.result()
            entries[number] = entry
            report.written += written
            report.skipped += not written
            progress.update(entry["seconds"], written)
            if written:  # progress survives an interrupted run: the next run skips what is here
                write_json_atomic(
                    split_dir / "index.partial.json",
                    index_dict(split, sample_rate, [entries[k] for k in sorted(entries)], histogram, settings),
                )

    with pool:
        cut_iter = iter(CutSet.from_jsonl_lazy(cuts_path))
        for number, size in enumerate(sizes):
            group = [cut_spec(next(cut_iter)) for _ in range(size)]
            path = split_dir / (SHARD_PATTERN % number)
            pending.append(
                (
                    number,
                    pool.submit(
                        ensure_shard, str(path), group, _keys_digest(group), previous.get(path.name), sample_rate
                    ),
                )
            )
            collect(2 * jobs)
        collect(0)
    ordered = [entries[k] for k in range(len(sizes))]
    # shards of an older, larger plan would be picked up by nothing, but confuse people
    for stale in split_dir.glob("shard-[0-9][0-9][0-9][0-9][0-9][0-9].tar*"):
        if int(stale.name[6:12]) >= len(sizes) or stale.name.endswith(".tmp"):
            stale.unlink()
    write_json_atomic(split_dir / "index.json", index_dict(split, sample_rate, ordered, histogram, settings))
    (split_dir / "index.partial.json").unlink(missing_ok=True)
    report.shards = len(ordered)
    report.samples = sum(e["samples"] for e in ordered)
    report.seconds = sum(e["seconds"] for e in ordered)
    report.bytes = sum(e["bytes"] for e in ordered)
    log(
        f"{split}: {report.shards} shards ({report.written} written, {report.skipped} already there), "
        f"{report.samples} cuts, {report.seconds / 3600:.3f} h, {report.bytes / 1e6:.1f} MB -> {report.index}"
    )
    return report


def shard_corpus(
    corpus_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    corpus: str | Corpus = DEFAULT_CORPUS,
    max_seconds: float = 20.0,
    min_seconds: float = 1.0,
    shard_mb: float = 1024.0,
    max_per_shard: int | None = None,
    min_shards: int = 8,
    valid_speakers: int | None = 1,
    valid_fraction: float | None = None,
    sample_rate: int = 16000,
    jobs: int = 1,
    log: Callable = print,
    progress_stream=None,
) -> dict[str, SplitReport]:
    """The whole pipeline for `corpus` (a name under istack_ds/data/corpora/, or a corpus object) in `corpus_dir`.

    Returns a report per split (`train`, and `valid` when speakers are held out).
    """
    out_dir = Path(out_dir)
    prepared = get_corpus(corpus).prepare(
        corpus_dir,
        out_dir,
        max_seconds=max_seconds,
        min_seconds=min_seconds,
        valid_speakers=valid_speakers,
        valid_fraction=valid_fraction,
        jobs=max(4, jobs),
        log=log,
    )
    settings = {
        "max_seconds": max_seconds,
        "min_seconds": min_seconds,
        "shard_mb": shard_mb,
        "max_per_shard": max_per_shard,
        "min_shards": min_shards,
        **prepared.settings,
        "corpus": str(Path(corpus_dir).resolve()),
    }
    return {
        split: shard_split(
            split,
            Path(path),
            out_dir / split,
            sample_rate=sample_rate,
            shard_mb=shard_mb,
            max_per_shard=max_per_shard,
            min_shards=min_shards,
            settings={**settings, "split": split},
            jobs=jobs,
            log=log,
            progress_stream=progress_stream,
        )
        for split, path in prepared.splits.items()
    }


# ---- checking shards back ------------------------------------------------------------


def check_shard(shard: ShardInfo, sample_rate: int, decode: bool = True) -> tuple[list[tuple[str, str]], int]:
    """Problems [(where, why)] of one shard and the number of samples read (tools/check_shards.py)."""
    where = shard.path
    if not Path(where).is_file():
        return [(where, "missing on disk")], 0
    problems = []
    size = Path(where).stat().st_size
    if size != shard.bytes:
        problems.append((where, f"size {size} != index {shard.bytes}"))
    digest = file_sha256(where)
    if digest != shard.sha256:
        problems.append((where, f"sha256 {digest[:12]}... != index {shard.sha256[:12]}..."))
    if not decode:
        return problems, 0
    errors: list[str] = []
    n = 0
    for sample in iter_tar_samples(where, lambda reason, msg: errors.append(f"{reason}: {msg}")):
        n += 1
        try:
            _audio, meta = decode_member(sample, sample_rate)
            if meta.get("id") != sample["__key__"]:
                raise BadMember("bad_json", f"{sample['__key__']}: json id {meta.get('id')!r} differs from the key")
        except BadMember as e:
            problems.append((where, str(e)))  # the message starts with the member's key
    problems += [(where, e) for e in errors]
    if n != shard.samples:
        problems.append((where, f"{n} samples read, index says {shard.samples}"))
    return problems, n
