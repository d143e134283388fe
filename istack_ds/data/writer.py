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

A cut is left out, never written in part, and counted by one of
:data:`WRITE_SKIP_REASONS` when its source audio does not decode, it holds fewer
than :data:`~istack_ds.data.tario.MIN_MEMBER_SAMPLES` samples, its FLAC is above
:func:`member_byte_cap`, or its key was already written (in this split or an earlier
one). Each shard's index entry records its skips (``skipped``), so a re-run that keeps
the shard reports them again; each split's index records the sum
(``settings.skipped_members``) and the corpus's skipped source files
(``settings.skipped_sources``), and the run prints both.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING

from istack_ds.data.corpora import DEFAULT_CORPUS, Corpus, Skipped, get_corpus
from istack_ds.data.index import HISTOGRAM_BIN_SECONDS, DataError, ShardInfo, file_sha256, index_dict, write_json_atomic
from istack_ds.data.progress import Progress
from istack_ds.data.tario import (
    MAX_MEMBER_BYTES,
    MIN_MEMBER_SAMPLES,
    BadMember,
    MemberWriter,
    decode_member,
    encode_flac,
    iter_tar_samples,
    tar_keys,
    to_mono_rate,
)

if TYPE_CHECKING:
    import numpy as np

SHARD_PATTERN = "shard-%06d.tar"
#: Keys of a member's json that the writer sets; a cut's custom metadata cannot use them.
MEMBER_KEYS = ("id", "offset", "duration", "sample_rate")
#: Why the writer left a cut out (the keys of ``skipped.by_reason`` in index.json).
WRITE_SKIP_REASONS = ("undecodable_flac", "too_short", "too_large", "duplicate_key")


def member_byte_cap(max_seconds: float, sample_rate: int) -> int:
    """The largest FLAC the writer puts in a member: twice the 16-bit PCM of a `max_seconds` window, plus 4 KiB.

    NOTE: 16-bit FLAC is never much larger than its PCM, so only a cut far longer than
    max_seconds (a corpus breaking its contract) reaches the cap; it never exceeds what
    the reader takes (MAX_MEMBER_BYTES).
    """
    return min(MAX_MEMBER_BYTES, 2 * 2 * math.ceil(max_seconds * sample_rate) + 4096)


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


def _keys_digest(cuts: list[dict], dropped: list[dict]) -> str:
    lines = "".join(f"{c['id']} {c['start']:.4f} {c['duration']:.4f}\n" for c in cuts)
    lines += "".join(f"{d['reason']} {d['name']}\n" for d in dropped)  # none dropped: the digest it always had
    return hashlib.sha256(lines.encode()).hexdigest()


def key_hashes(keys: Iterable[str]) -> array:
    """A stable 64-bit hash per key (blake2b), 8 bytes each: what duplicate detection keeps of every key."""
    return array("Q", (int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys))


def repeated_hashes(hashes: Iterable[array]) -> set[int]:
    """The hashes found more than once over all `hashes` (the keys that may be duplicates; compare the keys)."""
    import numpy as np

    parts = [np.frombuffer(h, dtype=np.uint64) for h in hashes if len(h)]
    if not parts:
        return set()
    a = np.sort(np.concatenate(parts))
    return {int(x) for x in np.unique(a[1:][a[1:] == a[:-1]])}


class KeyRegistry:
    """Which member keys were met before, over the splits of one sharding run: exact, 8 bytes per key.

    Built from every split's key hashes (:func:`key_hashes`) before any is written; only keys
    whose hash repeats are then kept, with where they were first met.
    """

    def __init__(self, hashes: Iterable[array] = ()):
        self._repeated = repeated_hashes(hashes)
        self._first: dict[str, str] = {}

    def first_seen(self, key: str, where: str) -> str | None:
        """Where `key` was met before (None the first time); records `where` for a first meeting."""
        if not self._repeated:
            return None
        (h,) = key_hashes([key])
        if h not in self._repeated:
            return None
        if key in self._first:
            return self._first[key]
        self._first[key] = where
        return None


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


def read_windows(cuts: list[dict], sample_rate: int) -> Iterator[tuple[dict, np.ndarray | None, str]]:
    """(cut, float32 mono audio at `sample_rate`, "") per cut, or (cut, None, why) when its source does not decode.

    Each source file is opened once and its windows read by seeking; a window that cannot
    be read in full (an error, or the body ends more than 1 ms short of it) gives None. A
    source file that is gone raises DataError: the manifests no longer match the corpus.
    """
    import numpy as np
    import soundfile as sf

    for path, grouped in groupby(cuts, key=lambda c: c["path"]):
        group = list(grouped)
        if not os.path.exists(path):
            raise DataError(
                f"{path}: source of cut {group[0]['id']} is missing; restore it, or delete the split's "
                "cuts.jsonl.gz and the manifests that name it to prepare the corpus again"
            )
        try:
            f = sf.SoundFile(path)
        except Exception as e:  # noqa: BLE001 -- soundfile raises several types on junk
            for c in group:
                yield c, None, f"{path}: {e}"
            continue
        with f:
            slack = f.samplerate // 1000 + 1  # the window's 0.1 ms rounding can ask for a frame past the end
            for c in group:
                want = int(round(c["duration"] * f.samplerate))
                try:
                    f.seek(int(round(c["start"] * f.samplerate)))
                    audio = f.read(want, dtype="float32", always_2d=True)
                except Exception as e:  # noqa: BLE001 -- a body that does not decode is a counted skip
                    yield c, None, f"{path}: {e}"
                    continue
                if len(audio) < want - slack:
                    yield c, None, f"{path}: {len(audio)} of {want} frames decode from {c['start']} s"
                    continue
                yield c, np.clip(to_mono_rate(audio, f.samplerate, sample_rate), -1.0, 1.0), ""


def write_shard(
    path: Path, cuts: list[dict], sample_rate: int, max_member_bytes: int = MAX_MEMBER_BYTES, dropped=()
) -> dict:
    """Writes one shard, member by member (to a temp name, renamed when complete); returns its index entry.

    A cut whose audio does not decode, is shorter than MIN_MEMBER_SAMPLES or encodes to more
    than `max_member_bytes` is left out; those and `dropped` ({"reason", "name", "why"} of
    cuts left out before, e.g. duplicate keys) are the entry's ``skipped`` (only when any).
    """
    tmp = path.with_name(path.name + ".tmp")
    samples, seconds = 0, 0.0
    skipped = Skipped()
    for d in dropped:
        skipped.add(d["reason"], d["name"], d["why"])
    with open(tmp, "wb") as f, MemberWriter(f, sample_rate) as members:
        for cut, audio, why in read_windows(cuts, sample_rate):
            if audio is None:
                skipped.add("undecodable_flac", cut["id"], why)
                continue
            if len(audio) < MIN_MEMBER_SAMPLES:
                skipped.add("too_short", cut["id"], f"{len(audio)} samples, fewer than {MIN_MEMBER_SAMPLES}")
                continue
            flac = encode_flac(audio, sample_rate)
            if len(flac) > max_member_bytes:
                skipped.add("too_large", cut["id"], f"{len(flac)} bytes of flac, above {max_member_bytes}")
                continue
            # NOTE: the key order is part of the shard's bytes (and of its sha256 in the index)
            meta = {
                "id": cut["id"],
                **cut["custom"],
                "offset": cut["start"],
                "duration": round(len(audio) / sample_rate, 4),
                "sample_rate": sample_rate,
            }
            members.write_encoded(cut["id"], flac, meta)
            samples += 1
            seconds += len(audio) / sample_rate
    os.replace(tmp, path)
    entry = {
        "path": path.name,
        "samples": samples,
        "seconds": round(seconds, 4),
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
    }
    if skipped.count:
        entry["skipped"] = skipped.to_dict()
    return entry


def ensure_shard(
    path: str,
    cuts: list[dict],
    digest: str,
    old: dict | None,
    sample_rate: int,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    dropped=(),
) -> tuple[dict, bool]:
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
    entry = write_shard(p, cuts, sample_rate, max_member_bytes, dropped)
    entry["keys_sha256"] = digest
    return entry, True


@dataclass
class SplitReport:
    split: str
    shards: int = 0
    written: int = 0
    skipped: int = 0
    """Shards already there (kept, not written)."""
    samples: int = 0
    seconds: float = 0.0
    bytes: int = 0
    index: str = ""
    members_skipped: Skipped = field(default_factory=Skipped)
    """Cuts of this split left out of its shards, by reason (WRITE_SKIP_REASONS)."""
    sources_skipped: Skipped = field(default_factory=Skipped)
    """Source files the corpus's preparation left out (the whole corpus, every split alike)."""


@dataclass
class SplitPlan:
    """What the first pass over a split's cuts found: shard sizes, duration histogram, total, key hashes."""

    split: str
    cuts_path: Path
    sizes: list[int]
    histogram: list[int]
    seconds: float
    keys: array
    """:func:`key_hashes` of the cut ids, for duplicate detection across splits."""


def plan_split(
    split: str, cuts_path: Path, *, sample_rate: int, shard_mb: float, max_per_shard: int | None, min_shards: int
) -> SplitPlan:
    """The first pass over a split's cuts manifest (lazily): :func:`plan_shards` and what the index needs."""
    from lhotse import CutSet

    histogram: list[int] = []
    total = [0.0]
    keys = array("Q")

    def durations():
        for c in CutSet.from_jsonl_lazy(cuts_path):
            b = int(c.duration / HISTOGRAM_BIN_SECONDS)
            histogram.extend([0] * (b + 1 - len(histogram)))
            histogram[b] += 1
            total[0] += c.duration
            keys.extend(key_hashes([c.id]))
            yield c.duration

    sizes = plan_shards(
        durations(), sample_rate=sample_rate, shard_mb=shard_mb, max_per_shard=max_per_shard, min_shards=min_shards
    )
    if not sizes:
        raise DataError(f"split {split!r} has no cuts ({cuts_path}); lower --min-seconds or check the corpus")
    return SplitPlan(split, Path(cuts_path), sizes, histogram, total[0], keys)


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
    plan: SplitPlan,
    split_dir: Path,
    *,
    sample_rate: int,
    settings: dict,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    keys: KeyRegistry | None = None,
    jobs: int = 1,
    log=print,
    progress_stream=None,
) -> SplitReport:
    """Writes the shards of one planned split with `jobs` writer processes; keeps matching shards.

    A cut whose key `keys` has met before (in this split or an earlier one) is left out and
    counted as duplicate_key; `keys` defaults to this split's own keys. Raises DataError when
    every cut was left out.
    """
    import multiprocessing

    from lhotse import CutSet

    split = plan.split
    keys = keys if keys is not None else KeyRegistry([plan.keys])
    report = SplitReport(split=split, index=str(split_dir / "index.json"))
    previous = _previous_entries(split_dir)
    entries: dict[int, dict] = {}
    progress = Progress(split, len(plan.sizes), plan.seconds, stream=progress_stream)
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) if jobs > 1 else _Inline()
    pending: deque[tuple[int, Future]] = deque()

    def collect(limit: int) -> None:
        while len(pending) > limit:
            number, fut = pending.popleft()
            entry, written = fut.result()
            entries[number] = entry
            report.written += written
            report.skipped += not written
            progress.update(entry["seconds"], written, entry.get("skipped", {}).get("count", 0))
            if written:  # progress survives an interrupted run: the next run skips what is here
                write_json_atomic(
                    split_dir / "index.partial.json",
                    index_dict(split, sample_rate, [entries[k] for k in sorted(entries)], plan.histogram, settings),
                )

    with pool:
        cut_iter = iter(CutSet.from_jsonl_lazy(plan.cuts_path))
        for number, size in enumerate(plan.sizes):
            path = split_dir / (SHARD_PATTERN % number)
            where = f"{split}/{path.name}"
            group, dropped = [], []
            for _ in range(size):
                spec = cut_spec(next(cut_iter))
                before = keys.first_seen(spec["id"], where)
                if before is None:
                    group.append(spec)
                else:
                    why = f"{spec['path']} from {spec['start']} s; the key is already in {before}"
                    dropped.append({"reason": "duplicate_key", "name": spec["id"], "why": why})
            args = (str(path), group, _keys_digest(group, dropped), previous.get(path.name), sample_rate)
            pending.append((number, pool.submit(ensure_shard, *args, max_member_bytes, dropped)))
            collect(2 * jobs)
        collect(0)
    ordered = [entries[k] for k in range(len(plan.sizes))]
    for e in ordered:
        report.members_skipped.update(e.get("skipped"))
    report.samples = sum(e["samples"] for e in ordered)
    if not report.samples:
        left_out = report.members_skipped.line("cuts")
        raise DataError(f"split {split!r}: no cut was written ({plan.cuts_path}); {left_out}")
    # shards of an older, larger plan would be picked up by nothing, but confuse people
    for stale in split_dir.glob("shard-[0-9][0-9][0-9][0-9][0-9][0-9].tar*"):
        if int(stale.name[6:12]) >= len(plan.sizes) or stale.name.endswith(".tmp"):
            stale.unlink()
    settings = {**settings, "skipped_members": report.members_skipped.to_dict()}
    write_json_atomic(split_dir / "index.json", index_dict(split, sample_rate, ordered, plan.histogram, settings))
    (split_dir / "index.partial.json").unlink(missing_ok=True)
    report.shards = len(ordered)
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

    Returns a report per split (`train`, and `valid` when speakers are held out); its last
    log lines name what was left out: the source files and, per split, the cuts.
    """
    out_dir = Path(out_dir)
    if 2 * max_seconds * sample_rate > MAX_MEMBER_BYTES:
        raise DataError(
            f"max_seconds={max_seconds}: a window would hold more than {MAX_MEMBER_BYTES} bytes of 16-bit PCM at "
            f"{sample_rate} Hz, above what a shard reader takes (tario.MAX_MEMBER_BYTES); use shorter windows"
        )
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
        "skipped_sources": prepared.skipped.to_dict(),
    }
    plans = [
        plan_split(
            split,
            Path(path),
            sample_rate=sample_rate,
            shard_mb=shard_mb,
            max_per_shard=max_per_shard,
            min_shards=min_shards,
        )
        for split, path in prepared.splits.items()
    ]
    keys = KeyRegistry(p.keys for p in plans)  # NOTE: before any split is written: a key is kept where first met
    reports = {}
    for plan in plans:
        reports[plan.split] = shard_split(
            plan,
            out_dir / plan.split,
            sample_rate=sample_rate,
            settings={**settings, "split": plan.split},
            max_member_bytes=member_byte_cap(max_seconds, sample_rate),
            keys=keys,
            jobs=jobs,
            log=log,
            progress_stream=progress_stream,
        )
        reports[plan.split].sources_skipped = prepared.skipped
    log(prepared.skipped.line("source files"))
    for split, report in reports.items():
        log(f"{split}: " + report.members_skipped.line("cuts"))
    return reports


# ---- checking shards back ------------------------------------------------------------


@dataclass
class ShardCheck:
    """What :func:`check_shard` found in one shard."""

    problems: list[tuple[str, str]]
    """(where, why) of each problem."""
    samples: int
    """Members read (0 without decoding)."""
    keys: array
    """:func:`key_hashes` of its member keys, in order (for duplicates across shards: :func:`duplicate_keys`)."""


def check_shard(shard: ShardInfo, sample_rate: int, decode: bool = True) -> ShardCheck:
    """Problems of one shard, the samples read, and its key hashes (tools/check_shards.py)."""
    where = shard.path
    if not Path(where).is_file():
        return ShardCheck([(where, "missing on disk")], 0, array("Q"))
    problems = []
    size = Path(where).stat().st_size
    if size != shard.bytes:
        problems.append((where, f"size {size} != index {shard.bytes}"))
    digest = file_sha256(where)
    if digest != shard.sha256:
        problems.append((where, f"sha256 {digest[:12]}... != index {shard.sha256[:12]}..."))
    if not decode:
        return ShardCheck(problems, 0, key_hashes(tar_keys(where)))
    errors: list[str] = []
    n = 0
    keys: list[str] = []
    for sample in iter_tar_samples(where, lambda reason, msg: errors.append(f"{reason}: {msg}")):
        n += 1
        keys.append(sample["__key__"])
        try:
            _audio, meta = decode_member(sample, sample_rate)
            if meta.get("id") != sample["__key__"]:
                raise BadMember("bad_json", f"{sample['__key__']}: json id {meta.get('id')!r} differs from the key")
        except BadMember as e:
            problems.append((where, str(e)))  # the message starts with the member's key
    problems += [(where, e) for e in errors]
    if n != shard.samples:
        problems.append((where, f"{n} samples read, index says {shard.samples}"))
    return ShardCheck(problems, n, key_hashes(keys))


def duplicate_keys(shards: list[str], hashes: list[array]) -> list[tuple[str, str, str]]:
    """(shard, key, first shard) for each member whose key an earlier member (of that or an earlier shard) has.

    `hashes` are the shards' :func:`key_hashes`; only shards holding a repeated hash are
    listed again (headers only), so the keys compared are exact.
    """
    repeated = repeated_hashes(hashes)
    if not repeated:
        return []
    first: dict[str, str] = {}
    out = []
    for shard, h in zip(shards, hashes):
        if repeated.isdisjoint(h):
            continue
        names = tar_keys(shard)
        for key, kh in zip(names, key_hashes(names)):
            if kh not in repeated:
                continue
            if key in first:
                out.append((shard, key, first[key]))
            else:
                first[key] = shard
    return out
