"""Cut manifests -> plain WebDataset shards + index.json per split, written in parallel, resumable.

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

Across machines (``--part I/N``) every job plans every split the same way (:mod:`istack_ds.data.plan`), walks
all its cuts (so duplicate keys are found as in one run) and writes only its part's shards; :mod:`istack_ds.data.parts`
merges the parts' indexes into the one an unsplit run writes. Checking shards back is :mod:`istack_ds.data.shard_check`.

A cut is left out, never written in part, and counted by one of
:data:`WRITE_SKIP_REASONS` when its source audio does not decode, it holds fewer
than :data:`~istack_ds.data.tario.MIN_MEMBER_SAMPLES` samples, every sample is zero (silent), its FLAC is above
:func:`member_byte_cap`, or its key was already written (in this split or an earlier
one). Each shard's index entry records its skips (``skipped``), so a re-run that keeps
the shard reports them again; each split's index records the sum
(``settings.skipped_members``) and the corpus's skipped source files
(``settings.skipped_sources``), and the run prints both.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING

from istack_ds.data.corpora import Corpus, Skipped, default_max_seconds, detect_layout, get_corpus
from istack_ds.data.index import DataError, file_sha256, index_dict, write_json_atomic
from istack_ds.data.parts import PART_INDEX, PART_INDEX_RE, SplitReport, finish_split, part_of
from istack_ds.data.plan import SHARD_PATTERN, KeyRegistry, SplitPlan, keys_digest, plan_split
from istack_ds.data.progress import Progress
from istack_ds.data.tario import MAX_MEMBER_BYTES, MIN_MEMBER_SAMPLES, MemberWriter, encode_flac, to_mono_rate

if TYPE_CHECKING:
    import numpy as np

#: Keys of a member's json that the writer sets; a cut's custom metadata cannot use them.
MEMBER_KEYS = ("id", "offset", "duration", "sample_rate")
#: Why the writer left a cut out (the keys of ``skipped.by_reason`` in index.json).
WRITE_SKIP_REASONS = ("undecodable_flac", "too_short", "silent", "too_large", "duplicate_key")


def member_byte_cap(max_seconds: float, sample_rate: int) -> int:
    """The largest FLAC the writer puts in a member: twice the 16-bit PCM of a `max_seconds` window, plus 4 KiB.

    NOTE: 16-bit FLAC is never much larger than its PCM, so only a cut far longer than
    max_seconds (a corpus breaking its contract) reaches the cap; it never exceeds what
    the reader takes (MAX_MEMBER_BYTES).
    """
    return min(MAX_MEMBER_BYTES, 2 * 2 * math.ceil(max_seconds * sample_rate) + 4096)


def check_window(max_seconds: float | None, sample_rate: int) -> None:
    """Raises DataError when a `max_seconds` window (None: not known yet) is above what a shard reader takes."""
    if max_seconds is not None and 2 * max_seconds * sample_rate > MAX_MEMBER_BYTES:
        raise DataError(
            f"max_seconds={max_seconds}: a window would hold more than {MAX_MEMBER_BYTES} bytes of 16-bit PCM at "
            f"{sample_rate} Hz, above what a shard reader takes (tario.MAX_MEMBER_BYTES); use shorter windows"
        )


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

    A cut whose audio does not decode, is shorter than MIN_MEMBER_SAMPLES, is all zeros or encodes to more
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
            if not audio.any():  # digital silence: a teacher's targets of nothing teach nothing
                skipped.add("silent", cut["id"], "every sample is zero")
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
            digest = keys_digest(group, dropped)
            planned.append(digest)
            if number not in own:
                continue
            args = (str(path), group, digest, previous.get(path.name), sample_rate)
            pending.append((number, pool.submit(ensure_shard, *args, max_member_bytes, dropped)))
            collect(2 * jobs)
        collect(0)
    ordered = [entries[k] for k in mine]
    finish_split(
        report,
        ordered,
        split_dir=split_dir,
        planned_shards=len(plan.sizes) if part is None else None,
        sample_rate=sample_rate,
        histogram=plan.histogram,
        settings=settings,
        # a part may hold no cut; merge_parts checks the whole split
        empty=None
        if part is not None
        else lambda r: f"split {split!r}: no cut was written ({plan.cuts_path}); {r.members_skipped.line('cuts')}",
        index_name=index_name,
        extra=block,
    )
    (split_dir / partial_name).unlink(missing_ok=True)
    log(
        f"{label}: {report.shards} shards ({report.written} written, {report.skipped} already there), "
        f"{report.samples} cuts, {report.seconds / 3600:.3f} h, {report.bytes / 1e6:.1f} MB -> {report.index}"
    )
    return report


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
    ``index.part-I-of-N.json`` (:func:`~istack_ds.data.parts.merge_parts` writes index.json once all N are done).
    Returns a report per split (`train`, and `valid` when held out); its last log lines name
    what was left out: the source files and, per split, the cuts.
    """
    out_dir = Path(out_dir)
    if part is not None and not 1 <= part[0] <= part[1]:
        raise DataError(f"part {part[0]}/{part[1]}: expected I/N with 1 <= I <= N")
    check_window(max_seconds, sample_rate)
    if corpus is None:
        corpus = detect_layout(corpus_dir)
        log(f"layout: {corpus} (recognised in {corpus_dir}; --layout names another)")
    if max_seconds is None:
        max_seconds = default_max_seconds(corpus)
    check_window(max_seconds, sample_rate)
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
