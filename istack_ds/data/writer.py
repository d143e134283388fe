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

Across machines (``--part I/N``): every job plans every split the same way (same corpus and
settings, same plan), walks all its cuts (so duplicate keys are found as in one run) and writes only
the shards numbered ``k`` with ``k % N == I - 1`` (round robin: each job gets shards of every size),
then ``OUT/<split>/index.part-I-of-N.json``: an index of its shards plus the plan every job made
(``part``: index, of, and the planned ``keys_sha256`` of every shard). :func:`merge_parts` checks
that all N are there, made with the same settings and plan, each shard present once, on disk with
its size and holding the planned keys (so no key is in two shards), and writes the ``index.json`` one
unsplit run writes, byte for byte.

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
import re
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING

from istack_ds.data.corpora import Corpus, Skipped, default_max_seconds, detect_layout, get_corpus
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
#: The index of one job's part of a split sharded over machines (``--part I/N``).
PART_INDEX = "index.part-{i}-of-{n}.json"
PART_INDEX_RE = re.compile(r"^index\.part-(\d+)-of-(\d+)\.json$")
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
    shard_seconds: list[float] = field(default_factory=list)
    """Planned seconds of audio per shard."""


def plan_split(
    split: str, cuts_path: Path, *, sample_rate: int, shard_mb: float, max_per_shard: int | None, min_shards: int
) -> SplitPlan:
    """The first pass over a split's cuts manifest (lazily): :func:`plan_shards` and what the index needs."""
    from lhotse import CutSet

    histogram: list[int] = []
    total = [0.0]
    keys = array("Q")
    seen = array("f")  # 4 bytes a cut: the per-shard seconds a job of a --part run shows progress against

    def durations():
        for c in CutSet.from_jsonl_lazy(cuts_path):
            b = int(c.duration / HISTOGRAM_BIN_SECONDS)
            histogram.extend([0] * (b + 1 - len(histogram)))
            histogram[b] += 1
            total[0] += c.duration
            keys.extend(key_hashes([c.id]))
            seen.append(c.duration)
            yield c.duration

    sizes = plan_shards(
        durations(), sample_rate=sample_rate, shard_mb=shard_mb, max_per_shard=max_per_shard, min_shards=min_shards
    )
    if not sizes:
        raise DataError(f"split {split!r} has no cuts ({cuts_path}); lower --min-seconds or check the corpus")
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    shard_seconds = [float(sum(seen[a:b])) for a, b in zip(bounds, bounds[1:])]
    return SplitPlan(split, Path(cuts_path), sizes, histogram, total[0], keys, shard_seconds)


def _previous_entries(split_dir: Path) -> dict[str, dict]:
    """Shard entries of the indexes already in a split's directory (whole, part and partial ones), by shard name.

    NOTE: an entry is only a candidate: ensure_shard keeps a shard only when its file still
    matches the entry (size, sha256) and the plan (keys_sha256), wherever the entry came from.
    """
    entries: dict[str, dict] = {}
    whole = ["index.json", *sorted(p.name for p in split_dir.glob("index.part-*.json") if PART_INDEX_RE.match(p.name))]
    for name in whole + [n.removesuffix(".json") + ".partial.json" for n in whole]:  # the partial ones (newer) win
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


def parse_part(text: str) -> tuple[int, int]:
    """``"3/8"`` -> (3, 8); raises DataError unless 1 <= I <= N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise DataError(f"--part {text!r}: expected I/N with 1 <= I <= N, e.g. 3/8")
    return int(m[1]), int(m[2])


def part_of(number: int, parts: int) -> int:
    """The part (1-based) that writes shard `number` when a split is sharded in `parts` parts: round robin."""
    return number % parts + 1


def shard_split(
    plan: SplitPlan,
    split_dir: Path,
    *,
    sample_rate: int,
    settings: dict,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    keys: KeyRegistry | None = None,
    jobs: int = 1,
    part: tuple[int, int] | None = None,
    log=print,
    progress_stream=None,
) -> SplitReport:
    """Writes the shards of one planned split with `jobs` writer processes; keeps matching shards.

    A cut whose key `keys` has met before (in this split or an earlier one) is left out and
    counted as duplicate_key; `keys` defaults to this split's own keys. Raises DataError when
    every cut was left out. With `part` (I, N) only the shards of part I are written, and
    ``index.part-I-of-N.json`` instead of index.json (see the module docstring).
    """
    import multiprocessing

    from lhotse import CutSet

    split = plan.split
    keys = keys if keys is not None else KeyRegistry([plan.keys])
    mine = [k for k in range(len(plan.sizes)) if part is None or part_of(k, part[1]) == part[0]]
    index_name = "index.json" if part is None else PART_INDEX.format(i=part[0], n=part[1])
    partial_name = index_name.removesuffix(".json") + ".partial.json"
    report = SplitReport(split=split, index=str(split_dir / index_name))
    previous = _previous_entries(split_dir)
    entries: dict[int, dict] = {}
    planned: list[str] = []  # keys_sha256 of every shard of the plan, this part's or not
    label = split if part is None else f"{split} part {part[0]}/{part[1]}"
    progress = Progress(
        label, len(mine), sum(plan.shard_seconds[k] for k in mine) if part else plan.seconds, stream=progress_stream
    )
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) if jobs > 1 else _Inline()
    pending: deque[tuple[int, Future]] = deque()
    block = {} if part is None else {"part": {"index": part[0], "of": part[1], "keys_sha256": planned}}

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
                    split_dir / partial_name,
                    index_dict(split, sample_rate, [entries[k] for k in sorted(entries)], plan.histogram, settings),
                )

    with pool:
        cut_iter = iter(CutSet.from_jsonl_lazy(plan.cuts_path))
        own = set(mine)
        for number, size in enumerate(plan.sizes):
            path = split_dir / (SHARD_PATTERN % number)
            where = f"{split}/{path.name}"
            group, dropped = [], []
            for _ in range(size):  # NOTE: every shard's cuts, so that keys are first met where one run meets them
                spec = cut_spec(next(cut_iter))
                before = keys.first_seen(spec["id"], where)
                if before is None:
                    group.append(spec)
                else:
                    why = f"{spec['path']} from {spec['start']} s; the key is already in {before}"
                    dropped.append({"reason": "duplicate_key", "name": spec["id"], "why": why})
            digest = _keys_digest(group, dropped)
            planned.append(digest)
            if number not in own:
                continue
            args = (str(path), group, digest, previous.get(path.name), sample_rate)
            pending.append((number, pool.submit(ensure_shard, *args, max_member_bytes, dropped)))
            collect(2 * jobs)
        collect(0)
    ordered = [entries[k] for k in mine]
    for e in ordered:
        report.members_skipped.update(e.get("skipped"))
    report.samples = sum(e["samples"] for e in ordered)
    if not report.samples and part is None:
        left_out = report.members_skipped.line("cuts")
        raise DataError(f"split {split!r}: no cut was written ({plan.cuts_path}); {left_out}")
    if part is None:
        _remove_stale_shards(split_dir, len(plan.sizes))
    settings = {**settings, "skipped_members": report.members_skipped.to_dict()}
    index = index_dict(split, sample_rate, ordered, plan.histogram, settings)
    write_json_atomic(split_dir / index_name, {**index, **block})
    (split_dir / partial_name).unlink(missing_ok=True)
    report.shards = len(ordered)
    report.seconds = sum(e["seconds"] for e in ordered)
    report.bytes = sum(e["bytes"] for e in ordered)
    log(
        f"{label}: {report.shards} shards ({report.written} written, {report.skipped} already there), "
        f"{report.samples} cuts, {report.seconds / 3600:.3f} h, {report.bytes / 1e6:.1f} MB -> {report.index}"
    )
    return report


def _remove_stale_shards(split_dir: Path, shards: int) -> None:
    # shards of an older, larger plan would be picked up by nothing, but confuse people
    for stale in split_dir.glob("shard-[0-9][0-9][0-9][0-9][0-9][0-9].tar*"):
        if int(stale.name[6:12]) >= shards or stale.name.endswith(".tmp"):
            stale.unlink()


def shard_corpus(
    corpus_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    corpus: str | Corpus | None = None,
    max_seconds: float | None = None,
    min_seconds: float = 1.0,
    shard_mb: float = 1024.0,
    max_per_shard: int | None = None,
    min_shards: int = 8,
    valid_speakers: int | None = 1,
    valid_fraction: float | None = None,
    sample_rate: int = 16000,
    jobs: int = 1,
    part: tuple[int, int] | None = None,
    log: Callable = print,
    progress_stream=None,
) -> dict[str, SplitReport]:
    """The whole pipeline for `corpus` (a name under istack_ds/data/corpora/, or a corpus object) in `corpus_dir`.

    `corpus` None: :func:`~istack_ds.data.corpora.detect_layout` names it; `max_seconds` None: the
    corpus module's default. `part` (I, N): only part I of N of every split's shards and
    ``index.part-I-of-N.json`` (:func:`merge_parts` writes index.json once all N are done).
    Returns a report per split (`train`, and `valid` when held out); its last log lines name
    what was left out: the source files and, per split, the cuts.
    """
    out_dir = Path(out_dir)
    if part is not None and not 1 <= part[0] <= part[1]:
        raise DataError(f"part {part[0]}/{part[1]}: expected I/N with 1 <= I <= N")
    if max_seconds is not None and 2 * max_seconds * sample_rate > MAX_MEMBER_BYTES:
        raise DataError(
            f"max_seconds={max_seconds}: a window would hold more than {MAX_MEMBER_BYTES} bytes of 16-bit PCM at "
            f"{sample_rate} Hz, above what a shard reader takes (tario.MAX_MEMBER_BYTES); use shorter windows"
        )
    if corpus is None:
        corpus = detect_layout(corpus_dir)
        log(f"layout: {corpus} (recognised in {corpus_dir}; --layout names another)")
    if max_seconds is None:
        max_seconds = default_max_seconds(corpus)
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
            part=part,
            log=log,
            progress_stream=progress_stream,
        )
        reports[plan.split].sources_skipped = prepared.skipped
    log(prepared.skipped.line("source files"))
    for split, report in reports.items():
        log(f"{split}: " + report.members_skipped.line("cuts"))
    if part is not None:
        log(f"part {part[0]}/{part[1]} done; once every part is: istack shard --merge --out {out_dir}")
    return reports


def merge_parts(out_dir: str | os.PathLike, *, log: Callable = print) -> dict[str, SplitReport]:
    """OUT/<split>/index.json from the part indexes of a sharding split over machines; returns a report per split.

    Raises DataError naming the part file when a part is missing or unfinished, was made with
    other settings or another plan, or one of its shards is missing, changed or claimed twice.
    """
    out_dir = Path(out_dir)
    split_dirs = sorted({p.parent for p in out_dir.glob("*/index.part-*.json") if PART_INDEX_RE.match(p.name)})
    if not split_dirs:
        raise DataError(f"{out_dir}: no part index (<split>/index.part-I-of-N.json) to merge; run istack shard --part")
    split_dirs.sort(key=lambda d: ({"train": 0, "valid": 1}.get(d.name, 2), d.name))
    reports = {}
    sources = Skipped()
    for split_dir in split_dirs:
        reports[split_dir.name], sources = _merge_split(split_dir, log)
    log(sources.line("source files"))
    for split, report in reports.items():
        log(f"{split}: " + report.members_skipped.line("cuts"))
    return reports


def _merge_split(split_dir: Path, log: Callable) -> tuple[SplitReport, Skipped]:
    found = {p.name: PART_INDEX_RE.match(p.name) for p in split_dir.glob("index.part-*.json")}
    counts = sorted({int(m[2]) for m in found.values() if m})
    if len(counts) != 1:
        names = sorted(n for n, m in found.items() if m)
        raise DataError(
            f"{split_dir}: part indexes of {len(counts)} different part counts {counts} ({', '.join(names)}); "
            "delete those of the split you no longer use"
        )
    n = counts[0]
    raws = []
    for i in range(1, n + 1):
        path = split_dir / PART_INDEX.format(i=i, n=n)
        if not path.is_file():
            unfinished = path.with_name(path.name.removesuffix(".json") + ".partial.json").is_file()
            raise DataError(
                f"{path}: part {i} of {n} is missing"
                + (" (unfinished: its partial index is there)" if unfinished else "")
                + f"; run istack shard ... --part {i}/{n} (a rerun keeps its finished shards)"
            )
        try:
            raw = json.loads(path.read_text())
            block = raw["part"]
            assert (block["index"], block["of"]) == (i, n), f"it says part {block['index']}/{block['of']}"
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as err:
            raise DataError(f"{path}: not a part index written by istack shard --part ({err})") from None
        raws.append((path, raw))
    ref_path, ref = raws[0]
    same = ("format", "split", "sample_rate", "duration_histogram")
    planned = ref["part"]["keys_sha256"]
    for path, raw in raws[1:]:
        differ = [k for k in same if raw.get(k) != ref.get(k)]
        mine, theirs = ({k: v for k, v in r["settings"].items() if k != "skipped_members"} for r in (raw, ref))
        differ += [f"settings.{k}" for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        if raw["part"]["keys_sha256"] != planned:
            differ.append("the shard plan (another corpus, manifests or sharding settings)")
        if differ:
            raise DataError(
                f"{path} was made with other settings than {ref_path.name}: {', '.join(differ)}; rerun the parts "
                "that differ with the same corpus and settings"
            )
    entries: dict[int, dict] = {}
    for path, raw in raws:
        i = raw["part"]["index"]
        for e in raw["shards"]:
            m = re.fullmatch(r"shard-(\d{6})\.tar", str(e.get("path", "")))
            k = int(m[1]) if m else -1
            if not 0 <= k < len(planned) or part_of(k, n) != i or k in entries:
                raise DataError(f"{path}: shard {e.get('path')} is not part {i}'s (or is listed twice)")
            shard = split_dir / e["path"]
            if not shard.is_file() or shard.stat().st_size != e["bytes"]:
                raise DataError(f"{path}: shard {shard} is missing or not the size the part wrote; rerun part {i}/{n}")
            if e.get("keys_sha256") != planned[k]:
                raise DataError(f"{path}: shard {e['path']} does not hold the planned keys; rerun part {i}/{n}")
            entries[k] = e
    missing = [k for k in range(len(planned)) if k not in entries]
    if missing:
        k = missing[0]
        raise DataError(
            f"{split_dir / PART_INDEX.format(i=part_of(k, n), n=n)} lacks shard {SHARD_PATTERN % k} "
            f"({len(missing)} planned shards missing); rerun part {part_of(k, n)}/{n}"
        )
    ordered = [entries[k] for k in range(len(planned))]
    split = str(ref["split"])
    report = SplitReport(split=split, index=str(split_dir / "index.json"))
    for e in ordered:
        report.members_skipped.update(e.get("skipped"))
    report.samples = sum(e["samples"] for e in ordered)
    if not report.samples:
        raise DataError(f"split {split!r}: no cut was written in any of the {n} parts ({split_dir})")
    _remove_stale_shards(split_dir, len(planned))
    settings = {**ref["settings"], "skipped_members": report.members_skipped.to_dict()}
    counts_hist = ref["duration_histogram"]["counts"]
    write_json_atomic(split_dir / "index.json", index_dict(split, ref["sample_rate"], ordered, counts_hist, settings))
    report.shards = len(ordered)
    report.seconds = sum(e["seconds"] for e in ordered)
    report.bytes = sum(e["bytes"] for e in ordered)
    log(
        f"{split}: merged {n} parts: {report.shards} shards, {report.samples} cuts, {report.seconds / 3600:.3f} h, "
        f"{report.bytes / 1e6:.1f} MB -> {report.index}"
    )
    report.sources_skipped = Skipped.from_dict(ref["settings"].get("skipped_sources") or {})
    return report, report.sources_skipped


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
